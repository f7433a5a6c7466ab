"""bench/common.py's statistics, which every benchmark table is read from."""

from __future__ import annotations

from bench.common import summary


def test_percentiles_are_nearest_rank_samples():
    """p90 of ten samples is the ninth (it was the tenth, the maximum)."""
    stats = summary([float(v) for v in range(10, 0, -1)])
    assert (stats["p10_s"], stats["median_s"], stats["p90_s"], stats["n"]) == (1.0, 5.5, 9.0, 10)
    assert summary([2.0])["p90_s"] == 2.0 and summary([1.0, 3.0])["p10_s"] == 1.0

"""bench/ingest's memory per user: what its summary calls the growth per recorded user."""

from __future__ import annotations

import pytest

from bench.ingest import rss_slopes

MIB = 2**20


def test_rss_per_recorded_user_is_over_the_recording_alone():
    """A --quick run's stages (MiB): the slope to 30,000 users started before
    the reads at 10,000 users, whose 1,000 newly cached profiles (the LRU not
    full) it counted as recorded users' memory: 4,666 B a user for 1,782."""
    stages = [("start", 237, 0), ("2000 recorded", 240, 2000), ("2000 read", 358, 2000), ("10000 recorded", 369, 10000),
              ("10000, 3000 read", 424, 10000), ("30000 recorded", 458, 30000)]
    slopes = rss_slopes([{"stage": s, "rss_bytes": mib * MIB, "users": u} for s, mib, u in stages])
    assert slopes["rss_bytes_per_recorded_user"] == pytest.approx((458 - 424) * MIB / 20000)
    assert slopes["rss_bytes_per_cached_profile"] == pytest.approx((358 - 240) * MIB / 2000)

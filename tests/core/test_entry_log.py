"""EntryLog: the popularity's log of weighted item entries, for sums over the past."""

from __future__ import annotations

import numpy as np

from halflife.core.ranking import EntryLog, decayed_sum

DAY = 86400.0


def _events(rng, n: int, n_items: int = 40):
    """n entries with positive type weights; some share an item and a time (an instant's several events)."""
    rows = rng.integers(0, n_items, n)
    times = np.round(rng.uniform(0, 30 * DAY, n), -4)  # 10,000 s steps: many equal times
    weights = rng.choice(np.array([1.0, 2.0, 0.5], dtype=np.float32), n)
    return rows, times, weights


def _sorted(rows, times, weights) -> list[tuple]:
    return sorted(zip(rows.tolist(), times.tolist(), weights.tolist()))


def test_appends_keep_few_chunks_and_every_entry_in_order():
    rng = np.random.default_rng(0)
    log, everything = EntryLog(), []
    for size in rng.integers(1, 9, 300):
        entries = _events(rng, int(size))
        log.append(*entries)
        everything.append(entries)
        sizes = [rows.size for rows, _, _ in log.chunks()]
        assert all(a > b for a, b in zip(sizes, sizes[1:]))  # merged as carries: fewer than sqrt(2n)
    for got, want in zip(log.columns(), (np.concatenate(c) for c in zip(*everything))):
        np.testing.assert_array_equal(got, want)
    assert log.newest == max(times.max() for _, times, _ in everything)


def test_net_drops_erased_events_and_leaves_the_sums_of_a_log_that_never_had_them():
    rng = np.random.default_rng(1)
    rows, times, weights = _events(rng, 3000)
    log = EntryLog()
    for part in np.array_split(np.arange(rows.size), 20):
        log.append(rows[part], times[part], weights[part])
    erased = rng.random(rows.size) < 0.6
    for part in np.array_split(np.flatnonzero(erased), 7):  # taken back in batches, later
        log.append(rows[part], times[part], -weights[part])
    assert log.taken_back == erased.sum()
    log.net()
    kept = ~erased
    assert _sorted(*log.columns()) == _sorted(rows[kept], times[kept], weights[kept])
    assert log.taken_back == 0 and len(log.chunks()) == 1 and log.newest == times[kept].max()
    never = EntryLog()
    never.append(rows[kept], times[kept], weights[kept])
    for t in (5 * DAY, 20 * DAY, 40 * DAY):
        np.testing.assert_allclose(decayed_sum(*log.columns(), t, 7 * DAY, 40),
                                   decayed_sum(*never.columns(), t, 7 * DAY, 40), rtol=1e-12, atol=0)


def test_net_keeps_what_it_cannot_pair_and_renumber_drops_the_rows_gone():
    log = EntryLog()
    log.append([3, 3, 5], [10.0, 10.0, 20.0], [2.0, 2.0, 1.0])
    log.append([5, 7], [20.0, 30.0], [-1.0, -4.0])  # one pairs; one took back an event the log never had
    log.net()
    assert _sorted(*log.columns()) == [(3, 10.0, 2.0), (3, 10.0, 2.0), (7, 30.0, -4.0)]
    log.renumber(np.array([-1, -1, -1, 0, -1, -1, -1, 1]))  # rows 3 and 7 become 0 and 1; the rest go
    assert _sorted(*log.columns()) == [(0, 10.0, 2.0), (0, 10.0, 2.0), (1, 30.0, -4.0)]
    log.renumber(np.array([-1, 0]))
    assert _sorted(*log.columns()) == [(0, 30.0, -4.0)] and log.newest == 30.0
    log.renumber(np.array([-1]))
    assert len(log) == 0 and log.newest == -np.inf and log.columns()[0].size == 0


def test_a_renumbered_log_counts_only_the_takings_back_it_kept():
    """renumber kept the count of takings-back it dropped with their rows, so
    the engine's trigger held and every append ran a net with nothing to net,
    a pass over the whole log under the engine lock (a review)."""
    log = EntryLog()
    log.append([1, 2, 2], [10.0, 20.0, 30.0], [1.0, 1.0, 1.0])
    log.append([1, 2], [10.0, 20.0], [-1.0, -1.0])
    assert log.taken_back == 2
    log.renumber(np.array([-1, -1, 0]))  # row 1 goes with its taking-back
    assert log.taken_back == 1 and _sorted(*log.columns()) == [(0, 20.0, -1.0), (0, 20.0, 1.0), (0, 30.0, 1.0)]
    log.renumber(np.array([0]))
    log.net()
    assert log.taken_back == 0 and _sorted(*log.columns()) == [(0, 30.0, 1.0)]
    log.taken_back = 3  # however it came to count what it does not hold, a net with nothing to net resets it
    log.net()
    assert log.taken_back == 0 and len(log) == 1


def test_an_empty_log_holds_no_entries():
    log = EntryLog()
    assert len(log) == 0 and [column.size for column in log.columns()] == [0, 0, 0]
    log.append([], [], [])
    assert log.chunks() == [] and log.newest == -np.inf


def test_net_drops_every_event_of_a_group_taken_back_as_often_as_it_happened():
    """Two equal events (same row, time, weight) and two takings-back of them:
    none is left. One event taken back twice cannot be paired: it stays, and
    every sum stays what it was."""
    log = EntryLog()
    log.append([3, 3, 5, 7], [DAY, DAY, DAY, DAY], [2.0, 2.0, 1.0, 1.0])
    log.append([3, 3, 7, 7], [DAY, DAY, DAY, DAY], [-2.0, -2.0, -1.0, -1.0])
    before = decayed_sum(*log.columns(), 2 * DAY, DAY, 8)
    log.net()
    assert _sorted(*log.columns()) == [(5, DAY, 1.0), (7, DAY, -1.0), (7, DAY, -1.0), (7, DAY, 1.0)]
    np.testing.assert_array_equal(decayed_sum(*log.columns(), 2 * DAY, DAY, 8), before)

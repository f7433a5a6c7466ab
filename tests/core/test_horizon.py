import numpy as np
import pytest

from halflife.core.horizon import Horizon


@pytest.mark.parametrize("max_held", [1_000_000, 5])
def test_what_it_hands_out_is_exactly_the_entries_up_to_through_or_the_read(max_held):
    """Random admits (with clocks behind and ahead of the entries), reads at
    random times and forgets: every step, the entries handed out are exactly
    those stamped up to `through`, and after a read at t >= through, up to t."""
    rng = np.random.default_rng(7)
    horizon, out, every_time = Horizon(max_held), [], []
    next_id = 0
    for step in range(300):
        if rng.random() < 0.6:
            n = int(rng.integers(0, 6))
            times = rng.uniform(0, 100, n).round(1)
            new_ids = np.arange(next_id, next_id + n)
            next_id += n
            every_time += list(zip(new_ids.tolist(), times.tolist()))
            out.append(horizon.admit(float(rng.uniform(0, 100)), times, new_ids))
        elif rng.random() < 0.3:  # a look ahead: what is held up to t, left held
            t = float(rng.uniform(0, 100))
            held = len(horizon)
            peeked = horizon.peek(t)
            want = sorted((i, w) for i, w in every_time if horizon.through < w <= t)
            assert (peeked is None and not want) or sorted(zip(peeked[1].tolist(), peeked[0].tolist())) == want
            assert len(horizon) == held
        elif rng.random() < 0.8:
            t = float(rng.uniform(0, 100))
            through = horizon.through
            released = horizon.release(t)
            if released is not None:
                out.append(released)
            if t >= through:
                handed = {i for chunk in out for i in chunk[1].tolist()}
                assert handed == {i for i, when in every_time if when <= t}
        else:  # forget: mark held ids negative, as an erasure of their pairs would
            horizon.map_held(lambda times, i: (times, -np.abs(i) - 1))
            every_time = [(i if when <= horizon.through else -abs(i) - 1, when) for i, when in every_time]
        handed = [(i, when) for chunk in out for i, when in zip(chunk[1].tolist(), chunk[0].tolist())]
        assert sorted(handed) == sorted((i, w) for i, w in every_time if w <= horizon.through)
        assert len(horizon) == sum(w > horizon.through for _, w in every_time) <= max_held
        assert all(c[0].shape == c[1].shape for c in out)


def test_entries_up_to_the_clock_pass_at_once_and_later_ones_wait_for_a_read():
    horizon = Horizon()
    times, ids = horizon.admit(10.0, np.array([5.0, 12.0, 9.0, 30.0]), np.array([0, 1, 2, 3]))
    assert ids.tolist() == [0, 2] and horizon.through == 9.0 and len(horizon) == 2
    assert horizon.release(8.0) is None  # a read into the past: the held ones are later still
    assert horizon.release(11.0) is None  # nothing due yet
    times, ids = horizon.release(12.0)
    assert ids.tolist() == [1] and horizon.through == 12.0
    # A new entry stamped before `through` always passes, whatever the clock says.
    assert horizon.admit(0.0, np.array([11.0]), np.array([4]))[1].tolist() == [4]
    assert len(horizon) == 1 and horizon.admit(40.0, np.zeros(0), np.zeros(0, int))[1].tolist() == [3]


def test_past_max_held_everything_is_handed_out():
    """A bound on memory (a server clock far behind its clients'): past
    max_held entries, admit hands out every held one and `through` moves past
    them, as if nothing had been held."""
    horizon = Horizon(max_held=3)
    assert horizon.admit(0.0, np.array([5.0, 6.0]), np.array([0, 1]))[1].size == 0 and len(horizon) == 2
    assert horizon.admit(0.0, np.array([7.0]), np.array([2]))[1].size == 0 and len(horizon) == 3
    times, ids = horizon.admit(0.0, np.array([-1.0, 8.0]), np.array([3, 4]))
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and len(horizon) == 0 and horizon.through == 8.0
    assert horizon.admit(0.0, np.array([7.5]), np.array([5]))[1].tolist() == [5]  # before `through`: at once


def test_a_peek_shows_the_held_entries_due_by_then_and_leaves_them_held():
    horizon = Horizon()
    horizon.admit(0.0, np.array([5.0, 9.0, 7.0]), np.array([0, 1, 2]))  # all ahead of the clock: held
    assert len(horizon) == 3 and horizon.peek(4.0) is None
    assert horizon.peek(5.0)[1].tolist() == [0]  # stamped at the read's time: due
    times, ids = horizon.peek(7.5)
    assert sorted(zip(times.tolist(), ids.tolist())) == [(5.0, 0), (7.0, 2)]
    assert len(horizon) == 3 and horizon.through == -np.inf  # nothing handed out
    assert sorted(horizon.release(9.0)[1].tolist()) == [0, 1, 2]

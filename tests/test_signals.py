"""sigterm_unwinds: how `halflife export` and `halflife eval` stop on SIGTERM."""

from __future__ import annotations

import signal
import time

import pytest

from halflife.signals import REDELIVERY_S, sigterm_unwinds


class _SignalledWhileCollected:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def _collect() -> None:
    """SIGTERM arrives while a finaliser runs."""
    _SignalledWhileCollected()


def _compile() -> None:
    """SIGTERM arrives while compile() folds constants (`2**63`, as in
    storage/sqlite.py, which `halflife eval` imports from source where no
    bytecode is cached). A CPU-time alarm takes it there: it cannot fire
    before the compile has worked for a while."""
    previous = signal.signal(signal.SIGVTALRM, lambda *_: signal.raise_signal(signal.SIGTERM))
    try:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0.01)
        compile("\n".join(f"x{i} = 2**63" for i in range(20_000)), "folded", "exec")
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finaliser's lost raise
@pytest.mark.parametrize("signalled", [_collect, _compile], ids=["in-a-finaliser", "in-compile"])
def test_a_sigterm_whose_raise_is_lost_still_stops_the_work_and_its_cleanup_runs(signalled):
    """The handler's SystemExit is lost where C code runs the handler and
    clears it (compile()'s constant folding, all but KeyboardInterrupt) or a
    finaliser does: `halflife eval`, signalled as it imported a module from
    source, ran to its end and exited 0 (a flaky test). The stop must come
    all the same, soon, and cleanup longer than the redelivery period must
    finish uncut."""
    cleaned = False
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        with sigterm_unwinds():
            try:
                signalled()
                time.sleep(10)  # the work going on
            finally:
                time.sleep(5 * REDELIVERY_S)  # removing a work directory, say
                cleaned = True
    assert stop.value.code == 128 + signal.SIGTERM
    assert cleaned
    assert time.monotonic() - started < 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_raise_is_lost_as_the_work_ends_still_sets_the_exit_status():
    """The work may end before the signal can be raised again: the exit
    status still says that the signal stopped the command."""
    with pytest.raises(SystemExit) as stop:
        with sigterm_unwinds():
            _collect()
    assert stop.value.code == 128 + signal.SIGTERM



def test_a_sigterm_during_ctrl_cs_cleanup_lets_the_cleanup_finish():
    """Ctrl-C, then SIGTERM (a supervisor's stop) while its cleanup removes
    a work directory: the SIGTERM's raise cut that cleanup short."""
    cleaned = False
    with pytest.raises(KeyboardInterrupt):
        with sigterm_unwinds():
            try:
                raise KeyboardInterrupt
            finally:
                signal.raise_signal(signal.SIGTERM)
                time.sleep(5 * REDELIVERY_S)
                cleaned = True
    assert cleaned

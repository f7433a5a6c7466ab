"""RepeatedWarning: a warning that repeats while a condition lasts is logged
at most once per interval, the next line counting those held back.
StderrInBackground: a log call never waits for stderr's reader.
Progress: a long pass says how far it has come."""

from __future__ import annotations

import logging
import os
import re
import threading
import time

from halflife import logs
from halflife.logs import Progress, RepeatedWarning, StderrInBackground


def test_a_repeated_warning_is_logged_once_an_interval_with_the_count_held_back(caplog):
    now = [100.0]
    warning = RepeatedWarning(logging.getLogger("halflife.test"), interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="halflife.test"):
        for step in range(5):  # a full disk failing a write every 10 s
            warning.log("store unavailable: %s", f"disk full {step}")
            now[0] += 10.0
        now[0] += 30.0
        warning.log("store unavailable: %s", "disk full 5")
        now[0] += 61.0
        warning.log("store unavailable: %s", "disk full 6")
        now[0] += 10.0
        warning.log("store unavailable: %s", "disk full 7")  # held back ...
        now[0] += 3600.0
        warning.log("store unavailable: %s", "disk full 8")  # ... and said to be an hour old, not 60 s
    assert [record.getMessage() for record in caplog.records] == [
        "store unavailable: disk full 0",
        "store unavailable: disk full 5 (and 4 more like it in the 80 s since the last)",
        "store unavailable: disk full 6",
        "store unavailable: disk full 8 (and 1 more like it in the 3610 s since the last)",
    ]


def test_a_long_pass_says_how_far_it_has_come_every_interval_and_a_short_one_nothing(caplog):
    """A start at 5M events was 20-56 s of NOT_SERVING without a line: a
    slow start read as a hung one (a scale review)."""
    now = [100.0]
    with caplog.at_level(logging.INFO, logger="halflife.test"):
        progress = Progress(logging.getLogger("halflife.test"), "loading the store", 1_000, "events",
                            clock=lambda: now[0])
        for _ in range(10):  # 100 events a second
            now[0] += 1.0
            progress.advance(100)
        short = Progress(logging.getLogger("halflife.test"), "short", 10, "items", clock=lambda: now[0])
        now[0] += logs.PROGRESS_INTERVAL_S - 0.5
        short.advance(10)
        then = Progress(logging.getLogger("halflife.test"), "then", 10, "items", clock=lambda: now[0], following=short)
        now[0] += 1.0  # 5.5 s since `short` began: due, though `then` began 1 s ago
        then.advance(5)
    assert [record.getMessage() for record in caplog.records] == [
        "loading the store: 500 of 1000 events in 5 s (50%, 100/s, ~5 s left)",
        "loading the store: 1000 of 1000 events in 10 s (100%, 100/s, ~0 s left)",
        "then: 5 of 10 items in 1 s (50%, 5/s, ~1 s left)",
    ]
    assert progress.done == 1_000
    assert list(short.counted(iter(range(2_500)), every=1_000)) == list(range(2_500)) and short.done == 2_510


def test_log_lines_wait_for_a_stalled_stderr_on_a_thread_of_their_own_and_past_the_bound_are_counted():
    """Written by the caller, a line blocked it once the pipe's reader stalled (64 KiB unread): on the
    event loop, every call, health check and SIGTERM with it (a review)."""
    read_end, write_end = os.pipe()
    stderr = os.fdopen(write_end, "w")
    handler = StderrInBackground(stderr, capacity=100)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("halflife.test")
    logger.addHandler(handler)
    line = "x" * 1000
    started = time.monotonic()
    for n in range(300):  # 300 kB: some 5 pipes' worth, and 3 times the bound
        logger.warning("%d %s", n, line)
    assert time.monotonic() - started < 5  # seconds, where it blocked for good
    assert not handler.flush(timeout=0.1)  # the reader still stalled: a flush gives up
    with os.fdopen(read_end, "rb") as reader:  # the reader wakes
        got: list[bytes] = []
        reading = threading.Thread(target=lambda: got.extend(reader), daemon=True)
        reading.start()
        assert handler.flush(timeout=10)
        stderr.close()
        reading.join(10)
    kept = [int(text.split()[1]) for text in got if text.endswith(line.encode() + b"\n")]
    said = rb"WARNING (\d+) log lines dropped: stderr was not read as fast as they came\n"
    dropped = [re.fullmatch(said, text) for text in got if not text.endswith(line.encode() + b"\n")]
    assert kept == sorted(kept) and kept[0] == 0 and len(kept) >= 100  # in order; the bound's worth at least
    assert dropped and all(dropped) and len(kept) + sum(int(m.group(1)) for m in dropped) == 300


def test_processes_sharing_stderr_never_tear_each_others_lines_once_the_pipe_fills():
    """The workers of `--workers` share their parent's stderr: written many lines at a time, a write
    past PIPE_BUF bytes was cut where the pipe filled and another's lines went in mid-line (a review:
    129 of 9,000 lines torn behind a slow reader)."""
    import fcntl

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # fills at once
    handlers = [StderrInBackground(os.fdopen(os.dup(write_end), "w")) for _ in range(2)]
    os.close(write_end)
    for n, handler in enumerate(handlers):
        handler.setFormatter(logging.Formatter(f"[worker {n}] %(message)s"))
        logger = logging.Logger(f"halflife.test{n}")
        logger.addHandler(handler)
        for k in range(200):
            logger.warning("%03d %s", k, str(n) * 300)
    got = b""
    with os.fdopen(read_end, "rb") as reader:
        while len(got) < 2 * 200 * 316:
            got += reader.read1(1000)
    for handler in handlers:
        assert handler.flush(timeout=10)
    lines = got.decode().splitlines()
    assert len(lines) == 400
    assert [line for line in lines if not re.fullmatch(r"\[worker (\d)\] \d{3} \1{300}", line)] == []

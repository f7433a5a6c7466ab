"""RepeatedWarning: a warning that repeats while a condition lasts is logged
at most once per interval, the next line counting those held back."""

from __future__ import annotations

import logging

from halflife.logs import RepeatedWarning


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

"""Request validation: collects every field violation, then fails once with all of them."""

from __future__ import annotations

import datetime as dt
import math
from typing import Sized

from google.protobuf import timestamp_pb2

from halflife.api.errors import invalid_argument
from halflife.texts import MAX_CATEGORY_BYTES, MAX_ID_BYTES, name_problem, stored_name_problem, text_size_problem

# What a text `halflife.texts.blank` refuses holds, for the message that refuses it.
UNREADABLE = ("holds nothing the model reads (only whitespace, control, format, private-use or combining "
              "characters, or U+FFFD)")
MAX_FUTURE_SECONDS = 24 * 3600.0  # event times may run ahead of our clock by at most a day
# Elements of a request's list. Here, where the client commands read them
# too, not in the servicers, which import the model's runtime.
MAX_ITEMS_PER_REQUEST = 1000  # items, ids and filter values
MAX_EVENTS_PER_REQUEST = 1000
MAX_INPUTS_PER_REQUEST = 256  # Embed's texts
# google.protobuf.Timestamp's valid range.
MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


class Violations:
    """Field violations of one request, in the order found."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise invalid_argument(self.items)

    def count(self, values: Sized, field: str, maximum: int) -> bool:
        """Whether `values` holds 1 to `maximum` elements; adds the violation where not."""
        n = len(values)
        if n == 0:
            self.add(field, "must hold at least 1 element")
            return False
        if n > maximum:
            self.add(field, f"holds {n} elements; at most {maximum} per request")
            return False
        return True

    def identifier(self, value: str, field: str) -> None:
        self._name(value, field, MAX_ID_BYTES)

    def stored_user(self, value: str, field: str) -> None:
        """A user id to look up: control characters pass (`stored_name_problem`)."""
        if (problem := stored_name_problem(value, nul=True)) is not None:
            self.add(field, problem)

    def stored_item(self, value: str, field: str) -> None:
        """An item id to look up: control characters but NUL pass (`stored_name_problem`)."""
        if (problem := stored_name_problem(value, nul=False)) is not None:
            self.add(field, problem)

    def category(self, value: str, field: str) -> None:
        self._name(value, field, MAX_CATEGORY_BYTES)

    def _name(self, value: str, field: str, max_bytes: int) -> None:
        if (problem := name_problem(value, max_bytes)) is not None:
            self.add(field, problem)

    def text(self, value: str, field: str) -> bool:
        """Whether `value` is short enough; adds the violation where not."""
        if (problem := text_size_problem(value)) is not None:
            self.add(field, problem)
            return False
        return True

    def finite(self, value: float, field: str) -> bool:
        """Whether `value` is finite; a violation where not."""
        if not math.isfinite(value):
            self.add(field, f"must be a finite number, got {value}")
            return False
        return True

    def limit(self, value: int, field: str, maximum: int) -> None:
        if not 1 <= value <= maximum:
            self.add(field, f"must be between 1 and {maximum}, got {value}")

    def timestamp(self, message, name: str, field: str, now: float | None) -> float | None:
        """Seconds of the Timestamp field `name` of `message`; None when unset.

        With `now` (event and as-of times): before 1970 or more than a day
        ahead of `now` is a violation. Without (e.g. an item's publication
        date, which may be 1931): any time Timestamp itself allows."""
        if not message.HasField(name):
            return None
        stamp: timestamp_pb2.Timestamp = getattr(message, name)
        if not 0 <= stamp.nanos < 1_000_000_000:
            self.add(field, f"nanos must be in [0, 1e9), got {stamp.nanos}")
            return None
        if not MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS:
            self.add(field, "is outside 0001-01-01 .. 9999-12-31")
            return None
        seconds = stored_seconds(stamp.seconds, stamp.nanos)
        if now is not None and seconds < 0:
            self.add(field, "is before 1970-01-01")
        elif now is not None and seconds > now + MAX_FUTURE_SECONDS:
            self.add(field, too_far_ahead(now))
        return seconds


def too_far_ahead(now: float) -> str:
    """The violation of a time more than MAX_FUTURE_SECONDS after `now`, the
    server's clock, named: a server whose clock was set back told a client
    stamping events at its own, right, time that they were "more than 24
    hours in the future" (a clock review)."""
    clock = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"is more than 24 hours ahead of the server's clock ({clock})"


def event_time_window(now: float) -> dict[str, float]:
    """The event times the API takes at `now` (from 1970 to a day ahead), as
    load_dataset's `earliest` and `latest`: what a dataset sent to a server
    is checked against before anything is sent."""
    return {"earliest": 0.0, "latest": now + MAX_FUTURE_SECONDS}


def stored_seconds(seconds: int, nanos: int) -> float:
    """A Timestamp's time as the server keeps it: float seconds."""
    return seconds + nanos / 1e9


def to_timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A stored time (float seconds) as a Timestamp within Timestamp's range:
    a float holds 9999-12-31T23:59:59.999999999 as 253402300800.0. A time
    sent to the microsecond (a Python datetime; a JavaScript Date, to the
    millisecond) comes back as sent: the whole microsecond nearest, where the
    server reads it as this very float. To the nanosecond, Python's
    ToDatetime truncated about half such times 1 us early (a clients review)."""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    micros = round(nanos, -3)
    if micros != nanos and stored_seconds(whole, micros) == seconds:
        nanos = micros
    if nanos == 1_000_000_000:  # x.9999999996 rounds up into the next second
        whole, nanos = whole + 1, 0
    if whole > MAX_TIMESTAMP_SECONDS:
        whole, nanos = MAX_TIMESTAMP_SECONDS, 999_999_999
    return timestamp_pb2.Timestamp(seconds=int(whole), nanos=int(nanos))

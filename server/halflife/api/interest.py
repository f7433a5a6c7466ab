"""InterestService: validates events, hands them to the interest engine, renders profiles."""

from __future__ import annotations

import asyncio
import math
import zlib
from typing import Iterable, Sequence

import grpc

from halflife.api.backend import Backend
from halflife.api.calls import run_with_deadline
from halflife.api.errors import aborted, not_found, translate_errors
from halflife.api.paging import page_size, page_token, token_position
from halflife.api.validation import (
    MAX_EVENTS_PER_REQUEST,
    MAX_FUTURE_SECONDS,
    MAX_ID_BYTES,
    MAX_TIMESTAMP_SECONDS,
    UNREADABLE,
    Violations,
    stored_seconds,
    to_timestamp,
)
from halflife.config import MAX_PER_INTEREST, RatingConfig
from halflife.interest.engine import RECORD_ATTEMPTS
from halflife.interest.types import EventInput, UnknownItemsError
from halflife.storage.base import EventRecord, ItemsChangedError
from halflife.texts import MAX_TEXT_BYTES, blank
from halflife.v1 import interest_pb2, interest_pb2_grpc

TRENDS = {
    "rising": interest_pb2.TREND_RISING,
    "steady": interest_pb2.TREND_STEADY,
    "fading": interest_pb2.TREND_FADING,
}
_EVENT_TYPES = set(interest_pb2.EventType.values()) - {interest_pb2.EVENT_TYPE_UNSPECIFIED}


def _event_input(event: interest_pb2.Event, field: str, now: float, violations: Violations,
                 ratings: RatingConfig) -> EventInput | None:
    before = len(violations.items)
    violations.identifier(event.event_id, f"{field}.event_id")
    violations.identifier(event.user_id, f"{field}.user_id")
    if event.type not in _EVENT_TYPES:
        name = "EVENT_TYPE_UNSPECIFIED" if event.type == 0 else f"unknown value {event.type}"
        violations.add(f"{field}.type", f"must be a known event type, got {name}")
    readable = not blank(event.text)
    if not event.item_id and event.text and not readable:
        violations.add(f"{field}.text", f"{UNREADABLE}; an event needs an item_id, a text the model reads, or both")
    elif not event.item_id and not readable:
        violations.add(f"{field}.item_id", "an event needs an item_id, a text, or both")
    if event.item_id:
        violations.identifier(event.item_id, f"{field}.item_id")
    violations.text(event.text, f"{field}.text")
    value = event.value if event.HasField("value") else None
    if value is None:
        if event.type == interest_pb2.EVENT_TYPE_RATE:
            violations.add(f"{field}.value", "EVENT_TYPE_RATE needs the rating in value")
    elif violations.finite(value, f"{field}.value") and event.type == interest_pb2.EVENT_TYPE_RATE \
            and not ratings.lowest <= value <= ratings.highest:
        violations.add(f"{field}.value", f"must be a rating from {ratings.lowest:.15g} to {ratings.highest:.15g} "
                                         f"(the server's ratings.lowest and ratings.highest), got {value!r}")
    event_time = violations.timestamp(event, "event_time", f"{field}.event_time", now)
    if len(violations.items) > before:
        return None
    return EventInput(
        event_id=event.event_id,
        user_id=event.user_id,
        type=event.type,
        item_id=event.item_id or None,
        text=event.text if readable else None,  # a blank one would embed as a vector of its own
        value=value,
        event_time=now if event_time is None else event_time,
    )


def _event_inputs(events: Iterable[interest_pb2.Event], now: float, violations: Violations,
                  ratings: RatingConfig) -> list[EventInput | None]:
    """`_event_input` of each event, with its field path `events[i]`.

    A batch's events are mostly valid, and the full checks were the largest
    part of ingest's time under the GIL (38%). An event that passes these
    cheaper ones, each of which implies its full rule (a 64-character id is at
    most 256 UTF-8 bytes, ...), is built directly; any other goes through
    `_event_input`, which names every violation. test_interest_api checks that
    the two agree on random valid and invalid events."""
    out: list[EventInput | None] = []
    latest = now + MAX_FUTURE_SECONDS
    for i, event in enumerate(events):
        event_id, user_id, item_id, text, type_ = event.event_id, event.user_id, event.item_id, event.text, event.type
        value = event.value if event.HasField("value") else None
        if event.HasField("event_time"):
            stamp = event.event_time
            seconds, nanos = stamp.seconds, stamp.nanos
            event_time = stored_seconds(seconds, nanos)  # as the full checks read it, and to_timestamp assumes
            time_ok = 0 <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos < 1_000_000_000 and event_time <= latest
        else:
            event_time, time_ok = now, True
        readable = not blank(text)
        if (
            time_ok
            and 0 < len(event_id) <= MAX_ID_BYTES // 4
            and 0 < len(user_id) <= MAX_ID_BYTES // 4
            and len(item_id) <= MAX_ID_BYTES // 4
            and len(text) <= MAX_TEXT_BYTES // 4
            and type_ in _EVENT_TYPES
            and (event_id + user_id + item_id).isprintable()  # no control characters (nor rarer ones, e.g. NBSP)
            and (item_id or readable)
            and (type_ != interest_pb2.EVENT_TYPE_RATE if value is None else
                 ratings.lowest <= value <= ratings.highest if type_ == interest_pb2.EVENT_TYPE_RATE else
                 math.isfinite(value))
        ):
            out.append(EventInput(event_id, user_id, type_, item_id or None, text if readable else None, value,
                                  event_time))
        else:
            out.append(_event_input(event, f"events[{i}]", now, violations, ratings))
    return out


def _log_position(seq: int, user_id: str, newest_first: bool) -> str:
    """Where a ListEvents page ends: the seq, the user's checksum and the
    order, so that a token sent with another user_id or the other order is
    refused (AIP-158), not read as a place in another list."""
    return f"{seq}.{zlib.crc32(user_id.encode()):08x}{'.newest' if newest_first else ''}"


def _listed_after(position: str | None, request: interest_pb2.ListEventsRequest, violations: Violations) -> int:
    """The seq a ListEvents page token (`token_position`'s) lists after: 0 for
    the first page; a position not made for the request's user_id and order
    is a violation."""
    if not position:
        return 0
    seq = position.partition(".")[0]
    # At most 18 digits: any seq, and nothing past SQLite's integers.
    if not (seq.isascii() and seq.isdigit() and len(seq) <= 18) or position != _log_position(
            int(seq), request.user_id, request.newest_first):
        violations.add("page_token", "is not a ListEvents page token of this user_id and newest_first: give the "
                                     "next_page_token of the page before, or none for the first page")
        return 0
    return int(seq)


def _event_message(record: EventRecord) -> interest_pb2.Event:
    """A stored event as the API spells it."""
    event = interest_pb2.Event(event_id=record.event_id, user_id=record.user_id, type=record.type,
                               item_id=record.item_id or "", text=record.text or "",
                               event_time=to_timestamp(record.event_time))
    if record.value is not None:
        event.value = record.value
    return event


def _check_repeats(events: list[EventInput | None], sent: Sequence[interest_pb2.Event], violations: Violations) -> None:
    """An event id twice in one batch with other fields names two events:
    the store would keep the first and drop the other silently (an audit).
    An identical repeat (a retried chunk, say) is a duplicate, as a re-send
    is. Identical as the server reads them (a blank text is none, -0.0 is 0),
    but for the time, which is compared as sent: times 1 ns apart read as
    one float64 (a review), and so did some 100 ns apart, others not."""
    def as_sent(i: int) -> tuple:
        stamp = sent[i].event_time
        return events[i], (stamp.seconds, stamp.nanos) if sent[i].HasField("event_time") else None

    first: dict[str, int] = {}
    for i, event in enumerate(events):
        if event is not None and (j := first.setdefault(event.event_id, i)) != i and as_sent(i) != as_sent(j):
            violations.add(f"events[{i}].event_id", f"repeats events[{j}].event_id with other fields")


class InterestServicer(interest_pb2_grpc.InterestServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @translate_errors
    async def RecordEvents(self, request: interest_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        events = []
        if violations.count(request.events, "events", MAX_EVENTS_PER_REQUEST):
            now = interest.now()
            events = _event_inputs(request.events, now, violations, interest.config.ratings)
            _check_repeats(events, request.events, violations)
        violations.raise_if_any()
        try:
            threads = self._backend.write_threads(embeds=any(event.text is not None for event in events))
            accepted, duplicates = await run_with_deadline(context, interest.record_events, events, threads=threads)
        except UnknownItemsError as error:
            raise not_found(
                f"{len(error.missing)} events refer to unknown items; nothing was recorded",
                [(f"events[{i}].item_id", f"no item {item_id!r} in the catalogue") for i, item_id in error.missing],
            ) from None
        except ItemsChangedError as error:
            raise aborted(f"{error}, {RECORD_ATTEMPTS} times; nothing was recorded, retry") from None
        return interest_pb2.RecordEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    @translate_errors
    async def GetProfile(self, request: interest_pb2.GetProfileRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        violations.stored_user(request.user_id, "user_id")
        as_of = violations.timestamp(request, "as_of_time", "as_of_time", interest.now())
        if not 0 <= request.items_per_interest <= MAX_PER_INTEREST:
            violations.add("items_per_interest",
                           f"must be between 0 and {MAX_PER_INTEREST}, got {request.items_per_interest}")
        violations.raise_if_any()
        profile = await run_with_deadline(context, interest.profile, request.user_id, as_of,
                                          request.items_per_interest or None)
        response = interest_pb2.GetProfileResponse(
            user_id=profile.user_id,
            negative_strength=profile.negative_strength,
            event_counts=[
                interest_pb2.EventTypeCount(type=t, count=n) for t, n in sorted(profile.event_counts.items())
            ],
        )
        if profile.last_event_time is not None:
            response.last_event_time.CopyFrom(to_timestamp(profile.last_event_time))
        for view in profile.interests:
            message = response.interests.add(
                interest_id=view.interest_id,
                strength=view.strength,
                share=view.share,
                trend=TRENDS[view.trend],
                event_count=view.event_count,
                labels=[interest_pb2.InterestLabel(label=l, similarity=s) for l, s in view.labels],
                top_items=[interest_pb2.InterestItem(item_id=i, text=t, similarity=s) for i, t, s in view.top_items],
            )
            if math.isfinite(view.last_event_time):
                message.last_event_time.CopyFrom(to_timestamp(view.last_event_time))
        return response

    @translate_errors
    async def DeleteUser(self, request: interest_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        violations.stored_user(request.user_id, "user_id")
        violations.raise_if_any()
        deleted = await run_with_deadline(context, interest.delete_user, request.user_id)
        return interest_pb2.DeleteUserResponse(deleted_event_count=deleted)

    @translate_errors
    async def ListEvents(self, request: interest_pb2.ListEventsRequest, context: grpc.aio.ServicerContext):
        interest = self._backend.ready().interest
        violations = Violations()
        violations.stored_user(request.user_id, "user_id")
        size = page_size(request.page_size, violations)
        after = _listed_after(token_position(request.page_token, violations, "ListEvents"), request, violations)
        # Any time a Timestamp holds: a range is a filter, not an event's time.
        start = violations.timestamp(request, "start_time", "start_time", now=None)
        end = violations.timestamp(request, "end_time", "end_time", now=None)
        # As sent, not as stored: float seconds cannot tell times under ~0.24 us apart (compared as stored, the
        # range is then empty; a review).
        if start is not None and end is not None and not (
                (request.end_time.seconds, request.end_time.nanos) > (request.start_time.seconds, request.start_time.nanos)):
            violations.add("end_time", "must be after start_time (the range holds event times from start_time up "
                                       "to, not including, end_time)")
        violations.raise_if_any()
        records, last_seq = await asyncio.to_thread(
            interest.list_user_events, request.user_id, after, size, request.newest_first,
            -math.inf if start is None else start, math.inf if end is None else end)
        return interest_pb2.ListEventsResponse(
            events=[_event_message(record) for record in records],
            next_page_token="" if last_seq is None else page_token(
                "ListEvents", _log_position(last_seq, request.user_id, request.newest_first)),
            newest_first=request.newest_first,
            start_time=None if start is None else to_timestamp(start),
            end_time=None if end is None else to_timestamp(end),
        )

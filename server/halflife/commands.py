"""Client-side commands of the `halflife` CLI: load a dataset, show recommendations, profiles and events.

They talk to a running server through the Python client, like any backend.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from halflife.api.validation import MAX_ITEMS_PER_REQUEST, event_time_window
from halflife.datasets.interactions import MOVIELENS, load_dataset
from halflife.progress import progress
from halflife.texts import MAX_ID_BYTES
from halflife.v1 import interest_pb2, recommend_pb2
from halflife_client import Event, HalflifeClient, Item, field_violations

LOAD_TIMEOUT_S = 300.0  # a batch waits for the embedding queue behind other batches


def _batches(values: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _event_id(*parts: object) -> str:
    """The parts joined by "-", a "-" or "%" within one escaped (user "1-2" on
    movie "3" and user "1" on movie "2-3" were one event, and one rating was
    dropped as its duplicate; numeric ids read as before, so earlier loads stay
    idempotent); past MAX_ID_BYTES (long user and item ids), a digest of them
    instead, the same on every run (a re-run stores nothing twice)."""
    joined = "-".join(str(part).replace("%", "%25").replace("-", "%2D") for part in parts)
    if len(joined.encode()) <= MAX_ID_BYTES:
        return joined
    return f"{parts[0]}-sha256-{hashlib.sha256(joined.encode()).hexdigest()}"


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def load_movielens(directory: Path, target: str, batch_size: int = 500) -> dict[str, int]:
    """Loads MovieLens through the gRPC API: movies as items (title and genres
    as text, genres as categories), ratings as RATE events (the server's
    config maps >= 4 to positive and <= 2 to negative feedback), tags as
    REVIEW events with the tag as text. Idempotent: event ids derive from the
    data, so a re-run stores nothing twice. Whatever the server would refuse
    in the files (an id, a time before 1970 or over a day ahead, a rating
    off MovieLens's 0.5-5 stars) stops it before anything is sent, naming
    the file and line; a server configured with a narrower rating scale
    (`[ratings]`) refuses those ratings' batch when it comes."""
    dataset = load_dataset(directory, MOVIELENS, **event_time_window(time.time()))
    ratings, tags = dataset.interactions, dataset.texts
    # A 1970 title's create_time is 0.0: tested against None, not for truth.
    items = [Item(id=m.id, text=m.text, categories=m.categories,
                  create_time=None if m.create_time is None else _utc(m.create_time)) for m in dataset.items]
    events = [
        Event(event_id=_event_id("rating", u, i), user_id=u, type=interest_pb2.EVENT_TYPE_RATE, item_id=i, value=float(v), event_time=_utc(t))
        for u, i, v, t in zip(ratings.users, ratings.items, ratings.values, ratings.times)
    ]
    # A tag's id from its content (user, movie, time, text; a repeat of all four
    # numbered), not its position: one tag added or removed earlier in the file
    # shifted every later id, and a re-run stored those tags twice.
    repeats: dict[tuple, int] = {}
    for u, i, text, t in zip(tags.users, tags.items, tags.texts, tags.times):
        key = (u, i, int(t), hashlib.sha256(text.encode()).hexdigest()[:16])
        repeats[key] = nth = repeats.get(key, -1) + 1
        events.append(Event(event_id=_event_id("tag", *key, nth), user_id=u, type=interest_pb2.EVENT_TYPE_REVIEW,
                            item_id=i, text=text, event_time=_utc(t)))
    totals = {"items_created": 0, "items_updated": 0, "events_accepted": 0, "events_duplicate": 0}
    with HalflifeClient(target, timeout=LOAD_TIMEOUT_S) as client:
        with progress(total=len(items), desc="items (embedding)", unit="item") as bar:
            for batch in _batches(items, 256):
                created, updated = client.upsert_items(batch)
                totals["items_created"] += created
                totals["items_updated"] += updated
                bar.update(len(batch))
        with progress(total=len(events), desc="events", unit="event") as bar:
            for batch in _batches(events, batch_size):
                accepted, duplicates = client.record_events(batch)
                totals["events_accepted"] += accepted
                totals["events_duplicate"] += duplicates
                bar.update(len(batch))
    return totals


# What a catalogue's texts may hold that a terminal would act on rather than show (an audit's item
# text cleared the screen and set the window title): line breaks and tabs become spaces, other
# controls (C0, DEL, C1) and bidirectional overrides their escapes.
_TERMINAL_SAFE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_TERMINAL_SAFE |= {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_TERMINAL_SAFE |= {ord(c): " " for c in "\t\n\r\v\f"}


def printable(text: str) -> str:
    """`text` as a terminal shows it literally, on one line (see _TERMINAL_SAFE)."""
    return text.translate(_TERMINAL_SAFE)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out=None) -> None:
    """A plain aligned table. On a terminal the last column takes what the
    width leaves; into a pipe or a file nothing is cut."""
    out = out or sys.stdout
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if out.isatty():
        room = shutil.get_terminal_size().columns - sum(widths[:-1]) - 2 * (len(headers) - 1)
        widths[-1] = max(20, min(widths[-1], room))
    line = lambda cells: "  ".join(_clip(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line(row), file=out)


def _texts_of(client: HalflifeClient, ids: Iterable[str]) -> dict[str, str]:
    """Item texts by id, of those still in the catalogue: an explanation's
    event may name an item deleted since (GetItems' NOT_FOUND for it stopped
    `recommend` with nothing printed); those are left out, shown by their ids.
    At most MAX_ITEMS_PER_REQUEST ids a call (a list of 1,000 and the items
    its explanations name was refused whole: a review)."""
    ids = sorted(set(ids))
    texts: dict[str, str] = {}
    for start in range(0, len(ids), MAX_ITEMS_PER_REQUEST):
        chunk = ids[start : start + MAX_ITEMS_PER_REQUEST]
        while chunk:  # each pass drops at least one id, or raises
            try:
                texts.update((item.id, item.text) for item in client.get_items(chunk))
                break
            except grpc.RpcError as error:
                gone = {chunk[int(field[len("ids["):-1])] for field, _ in field_violations(error) if field.startswith("ids[")}
                if error.code() != grpc.StatusCode.NOT_FOUND or not gone:
                    raise
                chunk = [i for i in chunk if i not in gone]
    return texts


def show_recommendations(user_id: str, target: str, limit: int, as_of: dt.datetime | None, query: str) -> None:
    with HalflifeClient(target) as client:
        response = client.recommend(user_id, limit, as_of=as_of, query=query, explain=True)
        # One GetItems for the items and those their explanations' events name.
        texts = _texts_of(client, [i.item_id for i in response.items]
                          + [e.item_id for i in response.items for e in i.explanation.events if e.item_id])
    strategy = recommend_pb2.Strategy.Name(response.strategy).removeprefix("STRATEGY_").lower()
    print(f"recommendations for user {printable(user_id)} ({strategy})")
    rows = []
    for rank, item in enumerate(response.items, 1):
        why = []
        if item.explanation.interests and item.explanation.interests[0].labels:  # none point its way: unnamed
            why.append("interest: " + ", ".join(item.explanation.interests[0].labels))
        if item.explanation.events:
            e = item.explanation.events[0]
            why.append("because of " + _clip(texts.get(e.item_id, e.item_id or e.event_id), 40))
        rows.append([str(rank), item.item_id, f"{item.score:.3f}", _clip(texts.get(item.item_id, ""), 60), "; ".join(why)])
    if not rows:  # a bare table header read as a failure (a newcomer review)
        print("no items: the catalogue is empty, or this user has seen every item in it")
        return
    print_table(["#", "item", "score", "text", "why"], rows)


def _percent(share: float) -> str:
    """A share as a whole percentage; one that rounds to 0 but is not, as "<1%" (GetProfile lists interests with
    a share above 0: a MovieLens profile showed seven at "0%", read as empty)."""
    shown = f"{share:.0%}"
    return "<1%" if share > 0 and shown == "0%" else shown


def _iso(time: Timestamp) -> str:
    return time.ToDatetime().isoformat() + "Z"


def _type_name(event_type: int) -> str:
    return interest_pb2.EventType.Name(event_type).removeprefix("EVENT_TYPE_").lower()


def _value(value: float) -> str:
    """An event's value as sent (a decimal of up to 15 digits reads back as itself), without a trailing .0."""
    return f"{value:.15g}"


def show_events(user_id: str, target: str, limit: int, since: dt.datetime | None = None,
                until: dt.datetime | None = None) -> None:
    with HalflifeClient(target) as client:
        latest = list(itertools.islice(client.iter_events(user_id, page_size=min(limit, MAX_ITEMS_PER_REQUEST),
                                                          newest_first=True, start_time=since, end_time=until), limit))
        texts = _texts_of(client, [e.item_id for e in latest if e.item_id])
    span = "".join(f" {word} {when.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat()}Z"
                   for word, when in (("since", since), ("before", until)) if when is not None)
    if not latest:
        print(f"user {printable(user_id)}: no events stored{span}")
        return
    print(f"events recorded last for user {printable(user_id)}{span}, the last first")
    rows = []
    for e in latest:
        # The item's text (an item deleted since: its id alone), then what the user wrote, quoted.
        what = [_clip(texts.get(e.item_id, ""), 50), f'"{_clip(e.text, 60)}"' if e.text else ""]
        rows.append([_iso(e.event_time), _type_name(e.type), _value(e.value) if e.HasField("value") else "",
                     e.item_id, " — ".join(filter(None, what))])
    print_table(["time", "type", "value", "item", "text"], rows)


def show_profile(user_id: str, target: str, as_of: dt.datetime | None) -> None:
    with HalflifeClient(target) as client:
        profile = client.profile(user_id, as_of=as_of)
    counts = ", ".join(f"{_type_name(c.type)} {c.count}" for c in profile.event_counts)
    last = _iso(profile.last_event_time) if profile.HasField("last_event_time") else "never"
    # Strengths decay with age: a user of old events has tiny ones, which 3 decimals read as 0.
    positive, negative = sum(i.strength for i in profile.interests), profile.negative_strength
    relative = f" ({negative / positive:.0%} of the positive)" if positive > 0 else ""
    print(f"user {printable(user_id)}: {counts or 'no events'}; last event {last}; negative feedback {negative:.3g}{relative}")
    rows = [
        [
            str(interest.interest_id),
            _percent(interest.share),
            interest_pb2.Trend.Name(interest.trend).removeprefix("TREND_").lower(),
            str(interest.event_count),
            ", ".join(label.label for label in interest.labels),
            "; ".join(_clip(item.text, 40) for item in interest.top_items),
        ]
        for interest in profile.interests
    ]
    print_table(["interest", "share", "trend", "events", "labels", "representative items"], rows)

"""CatalogService, InterestService and RecommendService over a real gRPC server
on 127.0.0.1 with the real model: every RPC, the validation matrix (batches
are atomic), durability across restarts and `kill -9`, real-time interest
drift, negative feedback, late events and user deletion.

Times are fixed (T0 in 2024, passed as as_of_time), so nothing depends on the
wall clock except the "more than a day in the future" check.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import math
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2

from halflife.api.interest import _event_input, _event_inputs
from halflife.api.server import ServerConfig
from halflife.api.validation import Violations
from halflife.api.validation import to_timestamp as to_pb_timestamp
from halflife.config import BlendConfig, Config, RankingConfig, RatingConfig
from halflife.v1 import catalog_pb2, catalog_pb2_grpc, interest_pb2, interest_pb2_grpc, recommend_pb2
from halflife_client import AsyncHalflifeClient, HalflifeClient, Item, field_violations, to_timestamp
from tests.fakes import full_disk
from tests.serving import ServerThread, repeat_min_cosine, start_cli_server

T0 = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
DAY = dt.timedelta(days=1)
DIM = 384

VIEW = interest_pb2.EVENT_TYPE_VIEW
CLICK = interest_pb2.EVENT_TYPE_CLICK
LIKE = interest_pb2.EVENT_TYPE_LIKE
PURCHASE = interest_pb2.EVENT_TYPE_PURCHASE
RATE = interest_pb2.EVENT_TYPE_RATE
SEARCH = interest_pb2.EVENT_TYPE_SEARCH
REVIEW = interest_pb2.EVENT_TYPE_REVIEW
DISLIKE = interest_pb2.EVENT_TYPE_DISLIKE
PERSONALIZED = recommend_pb2.STRATEGY_PERSONALIZED
TRENDING = recommend_pb2.STRATEGY_TRENDING
RISING, STEADY, FADING = interest_pb2.TREND_RISING, interest_pb2.TREND_STEADY, interest_pb2.TREND_FADING

SCIFI, ROMCOM, COOKING, SPORTS, GARDENING = "science fiction", "romantic comedy", "cooking", "sports", "gardening"
TOPICS = {
    SCIFI: [
        "Sci-fi space movie: a starship crew explores a distant galaxy",
        "Sci-fi space movie: astronauts stranded on Mars",
        "Sci-fi space movie: aliens invade Earth from outer space",
        "Sci-fi space movie: a space station orbiting Jupiter",
        "Sci-fi space movie: time travel aboard a spaceship",
        "Sci-fi space movie: robots rebel on a space colony",
        "Sci-fi space movie: smugglers race across the galaxy",
        "Sci-fi space movie: first contact with an alien starship",
    ],
    ROMCOM: [
        "Romantic comedy: two strangers fall in love in Paris",
        "Romantic comedy: a wedding planner falls for the groom",
        "Romantic comedy: best friends realize they are in love",
        "Romantic comedy: a dating app mix-up leads to love",
        "Romantic comedy: a holiday romance in a snowy town",
        "Romantic comedy: rival bookshop owners fall in love",
        "Romantic comedy: a fake engagement turns into love",
        "Romantic comedy: love at first sight on a train",
    ],
    COOKING: [
        "Cooking show: easy pasta recipes for weeknight dinners",
        "Cooking show: baking sourdough bread at home",
        "Cooking show: a vegetarian curry recipe",
        "Cooking show: grilling steak and barbecue tips",
        "Cooking show: quick healthy breakfast recipes",
        "Cooking show: French pastry and dessert techniques",
    ],
    SPORTS: [
        "Sports broadcast: football world cup final",
        "Sports broadcast: marathon running race",
        "Sports broadcast: basketball playoffs game",
        "Sports broadcast: tennis grand slam match",
        "Sports broadcast: cycling race in the mountains",
        "Sports broadcast: swimming championship final",
    ],
    GARDENING: [
        "Gardening: growing tomatoes on a balcony",
        "Gardening: pruning roses in spring",
        "Gardening: composting kitchen scraps",
    ],
}
PREFIX = {SCIFI: "scifi", ROMCOM: "romcom", COOKING: "cook", SPORTS: "sport", GARDENING: "garden"}
IDS = {topic: [f"{PREFIX[topic]}-{i}" for i in range(len(texts))] for topic, texts in TOPICS.items()}
CATALOG = [
    Item(id=item_id, text=text, categories=[topic], attributes={"topic": topic})
    for topic, texts in TOPICS.items()
    for item_id, text in zip(IDS[topic], texts)
]
TOPIC_OF = {item.id: item.categories[0] for item in CATALOG}


# ---------------------------------------------------------------- helpers


def ev(event_id: str, user_id: str, kind: int, item_id: str = "", *, text: str = "", value: float | None = None,
       at: dt.datetime | None = None) -> interest_pb2.Event:
    event = interest_pb2.Event(event_id=event_id, user_id=user_id, type=kind, item_id=item_id, text=text)
    if value is not None:
        event.value = value
    if at is not None:
        event.event_time.CopyFrom(to_timestamp(at))
    return event


def token_text(token: str) -> str:
    """What a page token spells (base64url without padding), to forge others from."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def page_token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def fields(error: grpc.RpcError) -> list[str]:
    return [field for field, _ in field_violations(error)]


def ids(response) -> list[str]:
    return [item.item_id for item in response.items]


def scores(response) -> list[float]:
    return [item.score for item in response.items]


def assert_best_first(response) -> None:
    s = scores(response)
    assert s == sorted(s, reverse=True), s


def filt(include=(), exclude=(), exclude_ids=()) -> recommend_pb2.ItemFilter:
    return recommend_pb2.ItemFilter(
        include_categories=list(include), exclude_categories=list(exclude), exclude_item_ids=list(exclude_ids)
    )


def profile_summary(profile) -> list[tuple]:
    """What a profile says, comparable across servers and orders."""
    return [
        (
            round(i.strength, 9),
            round(i.share, 9),
            i.trend,
            tuple(label.label for label in i.labels),
            tuple(item.item_id for item in i.top_items),
            i.event_count,
            i.last_event_time.seconds,
        )
        for i in profile.interests
    ]


def assert_same_recommendations(a, b, tol: float = 1e-6) -> None:
    assert ids(a) == ids(b)
    np.testing.assert_allclose(scores(a), scores(b), rtol=0, atol=tol)
    assert getattr(a, "strategy", None) == getattr(b, "strategy", None)  # SimilarItems has none


def start_server(model_dir: Path, data_dir: Path, config: Config | None = None) -> ServerThread:
    """A fresh server (use as a context manager)."""
    return ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=data_dir, halflife=config or Config()))


# ---------------------------------------------------------------- the shared server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server for the module, with the topic catalogue loaded. Tests use
    their own user ids and event-id prefixes, so they do not see each other."""
    with ServerThread(
        ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path_factory.mktemp("interest"), halflife=Config())
    ) as running:
        with HalflifeClient(running.address) as client:
            assert client.upsert_items(CATALOG) == (len(CATALOG), 0)
        yield running


@pytest.fixture(scope="module")
def client(server):
    with HalflifeClient(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def profile_client(model_dir, tmp_path_factory):
    """A server scoring with the embedding profile alone (blend's co-occurrence
    and popularity off), for the semantics of filters, queries and explanations
    without other users' behaviour in the scores."""
    config = Config(blend=BlendConfig(cooccurrence=0.0, popularity=0.0))
    data_dir = tmp_path_factory.mktemp("profile-only")
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=data_dir, halflife=config)) as running:
        with HalflifeClient(running.address, timeout=30) as c:
            assert c.upsert_items(CATALOG) == (len(CATALOG), 0)
            yield c


@pytest.fixture(scope="module")
def vectors(client) -> dict[str, np.ndarray]:
    items = client.get_items([item.id for item in CATALOG], include_vectors=True)
    return {item.id: np.asarray(item.vector, dtype=np.float32) for item in items}


def likes(user: str, items, start: dt.datetime, step: dt.timedelta = dt.timedelta(hours=1), kind: int = LIKE,
          prefix: str | None = None):
    return [ev(f"{prefix or user}-{kind}-{n}", user, kind, item, at=start + n * step) for n, item in enumerate(items)]


# ================================================================ CatalogService


def test_upsert_counts_created_and_updated_and_get_items_returns_them_in_order(client, server):
    embedded_text = "Cooking show: slow roasted lamb with garlic"
    given = client.embed(["Cooking show: homemade ravioli"])[0] * 3.0  # any norm: normalised on the way in
    created = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    first = [
        Item(id="up-text", text=embedded_text, categories=[COOKING], attributes={"k": "v"}, create_time=created),
        # A vector wins over the text: the text is only stored.
        Item(id="up-vector", text="not what the vector says", categories=[COOKING], vector=given),
    ]
    assert client.upsert_items(first) == (2, 0)
    new_text = "Cooking show: lamb stew for winter nights"
    assert client.upsert_items([Item(id="up-text", text=new_text, categories=[COOKING]), Item(id="up-third", text="x")]) == (1, 1)

    got = client.get_items(["up-vector", "up-third", "up-text", "up-vector"], include_vectors=True)
    assert [item.id for item in got] == ["up-vector", "up-third", "up-text", "up-vector"]
    by_id = {item.id: item for item in got}
    # Replaced whole: new text, new categories, attributes and create_time gone.
    assert by_id["up-text"].text == new_text
    assert list(by_id["up-text"].categories) == [COOKING]
    assert dict(by_id["up-text"].attributes) == {} and not by_id["up-text"].HasField("create_time")
    stored = np.asarray(by_id["up-vector"].vector, dtype=np.float32)
    assert stored.shape == (DIM,)
    np.testing.assert_allclose(stored, given / np.linalg.norm(given), atol=1e-6)
    embedded = np.asarray(by_id["up-text"].vector, dtype=np.float32)
    assert float(embedded @ client.embed([new_text])[0]) > repeat_min_cosine(client.model_info().precision)
    assert abs(np.linalg.norm(embedded) - 1) < 1e-5

    plain = client.get_items(["up-vector"])[0]
    assert len(plain.vector) == 0 and plain.text == "not what the vector says"

    # Attributes and create_time round-trip; publication dates may be before 1970 or in the future.
    assert client.upsert_items([first[0]]) == (0, 1)
    again = client.get_items(["up-text"])[0]
    assert dict(again.attributes) == {"k": "v"}
    assert again.create_time.ToDatetime(tzinfo=dt.timezone.utc) == created
    old, future = dt.datetime(1931, 2, 12, tzinfo=dt.timezone.utc), NOW + 400 * DAY
    assert client.upsert_items([Item(id="up-third", text="x", create_time=old), Item(id="up-text", text="y", create_time=future)]) == (0, 2)
    got = {item.id: item for item in client.get_items(["up-third", "up-text"])}
    assert got["up-third"].create_time.ToDatetime(tzinfo=dt.timezone.utc) == old
    assert got["up-text"].create_time.seconds == int(future.timestamp())

    # SimilarItems finds the precomputed vector by meaning, not by its text.
    similar = client.similar_items(text="homemade ravioli pasta", limit=3)
    assert "up-vector" in ids(similar)
    assert client.delete_items(["up-text", "up-vector", "up-third"]) == 3


def test_get_items_not_found_names_each_missing_index(client):
    error = rpc_error(client.get_items, ["scifi-0", "nope-a", "romcom-0", "nope-b"])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert fields(error) == ["ids[1]", "ids[3]"]
    assert "nope-a" in dict(field_violations(error))["ids[1]"]


def listed_pages(list_page, ids_of) -> list[list[str]]:
    """ids_of(page) of each page a List RPC returns, from the first to the
    last: list_page(page_token) calls it for one."""
    pages, token = [], ""
    while True:
        page = list_page(token)
        pages.append(ids_of(page))
        if not (token := page.next_page_token):
            return pages


def test_list_items_pages_through_the_catalogue_once_in_id_order(client, server):
    ours = [f"list-{c}" for c in ("b", "A", "\u00e9", "\U0001f600", "a")]
    assert client.upsert_items([Item(id=i, text=f"Listed item {i}", categories=["listed"]) for i in ours]) == (5, 0)
    try:
        pages = listed_pages(lambda token: client.list_items(page_size=4, page_token=token),
                             lambda page: [item.id for item in page.items])
        everything = [i for page in pages for i in page]
        assert [len(page) for page in pages[:-1]] == [4] * (len(pages) - 1) and 1 <= len(pages[-1]) <= 4
        assert everything == sorted(set(everything), key=str.encode)  # by UTF-8 bytes, each once
        assert set(ours) | {item.id for item in CATALOG} <= set(everything)
        assert [item.id for item in client.iter_items()] == everything
        assert [item.id for item in client.iter_items(page_size=7)] == everything

        async def listed_async():
            async with AsyncHalflifeClient(server.address, timeout=30) as aio:
                first = await aio.list_items(page_size=3)
                return [item.id for item in first.items], [item.id async for item in aio.iter_items(page_size=3)]

        assert asyncio.run(listed_async()) == (everything[:3], everything)
        # Whole items, as GetItems returns them; vectors only when asked for.
        in_order = sorted(ours, key=str.encode)
        assert [item for item in client.iter_items() if item.id in ours] == client.get_items(in_order)
        with_vectors = [item for item in client.iter_items(include_vectors=True) if item.id in ours]
        assert with_vectors == client.get_items(in_order, include_vectors=True) and len(with_vectors[0].vector) == DIM
    finally:
        assert client.delete_items(ours) == len(ours)
    assert not set(ours) & {item.id for item in client.iter_items()}


def test_list_items_page_size_defaults_to_100_and_stops_at_1000(model_dir, tmp_path):
    # A server of its own: the module's would keep the free pages of 1,050 deleted items, room a full-disk test
    # counts on not having.
    rng = np.random.default_rng(7)
    many = [Item(id=f"many-{n:04d}", vector=rng.standard_normal(DIM)) for n in range(1050)]
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path, halflife=Config())) as running:
        with HalflifeClient(running.address, timeout=30) as client:
            for start in (0, 1000):
                client.upsert_items(many[start:start + 1000])
            default = client.list_items()
            assert [item.id for item in default.items] == [item.id for item in many[:100]] and default.next_page_token
            biggest = client.list_items(page_size=5000)
            assert len(biggest.items) == 1000 and biggest.next_page_token
            rest = client.list_items(page_size=1000, page_token=biggest.next_page_token)
            assert [item.id for item in [*biggest.items, *rest.items]] == [item.id for item in many]
            assert not rest.next_page_token


def test_items_changed_while_listing_are_listed_as_their_page_found_them(client):
    ours = [f"turn-{n}" for n in range(6)]
    client.upsert_items([Item(id=i, text=f"Turnover item {i}") for i in ours])
    listing = client.iter_items(page_size=1)  # a page per item: the next is read when asked for
    seen = []
    for item in listing:
        seen.append(item)
        if item.id == "turn-1":
            break
    client.delete_items(["turn-0", "turn-4"])  # one listed already, one not yet
    client.upsert_items([Item(id="turn-00", text="Created before the cursor"),
                         Item(id="turn-2a", text="Created after the cursor"),
                         Item(id="turn-3", text="Replaced after the cursor")])
    try:
        seen += listing
        ours_seen = [item for item in seen if item.id.startswith("turn-")]
        assert [item.id for item in ours_seen] == ["turn-0", "turn-1", "turn-2", "turn-2a", "turn-3", "turn-5"]
        assert ours_seen[4].text == "Replaced after the cursor"
        assert len(seen) == len({item.id for item in seen})
    finally:
        client.delete_items(ours + ["turn-00", "turn-2a"])


def test_list_items_refuses_tokens_it_did_not_make_and_negative_sizes(client):
    token = client.list_items(page_size=1).next_page_token
    after_a = page_token_of("ListItems:a")  # 15 characters: the last one's 2 low bits are padding
    assert client.list_items(page_token=after_a).items is not None
    for bad in ("not a token!", "_w",  # not base64; one byte that is not UTF-8
                after_a[:-1] + chr(ord(after_a[-1]) + 1), token + "=", token + "\n"):  # other spellings of real ones
        error = rpc_error(client.list_items, page_token=bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_token"], bad
    error = rpc_error(client.list_items, page_size=-1, page_token="!")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_size", "page_token"]
    assert "-1" in dict(field_violations(error))["page_size"]
    assert client.list_items(page_size=1, page_token=token).items  # and it goes on serving
    # Another List's token is refused, not read as an id to list after (a ListEvents position is a possible id).
    client.record_events([ev(f"tok-items-{n}", "tok-items-user", VIEW, "scifi-0", at=T0) for n in range(2)])
    events_token = client.list_events("tok-items-user", page_size=1).next_page_token
    error = rpc_error(client.list_items, page_token=events_token)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_token"]


def test_list_events_pages_through_a_users_log_as_recorded(client):
    user, other = "log-user", "log-other"
    first = [ev("log-3", user, RATE, "romcom-0", value=4.5, at=T0 - DAY),
             ev("log-1", user, SEARCH, text="space opera with a heist", at=T0 - 3 * DAY),  # recorded, not event, order
             ev("log-x", other, LIKE, "scifi-1", at=T0 - DAY),
             ev("log-2", user, REVIEW, "scifi-0", text="Loved the ship's AI", at=T0 - 2 * DAY),
             ev("log-4", user, VIEW, "cook-0", text=" \u200b ", at=T0 - DAY + dt.timedelta(microseconds=250))]
    unstamped = ev("log-5", user, CLICK, "sport-0")  # the server's time
    assert client.record_events(first) == (5, 0)
    before = dt.datetime.now(dt.timezone.utc)
    assert client.record_events([unstamped]) == (1, 0)
    after = dt.datetime.now(dt.timezone.utc)

    pages = listed_pages(lambda token: client.list_events(user, page_size=2, page_token=token),
                         lambda page: [e.event_id for e in page.events])
    assert pages == [["log-3", "log-1"], ["log-2", "log-4"], ["log-5"]]
    listed = {e.event_id: e for e in client.iter_events(user)}
    assert list(listed) == ["log-3", "log-1", "log-2", "log-4", "log-5"]
    for sent in first:
        if sent.user_id == user and sent.event_id != "log-4":
            assert listed[sent.event_id] == sent  # every field as sent: value set or not, text, time
    assert listed["log-3"].HasField("value") and not listed["log-2"].HasField("value")
    blank = listed["log-4"]  # its text of nothing readable beside an item: none, as stored
    blank_time = blank.event_time.ToDatetime(dt.timezone.utc)
    assert (blank.text, blank.item_id, blank_time) == ("", "cook-0", T0 - DAY + dt.timedelta(microseconds=250))
    assert before <= listed["log-5"].event_time.ToDatetime(dt.timezone.utc) <= after
    assert [e.event_id for e in client.iter_events(other)] == ["log-x"]
    assert not client.list_events("log-nobody").events and not client.list_events("log-nobody").next_page_token
    newest = listed_pages(lambda token: client.list_events(user, page_size=2, page_token=token, newest_first=True),
                          lambda page: [e.event_id for e in page.events])
    assert newest == [["log-5", "log-4"], ["log-2", "log-1"], ["log-3"]]
    # The order as the server read it: one from before newest_first leaves it false (the clients check).
    assert client.list_events(user, newest_first=True).newest_first and not client.list_events(user).newest_first
    assert [e for e in client.iter_events(user, newest_first=True)] == list(reversed(listed.values()))

    # Events recorded while paging come on later pages (newest first: not at all); an erased user has none.
    page = client.list_events(user, page_size=4)
    assert len(page.events) == 4 and page.next_page_token
    newest_page = client.list_events(user, page_size=3, newest_first=True)
    client.record_events([ev("log-6", user, LIKE, "scifi-2", at=T0)])
    rest = client.list_events(user, page_token=page.next_page_token)
    assert [e.event_id for e in rest.events] == ["log-5", "log-6"] and not rest.next_page_token
    rest = client.list_events(user, page_token=newest_page.next_page_token, newest_first=True)
    assert [e.event_id for e in rest.events] == ["log-1", "log-3"] and not rest.next_page_token
    assert client.delete_user(user) == 6
    assert not client.list_events(user).events and not client.list_events(user, page_token=page.next_page_token).events


def test_list_events_keeps_a_time_range_in_either_order_page_by_page(client):
    """start_time and end_time keep the events of [start_time, end_time) by
    event_time, in the order recorded or the reverse, whatever order their
    times are in (a backfill); pages follow the log, and the response says
    which range it read (a server from before the fields leaves it unset)."""
    user = "range-user"
    hours = [5, 1, 3, 2, 4, 0]  # recorded in this order, an hour apart from T0 - 6 h
    client.record_events([ev(f"range-{h}", user, VIEW, "scifi-0", at=T0 - dt.timedelta(hours=6 - h)) for h in hours])
    start, end = T0 - dt.timedelta(hours=5), T0 - dt.timedelta(hours=2)  # hours 1, 2, 3: not 4, end excluded

    def ids(**kw):
        return listed_pages(lambda token: client.list_events(user, page_size=2, page_token=token, **kw),
                            lambda page: [e.event_id for e in page.events])

    assert ids(start_time=start, end_time=end) == [["range-1", "range-3"], ["range-2"]]
    assert ids(start_time=start, end_time=end, newest_first=True) == [["range-2", "range-3"], ["range-1"]]
    assert sum(ids(start_time=start), []) == ["range-5", "range-1", "range-3", "range-2", "range-4"]
    assert sum(ids(end_time=start), []) == ["range-0"]
    assert [e.event_id for e in client.iter_events(user, start_time=T0, end_time=T0 + DAY)] == []
    page = client.list_events(user, start_time=start, end_time=end)
    assert page.start_time.ToDatetime(dt.timezone.utc) == start and page.end_time.ToDatetime(dt.timezone.utc) == end
    assert not client.list_events(user).HasField("start_time")
    for bad_start, bad_end in ((end, start), (start, start)):
        error = rpc_error(client.list_events, user, start_time=bad_start, end_time=bad_end)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["end_time"]
    request = interest_pb2.ListEventsRequest(user_id=user)
    request.start_time.nanos = -1
    with pytest.raises(grpc.RpcError) as raised:
        client._interest.ListEvents(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(raised.value) == ["start_time"]
    request = interest_pb2.ListEventsRequest(user_id=user)  # 1 ns wide: after, as sent (as stored, the same float)
    request.start_time.FromDatetime(T0)
    request.end_time.CopyFrom(request.start_time)
    request.end_time.nanos += 1
    assert not client._interest.ListEvents(request).events
    assert len(client.list_events(user).events) == 6  # and the server serves on


def test_list_events_refuses_bad_users_sizes_and_tokens(client):
    client.record_events([ev(f"tok-{n}", f"tok-user-{n % 2}", VIEW, "scifi-0", at=T0) for n in range(4)])
    token = client.list_events("tok-user-0", page_size=1).next_page_token
    assert client.list_events("tok-user-0", page_token=token).events  # the same user: fine
    error = rpc_error(client.list_events, "tok-user-1", page_token=token)  # another user's place in the log
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_token"]
    newest_token = client.list_events("tok-user-0", page_size=1, newest_first=True).next_page_token
    assert client.list_events("tok-user-0", page_token=newest_token, newest_first=True).events
    for sent, newest_first in ((token, True), (newest_token, False)):  # a place in the list of the other order
        error = rpc_error(client.list_events, "tok-user-0", page_token=sent, newest_first=newest_first)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_token"]
    items_token = client.list_items(page_size=1).next_page_token
    crc = token_text(token).split(".")[1]
    for bad in (items_token, "not a token", token + "=", page_token_of(f"ListEvents:007.{crc}"),
                page_token_of(f"ListEvents:99999999999999999999.{crc}")):
        error = rpc_error(client.list_events, "tok-user-0", page_token=bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["page_token"], bad
    error = rpc_error(client.list_events, "", page_size=-5)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["user_id", "page_size"]
    assert len(client.list_events("tok-user-0", page_size=5000).events) == 2  # more than the most is the most


def test_delete_items_is_idempotent_and_deleted_items_are_never_recommended(client):
    twins = [
        Item(id="gone-1", text="Romantic comedy: two strangers fall in love in Rome", categories=[ROMCOM]),
        Item(id="gone-2", text="Romantic comedy: two strangers fall in love in Paris again", categories=[ROMCOM]),
    ]
    assert client.upsert_items(twins) == (2, 0)
    user = "del-user"
    events = likes(user, ["romcom-0", "romcom-1", "gone-1"], T0 - 3 * DAY)
    # Popularity for the doomed items, so trending would pick them too.
    events += [ev(f"del-pop-{n}", f"del-pop-{n % 4}", VIEW, "gone-2", at=T0 - DAY) for n in range(12)]
    assert client.record_events(events) == (len(events), 0)
    before = client.recommend(user, 5, as_of=T0)
    assert "gone-2" in ids(before)
    assert ids(client.recommend("del-cold", 1, as_of=T0, item_filter=filt(include=[ROMCOM]))) == ["gone-2"]

    assert client.delete_items(["gone-1", "gone-2", "gone-never-existed", "gone-1"]) == 2
    assert client.delete_items(["gone-1", "gone-2"]) == 0

    everything = client.recommend(user, 1000, as_of=T0, include_seen=True)
    assert not {"gone-1", "gone-2"} & set(ids(everything))
    assert len(everything.items) == len(CATALOG)
    trending = client.recommend("del-cold", 1000, as_of=T0)
    assert trending.strategy == TRENDING and not {"gone-1", "gone-2"} & set(ids(trending))
    assert not {"gone-1", "gone-2"} & set(ids(client.similar_items(text=twins[0].text, limit=1000)))
    assert not {"gone-1", "gone-2"} & set(ids(client.similar_items(item_id="romcom-0", limit=1000)))
    error = rpc_error(client.get_items, ["romcom-0", "gone-1"])
    assert error.code() == grpc.StatusCode.NOT_FOUND and fields(error) == ["ids[1]"]
    # Recorded events keep their contribution, at a past as_of too (interest.proto's as_of_time), while
    # the items that describe the profile are today's; new events on the item are refused.
    profile = client.profile(user, as_of=T0, items_per_interest=20)
    assert sum(i.event_count for i in profile.interests) == 3
    assert not {"gone-1", "gone-2"} & {t.item_id for i in profile.interests for t in i.top_items}
    error = rpc_error(client.record_events, [ev("del-late", user, LIKE, "gone-1", at=T0)])
    assert error.code() == grpc.StatusCode.NOT_FOUND and fields(error) == ["events[0].item_id"]


# ================================================================ InterestService


def test_resending_an_event_whose_item_was_deleted_is_a_duplicate(client):
    assert client.upsert_items([Item(id="resend-item", text="Gardening: a soon deleted shovel")]) == (1, 0)
    batch = [ev("resend-0", "resend-user", LIKE, "resend-item", at=T0 - DAY),
             ev("resend-1", "resend-user", LIKE, "sport-5", at=T0 - DAY)]
    assert client.record_events(batch) == (2, 0)
    assert client.delete_items(["resend-item"]) == 1
    # A client retrying the batch (its first answer was lost) must learn it is stored.
    assert client.record_events(batch) == (0, 2)


def test_record_events_counts_accepted_and_duplicates(client):
    user = "idem-user"
    batch = likes(user, IDS[SCIFI][:3], T0 - 2 * DAY)
    assert client.record_events(batch) == (3, 0)
    assert client.record_events(batch) == (0, 3)  # a re-sent batch is stored once
    fresh = likes(user, IDS[SCIFI][3:5], T0 - DAY, prefix="idem-b")
    # Duplicates within a batch: the first wins, the rest count as duplicates.
    assert client.record_events([fresh[0], fresh[0], batch[1], fresh[1], fresh[1]]) == (2, 3)
    profile = client.profile(user, as_of=T0)
    assert [(c.type, c.count) for c in profile.event_counts] == [(LIKE, 5)]
    assert sum(i.event_count for i in profile.interests) == 5
    # One id for two events in a batch: refused whole, naming the second; the first was not kept meanwhile.
    other = likes("idem-other", IDS[SCIFI][5:6], T0 - DAY, prefix="idem-c")[0]
    conflicting = interest_pb2.Event()
    conflicting.CopyFrom(other)
    conflicting.user_id = "idem-someone-else"
    error = rpc_error(client.record_events, [fresh[0], other, conflicting])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["events[2].event_id"]
    assert "repeats events[1].event_id" in error.details()
    assert client.record_events([other, other]) == (1, 1)  # an identical repeat is a duplicate
    # Compared as sent: 1 ns apart are two events, though their times round to one float64.
    later = interest_pb2.Event()
    later.CopyFrom(other)
    later.event_id = "idem-d"
    later.event_time.nanos += 1
    first = interest_pb2.Event()
    first.CopyFrom(later)
    first.event_time.nanos -= 1
    error = rpc_error(client.record_events, [first, later])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["events[1].event_id"]
    # ... but read as the server reads them otherwise: a blank text is none, -0.0 is 0.
    blank = interest_pb2.Event()
    blank.CopyFrom(first)
    blank.text, blank.value = "   ", -0.0
    first.value = 0.0
    assert client.record_events([first, blank]) == (1, 1)


def test_get_profile_describes_interests(client):
    user = "prof-user"
    events = likes(user, IDS[SCIFI][:4], T0 - 10 * DAY)
    events += likes(user, IDS[COOKING][:3], T0 - 2 * DAY, kind=PURCHASE)
    events += [
        ev("prof-search", user, SEARCH, text="pasta recipes", at=T0 - 2 * DAY + dt.timedelta(hours=5)),
        ev("prof-dislike", user, DISLIKE, "sport-0", at=T0 - DAY),
        ev("prof-rate", user, RATE, "cook-4", value=5.0, at=T0 - 3 * DAY),
        ev("prof-future", user, VIEW, "sport-1", at=T0 + DAY),  # after as_of: ignored
    ]
    assert client.record_events(events) == (len(events), 0)
    profile = client.profile(user, as_of=T0, items_per_interest=2)
    assert profile.user_id == user
    counts = {c.type: c.count for c in profile.event_counts}
    assert counts == {LIKE: 4, PURCHASE: 3, SEARCH: 1, DISLIKE: 1, RATE: 1}
    assert [c.type for c in profile.event_counts] == sorted(counts)
    assert profile.last_event_time.ToDatetime(tzinfo=dt.timezone.utc) == T0 - DAY
    assert profile.negative_strength > 0
    interests = profile.interests
    assert len(interests) >= 2
    strengths = [i.strength for i in interests]
    assert strengths == sorted(strengths, reverse=True)
    assert sum(i.share for i in interests) == pytest.approx(1.0)
    for rank, interest in enumerate(interests):
        assert interest.interest_id == rank
        assert interest.share == pytest.approx(interest.strength / sum(strengths))
        assert interest.trend in (RISING, STEADY, FADING)
        assert 1 <= len(interest.labels) <= 3 and len(interest.top_items) == 2  # labels pointing its way only
        sims = [label.similarity for label in interest.labels]
        assert sims == sorted(sims, reverse=True) and all(0 < s <= 1.0001 for s in sims)
        assert [i.similarity for i in interest.top_items] == sorted((i.similarity for i in interest.top_items), reverse=True)
        assert all(item.text == next(c.text for c in CATALOG if c.id == item.item_id) for item in interest.top_items)
        assert interest.last_event_time.seconds <= profile.last_event_time.seconds
    # The positive events only: the dislike (negative) and the future view are not in any interest.
    assert sum(i.event_count for i in interests) == 9
    # The strongest interest is the recent purchases and the search: cooking.
    assert interests[0].labels[0].label == COOKING
    assert any(i.labels[0].label == SCIFI for i in interests)
    # Default: 3 representative items.
    assert all(len(i.top_items) == 3 for i in client.profile(user, as_of=T0).interests)
    # Replaying the past: only what had happened by then.
    past = client.profile(user, as_of=T0 - 5 * DAY)
    assert {c.type: c.count for c in past.event_counts} == {LIKE: 4}
    assert past.negative_strength == 0
    # With the default clock (now), the future view counts too.
    assert {c.type: c.count for c in client.profile(user).event_counts}[VIEW] == 1


def test_items_per_interest_0_lists_the_servers_configured_number(model_dir, tmp_path):
    """0 (a request's default) is the server's ranking.items_per_interest,
    which the reference names: it said "the server's default of 3", also
    where a server was configured otherwise."""
    config = Config(ranking=RankingConfig(items_per_interest=1))
    with start_server(model_dir, tmp_path, config) as running, HalflifeClient(running.address, timeout=30) as client:
        client.upsert_items(CATALOG)
        client.record_events(likes("ipi-user", IDS[SCIFI][:3], T0 - DAY))
        interests = client.profile("ipi-user", as_of=T0).interests
        assert interests and all(len(interest.top_items) == 1 for interest in interests)
        assert all(len(interest.top_items) == 2 for interest in client.profile("ipi-user", as_of=T0,
                                                                                items_per_interest=2).interests)
    field = interest_pb2.GetProfileRequest.DESCRIPTOR.fields_by_name["items_per_interest"]
    row = next(line for line in API_MD.read_text().splitlines() if line.startswith(f"| `{field.name}` |"))
    assert "`ranking.items_per_interest`" in row and "of 3" not in row


def test_unknown_user_has_an_empty_profile(client):
    profile = client.profile("nobody-ever", as_of=T0)
    assert profile.user_id == "nobody-ever"
    assert len(profile.interests) == 0 and len(profile.event_counts) == 0
    assert not profile.HasField("last_event_time") and profile.negative_strength == 0


def test_ratings_map_to_positive_neutral_and_negative(client):
    events = [
        ev("rt-hi", "rt-high", RATE, "scifi-0", value=5.0, at=T0 - DAY),
        ev("rt-mid", "rt-mid", RATE, "scifi-0", value=3.0, at=T0 - DAY),
        ev("rt-lo", "rt-low", RATE, "scifi-0", value=1.0, at=T0 - DAY),
    ]
    assert client.record_events(events) == (3, 0)
    high, mid, low = (client.profile(u, as_of=T0) for u in ("rt-high", "rt-mid", "rt-low"))
    assert len(high.interests) == 1 and high.negative_strength == 0
    assert len(mid.interests) == 0 and mid.negative_strength == 0
    assert len(low.interests) == 0 and low.negative_strength > 0
    assert all([(c.type, c.count) for c in p.event_counts] == [(RATE, 1)] for p in (high, mid, low))
    assert client.recommend("rt-high", 3, as_of=T0).strategy == PERSONALIZED
    assert client.recommend("rt-low", 3, as_of=T0).strategy == TRENDING  # no positive signal yet


# ================================================================ RecommendService


def test_cold_user_gets_trending_and_known_user_personalized(client):
    # Popularity on the gardening items only (no other test touches them): 6, 3, 1 views.
    counts = {"garden-0": 6, "garden-1": 3, "garden-2": 1}
    events = [
        ev(f"trend-{item}-{n}", f"trend-u{n}", VIEW, item, at=T0 - DAY)
        for item, count in counts.items()
        for n in range(count)
    ]
    assert client.record_events(events) == (10, 0)
    cold = client.recommend("trend-cold", 3, as_of=T0, item_filter=filt(include=[GARDENING]))
    assert cold.strategy == TRENDING
    assert ids(cold) == ["garden-0", "garden-1", "garden-2"]
    assert_best_first(cold)
    assert cold.items[0].score == pytest.approx(2 * cold.items[1].score, rel=1e-5)
    # Explained, a cold user's items name no interest or event: popularity alone produced them.
    explained = client.recommend("trend-cold", 3, as_of=T0, explain=True, item_filter=filt(include=[GARDENING]))
    for item in explained.items:
        assert item.HasField("explanation") and not item.explanation.interests and not item.explanation.events
        assert dict(item.explanation.score_parts) == {"popularity": pytest.approx(item.score)}

    warm = client.recommend("trend-u0", 3, as_of=T0)
    assert warm.strategy == PERSONALIZED
    assert "garden-0" not in ids(warm)  # already seen


def _record_scifi_fan(client) -> str:
    """Likes three sci-fi movies (recent) and one romantic comedy (older)."""
    user = "fan"
    events = likes(user, IDS[SCIFI][:3], T0 - 2 * DAY) + likes(user, ["romcom-0"], T0 - 20 * DAY, prefix="fan-old")
    assert client.record_events(events) == (4, 0)
    return user


@pytest.fixture(scope="module")
def scifi_fan(client) -> str:
    return _record_scifi_fan(client)


@pytest.fixture(scope="module")
def profile_fan(profile_client) -> str:
    return _record_scifi_fan(profile_client)


def test_personalized_ranking_follows_the_profile(client, scifi_fan):
    response = client.recommend(scifi_fan, 5, as_of=T0)
    assert response.strategy == PERSONALIZED
    assert len(response.items) == 5
    assert_best_first(response)
    assert [TOPIC_OF[i] for i in ids(response)[:3]] == [SCIFI] * 3
    assert not set(ids(response)) & {"scifi-0", "scifi-1", "scifi-2", "romcom-0"}


def test_filters_apply_before_top_k(profile_client, profile_fan):
    client, scifi_fan = profile_client, profile_fan
    seen = {"scifi-0", "scifi-1", "scifi-2", "romcom-0"}
    unfiltered = client.recommend(scifi_fan, 10, as_of=T0)
    assert len(unfiltered.items) == 10

    no_scifi = client.recommend(scifi_fan, 10, as_of=T0, item_filter=filt(exclude=[SCIFI]))
    assert len(no_scifi.items) == 10
    assert all(TOPIC_OF[i] != SCIFI for i in ids(no_scifi)) and not seen & set(ids(no_scifi))
    assert_best_first(no_scifi)

    # Cooking is far from this user's interests: none would be in a plain top-6.
    assert not any(TOPIC_OF[i] == COOKING for i in ids(client.recommend(scifi_fan, 6, as_of=T0)))
    cooking = client.recommend(scifi_fan, 6, as_of=T0, item_filter=filt(include=[COOKING]))
    assert sorted(ids(cooking)) == sorted(IDS[COOKING])

    both = client.recommend(scifi_fan, 100, as_of=T0, item_filter=filt(include=[COOKING, SPORTS], exclude=[SPORTS]))
    assert sorted(ids(both)) == sorted(IDS[COOKING])

    top5 = ids(unfiltered)[:5]
    rest = client.recommend(scifi_fan, 5, as_of=T0, item_filter=filt(exclude_ids=top5 + ["no-such-item"]))
    assert ids(rest) == ids(unfiltered)[5:10]

    assert len(client.recommend(scifi_fan, 5, as_of=T0, item_filter=filt(include=["no-such-category"])).items) == 0
    # Fewer than limit only when fewer pass.
    assert len(client.recommend(scifi_fan, 1000, as_of=T0).items) == len(CATALOG) - len(seen)


def test_include_seen(client, scifi_fan):
    seen = {"scifi-0", "scifi-1", "scifi-2", "romcom-0"}
    default = client.recommend(scifi_fan, 1000, as_of=T0)
    assert not seen & set(ids(default))
    with_seen = client.recommend(scifi_fan, 1000, as_of=T0, include_seen=True)
    assert seen <= set(ids(with_seen)) and len(with_seen.items) == len(CATALOG)
    assert set(ids(with_seen)[:3]) & seen  # what you liked is the closest to your profile


def test_query_blends_into_the_ranking(profile_client, profile_fan):
    client, scifi_fan = profile_client, profile_fan
    plain = client.recommend(scifi_fan, 1000, as_of=T0)
    blended = client.recommend(scifi_fan, 1000, as_of=T0, query="easy pasta recipes for dinner", explain=True)
    assert blended.strategy == PERSONALIZED
    assert ids(plain).index("cook-0") > 10
    assert ids(blended).index("cook-0") < 3
    parts = dict(blended.items[0].explanation.score_parts)
    assert {"interest", "query"} <= set(parts)
    assert sum(parts.values()) == pytest.approx(blended.items[0].score, abs=1e-5)


def test_query_steers_a_cold_users_trending_list(model_dir, tmp_path):
    with start_server(model_dir, tmp_path) as running, HalflifeClient(running.address) as client:
        client.upsert_items([item for item in CATALOG if item.categories[0] in (SPORTS, COOKING)])
        # Sports twice as popular as cooking; then a cold user searches for pasta.
        events = [ev(f"qcold-{item}-{n}", f"qcold-u{n}", VIEW, item, at=T0 - DAY) for item in IDS[SPORTS] for n in range(2)]
        events += [ev(f"qcold-{item}", "qcold-u0", VIEW, item, at=T0 - DAY) for item in IDS[COOKING]]
        assert client.record_events(events) == (len(events), 0)
        assert TOPIC_OF[ids(client.recommend("qcold-cold", 1, as_of=T0))[0]] == SPORTS
        response = client.recommend("qcold-cold", 3, as_of=T0, query="easy pasta recipes for dinner")
        assert response.strategy == TRENDING
        assert ids(response)[0] == "cook-0"


def test_explain_names_interests_events_and_score_parts(profile_client, profile_fan):
    client, scifi_fan = profile_client, profile_fan
    response = client.recommend(scifi_fan, 4, as_of=T0, explain=True)
    fan_events = {"fan-3-0", "fan-3-1", "fan-3-2", "fan-old-3-0"}
    for item in response.items:
        explanation = item.explanation
        assert 1 <= len(explanation.interests) <= 3
        assert all(len(c.labels) > 0 and 0 <= c.share <= 1 for c in explanation.interests)
        assert 1 <= len(explanation.events) <= 3
        assert {e.event_id for e in explanation.events} <= fan_events
        assert all(e.type == LIKE and e.weight > 0 and e.event_time.seconds > 0 for e in explanation.events)
        assert set(explanation.score_parts) == {"interest"}
        assert explanation.score_parts["interest"] == pytest.approx(item.score, abs=1e-5)
    top = response.items[0].explanation
    assert top.interests[0].labels[0] == SCIFI
    assert TOPIC_OF[top.events[0].item_id] == SCIFI
    sims = [e.similarity for e in top.events]
    assert all(-1 <= s <= 1.0001 for s in sims)
    assert all(not item.HasField("explanation") for item in client.recommend(scifi_fan, 4, as_of=T0).items)


def test_the_default_blend_adds_cooccurrence_and_popularity(client, scifi_fan):
    # Other users who liked the fan's sci-fi films also liked sport-0: the
    # co-occurrence signal (off in profile_client) lifts it for the fan.
    others = [e for n in range(3) for e in likes(f"cooc-{n}", IDS[SCIFI][:2] + ["sport-0"], T0 - 5 * DAY)]
    client.record_events(others)
    response = client.recommend(scifi_fan, 40, as_of=T0, explain=True)
    by_id = {item.item_id: item for item in response.items}
    sports = by_id["sport-0"].explanation.score_parts
    assert sports["cooccurrence"] > 0 and sports["popularity"] > 0
    for item in response.items:
        parts = dict(item.explanation.score_parts)
        assert {"interest", "cooccurrence", "popularity"} <= set(parts)
        assert sum(parts.values()) == pytest.approx(item.score, abs=1e-5)
    rank = ids(response).index("sport-0")
    assert rank < min(ids(response).index(i) for i in IDS[SPORTS] if i != "sport-0")


def test_diversity_changes_the_list_and_keeps_the_filters(client, scifi_fan, vectors):
    allowed = filt(include=[SCIFI, ROMCOM], exclude_ids=["romcom-7"])
    plain = client.recommend(scifi_fan, 5, as_of=T0, item_filter=allowed)
    diverse = client.recommend(scifi_fan, 5, as_of=T0, item_filter=allowed, diversity=0.9)
    assert diverse.strategy == PERSONALIZED and len(diverse.items) == 5
    assert ids(diverse) != ids(plain)
    assert ids(diverse)[0] == ids(plain)[0]  # MMR's first pick is the most relevant
    seen = {"scifi-0", "scifi-1", "scifi-2", "romcom-0"}
    assert all(TOPIC_OF[i] in (SCIFI, ROMCOM) for i in ids(diverse))
    assert not ({"romcom-7"} | seen) & set(ids(diverse))
    assert len(set(ids(diverse))) == 5

    def mean_pairwise(item_ids):
        v = np.stack([vectors[i] for i in item_ids])
        sim = v @ v.T
        return sim[~np.eye(len(item_ids), dtype=bool)].mean()

    assert mean_pairwise(ids(diverse)) < mean_pairwise(ids(plain))
    assert ids(client.recommend(scifi_fan, 5, as_of=T0, item_filter=allowed, diversity=0.0)) == ids(plain)


def test_similar_items(client, vectors):
    by_item = client.similar_items(item_id="scifi-0", limit=5)
    assert "scifi-0" not in ids(by_item) and len(by_item.items) == 5
    assert_best_first(by_item)
    assert all(TOPIC_OF[i] == SCIFI for i in ids(by_item)[:3])
    for item in by_item.items:  # the score is the cosine similarity
        assert item.score == pytest.approx(float(vectors["scifi-0"] @ vectors[item.item_id]), abs=1e-5)

    by_text = client.similar_items(text="recipes for pasta dinners", limit=3)
    assert ids(by_text)[0] == "cook-0"
    filtered = client.similar_items(item_id="scifi-0", limit=4, item_filter=filt(include=[COOKING], exclude_ids=["cook-0"]))
    assert len(filtered.items) == 4 and all(TOPIC_OF[i] == COOKING and i != "cook-0" for i in ids(filtered))

    error = rpc_error(client.similar_items, item_id="no-such-item", limit=3)
    assert error.code() == grpc.StatusCode.NOT_FOUND and fields(error) == ["item_id"]


def test_a_key_error_of_a_bug_in_similar_items_is_internal_not_a_missing_item(server, client, monkeypatch):
    def broken(*args, **kwargs):
        return {}["oops"]

    monkeypatch.setattr(server.server.interest, "_similar_items", broken)
    error = rpc_error(client.similar_items, item_id="scifi-0", limit=3)
    assert error.code() == grpc.StatusCode.INTERNAL and fields(error) == []


def test_a_panic_in_a_library_is_internal_not_a_hung_call(server, client, monkeypatch):
    """pyo3 raises a Rust panic (the tokenizers library's) as PanicException,
    a BaseException: uncaught by the handler's Exception, the call hung until
    its deadline, or for good without one (a review)."""
    class Panic(BaseException):
        pass

    def panicking(*args, **kwargs):
        raise Panic("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(server.server.interest, "_similar_items", panicking)
    began = time.monotonic()
    error = rpc_error(client.similar_items, item_id="scifi-0", limit=3, timeout=5)
    assert error.code() == grpc.StatusCode.INTERNAL and time.monotonic() - began < 4
    monkeypatch.undo()
    assert ids(client.similar_items(item_id="scifi-0", limit=3))  # and it serves on


# ================================================================ validation matrix

NOW = dt.datetime.now(dt.timezone.utc)


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def _bad_event(case: str) -> interest_pb2.Event:
    base = dict(event_id=f"bad-{case}", user_id="val-user", type=LIKE, item_id="scifi-0")
    if case == "unknown_item":
        base["item_id"] = "no-such-item"
    elif case == "empty_event_id":
        base["event_id"] = ""
    elif case == "long_event_id":
        base["event_id"] = "x" * 257
    elif case == "empty_user_id":
        base["user_id"] = ""
    elif case == "nul_in_event_id":
        base["event_id"] = "bad-nul\x00id"
    elif case == "control_in_user_id":
        base["user_id"] = "val\tuser"
    elif case == "nul_in_item_id":
        base["item_id"] = "scifi-0\x00whatever"
    elif case in ("nan_value", "inf_value"):
        base["value"] = math.nan if case == "nan_value" else math.inf
    elif case == "before_1970":
        base["event_time"] = _ts(-86400)
    elif case == "future":
        base["event_time"] = to_timestamp(NOW + 2 * DAY)
    elif case == "unspecified_type":
        base["type"] = interest_pb2.EVENT_TYPE_UNSPECIFIED
    elif case == "unknown_type":
        base["type"] = 99
    elif case == "no_item_no_text":
        base["item_id"] = ""
    elif case == "no_item_blank_text":
        base["item_id"] = ""
        base["text"] = "   "
    elif case == "rate_without_value":
        base["type"] = RATE
    elif case == "rate_off_the_scale":  # 45 for 4.5: stored as a positive rating, silently (an onboarding review)
        base["type"], base["value"] = RATE, 45.0
    elif case == "long_text":
        base["text"] = "y" * (32 * 1024 + 1)
    else:
        raise AssertionError(case)
    return interest_pb2.Event(**base)


EVENT_CASES = {
    "unknown_item": (grpc.StatusCode.NOT_FOUND, "events[1].item_id"),
    "empty_event_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].event_id"),
    "long_event_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].event_id"),
    "empty_user_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].user_id"),
    "nul_in_event_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].event_id"),
    "control_in_user_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].user_id"),
    "nul_in_item_id": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].item_id"),
    "nan_value": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].value"),
    "inf_value": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].value"),
    "before_1970": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].event_time"),
    "future": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].event_time"),
    "unspecified_type": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].type"),
    "unknown_type": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].type"),
    "no_item_no_text": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].item_id"),
    "no_item_blank_text": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].text"),
    "rate_without_value": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].value"),
    "rate_off_the_scale": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].value"),
    "long_text": (grpc.StatusCode.INVALID_ARGUMENT, "events[1].text"),
}


@pytest.mark.parametrize("case", sorted(EVENT_CASES))
def test_invalid_event_rejects_the_whole_batch(client, case):
    code, field = EVENT_CASES[case]
    good = [ev(f"good-{case}-0", f"val-{case}", LIKE, "scifi-1", at=T0 - DAY),
            ev(f"good-{case}-2", f"val-{case}", VIEW, "romcom-1", at=T0 - DAY)]
    error = rpc_error(client.record_events, [good[0], _bad_event(case), good[1]])
    assert error.code() == code, error.details()
    assert fields(error) == [field], field_violations(error)
    # Nothing was applied: the good events are new on their own.
    assert len(client.profile(f"val-{case}", as_of=T0).event_counts) == 0
    assert client.record_events(good) == (2, 0)


def test_the_batch_fast_path_agrees_with_the_full_event_checks():
    # RecordEvents builds events that pass cheaper checks directly; they must
    # accept exactly what the full checks accept, with the same values and the
    # same violations. Random events from each field's boundary cases:
    now = 1_750_000_000.25
    ids = ["", "a", "x" * 64, "x" * 65, "\U0001F600" * 64, "\U0001F600" * 65, "é" * 128, "é" * 129, "a\x00b",
           "\x7f", "tab\tid", "nbsp\u00a0id"]
    texts = ["", "   ", "\u200b\ufeff", "some text", "y" * 8192, "y" * 8193, "é" * 16384, "é" * 16385, "y" * (32 * 1024 + 1)]
    times = [None, (-1, 0), (0, 0), (int(now), 5), (int(now) + 86400, 250_000_000), (int(now) + 86401, 0),
             (253_402_300_800, 0), (10, 1_000_000_000), (10, -1)]
    values = [None, 0.0, 4.5, 5.0, 5.5, -0.5, 45.0, math.nan, math.inf, -math.inf]  # RATE's scale: 0 to 5
    types = [0, VIEW, RATE, DISLIKE, 12, 99]
    rng = np.random.default_rng(5)
    # each field keeps an ordinary valid value 80% of the time
    pick = lambda pool, usual: pool[rng.integers(len(pool))] if rng.random() < 0.2 else usual  # noqa: E731
    events = []
    for k in range(4000):
        event = interest_pb2.Event(event_id=pick(ids, f"e{k}"), user_id=pick(ids, "u1"), item_id=pick(ids[:4], "i1"),
                                   text=pick(texts, ""), type=pick(types, VIEW))
        if (value := pick(values, None)) is not None:
            event.value = value
        if (stamp := pick(times, (int(now) - 60, 0))) is not None:
            event.event_time.seconds, event.event_time.nanos = stamp
        events.append(event)
    fast, full = Violations(), Violations()
    built = _event_inputs(events, now, fast, RatingConfig())
    expected = [_event_input(e, f"events[{i}]", now, full, RatingConfig()) for i, e in enumerate(events)]
    assert [tuple(e) if e else e for e in built] == [tuple(e) if e else e for e in expected]
    assert fast.items == full.items
    assert 1000 < sum(e is not None for e in built) < 3000  # valid and invalid ones aplenty


def test_a_rating_just_off_the_scale_says_what_it_was():
    """`:g` printed 5.0000001 as 5, a rating refused for being 5 on a scale up to 5 (a review)."""
    violations = Violations()
    event = interest_pb2.Event(event_id="e", user_id="u", type=RATE, item_id="i", value=5.0000001)
    assert _event_inputs([event], 1_750_000_000.0, violations, RatingConfig()) == [None]
    assert violations.items[0][1].endswith("(the server's ratings.lowest and ratings.highest), got 5.0000001")


def test_a_time_more_than_a_day_ahead_names_the_servers_clock():
    """A server whose clock was set back two days told a client stamping
    events (or an as_of_time) at its own, right, time that they were "more
    than 24 hours in the future": the clock at fault went unnamed (a clock review)."""
    now = 1_750_000_000.0  # 2025-06-15T15:06:40Z
    expected = "is more than 24 hours ahead of the server's clock (2025-06-15T15:06:40Z)"
    event = interest_pb2.Event(event_id="e", user_id="u", type=VIEW, item_id="i")
    event.event_time.FromSeconds(int(now) + 2 * 86400)
    violations = Violations()
    assert _event_inputs([event], now, violations, RatingConfig()) == [None]
    assert violations.items == [("events[0].event_time", expected)]
    request = recommend_pb2.RecommendRequest(user_id="u", limit=1)
    request.as_of_time.FromSeconds(int(now) + 86401)
    violations = Violations()
    violations.timestamp(request, "as_of_time", "as_of_time", now)
    assert violations.items == [("as_of_time", expected)]


def test_a_timestamp_takes_timestamps_whole_range_and_nothing_past_it():
    """0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z, as
    google.protobuf.Timestamp defines it, where no clock applies (an item's
    create_time may be 1931)."""
    from halflife.api.validation import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS

    def read(seconds, nanos=0):
        request = recommend_pb2.RecommendRequest(user_id="u", limit=1)
        request.as_of_time.seconds, request.as_of_time.nanos = seconds, nanos
        violations = Violations()
        return violations.timestamp(request, "as_of_time", "as_of_time", None), violations.items

    assert read(MIN_TIMESTAMP_SECONDS) == (-62_135_596_800.0, [])
    assert read(MAX_TIMESTAMP_SECONDS, 999_999_999)[1] == []
    for seconds in (MIN_TIMESTAMP_SECONDS - 1, MAX_TIMESTAMP_SECONDS + 1):
        assert read(seconds) == (None, [("as_of_time", "is outside 0001-01-01 .. 9999-12-31")])
    for nanos in (-1, 1_000_000_000):
        assert read(0, nanos)[0] is None
    assert read(0)[0] == 0.0 and read(0)[1] == []


def test_each_check_says_whether_the_value_passed_and_records_what_did_not():
    """The servicers go on to read a value only where its check passed."""
    from halflife.api.validation import MAX_TIMESTAMP_SECONDS, event_time_window

    v = Violations()
    assert v.count([1, 2], "a", 2) and v.finite(1.5, "b") and v.text("x" * 32 * 1024, "c") and v.items == []
    assert not v.count([], "d", 2) and not v.count([1, 2, 3], "e", 2)
    assert not v.finite(float("nan"), "f") and not v.text("x" * (32 * 1024 + 1), "g")
    assert [field for field, _ in v.items] == ["d", "e", "f", "g"]
    assert event_time_window(1000.0) == {"earliest": 0.0, "latest": 1000.0 + 86400.0}
    # Past Timestamp's last second only the last nanosecond is clamped to; within it, the time as it is.
    assert to_pb_timestamp(MAX_TIMESTAMP_SECONDS + 0.5) == timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS,
                                                                                 nanos=500_000_000)
    assert to_pb_timestamp(MAX_TIMESTAMP_SECONDS + 1.0).nanos == 999_999_999


@pytest.mark.parametrize("text", [" \t\n ", "\u200b\ufeff\u200d", "\x01\ue000\u0301\ufffd"])  # tokenizers drop them
def test_blank_text_beside_an_item_is_no_text(text):
    """Whitespace or invisible characters alone are no text (without an item
    they are refused): embedded, they would pull the event's vector off its
    item's. Both paths: a 65-character event id takes the full checks."""
    events = [interest_pb2.Event(event_id=event_id, user_id="u", type=VIEW, item_id="i", text=text)
              for event_id in ("short", "x" * 65)]
    built = _event_inputs(events, 1_750_000_000.0, Violations(), RatingConfig())
    assert [(e.item_id, e.text) for e in built] == [("i", None), ("i", None)]


@pytest.mark.parametrize("text", [" \t ", "\u200b\ufeff", "\x00\u0301"])
def test_unreadable_text_alone_is_refused_as_such(client, text):
    """Whitespace, U+200B and U+FEFF, a NUL or a lone accent tokenize to
    nothing: an item of them embedded as the empty text. Each is refused
    on the text field, saying why (not "empty", nor "only whitespace")."""
    unreadable = "holds nothing the model reads"
    calls = [
        (lambda: client.upsert_items([Item(id="blank", text=text)]), "items[0].text"),
        (lambda: client.record_events([ev("blank-e", "u", LIKE, text=text, at=T0)]), "events[0].text"),
        (lambda: client.recommend("u", 3, query=text), "query"),
        (lambda: client._recommend.SimilarItems(recommend_pb2.SimilarItemsRequest(text=text, limit=3), timeout=30),
         "text"),
    ]
    for call, field in calls:
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        [(named, description)] = field_violations(error)
        assert named == field and description.startswith(unreadable), (field, description)
    # Missing altogether, they say so.
    assert field_violations(rpc_error(lambda: client.upsert_items([Item(id="none", text="")]))) == [
        ("items[0].text", "is required when no vector is given")]
    assert fields(rpc_error(lambda: client.record_events([ev("none-e", "u", LIKE, at=T0)]))) == ["events[0].item_id"]
    error = rpc_error(lambda: client._recommend.SimilarItems(recommend_pb2.SimilarItemsRequest(text="", limit=3), timeout=30))
    assert field_violations(error) == [("text", "must not be empty")]


def test_every_bad_event_is_named(client):
    batch = [
        ev("multi-0", "val-multi", LIKE, "scifi-0", at=T0),
        _bad_event("nan_value"),
        ev("multi-2", "val-multi", LIKE, "scifi-0", at=T0),
        _bad_event("unspecified_type"),
        _bad_event("before_1970"),
    ]
    error = rpc_error(client.record_events, batch)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["events[1].value", "events[3].type", "events[4].event_time"]
    # Several unknown items: NOT_FOUND naming each.
    error = rpc_error(client.record_events, [ev("multi-x", "val-multi", LIKE, "nope-1"), batch[0], ev("multi-y", "val-multi", LIKE, "nope-2")])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert fields(error) == ["events[0].item_id", "events[2].item_id"]
    assert client.record_events([batch[0], batch[2]]) == (2, 0)


def test_a_thousand_unknown_items_still_fit_the_error_trailer(client):
    # gRPC refuses trailers over 16 KiB, and from 8 KiB at random: a violation for each of
    # 1,000 events did not fit, and the caller saw RESOURCE_EXHAUSTED about metadata instead.
    batch = [ev(f"lost-{n}", "val-lost", LIKE, f"no-such-item-with-a-long-name-{n:04}") for n in range(1000)]
    error = rpc_error(client.record_events, batch)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    # Under the 8 KiB soft limit, as gRPC counts it (name + value + 32 bytes per entry), with
    # 1 KiB left for grpc-status and grpc-message, which the client does not list: never refused.
    assert sum(len(key) + len(value) + 32 for key, value in error.trailing_metadata()) <= 7 * 1024
    named = fields(error)
    assert 10 < len(named) < 1000 and named == [f"events[{n}].item_id" for n in range(len(named))]
    assert f"1000 violations; the details list the first {len(named)}" in error.details()


def test_event_batch_sizes(client):
    error = rpc_error(client.record_events, [])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["events"]
    batch = [ev(f"big-{n}", "val-big", VIEW, "sport-0", at=T0 - DAY) for n in range(1001)]
    error = rpc_error(client.record_events, batch)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["events"]
    assert "1001" in field_violations(error)[0][1]
    assert client.record_events(batch[:1000]) == (1000, 0)


def test_event_times_within_a_day_ahead_and_unset_are_accepted(model_dir, tmp_path):
    # A server of its own: events at the wall clock's time would move the shared
    # server's popularity landmark years past T0.
    with start_server(model_dir, tmp_path) as running, HalflifeClient(running.address) as client:
        client.upsert_items(CATALOG[:3])
        _check_event_times(client)


def _check_event_times(client):
    soon = ev("time-soon", "val-time", VIEW, "scifi-1", at=NOW + dt.timedelta(hours=12))
    unset = ev("time-unset", "val-time", VIEW, "scifi-2")
    before = time.time()
    assert client.record_events([soon, unset]) == (2, 0)
    profile = client.profile("val-time", as_of=NOW + DAY)
    assert profile.last_event_time.seconds == int((NOW + dt.timedelta(hours=12)).timestamp())
    # The unset one got the server's clock.
    past = client.profile("val-time", as_of=NOW + dt.timedelta(hours=1))
    assert before - 1 <= past.last_event_time.ToSeconds() <= time.time() + 1


def _bad_item(case: str) -> catalog_pb2.Item:
    item = catalog_pb2.Item(id=f"bad-item-{case}", text="Cooking show: something", categories=[COOKING])
    if case == "empty_id":
        item.id = ""
    elif case == "wrong_dimension":
        item.vector.extend([0.1] * (DIM - 1))
    elif case == "nan_vector":
        item.vector.extend([0.1] * (DIM - 1) + [math.nan])
    elif case == "inf_vector":
        item.vector.extend([math.inf] + [0.1] * (DIM - 1))
    elif case == "zero_vector":
        item.vector.extend([0.0] * DIM)
    elif case == "no_text_no_vector":
        item.text = " "
    elif case == "duplicate_id":
        item.id = "good-item-duplicate_id"
    elif case == "create_after_9999":
        item.create_time.CopyFrom(_ts(253_402_300_800))
    elif case == "create_bad_nanos":
        item.create_time.CopyFrom(timestamp_pb2.Timestamp(seconds=5, nanos=1_000_000_000))
    elif case == "empty_category":
        item.categories.append("")
    elif case == "nul_in_id":
        item.id = "cook-0\x00whatever"
    elif case == "control_in_category":
        item.categories.append("new\nline")
    elif case == "long_category":
        item.categories.append("c" * 129)
    elif case == "large_attributes":
        item.attributes.update({f"k{n:02}": "v" * 1022 for n in range(16)})  # 16 x 1,025 bytes
    elif case == "long_text":
        item.text = "z" * (32 * 1024 + 1)
    else:
        raise AssertionError(case)
    return item


ITEM_CASES = {
    "empty_id": "items[1].id",
    "wrong_dimension": "items[1].vector",
    "nan_vector": "items[1].vector",
    "inf_vector": "items[1].vector",
    "zero_vector": "items[1].vector",
    "no_text_no_vector": "items[1].text",
    "duplicate_id": "items[1].id",
    "create_after_9999": "items[1].create_time",
    "create_bad_nanos": "items[1].create_time",
    "empty_category": "items[1].categories[1]",
    "nul_in_id": "items[1].id",
    "control_in_category": "items[1].categories[1]",
    "long_category": "items[1].categories[1]",
    "large_attributes": "items[1].attributes",
    "long_text": "items[1].text",
}


@pytest.mark.parametrize("case", sorted(ITEM_CASES))
def test_invalid_item_rejects_the_whole_batch(client, case):
    good = catalog_pb2.Item(id=f"good-item-{case}", text="Gardening: watering cactus", categories=[GARDENING])
    error = rpc_error(client.upsert_items, [good, _bad_item(case)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == [ITEM_CASES[case]], field_violations(error)
    assert rpc_error(client.get_items, [good.id]).code() == grpc.StatusCode.NOT_FOUND
    assert client.upsert_items([good]) == (1, 0)
    assert client.delete_items([good.id]) == 1


def test_times_sent_to_the_microsecond_come_back_as_sent():
    """Python's ToDatetime truncates: a time stored as float seconds came
    back 1 us early about half the time (a clients review)."""
    import datetime as dt

    from halflife.api.validation import stored_seconds

    rng = np.random.default_rng(3)
    for seconds in rng.integers(0, 4_000_000_000, 2_000):
        for micros in rng.integers(0, 1_000_000, 5):
            sent = dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc) + dt.timedelta(microseconds=int(micros))
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(sent)
            back = to_pb_timestamp(stored_seconds(stamp.seconds, stamp.nanos))
            assert back.ToDatetime(dt.timezone.utc) == sent, (sent, back)
    # To the nanosecond: within one float64 spacing, as docs/api.md says.
    back = to_pb_timestamp(stored_seconds(1_700_000_000, 123_456_789))
    assert (back.seconds, back.nanos) == (1_700_000_000, 123_456_717)
    # To the microsecond only within +-2^33 s, where the spacing is under 1 us: an item's date may lie outside
    # (years 1 to 9999), and docs/api.md said such a time came back as sent, whatever its year.
    edge = 2**33 - 1
    for micros in rng.integers(0, 1_000_000, 2_000):
        for seconds in (edge, -edge - 1):
            back = to_pb_timestamp(stored_seconds(seconds, int(micros) * 1000))
            assert (back.seconds, back.nanos) == (seconds, micros * 1000)
    api_md = " ".join((Path(__file__).parents[1] / "docs" / "api.md").read_text(encoding="utf-8").split())
    assert "as sent from 1697-10-17 to 2242-03-16 (±2^33 s" in api_md
    for sent, returned in (("9999-01-01T00:00:00.123Z", ".122986Z"), ("1500-06-01T00:00:00.123456Z", ".123455Z")):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromJsonString(sent)
        assert to_pb_timestamp(stored_seconds(stamp.seconds, stamp.nanos)).ToJsonString() == sent[:19] + returned
        assert f"`{sent}` returns as `{returned}`" in api_md or f"`{sent}` as `{returned}`" in api_md


def test_stored_times_come_back_as_valid_timestamps(client):
    # Times are stored as float seconds: the last nanosecond of 9999 reads back
    # as 253402300800.0, past Timestamp's range, and x.9999999996 rounds up.
    assert to_pb_timestamp(253_402_300_800.0) == timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    assert to_pb_timestamp(1.9999999996) == timestamp_pb2.Timestamp(seconds=2)
    assert to_pb_timestamp(-0.25) == timestamp_pb2.Timestamp(seconds=-1, nanos=750_000_000)
    last = catalog_pb2.Item(id="last-of-9999", text="Gardening: the last day",
                            create_time=timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999))
    client.upsert_items([last])
    stamp = client.get_items([last.id])[0].create_time
    assert stamp.ToJsonString() == "9999-12-31T23:59:59.999999999Z"
    client.delete_items([last.id])


def test_item_batch_sizes_and_id_lists(client):
    error = rpc_error(client.upsert_items, [])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["items"]
    many = [catalog_pb2.Item(id=f"many-{n}", vector=[1.0] + [0.0] * (DIM - 1)) for n in range(1001)]
    error = rpc_error(client.upsert_items, many)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["items"]
    assert rpc_error(client.get_items, ["many-0"]).code() == grpc.StatusCode.NOT_FOUND
    for call in (client.get_items, client.delete_items):
        for bad, expected in (([], ["ids"]), (["scifi-0", ""], ["ids[1]"]), (["x"] * 1001, ["ids"]),
                              (["scifi-0\x00whatever"], ["ids[0]"])):
            error = rpc_error(call, bad)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == expected
    assert len(client.get_items(["scifi-0"])) == 1  # nothing was deleted


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(user_id="", limit=5), "user_id"),
        (dict(user_id="fan", limit=0), "limit"),
        (dict(user_id="fan", limit=-1), "limit"),
        (dict(user_id="fan", limit=1001), "limit"),
        (dict(user_id="fan", limit=5, diversity=1.5), "diversity"),
        (dict(user_id="fan", limit=5, diversity=-0.1), "diversity"),
        (dict(user_id="fan", limit=5, diversity=math.nan), "diversity"),
        (dict(user_id="fan", limit=5, as_of_time=_ts(-5)), "as_of_time"),
        (dict(user_id="fan", limit=5, filter=filt(include=[""])), "filter.include_categories[0]"),
        (dict(user_id="fan", limit=5, filter=filt(exclude_ids=["a", ""])), "filter.exclude_item_ids[1]"),
        (dict(user_id="fan", limit=5, filter=filt(exclude_ids=["x" * 257])), "filter.exclude_item_ids[0]"),
        (dict(user_id="fan", limit=5, filter=filt(exclude=["c" * 129])), "filter.exclude_categories[0]"),
        (dict(user_id="fan", limit=5, filter=filt(include=["a\x00b"])), "filter.include_categories[0]"),
        (dict(user_id="f" * 257, limit=5), "user_id"),
        (dict(user_id="fan", limit=5, query=" \n "), "query"),
    ],
)
def test_invalid_recommend_requests(client, kwargs, field):
    request = recommend_pb2.RecommendRequest(**kwargs)
    error = rpc_error(client._recommend.Recommend, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == [field]


@pytest.mark.parametrize(
    "request_, field",
    [
        (recommend_pb2.SimilarItemsRequest(limit=3), ["item_id", "text"]),  # fields, not the oneof "target"
        (recommend_pb2.SimilarItemsRequest(item_id="", limit=3), ["item_id"]),
        (recommend_pb2.SimilarItemsRequest(text="  ", limit=3), ["text"]),
        (recommend_pb2.SimilarItemsRequest(item_id="scifi-0", limit=0), ["limit"]),
        (recommend_pb2.SimilarItemsRequest(text="space", limit=1001), ["limit"]),
    ],
)
def test_invalid_similar_items_requests(client, request_, field):
    error = rpc_error(client._recommend.SimilarItems, request_, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == field


def test_invalid_profile_and_delete_user_requests(client):
    error = rpc_error(client.profile, "")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["user_id"]
    error = rpc_error(client.profile, "fan", items_per_interest=21)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == [("items_per_interest", "must be between 0 and 20, got 21")]
    request = interest_pb2.GetProfileRequest(user_id="fan", as_of_time=_ts(-1))
    error = rpc_error(client._interest.GetProfile, request, timeout=30)
    assert fields(error) == ["as_of_time"]
    error = rpc_error(client.delete_user, "")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(error) == ["user_id"]


def test_a_full_disk_is_unavailable_and_a_retry_records_once(client, server):
    events = likes("disk-full", IDS[COOKING] * 50, T0 - 2 * DAY, step=dt.timedelta(minutes=1))  # 300: new pages
    full_disk(server.server.store, True)
    try:
        for _ in range(2):
            error = rpc_error(client.record_events, events)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "full" in error.details(), error.details()
        assert len(client.profile("disk-full", as_of=T0).event_counts) == 0  # reads still served
    finally:
        full_disk(server.server.store, False)
    assert client.record_events(events) == (300, 0)
    assert client.record_events(events) == (0, 300)


def test_server_keeps_serving_after_errors(client, scifi_fan):
    for _ in range(3):
        rpc_error(client.record_events, [_bad_event("nan_value")])
        rpc_error(client.recommend, scifi_fan, 0)
    assert client.recommend(scifi_fan, 2, as_of=T0).strategy == PERSONALIZED


# ================================================================ real-time drift


def test_interest_drifts_to_the_recent_topic(client):
    user = "drifter"
    old = [ev(f"drift-old-{n}", user, LIKE, IDS[SCIFI][n % 5], at=T0 - (200 + n) * DAY) for n in range(12)]
    new = [ev(f"drift-new-{n}", user, LIKE, IDS[ROMCOM][n], at=T0 - (5 - n) * DAY) for n in range(5)]
    assert client.record_events(old + new) == (17, 0)

    response = client.recommend(user, 3, as_of=T0)
    assert [TOPIC_OF[i] for i in ids(response)] == [ROMCOM] * 3, ids(response)
    profile = client.profile(user, as_of=T0)
    top = profile.interests[0]
    assert top.labels[0].label == ROMCOM and top.trend == RISING
    assert top.share > 0.5
    old_interests = [i for i in profile.interests if i.labels[0].label == SCIFI]
    assert old_interests and max(old_interests, key=lambda i: i.strength).trend == FADING
    assert all(i.trend != RISING for i in old_interests)

    # Half a year earlier, before the new topic: the same user was all sci-fi.
    then = T0 - 190 * DAY
    assert [TOPIC_OF[i] for i in ids(client.recommend(user, 3, as_of=then))] == [SCIFI] * 3
    assert client.profile(user, as_of=then).interests[0].labels[0].label == SCIFI


def test_dislikes_push_similar_items_down(client):
    base = likes("neg-a", IDS[SCIFI][:3], T0 - 3 * DAY, prefix="neg-a-sci")
    base += likes("neg-a", IDS[ROMCOM][:3], T0 - 3 * DAY + dt.timedelta(minutes=30), prefix="neg-a-rom")

    def copy_for(user, events):
        return [ev(e.event_id.replace("neg-a", user), user, e.type, e.item_id, at=e.event_time.ToDatetime(tzinfo=dt.timezone.utc)) for e in events]

    dislikes = [ev(f"neg-b-dis-{n}", "neg-b", DISLIKE, item, at=T0 - DAY) for n, item in enumerate(["romcom-3", "romcom-4"])]
    assert client.record_events(base + copy_for("neg-b", base) + dislikes) == (14, 0)

    mask = filt(exclude_ids=["romcom-3", "romcom-4"])  # the same candidates for both users
    plain = ids(client.recommend("neg-a", 1000, as_of=T0, item_filter=mask))
    disliked = client.recommend("neg-b", 1000, as_of=T0, item_filter=mask, explain=True)
    romcom_rank = lambda ranking: np.mean([r for r, i in enumerate(ranking) if TOPIC_OF[i] == ROMCOM])
    assert romcom_rank(ids(disliked)) > romcom_rank(plain) + 1
    assert [TOPIC_OF[i] for i in ids(disliked)[:2]] == [SCIFI] * 2
    assert all(item.explanation.score_parts["negative"] < 0 for item in disliked.items[:3])
    assert client.profile("neg-b", as_of=T0).negative_strength > 0
    assert client.profile("neg-a", as_of=T0).negative_strength == 0


# ================================================================ late and out-of-order events


def test_late_and_out_of_order_events_give_the_same_profile(client):
    items = IDS[SCIFI][:4] + IDS[COOKING][:3] + IDS[ROMCOM][:3] + IDS[SCIFI][4:6]
    kinds = [LIKE, VIEW, CLICK, PURCHASE]
    plan = [(n, items[n], kinds[n % 4], T0 - (40 - 3 * n) * DAY) for n in range(len(items))]

    def events(user, order):
        return [ev(f"{user}-{n}", user, kind, item, at=at) for n, item, kind, at in (plan[k] for k in order)]

    in_order = list(range(len(plan)))
    reverse = in_order[::-1]
    shuffled = [5, 0, 11, 3, 8, 1, 10, 2, 7, 4, 9, 6]
    # in order, in batches of 3, reading the profile after each batch
    for start in range(0, len(plan), 3):
        assert client.record_events(events("ooo-a", in_order[start : start + 3]))[0] == 3
        client.profile("ooo-a", as_of=T0)
        client.recommend("ooo-a", 3, as_of=T0)
    # newest first, one at a time (every event late), reading after each, plus re-sends
    for k in reverse:
        assert client.record_events(events("ooo-b", [k])) == (1, 0)
        client.profile("ooo-b", as_of=T0)
    assert client.record_events(events("ooo-b", reverse[:4])) == (0, 4)
    # shuffled, in two batches with a read between
    assert client.record_events(events("ooo-c", shuffled[:6])) == (6, 0)
    client.profile("ooo-c", as_of=T0)
    assert client.record_events(events("ooo-c", shuffled[6:])) == (6, 0)
    # all at once, never read before
    assert client.record_events(events("ooo-d", shuffled[::-1])) == (12, 0)

    users = ["ooo-a", "ooo-b", "ooo-c", "ooo-d"]
    profiles = [client.profile(u, as_of=T0) for u in users]
    reference = profile_summary(profiles[0])
    assert len(reference) >= 2
    for profile in profiles[1:]:
        assert profile_summary(profile) == reference
        assert [(c.type, c.count) for c in profile.event_counts] == [(c.type, c.count) for c in profiles[0].event_counts]
        assert profile.last_event_time == profiles[0].last_event_time
    recs = [client.recommend(u, 8, as_of=T0, explain=True) for u in users]
    for rec in recs[1:]:
        assert_same_recommendations(rec, recs[0], tol=1e-6)
    # ... and in the past too
    then = T0 - 20 * DAY
    past = [client.recommend(u, 5, as_of=then) for u in users]
    for rec in past[1:]:
        assert_same_recommendations(rec, past[0], tol=1e-6)
    assert profile_summary(client.profile("ooo-b", as_of=then)) == profile_summary(client.profile("ooo-a", as_of=then))


# ================================================================ DeleteUser


def test_delete_user_erases_everything(client):
    user = "forget-me"
    events = likes(user, IDS[SPORTS][:3], T0 - 2 * DAY) + [ev("forget-me-search", user, SEARCH, text="tennis", at=T0 - DAY)]
    assert client.record_events(events) == (4, 0)
    assert client.recommend(user, 3, as_of=T0).strategy == PERSONALIZED
    assert len(client.profile(user, as_of=T0).interests) > 0

    assert client.delete_user(user) == 4
    profile = client.profile(user, as_of=T0)
    assert len(profile.interests) == 0 and len(profile.event_counts) == 0
    assert not profile.HasField("last_event_time")
    assert client.recommend(user, 3, as_of=T0).strategy == TRENDING
    assert client.delete_user(user) == 0
    assert client.delete_user("never-existed") == 0
    # Truly gone: the same event ids are new again.
    assert client.record_events(events) == (4, 0)
    assert client.recommend(user, 3, as_of=T0).strategy == PERSONALIZED


# ================================================================ durability: clean restart


def _durability_events() -> list[interest_pb2.Event]:
    events = likes("dur-a", IDS[SCIFI][:3], T0 - 30 * DAY)
    events += likes("dur-a", IDS[COOKING][:2], T0 - 2 * DAY, kind=PURCHASE)
    events += [
        ev("dur-a-search", "dur-a", SEARCH, text="french desserts", at=T0 - DAY),
        ev("dur-a-review", "dur-a", interest_pb2.EVENT_TYPE_REVIEW, "cook-5", text="lovely pastries", at=T0 - DAY),
        ev("dur-a-dislike", "dur-a", DISLIKE, "sport-0", at=T0 - 3 * DAY),
        ev("dur-a-rate", "dur-a", RATE, "romcom-1", value=4.5, at=T0 - 4 * DAY),
        ev("dur-a-deleted", "dur-a", LIKE, "dur-doomed", at=T0 - 5 * DAY),
    ]
    events += likes("dur-b", IDS[ROMCOM][:4], T0 - 8 * DAY, step=DAY)
    # Distinct popularity (ties would be ordered by the catalogue's row layout: see the tie test).
    events += [ev(f"dur-pop-{n}", f"dur-pop-{n % 3}", VIEW, IDS[SPORTS][n % 4], at=T0 - n * dt.timedelta(hours=7)) for n in range(20)]
    return events


def _snapshot(client) -> dict:
    users = ["dur-a", "dur-b", "dur-cold"]
    return {
        "items": client.get_items([i.id for i in CATALOG], include_vectors=True),
        "profiles": {u: client.profile(u, as_of=T0, items_per_interest=5) for u in users},
        "past_profiles": {u: client.profile(u, as_of=T0 - 6 * DAY) for u in users},
        "recommend": {u: client.recommend(u, 10, as_of=T0, explain=True) for u in users},
        "past": {u: client.recommend(u, 10, as_of=T0 - 6 * DAY) for u in users},
        "diverse": {u: client.recommend(u, 5, as_of=T0, diversity=0.5, item_filter=filt(exclude=[SPORTS])) for u in users[:2]},
        "similar": client.similar_items(item_id="cook-1", limit=10),
    }


def test_restart_keeps_items_events_profiles_and_recommendations(model_dir, tmp_path):
    data = tmp_path / "data"
    with start_server(model_dir, data) as first, HalflifeClient(first.address, timeout=30) as client:
        assert client.upsert_items(CATALOG + [Item(id="dur-doomed", text="Cooking show: doomed soup", categories=[COOKING])]) == (len(CATALOG) + 1, 0)
        events = _durability_events()
        assert client.record_events(events) == (len(events), 0)
        assert client.delete_items(["dur-doomed"]) == 1
        before = _snapshot(client)
    assert before["recommend"]["dur-a"].strategy == PERSONALIZED
    assert before["recommend"]["dur-cold"].strategy == TRENDING

    with start_server(model_dir, data) as second, HalflifeClient(second.address, timeout=30) as client:
        after = _snapshot(client)
        # Nothing was embedded again: not the catalogue, not the labels.
        assert second.server.backend.batcher.batches_run == 0
        for a, b in zip(before["items"], after["items"]):
            assert a.id == b.id and a.text == b.text and list(a.categories) == list(b.categories)
            assert np.array_equal(np.asarray(a.vector, np.float32), np.asarray(b.vector, np.float32))
        for user in before["profiles"]:
            assert profile_summary(after["profiles"][user]) == profile_summary(before["profiles"][user])
            assert after["profiles"][user].event_counts == before["profiles"][user].event_counts
            assert after["profiles"][user].last_event_time == before["profiles"][user].last_event_time
            assert after["profiles"][user].negative_strength == pytest.approx(before["profiles"][user].negative_strength, rel=1e-9)
            assert profile_summary(after["past_profiles"][user]) == profile_summary(before["past_profiles"][user])
            for kind in ("recommend", "past", "diverse"):
                if user in before[kind]:
                    assert_same_recommendations(after[kind][user], before[kind][user])
            for x, y in zip(after["recommend"][user].items, before["recommend"][user].items):
                assert [e.event_id for e in x.explanation.events] == [e.event_id for e in y.explanation.events]
        assert_same_recommendations(after["similar"], before["similar"])
        assert rpc_error(client.get_items, ["dur-doomed"]).code() == grpc.StatusCode.NOT_FOUND
        # Every event is there: re-sending them gives only duplicates (but the one on the
        # deleted item: see test_resending_an_event_whose_item_was_deleted_is_a_duplicate).
        events = [e for e in _durability_events() if e.item_id != "dur-doomed"]
        assert client.record_events(events) == (0, len(events))


def test_restart_keeps_the_order_of_tied_items(model_dir, tmp_path):
    data = tmp_path / "data"
    items = [Item(id=f"tie-{c}", text=f"Gardening: seed packet {c}", categories=[GARDENING]) for c in "dbca"]
    with start_server(model_dir, data) as first, HalflifeClient(first.address) as client:
        client.upsert_items(items)  # no events yet: every item has popularity 0
        before = client.recommend("tie-cold", 4, as_of=T0)
    with start_server(model_dir, data) as second, HalflifeClient(second.address) as client:
        after = client.recommend("tie-cold", 4, as_of=T0)
    assert ids(after) == ids(before)


def test_restart_keeps_trending_with_low_ratings(model_dir, tmp_path):
    data = tmp_path / "data"
    items = [Item(id=f"lr-{n}", text=f"Gardening: plant number {n}", categories=[GARDENING]) for n in range(3)]
    events = [ev(f"lr-view-{n}", f"lr-u{n}", VIEW, "lr-0", at=T0 - DAY) for n in range(2)]
    events += [ev(f"lr-rate-{n}", f"lr-u{n}", RATE, "lr-1", value=1.0, at=T0 - DAY) for n in range(5)]   # negative
    events += [ev(f"lr-mid-{n}", f"lr-u{n}", RATE, "lr-2", value=3.0, at=T0 - DAY) for n in range(5)]   # no signal
    with start_server(model_dir, data) as first, HalflifeClient(first.address) as client:
        client.upsert_items(items)
        client.record_events(events)
        before = client.recommend("lr-cold", 3, as_of=T0)
    assert ids(before)[0] == "lr-0" and before.items[1].score == 0
    with start_server(model_dir, data) as second, HalflifeClient(second.address) as client:
        after = client.recommend("lr-cold", 3, as_of=T0)
    assert scores(after) == pytest.approx(scores(before))
    assert ids(after)[0] == "lr-0"


def test_restart_does_not_leak_popularity_to_a_recreated_item(model_dir, tmp_path):
    data = tmp_path / "data"
    items = [Item(id=f"rc-{n}", text=f"Gardening: seed packet {n}", categories=[GARDENING]) for n in range(2)]
    with start_server(model_dir, data) as first, HalflifeClient(first.address) as client:
        client.upsert_items(items)
        client.record_events([ev(f"rc-view-{n}", f"rc-u{n}", VIEW, "rc-0", at=T0 - DAY) for n in range(5)])
        client.record_events([ev("rc-one", "rc-u9", VIEW, "rc-1", at=T0 - DAY)])
        client.delete_items(["rc-0"])
        client.upsert_items(items[:1])  # a new item under the old id
        before = client.recommend("rc-cold", 2, as_of=T0)
    assert ids(before) == ["rc-1", "rc-0"]
    with start_server(model_dir, data) as second, HalflifeClient(second.address) as client:
        after = client.recommend("rc-cold", 2, as_of=T0)
    assert_same_recommendations(after, before)


def test_trending_replay_ignores_events_after_as_of(model_dir, tmp_path):
    with start_server(model_dir, tmp_path) as running, HalflifeClient(running.address) as client:
        client.upsert_items(CATALOG)
        then = T0 - 30 * DAY
        client.record_events([ev(f"asof-old-{n}", f"asof-u{n}", VIEW, "garden-0", at=then - DAY) for n in range(3)])
        before = client.recommend("asof-cold", 3, as_of=then, item_filter=filt(include=[GARDENING]))
        assert ids(before)[0] == "garden-0"
        # Later events, after `then`: a replay of `then` must not see them.
        client.record_events([ev(f"asof-new-{n}", f"asof-u{n}", VIEW, "garden-2", at=T0 - DAY) for n in range(30)])
        after = client.recommend("asof-cold", 3, as_of=then, item_filter=filt(include=[GARDENING]))
        assert all(math.isfinite(s) for s in scores(after))
        assert_same_recommendations(after, before)


def test_events_stamped_ahead_of_the_server_clock_count_from_their_time(model_dir, tmp_path):
    """A client clock an hour ahead: its events are accepted (up to 24 h) and
    count from their own time on, for the user's profile and for trending."""
    now = dt.datetime.now(dt.timezone.utc)
    ahead, later = now + dt.timedelta(hours=1), now + dt.timedelta(hours=2)
    with start_server(model_dir, tmp_path) as running, HalflifeClient(running.address) as client:
        client.upsert_items(CATALOG)
        client.record_events([ev("skew-past", "skew-v", VIEW, "garden-0", at=now - DAY)]
                             + [ev(f"skew-{n}", f"skew-u{n}", VIEW, "garden-2", at=ahead) for n in range(3)])
        trending = lambda **at: ids(client.recommend("skew-cold", 2, item_filter=filt(include=[GARDENING]), **at))
        assert trending()[0] == "garden-0"  # the views stamped ahead have not happened yet
        assert trending(as_of=later)[0] == "garden-2"
        assert client.recommend("skew-u0", 3).strategy == TRENDING
        assert not client.profile("skew-u0").event_counts
        assert client.recommend("skew-u0", 3, as_of=later).strategy == PERSONALIZED
        assert trending()[0] == "garden-0"  # a look ahead leaves the present as it was


# ================================================================ concurrency: events committed out of order


def test_events_committed_before_a_newer_batch_are_not_lost(model_dir, tmp_path):
    with start_server(model_dir, tmp_path / "data") as running, HalflifeClient(running.address) as client:
        client.upsert_items(CATALOG[:10])
        user = "race"
        assert client.record_events([ev("race-0", user, LIKE, "scifi-0", at=T0 - 3 * DAY)]) == (1, 0)
        client.profile(user, as_of=T0)  # the profile is cached
        store = running.server.interest.store
        real = store.record_events
        committed, may_apply = threading.Event(), threading.Event()

        def slow_to_apply(records, *args):
            stored = real(records, *args)
            if records[0].event_id.startswith("race-a"):
                committed.set()
                assert may_apply.wait(30)  # batch A is durable but not applied yet
            return stored

        store.record_events = slow_to_apply
        try:
            result = {}
            batch_a = [ev(f"race-a{n}", user, LIKE, "scifi-1", at=T0 - 2 * DAY) for n in range(3)]
            writer = threading.Thread(target=lambda: result.setdefault("a", client.record_events(batch_a)))
            writer.start()
            assert committed.wait(30)
            assert client.record_events([ev("race-b", user, VIEW, "scifi-2", at=T0 - DAY)]) == (1, 0)
            client.profile(user, as_of=T0)  # applies batch B
            may_apply.set()
            writer.join(30)
            assert result["a"] == (3, 0)
        finally:
            may_apply.set()
            store.record_events = real
        counts = {c.type: c.count for c in client.profile(user, as_of=T0).event_counts}
        assert counts == {LIKE: 4, VIEW: 1}


# ================================================================ durability: kill -9 mid-ingest


@contextlib.contextmanager
def _cli_server(model_dir: Path, data_dir: Path):
    process, address = start_cli_server(model_dir, data_dir, drain=True)
    try:
        with HalflifeClient(address, timeout=30) as client:
            yield client
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        finally:
            process.kill()


def _kill_batch(k: int) -> list[interest_pb2.Event]:
    user = f"k9-u{k % 3}"
    return [
        ev(f"k9-{k}-{j}", user, (LIKE, VIEW, CLICK)[j], IDS[SCIFI if k % 2 else ROMCOM][(k + j) % 8],
           at=T0 - 10 * DAY + dt.timedelta(minutes=10 * k + j))
        for j in range(3)
    ]


def test_kill_9_mid_ingest_loses_no_acknowledged_event(model_dir, tmp_path):
    data = tmp_path / "data"
    process, address = start_cli_server(model_dir, data, drain=True)
    try:
        with HalflifeClient(address, timeout=10) as client:
            assert client.upsert_items(CATALOG) == (len(CATALOG), 0)
            acked: list[int] = []
            state = {"sent": -1}
            stop = threading.Event()

            def ingest():
                k = 0
                while not stop.is_set():
                    state["sent"] = k
                    try:
                        client.record_events(_kill_batch(k), timeout=5)
                    except grpc.RpcError:
                        return
                    acked.append(k)
                    k += 1

            writer = threading.Thread(target=ingest)
            writer.start()
            deadline = time.monotonic() + 60
            while len(acked) < 60 and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            writer.join(60)
            stop.set()
        assert len(acked) >= 60
        assert acked == list(range(len(acked)))
        in_flight = state["sent"]
        assert in_flight == len(acked)  # the one the kill interrupted
    finally:
        process.kill()
        process.wait(30)

    users = ["k9-u0", "k9-u1", "k9-u2"]
    with _cli_server(model_dir, data) as client:
        acknowledged = [e for k in acked for e in _kill_batch(k)]
        assert client.record_events(acknowledged) == (0, len(acknowledged))
        # The interrupted batch is all there or not at all.
        assert client.record_events(_kill_batch(in_flight)) in ((3, 0), (0, 3))
        first = {u: (client.recommend(u, 10, as_of=T0), client.profile(u, as_of=T0)) for u in users}
    with _cli_server(model_dir, data) as client:
        again = {u: (client.recommend(u, 10, as_of=T0), client.profile(u, as_of=T0)) for u in users}
        items = client.get_items([item.id for item in CATALOG], include_vectors=True)
    for user in users:
        assert_same_recommendations(again[user][0], first[user][0], tol=0)
        assert profile_summary(again[user][1]) == profile_summary(first[user][1])

    # A clean server given exactly the stored events (same vectors, same order) agrees.
    with start_server(model_dir, tmp_path / "clean") as clean, HalflifeClient(clean.address, timeout=30) as client:
        client.upsert_items([Item(id=i.id, text=i.text, categories=list(i.categories), vector=np.asarray(i.vector)) for i in items])
        for k in range(in_flight + 1):
            client.record_events(_kill_batch(k))
        for user in users:
            expected = client.recommend(user, 10, as_of=T0)
            assert_same_recommendations(first[user][0], expected, tol=1e-5)
            assert [(c.type, c.count) for c in client.profile(user, as_of=T0).event_counts] == [
                (c.type, c.count) for c in first[user][1].event_counts
            ]



@contextlib.contextmanager
def embedding_held(server, monkeypatch):
    """While inside, the server's engine embeds nothing: every text waits
    (bounded) until the block exits, then gets a fixed unit vector. Yields an
    Event set once a call is waiting. So a client's deadline or cancel
    surely comes while its write is still being embedded, on any machine."""
    engine = server.server.interest
    waiting, release = threading.Event(), threading.Event()

    def held(texts, deadline):
        waiting.set()
        assert release.wait(30)
        return np.tile(np.eye(DIM, dtype=np.float32)[0], (len(texts), 1))

    monkeypatch.setattr(engine, "_embed", held)
    jobs = engine.store.job_count
    try:
        yield waiting
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while engine.store.job_count <= jobs + 1 and time.monotonic() < deadline:  # the late write's turn has come
        time.sleep(0.01)


def give_up(call, how: str, waiting: threading.Event) -> None:
    """Runs the gRPC call future `call(timeout)` and, once the server is
    embedding its texts (`waiting`), gives up on it by its deadline or by
    cancelling it. The deadline leaves a loaded machine time to get there."""
    future = call(1.5 if how == "deadline" else 30)
    assert waiting.wait(30), "the call never reached the embedding"
    if how == "cancel":
        future.cancel()
    with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError) as caught:
        future.result()
    if how == "deadline":
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_resent_upsert_is_not_embedded_again(server, client, monkeypatch):
    """The server names its model to the engine (EmbeddingEngine.identity), so
    an upsert that repeats items' texts keeps the vectors embedded before."""
    engine = server.server.interest
    embed, embedded = engine._embed, []
    monkeypatch.setattr(engine, "_embed", lambda texts, deadline: embedded.extend(texts) or embed(texts, deadline))
    items = [Item(id=f"resent-{n}", text=f"a resent item number {n}") for n in range(3)]
    assert client.upsert_items(items) == (3, 0)
    assert client.upsert_items(items) == (0, 3)
    assert embedded == [item.text for item in items]


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_an_erasure_after_a_record_the_client_gave_up_on_is_not_undone_by_it(server, client, monkeypatch, how):
    user = f"gave-up-{how}"
    request = interest_pb2.RecordEventsRequest(
        events=[interest_pb2.Event(event_id=f"{user}-{n}", user_id=user, type=REVIEW, text="a long review")
                for n in range(3)])
    with embedding_held(server, monkeypatch) as waiting, grpc.insecure_channel(server.address) as channel:
        give_up(lambda timeout: interest_pb2_grpc.InterestServiceStub(channel).RecordEvents.future(
            request, timeout=timeout), how, waiting)
        client.delete_user(user)  # the erasure the client asks for next
    assert client.profile(user).event_counts == []  # the events did not come back once embedded


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_an_upsert_the_client_gave_up_on_never_overwrites_a_later_one(server, client, monkeypatch, how):
    ids = [f"late-{how}-{n}" for n in range(3)]
    request = catalog_pb2.UpsertItemsRequest(items=[catalog_pb2.Item(id=i, text="v1", categories=["v1"]) for i in ids])
    newer = [Item(id=i, text="v2", categories=["v2"], vector=np.eye(DIM, dtype=np.float32)[1]) for i in ids]
    with embedding_held(server, monkeypatch) as waiting, grpc.insecure_channel(server.address) as channel:
        give_up(lambda timeout: catalog_pb2_grpc.CatalogServiceStub(channel).UpsertItems.future(
            request, timeout=timeout), how, waiting)
        client.upsert_items(newer)  # precomputed vectors: nothing to embed
    assert {tuple(item.categories) for item in client.get_items(ids)} == {("v2",)}


def test_record_events_answers_aborted_when_its_items_change_at_every_try(server, client, monkeypatch):
    engine = server.server.interest
    unit = np.eye(DIM, dtype=np.float32)
    client.upsert_items([Item(id="churning", text="an item updated all the time", vector=unit[2])])
    read = engine._item_vectors
    tries = []

    def read_then_update(events):  # another caller's upsert lands between every read and its commit
        tries.append(1)
        out = read(events)
        client.upsert_items([Item(id="churning", text=f"version {len(tries)}", vector=unit[2 + len(tries)])])
        return out

    monkeypatch.setattr(engine, "_item_vectors", read_then_update)
    event = interest_pb2.Event(event_id="churn-1", user_id="churn-user", type=LIKE, item_id="churning",
                               event_time=to_pb_timestamp(time.time() - 60))
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:  # no retries
        interest_pb2_grpc.InterestServiceStub(channel).RecordEvents(
            interest_pb2.RecordEventsRequest(events=[event]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "nothing was recorded" in caught.value.details()
    assert len(tries) == 3
    with pytest.raises(grpc.RpcError) as caught:
        client.record_events([event])  # the client resends it as the status asks, 4 tries in all
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert len(tries) == 3 + 4 * 3
    monkeypatch.setattr(engine, "_item_vectors", read)
    assert client.profile("churn-user").event_counts == []
    assert client.record_events([event]) == (1, 0)  # the retry the status asks for


def test_calls_held_up_in_the_engine_leave_threads_for_the_others(server, client, monkeypatch):
    """asyncio's default executor has cores + 4 threads: 8 callers replaying
    long logs (as_of in the past) held all 6 of them here, and every other
    call waited for a thread, up to 17.5 s (an audit). The server's has
    ServerConfig.call_threads."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    engine = server.server.interest
    held = min(os.cpu_count() + 5, server.server.config.call_threads - 2)  # more than asyncio's default
    release, entered = threading.Event(), []
    profile = engine.profile

    def slow_profile(user_id, *args, **kwargs):
        if user_id.startswith("slow-"):
            entered.append(user_id)
            assert release.wait(30)
        return profile(user_id, *args, **kwargs)

    monkeypatch.setattr(engine, "profile", slow_profile)
    with ThreadPoolExecutor(held) as callers:
        try:
            slow = [callers.submit(client.profile, f"slow-{n}") for n in range(held)]
            deadline = time.monotonic() + 30
            while len(entered) < held and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(entered) == held
            assert client.recommend("someone-else", 3, timeout=10).strategy == TRENDING
        finally:
            release.set()
        assert all(s.result(30).event_counts == [] for s in slow)


def test_writes_waiting_for_the_embedding_model_leave_threads_for_the_others(server, client, monkeypatch):
    """An upsert or a text event waits for the model in a call thread: 80
    upserts of 4 long texts at once held all of them while the model worked
    through its backlog, and a GetItems or a Recommend, which embed nothing,
    waited up to 13.7 s for one (a review; 100 writes of search events: 11.4
    s). Writes that embed run on threads of their own."""
    from concurrent.futures import ThreadPoolExecutor

    batcher = server.server.backend.batcher
    entered, release = threading.Event(), threading.Event()
    forward = batcher._forward

    def held_forward(ids):
        entered.set()
        assert release.wait(30)
        return forward(ids)

    monkeypatch.setattr(batcher, "_forward", held_forward)
    writes = server.server.config.call_threads + 4
    with ThreadPoolExecutor(writes + 1) as callers:
        try:
            # The model held on one input first: the writes' inputs then all wait in the queue, counted, where a
            # window taken from a burst of them held some uncounted (a loaded full run).
            first = callers.submit(client.embed, ["the model is held on this"])
            assert entered.wait(30)
            upserts = [callers.submit(client.upsert_items, [Item(id=f"held-{n}", text=f"an item held up, {n}")])
                       for n in range(writes // 2)]
            events = [callers.submit(client.record_events, [ev(f"held-{n}", "held-searcher", SEARCH, text=f"query {n}")])
                      for n in range(writes - writes // 2)]
            deadline = time.monotonic() + 30  # every thread the writes can have waits on the model
            while batcher.queued_inputs < server.server.config.call_threads - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued_inputs >= server.server.config.call_threads - 1
            assert client.recommend("someone-else", 3, timeout=5).strategy == TRENDING
            assert [item.id for item in client.get_items([CATALOG[0].id], timeout=5)] == [CATALOG[0].id]
        finally:
            release.set()
        assert [u.result(60) for u in upserts] == [(1, 0)] * len(upserts)
        assert [e.result(60) for e in events] == [(1, 0)] * len(events)
        assert len(first.result(60)) == 1
    assert client.delete_items([f"held-{n}" for n in range(writes // 2)]) == writes // 2


def test_a_writes_texts_go_ahead_of_embed_calls_queued_before_them(server, client, monkeypatch):
    """A write's texts queued with Embed calls, unprioritised: under a flood
    of them (64 callers of 32 sentences, 10 s deadlines) RecordEvents with
    texts took 4-6 s (p50) on 2 cores. The server's own writes and queries now go
    ahead (the batcher's priority): here their batch runs first."""
    from concurrent.futures import ThreadPoolExecutor

    batcher = server.server.backend.batcher
    entered, release = threading.Event(), threading.Event()
    forward = batcher._forward
    batches = []

    def held_forward(ids):
        batches.append(len(ids))
        entered.set()
        assert release.wait(30)
        return forward(ids)

    def queued(inputs: int) -> bool:
        deadline = time.monotonic() + 30
        while batcher.queued_inputs < inputs and time.monotonic() < deadline:
            time.sleep(0.01)
        return batcher.queued_inputs == inputs

    monkeypatch.setattr(batcher, "_forward", held_forward)
    with ThreadPoolExecutor(34) as callers:
        try:
            first = callers.submit(client.embed, ["the model is held on this"])
            assert entered.wait(30)
            embeds = [callers.submit(client.embed, [f"call {n}"]) for n in range(32)]  # shorter than the write's
            assert queued(32)
            write = callers.submit(client.record_events, [
                ev(f"ahead-{n}", "ahead-searcher", SEARCH, text=f"a search longer than those calls, {n}")
                for n in range(3)])
            assert queued(35)
        finally:
            release.set()
        assert write.result(60) == (3, 0)
        assert all(len(e.result(60)) == 1 for e in embeds) and len(first.result(60)) == 1
    assert batches == [1, 3, 32]  # by length alone: [1, 32, 3]


def test_client_interceptors_keep_the_clients_channel_options(server):
    """Auth metadata or TLS needed a channel of one's own, which dropped the
    client's options: replies over 4 MiB were refused and nothing retried (a
    review). Interceptors now wrap the channel the client makes."""
    calls = []

    class Count(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            calls.append(details.method)
            return continuation(details, request)

    class AsyncCount(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            calls.append(details.method.decode())  # bytes here
            return await continuation(details, request)

    vector = np.eye(384, dtype=np.float32)[0]
    items = [Item(id=f"big-{n}", text="x" * 32_000, vector=vector) for n in range(150)]  # 4.8 MB each way
    ids = [item.id for item in items]
    with HalflifeClient(server.address, timeout=30, interceptors=[Count()]) as client:
        client.upsert_items(items)
        assert [item.id for item in client.get_items(ids)] == ids

    async def read() -> list[str]:
        async with AsyncHalflifeClient(server.address, timeout=30, interceptors=[AsyncCount()]) as client:
            return [item.id for item in await client.get_items(ids)]

    assert asyncio.run(read()) == ids
    assert calls == ["/halflife.v1.CatalogService/UpsertItems", "/halflife.v1.CatalogService/GetItems",
                     "/halflife.v1.CatalogService/GetItems"]
    with HalflifeClient(server.address, timeout=30) as client:
        client.delete_items(ids)
    closed = HalflifeClient(server.address, interceptors=[Count()])
    closed.close()
    with pytest.raises(ValueError, match="closed channel"):  # grpcio crashed the process here (SIGSEGV)
        closed.model_info()
    channel = grpc.insecure_channel(server.address)
    with pytest.raises(ValueError, match="with channel=, add them to that channel"):
        HalflifeClient(channel=channel, interceptors=[Count()])
    channel.close()

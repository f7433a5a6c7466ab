"""`halflife reembed`: a store's catalogue and event log embedded again by another model into a new store."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, Iterator

import numpy as np
import pytest

from halflife.config import Config
from halflife.core.ranking import normalize
from halflife.interest import reembed as reembed_module
from halflife.interest.engine import InterestEngine
from halflife.interest.reembed import GivenVectorsError, SourceChangedError, reembed
from halflife.interest.types import EventInput, ItemInput
from halflife.storage.base import EventRecord
from halflife.storage.sqlite import SqliteStore
from tests.fakes import DIM, fake_embed

T = 1_700_000_000.0
VIEW, LIKE, REVIEW, SEARCH = 1, 3, 7, 8
NEW_DIM = 24


def new_embed(texts, deadline=None):
    """Another model: other vectors, of another size."""
    rows = [np.random.default_rng(int(hashlib.sha256(b"new" + t.encode()).hexdigest()[:8], 16)).normal(size=NEW_DIM)
            for t in texts]
    return normalize(np.array(rows, dtype=np.float32))


def old_engine(path) -> InterestEngine:
    return InterestEngine(Config(), SqliteStore(path), DIM, fake_embed, clock=lambda: T, embedder_id="old",
                          vector_space=("old-space", "old model"))


def new_engine(path) -> InterestEngine:
    return InterestEngine(Config(), SqliteStore(path), NEW_DIM, new_embed, clock=lambda: T, embedder_id="new",
                          vector_space=("new-space", "new model"))


def event(event_id, user, kind, item=None, text=None, value=None, hours_ago=1.0) -> EventInput:
    return EventInput(event_id, user, kind, item, text, value, T - hours_ago * 3600)


@pytest.fixture
def old_store(tmp_path):
    old = old_engine(tmp_path / "old")
    old.upsert_items([ItemInput(id=f"i{n}", text=f"item {n}", categories=(f"c{n % 2}",), attributes={"n": str(n)},
                                create_time=T - n * 86400) for n in range(6)])
    old.record_events([event("a1", "u1", LIKE, "i0", hours_ago=9), event("a2", "u1", VIEW, "i1", hours_ago=8),
                       event("a3", "u1", REVIEW, "i2", text="loved it", value=None, hours_ago=7),
                       event("a4", "u2", SEARCH, text="space operas", hours_ago=6),
                       event("a5", "u2", 6, "i3", value=4.5, hours_ago=5)])
    old.upsert_items([ItemInput(id="i1", text="item 1, renamed")])  # the event keeps the old text's vector
    old.delete_items(["i4"])
    old.record_events([event("b2", "u3", LIKE, "i5", hours_ago=3), event("b3", "u3", VIEW, "i3", hours_ago=2)])
    old.delete_items(["i5"])  # b2's item: gone, and b2 has no text
    old.record_events([event("b4", "u2", REVIEW, "i3", text="again", hours_ago=1.5)])
    old.delete_items(["i3"])  # a5, b3, b4's item, then a new i3: they concerned the old one
    old.upsert_items([ItemInput(id="i3", text="a new item 3")])
    old.record_events([event("b5", "u2", LIKE, "i3", hours_ago=1)])
    old.delete_user("u9")
    yield old.store
    old.store.close()


def test_a_copy_embeds_every_item_and_text_with_the_new_model_and_keeps_the_log(old_store, tmp_path):
    target = new_engine(tmp_path / "new")
    done = reembed(old_store, target)
    # i4, i5 deleted, i3 created anew; b2 (i5), a5 and b3 (the old i3) have no text: left out.
    assert (done.items, done.events, done.without_item, done.left_out) == (4, 6, 1, 3)
    assert done.through_seq == old_store.head().event_seq
    items = target.store.get_items([f"i{n}" for n in range(6)])
    assert sorted(items) == ["i0", "i1", "i2", "i3"]
    for item in items.values():
        old = old_store.get_items([item.id])[item.id]
        assert (item.text, item.categories, dict(item.attributes), item.create_time) == (
            old.text, old.categories, dict(old.attributes), old.create_time)
        np.testing.assert_allclose(item.vector, new_embed([item.text])[0], atol=1e-6)
        assert item.embedded_by == "new"
    assert target.store.bind_vectors("x", "y") == ("new-space", "new model")
    # The log: every event but those with nothing to embed, in the order it arrived, as it was.
    old_events = {u: old_store.user_events(u) for u in ("u1", "u2", "u3")}
    new_events = {u: target.store.user_events(u) for u in ("u1", "u2", "u3")}
    assert {u: [e.event_id for e in events] for u, events in new_events.items()} == {
        "u1": ["a1", "a2", "a3"], "u2": ["a4", "b4", "b5"], "u3": []}
    old_by_id = {e.event_id: e for events in old_events.values() for e in events}
    for e in (e for events in new_events.values() for e in events):
        old = old_by_id[e.event_id]
        assert (e.user_id, e.type, e.text, e.value, e.event_time) == (old.user_id, old.type, old.text, old.value,
                                                                        old.event_time)
    vectors = {e.event_id: (e.item_id, e.vector) for events in new_events.values() for e in events}
    new_item = {i: items[i].vector for i in items}
    np.testing.assert_allclose(vectors["a1"][1], new_item["i0"], atol=1e-6)
    np.testing.assert_allclose(vectors["a2"][1], new_item["i1"], atol=1e-6)  # the item's text now
    np.testing.assert_allclose(vectors["a3"][1], normalize(new_item["i2"] + new_embed(["loved it"])[0]), atol=1e-6)
    np.testing.assert_allclose(vectors["a4"][1], new_embed(["space operas"])[0], atol=1e-6)
    # b4 concerned the old i3 too: it keeps its text, without the item.
    assert vectors["b4"][0] is None
    np.testing.assert_allclose(vectors["b4"][1], new_embed(["again"])[0], atol=1e-6)
    assert vectors["b5"][0] == "i3"
    np.testing.assert_allclose(vectors["b5"][1], new_item["i3"], atol=1e-6)
    assert target.profile("u1", as_of=T).event_counts == old_engine_counts(old_store, "u1")


def old_engine_counts(store, user_id) -> dict:
    counts: dict[int, int] = {}
    for e in store.user_events(user_id):
        counts[e.type] = counts.get(e.type, 0) + 1
    return counts


def test_a_copy_reads_the_log_in_batches_and_nothing_recorded_after_its_start(old_store, tmp_path, monkeypatch):
    monkeypatch.setattr(reembed_module, "SEQS_PER_BATCH", 2)
    target = new_engine(tmp_path / "new")
    seen = []

    def steps(starts, what):
        for start in starts:
            if not seen:  # recorded once the copy started: not in it
                old_store.record_events([EventRecord("late", "u1", VIEW, "i0", None, None, T, fake_embed(["x"])[0])])
            seen.append((what, start))
            yield start

    head = old_store.head().event_seq
    done = reembed(old_store, target, steps)
    assert seen == [("items", 0)] + [("events", start) for start in range(0, head, 2)]
    assert done.events == target.store.event_count() == 6
    assert old_store.existing_event_ids(["late"]) == {"late"} and not target.store.existing_event_ids(["late"])


def test_an_item_deleted_in_the_old_store_during_the_copy_counts_as_deleted_before_and_refuses_it(old_store,
                                                                                                    tmp_path):
    """The items are read twice (their ids, then their batches): one deleted
    between the reads (a server still writing) was left out of the catalogue
    but not of the events' joins, whose record then failed UnknownItemsError.
    The copy runs to its end, and is refused there: the old store changed."""
    target = new_engine(tmp_path / "new")
    # a1 (u1 liked it, no text): left out as on a deleted item
    steps = during("items", lambda: old_store.delete_items(["i0"]))
    with pytest.raises(SourceChangedError, match=r"\(1 items upserted or deleted, 0 users erased\)"):
        reembed(old_store, target, steps)
    assert sorted(target.store.get_items([f"i{n}" for n in range(6)])) == ["i1", "i2", "i3"]
    assert [e.event_id for e in target.store.user_events("u1")] == ["a2", "a3"]


def test_a_user_erased_during_the_copy_refuses_it_and_later_events_are_counted(old_store, tmp_path):
    """The events are read in batches: an erasure between them came back in
    the copy, which said nothing (a review)."""
    with pytest.raises(SourceChangedError, match=r"\(0 items upserted or deleted, 1 users erased\)"):
        reembed(old_store, new_engine(tmp_path / "erased"), during("events", lambda: old_store.delete_user("u1")))
    changes_since, old_store.changes_since = old_store.changes_since, lambda version: []  # a feed pruned meanwhile
    with pytest.raises(SourceChangedError, match=r"changed while it was copied \(items or users\)"):
        reembed(old_store, new_engine(tmp_path / "pruned"), during("events", lambda: old_store.delete_user("u3")))
    old_store.changes_since = changes_since

    recorder = old_engine(tmp_path / "old")
    done = reembed(old_store, new_engine(tmp_path / "new"),
                   during("events", lambda: recorder.record_events([event("late", "u2", VIEW, "i0")])))
    assert done.recorded_since == 1 and "late" not in [e.event_id for e in done_events(tmp_path / "new", "u2")]
    recorder.store.close()


def during(what: str, action: Callable[[], object]) -> Callable[[range, str], Iterator[int]]:
    """A `reembed` steps callback that runs `action` at each batch of `what`
    ("items" or "events"): a writer on the old store meanwhile."""
    def steps(starts: range, step: str) -> Iterator[int]:
        for start in starts:
            if step == what:
                action()
            yield start

    return steps


def done_events(path, user_id: str) -> list[EventRecord]:
    store = SqliteStore(path)
    try:
        return store.user_events(user_id)
    finally:
        store.close()


def test_items_with_vectors_given_with_them_take_the_new_models_given_or_refuse_the_copy(tmp_path):
    """Such an item stopped the copy whatever was done: the new model's
    vectors for them can now be given, and an event on one takes it."""
    old = old_engine(tmp_path / "old")
    old.upsert_items([ItemInput(id="mine", text="", vector=fake_embed(["x"])[0]), ItemInput(id="t", text="text")])
    old.record_events([event("e1", "u1", LIKE, "mine"), event("e2", "u1", REVIEW, "mine", text="great")])
    with pytest.raises(GivenVectorsError, match=r"^items carry vectors given with them, not embedded from their text \(1: 'mine'\)"):
        reembed(old.store, new_engine(tmp_path / "refused"))
    mine, text = np.arange(1, NEW_DIM + 1, dtype=np.float32), np.ones(NEW_DIM, np.float32)
    target = new_engine(tmp_path / "new")
    done = reembed(old.store, target, vectors={"mine": mine, "t": text, "gone": text})  # any item's, taken
    assert (done.items, done.events, done.vectors_unused) == (2, 2, 1)
    items = target.store.get_items(["mine", "t"])
    np.testing.assert_allclose(items["mine"].vector, normalize(mine), atol=1e-6)
    np.testing.assert_allclose(items["t"].vector, normalize(text), atol=1e-6)
    assert items["mine"].embedded_by is None  # still given: a later upsert of its text alone embeds it
    e1, e2 = target.store.user_events("u1")
    np.testing.assert_allclose(e1.vector, normalize(mine), atol=1e-6)
    np.testing.assert_allclose(e2.vector, normalize(normalize(mine) + new_embed(["great"])[0]), atol=1e-6)
    old.store.close()


@pytest.mark.parametrize("line, why", [
    ("{", "not UTF-8 JSON"),
    ('{"id": "\xff"}', "not UTF-8 JSON"),
    ('["mine", [1, 2, 3]]', r'not an object \{"id": "\.\.\.", "vector": \[numbers\]\}'),
    ('{"id": 7, "vector": [1, 2, 3]}', 'not an object'),
    ('{"id": "mine", "vector": [1, 2]}', "item 'mine' has 2 values; the model's dimension is 3"),
    ('{"id": "mine", "vector": [1, NaN, 3]}', "item 'mine': its vector holds a value that is not a finite number"),
    ('{"id": "mine", "vector": [1, "2", 3]}', "item 'mine': its vector holds a value that is not a finite number"),
    ('{"id": "mine", "vector": [0, 0, 0.0]}', "item 'mine': its vector is all zeros, which has no direction"),
    # As stored, in float32 (as UpsertItems checks one): these were stored as inf (NaN once normalised) and 0, and
    # an integer past any float was a traceback.
    ('{"id": "mine", "vector": [1, 1e39, 3]}', "item 'mine': its vector holds a value that is not a finite number"),
    ('{"id": "mine", "vector": [1, 1' + "0" * 400 + ', 3]}', "item 'mine': its vector holds a value that is not a "
                                                          "finite number"),
    ('{"id": "mine", "vector": [1e-46, 0, -1e-46]}', "item 'mine': its vector is all zeros, which has no direction"),
    ('{"id": "t", "vector": [1, 2, 3]}', "item 't' again \\(first on line 1\\)"),
])
def test_an_item_vectors_file_is_refused_by_its_line(tmp_path, line, why):
    path = tmp_path / "vectors.jsonl"
    path.write_bytes(b'{"id": "t", "vector": [1, 2, 3.5]}\n\n' + line.encode("latin-1") + b"\n")
    with pytest.raises(reembed_module.ItemVectorsFileError, match=f"^{re.escape(str(path))}, line 3: {why}"):
        reembed_module.read_item_vectors(path, 3)
    path.write_text('{"id": "t", "vector": [1, 2, 3.5]}\n')
    (only,) = reembed_module.read_item_vectors(path, 3).items()
    assert only[0] == "t" and only[1].tolist() == [1, 2, 3.5]


def test_a_copy_goes_into_an_empty_store_only(old_store, tmp_path):
    target = new_engine(tmp_path / "new")
    target.upsert_items([ItemInput(id="x", text="already here")])
    with pytest.raises(ValueError, match="not empty"):
        reembed(old_store, target)


def _store_of_another_model(path, dim: int) -> None:
    """Items and events embedded by a stand-in for another model (`dim`-d, as the new one)."""
    def embed(texts, deadline=None):
        return normalize(np.random.default_rng(len(texts)).normal(size=(len(texts), dim)).astype(np.float32))

    old = InterestEngine(Config(), SqliteStore(path), dim, embed, clock=lambda: T, embedder_id="old",
                         vector_space=("old-space", "old model"))
    old.upsert_items([ItemInput(id="dune", text="Dune (1984), science fiction"),
                      ItemInput(id="amelie", text="Amélie (2001), romance comedy")])
    old.record_events([event("e1", "ann", LIKE, "dune"), event("e2", "ann", REVIEW, "amelie", text="charming")])
    old.store.close()


def test_the_cli_copies_a_store_into_one_the_new_model_serves(model_dir, tmp_path, capsys):
    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine
    from halflife.embedding.offline import embed_sorted

    model = EmbeddingEngine.load(model_dir, variant="fp32-o2")  # a vector whatever its batch-mates (int8's vary)
    _store_of_another_model(tmp_path / "old", model.dimension)
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(model_dir), "--variant", "fp32-o2"]) == 0
    assert "copied 2 items and 2 events (the log through seq 2)" in capsys.readouterr().out
    store = SqliteStore(tmp_path / "new")
    items = store.get_items(["dune", "amelie"])
    np.testing.assert_allclose(items["dune"].vector, embed_sorted(model, ["Dune (1984), science fiction"])[0],
                               atol=1e-5)
    assert store.bind_vectors("x", "y") == model.named_vector_space  # what `serve` with the model checks
    assert [e.event_id for e in store.user_events("ann")] == ["e1", "e2"]
    store.close()


def test_the_cli_lists_items_with_given_vectors_and_takes_their_new_vectors_from_a_file(model_dir, tmp_path,
                                                                                         capsys):
    import json

    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine

    dim = EmbeddingEngine.load(model_dir).dimension
    _store_of_another_model(tmp_path / "old", dim)
    old = InterestEngine(Config(), SqliteStore(tmp_path / "old"), dim, new_embed, clock=lambda: T)
    old.upsert_items([ItemInput(id=f"v{n}", text="", vector=np.ones(dim, np.float32)) for n in range(4)])
    old.record_events([event("e3", "ann", LIKE, "v0")])
    old.store.close()
    args = ["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"), "--model-dir",
            str(model_dir)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [{"id": f"v{n}"} for n in range(4)]
    assert "(4: 'v0', 'v1', 'v2' and 1 more)" in err and "their ids are on stdout" in err and "--item-vectors" in err
    assert not (tmp_path / "new").exists()
    filled = "".join(json.dumps({**json.loads(line), "vector": [n + 1.0] * dim}) + "\n"
                     for n, line in enumerate(out.splitlines()))
    read_end, write_end = os.pipe()  # as `--item-vectors <(fill ids.jsonl)` gives it: refused as "not a file" once
    with os.fdopen(read_end, "rb"), os.fdopen(write_end, "w") as pipe:
        pipe.write(filled)  # within the pipe's buffer
        pipe.close()
        assert main(args + ["--item-vectors", f"/dev/fd/{read_end}"]) == 0
    assert "copied 6 items and 3 events" in capsys.readouterr().out
    with SqliteStore(tmp_path / "new") as store:
        assert np.allclose(store.get_items(["v3"])["v3"].vector, dim**-0.5)
        assert [e.event_id for e in store.user_events("ann")] == ["e1", "e2", "e3"]
    vectors = tmp_path / "vectors.jsonl"
    vectors.write_text(json.dumps({"id": "v0", "vector": [1.0] * (dim - 1)}) + "\n")
    assert main([*args[:4], str(tmp_path / "new2"), *args[5:], "--item-vectors", str(vectors)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"halflife reembed: error: {vectors}, line 1: item 'v0' has {dim - 1} values; the model's dimension is {dim}")
    assert not (tmp_path / "new2").exists()


def test_a_report_that_cannot_be_written_is_one_line_and_the_copy_stays(model_dir, tmp_path, monkeypatch, capsys):
    """`reembed ... > /dev/full` ended in a traceback (a review)."""
    import errno
    import io
    import sys

    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    _store_of_another_model(tmp_path / "old", EmbeddingEngine.load(model_dir).dimension)
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(model_dir)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"halflife reembed: error: the copy into {tmp_path / 'new'} is complete, but its report could not be "
        "written: [Errno 28] No space left on device")
    store = SqliteStore(tmp_path / "new")
    assert [e.event_id for e in store.user_events("ann")] == ["e1", "e2"]
    store.close()


def test_the_cli_makes_its_unfinished_mark_durable_before_it_copies(model_dir, tmp_path, monkeypatch):
    """A mark lost in a power cut would let `serve` take a half copy (a durability review)."""
    from halflife.locks import UNFINISHED_COPY_MARK
    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine
    from halflife.storage import sqlite as sqlite_module

    synced = []
    sync = sqlite_module.sync_directory
    monkeypatch.setattr(sqlite_module, "sync_directory",
                        lambda path: synced.append((path, sorted(p.name for p in path.iterdir()))) or sync(path))
    _store_of_another_model(tmp_path / "old", EmbeddingEngine.load(model_dir).dimension)
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(model_dir)]) == 0
    (path, names), *_ = [call for call in synced if call[0] == tmp_path / "new"]
    assert UNFINISHED_COPY_MARK in names and sqlite_module.DB_NAME not in names


def test_the_cli_refuses_an_unfinished_copy_as_source_or_target_and_leaves_anothers_files(model_dir, tmp_path,
                                                                                             capsys, monkeypatch):
    """A half copy given as the source was copied as if whole, and the
    result, unmarked, served; a rerun into one said only "not empty"; and
    a claim another process won meanwhile had its files removed (a review)."""
    from halflife import locks
    from halflife.cli import main

    old_engine(tmp_path / "old").store.close()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "halflife.sqlite3").write_bytes((tmp_path / "old" / "halflife.sqlite3").read_bytes())
    (tmp_path / "half" / locks.UNFINISHED_COPY_MARK).touch()
    args = ["reembed", "--model-dir", str(model_dir), "--data-dir"]
    assert main(args + [str(tmp_path / "half"), "--out", str(tmp_path / "new")]) == 1
    assert "holds a `halflife reembed` copy that has not finished (it is still running, or was killed)" in \
        capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(args + [str(tmp_path / "old"), "--out", str(tmp_path / "half")]) == 1
    assert "did not finish (its process was killed): delete the directory" in capsys.readouterr().err
    # A copy still running there is not called killed: deleting its directory, as that says, lost it (a review).
    with locks.hold_lock(tmp_path / "half" / locks.DATA_DIR_LOCK, "pid 7, halflife reembed copying into it"):
        assert main(args + [str(tmp_path / "old"), "--out", str(tmp_path / "half")]) == 1
    assert "in use by another halflife process (pid 7, halflife reembed copying into it)" in capsys.readouterr().err

    def taken_meanwhile(data_dir, holder=""):
        data_dir.mkdir(exist_ok=True)
        (data_dir / "theirs").touch()
        raise OSError(f"{data_dir} is in use by another halflife process (pid 1)")

    monkeypatch.setattr(locks, "claim_data_dir", taken_meanwhile)
    assert main(args + [str(tmp_path / "old"), "--out", str(tmp_path / "raced")]) == 1
    assert "in use by another halflife process" in capsys.readouterr().err
    assert (tmp_path / "raced" / "theirs").exists()


def _raise_rowid(path, seq: int) -> None:
    """Sets the high byte of event `seq`'s rowid in its leaf page, as a flipped bit on disk would."""
    data = bytearray(path.read_bytes())

    def varint(at: int) -> tuple[int, int]:
        value = 0
        for end in range(at, at + 9):
            value = value << 7 | data[end] & 0x7F
            if not data[end] & 0x80:
                return value, end + 1

    for page in range(4096, len(data), 4096):
        if data[page] == 0x0D:  # a table b-tree leaf: its cells are (payload size, rowid, payload)
            for cell in range(int.from_bytes(data[page + 3 : page + 5], "big")):
                _, at = varint(page + int.from_bytes(data[page + 8 + 2 * cell : page + 10 + 2 * cell], "big"))
                if varint(at)[0] == seq and seq >= 128:  # two bytes: the first made 0xFF, the rowid >= 16,256
                    data[at] = 0xFF
                    path.write_bytes(data)
                    return
    raise AssertionError(f"no event {seq}")


def test_the_cli_refuses_a_store_whose_pages_are_damaged(model_dir, tmp_path, capsys):
    """A rowid damaged in the middle of the log ended SQLite's range reads
    there without an error: the copy took 149 events of 300 and said it was
    complete (an operations review)."""
    from halflife.cli import main

    with SqliteStore(tmp_path / "old") as store:
        store.record_events([EventRecord(f"e{n}", f"u{n % 3}", SEARCH, None, "a long search " * 20, None, T + n,
                                         np.ones(DIM, np.float32)) for n in range(300)])
        store.checkpoint()
    _raise_rowid(tmp_path / "old" / "halflife.sqlite3", 150)
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(model_dir)]) == 1
    assert re.fullmatch(rf"halflife reembed: error: {re.escape(str(tmp_path / 'old' / 'halflife.sqlite3'))} is "
                        r"damaged \(On tree page \d+ cell \d+: Rowid \d+ out of order\): restore it from a backup",
                        capsys.readouterr().err.splitlines()[-1])
    assert not (tmp_path / "new").exists()


def test_the_cli_leaves_no_half_copy_behind(model_dir, tmp_path, capsys):
    from halflife.cli import main

    old = old_engine(tmp_path / "old")
    old.upsert_items([ItemInput(id="mine", text="", vector=fake_embed(["x"])[0])])
    old.store.close()
    args = ["reembed", "--data-dir", str(tmp_path / "old"), "--model-dir", str(model_dir), "--out"]
    assert main(args + [str(tmp_path / "new" / "a" / "b")]) == 1
    assert "error: items carry vectors given with them" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the parents it made for it
    (tmp_path / "empty").mkdir()
    assert main(args + [str(tmp_path / "empty")]) == 1
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "empty" / "x").write_text("")
    assert main(args + [str(tmp_path / "empty")]) == 1
    assert "is not an empty directory" in capsys.readouterr().err
    # "new/.." names the directory it is in once `new` is made: the copy went into it, and the failed copy's
    # cleanup removed the files it held (and the old store with them, from `--out OLD/new/..`).
    assert main(args + [str(tmp_path / "empty" / "new" / "..")]) == 1
    assert "is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["x"]
    old_files = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert main(args + [str(tmp_path / "old" / "new" / "..")]) == 1
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == old_files
    assert main(["reembed", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new2")]) == 1
    assert "holds no store" in capsys.readouterr().err and not (tmp_path / "new2").exists()


def test_the_cli_holds_the_copy_as_serve_holds_a_data_directory_and_a_copy_killed_outright_is_refused(
        model_dir, tmp_path, monkeypatch, capsys):
    """A server started on the copy meanwhile answered from half of it, and
    a copy killed outright (SIGKILL, no cleanup) was served as a store (a
    review). Here the copy checks the lock while it runs, then the process
    ends as a kill ends it (os._exit: no `finally`, no cleanup)."""
    import os
    import subprocess
    import sys
    import textwrap

    from halflife.locks import claim_data_dir
    from halflife.embedding.engine import EmbeddingEngine

    model = EmbeddingEngine.load(model_dir, variant="fp32-o2")
    _store_of_another_model(tmp_path / "old", model.dimension)
    child = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from halflife.locks import claim_data_dir
        from halflife.cli import main
        from halflife.interest import reembed as module
        copy = module.reembed

        def killed(*args, **kwargs):
            copy(*args, **kwargs)
            try:
                claim_data_dir(Path(sys.argv[2]))
            except OSError as e:
                print(e, flush=True)
            os._exit(9)

        module.reembed = killed
        main(["reembed", "--data-dir", sys.argv[1], "--out", sys.argv[2], "--model-dir", {str(model_dir)!r}])
    """)
    run = subprocess.run([sys.executable, "-c", child, str(tmp_path / "old"), str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 9, run.stderr
    assert "halflife reembed copying into it" in run.stdout and "in use by another halflife process" in run.stdout
    with pytest.raises(OSError, match="holds a `halflife reembed` copy that did not finish"):
        claim_data_dir(tmp_path / "new")


def test_the_cli_says_in_one_line_that_a_manifest_does_not_fit_its_model(model_dir, tmp_path, capsys):
    """It was a ValueError traceback from the copy's first batch: `reembed`
    loaded the model without the check `serve` runs (warm_up)."""
    import json

    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine

    model = EmbeddingEngine.load(model_dir, variant="fp32-o2")
    _store_of_another_model(tmp_path / "old", model.dimension)
    edited = tmp_path / "model"
    edited.mkdir()
    for path in model_dir.iterdir():
        (edited / path.name).symlink_to(path.resolve())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    (edited / "manifest.json").unlink()
    (edited / "manifest.json").write_text(json.dumps({**manifest, "dimension": 256}))
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(edited)]) == 1
    assert "the model gives 384-d vectors, the manifest says 256" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_store_error_during_the_copy_names_both_stores(model_dir, tmp_path, monkeypatch, capsys):
    """A full --out failed as "transaction aborted: database or disk is full", naming neither store (a review)."""
    from halflife.cli import main
    from halflife.embedding.engine import EmbeddingEngine
    from halflife.storage.base import StoreUnavailableError

    def full(self, *args, **kwargs):
        raise StoreUnavailableError("transaction aborted: database or disk is full")

    _store_of_another_model(tmp_path / "old", EmbeddingEngine.load(model_dir).dimension)
    monkeypatch.setattr(SqliteStore, "record_events", full)  # the copy's writes; the old store is only read
    assert main(["reembed", "--data-dir", str(tmp_path / "old"), "--out", str(tmp_path / "new"),
                 "--model-dir", str(model_dir)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "halflife reembed: error: transaction aborted: database or disk is full "
        f"(copying {tmp_path / 'old'} into {tmp_path / 'new'}: what it wrote there is removed)")
    assert not (tmp_path / "new").exists()

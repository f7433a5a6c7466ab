"""The client-side CLI (load-movielens, recommend, profile, events) and the Python client's retries, live."""

from __future__ import annotations

import datetime as dt
import csv
import json
import os
import re
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from halflife.api.server import ServerConfig
from halflife.config import Config, RankingConfig
from halflife.v1 import embedding_pb2, embedding_pb2_grpc, interest_pb2, interest_pb2_grpc
from halflife_client import Event, Filter, HalflifeClient, Item
from tests.serving import ServerThread, silent_server, stand_in

VIEW = interest_pb2.EVENT_TYPE_VIEW

MOVIES = [
    (1, "Star Voyage (1977)", "Action|Adventure|Sci-Fi"),
    (2, "Planet of Machines (1982)", "Sci-Fi"),
    (3, "Robots in Orbit (1999)", "Sci-Fi|Thriller"),
    (4, "Love in Paris (1995)", "Comedy|Romance"),
    (5, "Wedding Season (2003)", "Comedy|Romance"),
    (6, "The Long Goodbye Kiss (2008)", "Drama|Romance"),
    (7, "Haunted Manor (1970)", "Horror"),  # 0.0 Unix seconds: was sent as no create_time
    (8, "Untitled", "(no genres listed)"),
]
# (user, movie, rating, unix time): user 1 moved from sci-fi (2001) to romance (2010).
RATINGS = [(1, 1, 5.0, 978300000), (1, 2, 4.5, 978300100), (1, 4, 4.0, 1262304000), (1, 5, 5.0, 1262304100),
           (2, 1, 4.0, 978300000), (2, 3, 1.0, 978300200), (3, 7, 2.0, 1262304000), (3, 6, 4.0, 1262304100)]
TAGS = [(1, 5, "wonderful chemistry", 1262304200), (2, 3, "dull robots", 978300300)]


def write_movielens(directory):
    directory.mkdir()
    rows = {
        "movies.csv": (["movieId", "title", "genres"], MOVIES),
        "ratings.csv": (["userId", "movieId", "rating", "timestamp"], RATINGS),
        "tags.csv": (["userId", "movieId", "tag", "timestamp"], TAGS),
    }
    for name, (header, data) in rows.items():
        with open(directory / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(data)
    return directory


def halflife(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "halflife.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path_factory.mktemp("cli"))) as running:
        yield running


def test_load_movielens_recommend_and_profile(server, tmp_path):
    data = write_movielens(tmp_path / "ml")
    loaded = halflife("load-movielens", str(data), "--target", server.address)
    assert loaded.returncode == 0, loaded.stderr
    assert "items created: 8" in loaded.stdout and "events accepted: 10" in loaded.stdout
    assert loaded.stderr == ""  # stderr is a pipe, no terminal: no progress bars redrawn into it
    again = halflife("load-movielens", str(data), "--target", server.address)  # idempotent
    assert "items created: 0, items updated: 8" in again.stdout and "events duplicate: 10" in again.stdout
    # A newer snapshot with one tag more, earlier than the others: only it is new. A tag's id was its
    # position, and every later tag was stored again (a review).
    with open(data / "tags.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["userId", "movieId", "tag", "timestamp"], [3, 6, "tearjerker", 900000000],
                                      *TAGS])
    newer = halflife("load-movielens", str(data), "--target", server.address)
    assert "events accepted: 1, events duplicate: 10" in newer.stdout, newer.stdout

    with HalflifeClient(server.address) as client:
        (movie,) = client.get_items(["1"])
        assert movie.text == "Star Voyage (1977). Genres: Action, Adventure, Sci-Fi"
        assert list(movie.categories) == ["Action", "Adventure", "Sci-Fi"]
        assert movie.create_time.ToDatetime().year == 1977
        assert list(client.get_items(["8"])[0].categories) == []
        (old,) = client.get_items(["7"])
        assert old.HasField("create_time") and old.create_time.ToDatetime().year == 1970

    shown = halflife("recommend", "1", "--target", server.address, "--limit", "3", "--as-of", "2010-01-02T00:00:00")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "recommendations for user 1 (personalized)"
    assert lines[1].split() == ["#", "item", "score", "text", "why"]
    recommended = [line.split()[1] for line in lines[3:]]
    assert len(recommended) == 3 and not {"1", "2", "4", "5"} & set(recommended)  # seen items excluded
    assert "because of" in shown.stdout

    profile = halflife("profile", "1", "--target", server.address, "--as-of", "1262400000")
    assert profile.returncode == 0, profile.stderr
    assert profile.stdout.startswith("user 1: rate 4, review 1; last event 2010-01-01T00:03:20Z")
    first_interest = profile.stdout.splitlines()[3].split()
    assert first_interest[:2] == ["0", "100%"] and "Romance," in first_interest  # sci-fi has decayed away
    assert "Sci-Fi" in profile.stdout
    # User 2's one dislike (2001) has decayed for 9 years, as has their like: shown, not rounded to 0.000.
    decayed = halflife("profile", "2", "--target", server.address, "--as-of", "1262400000")
    header = decayed.stdout.splitlines()[0]
    assert "negative feedback 0.000" not in header and header.endswith("of the positive)"), header

    cold = halflife("recommend", "nobody", "--target", server.address)
    assert "(trending)" in cold.stdout.splitlines()[0]

    events = halflife("events", "1", "--target", server.address, "--limit", "2")
    assert events.returncode == 0, events.stderr
    lines = events.stdout.splitlines()
    assert lines[0] == "events recorded last for user 1, the last first" and len(lines) == 5  # title, header, rule
    assert lines[1].split() == ["time", "type", "value", "item", "text"]
    assert lines[3].startswith("2010-01-01T00:03:20Z  review") and lines[3].endswith(
        'Wedding Season (2003). Genres: Comedy, Romance — "wonderful chemistry"')
    assert lines[4].split()[:5] == ["2010-01-01T00:01:40Z", "rate", "5", "5", "Wedding"]
    every = halflife("events", "1", "--target", server.address).stdout.splitlines()
    assert len(every) == 3 + 5 and every[-1].split()[:4] == ["2000-12-31T22:00:00Z", "rate", "5", "1"]
    assert halflife("events", "nobody", "--target", server.address).stdout == "user nobody: no events stored\n"
    ranged = halflife("events", "1", "--target", server.address, "--since", "2000-12-31T22:00:00",
                      "--until", "1262304200").stdout.splitlines()  # 2010-01-01T00:03:20Z itself is left out
    assert ranged[0] == ("events recorded last for user 1 since 2000-12-31T22:00:00Z before 2010-01-01T00:03:20Z, "
                         "the last first")
    assert [line.split()[0] for line in ranged[3:]] == [line.split()[0] for line in every[4:]]
    assert halflife("events", "1", "--target", server.address, "--since", "2030-01-01").stdout == (
        "user 1: no events stored since 2030-01-01T00:00:00Z\n")


def test_progress_off_a_terminal_is_a_plain_line_now_and_then_and_none_for_quick_work(monkeypatch):
    """load-movielens and eval said nothing into a log for minutes: tqdm was
    off where stderr is no terminal, as its redraws are noise there."""
    import io

    import halflife.progress

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in halflife.progress.progress(range(3), desc="quick"):
        pass
    assert log.getvalue() == ""
    monkeypatch.setattr(halflife.progress, "LINE_INTERVAL_S", 0.05)
    for _ in halflife.progress.progress(range(4), desc="outer", unit="user"):
        for _ in halflife.progress.progress(range(3), desc="inner", leave=False):
            time.sleep(0.03)
    lines = log.getvalue().splitlines()
    assert not any(set(line) & {"\r", "\x1b"} for line in log.getvalue())
    assert lines[-1].startswith("outer: 100%") and "4/4" in lines[-1]
    assert any(line.startswith("inner:") for line in lines) and len(lines) >= 4
    assert all(a != b for a, b in zip(lines, lines[1:]))


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_to_a_reader_that_left_ends_quietly(server, buffered):
    """`halflife recommend ... | head -1`: the pipe closes under the command.
    Buffered (a pipe's default), the output is written at the end; loadtest's
    verdict must survive it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else {"PYTHONUNBUFFERED": "1"})

    def reader_leaves(*args: str) -> tuple[int, str]:
        process = subprocess.Popen([sys.executable, "-m", "halflife.cli", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        process.stdout.close()  # before the command writes a line
        _, stderr = process.communicate(timeout=60)
        return process.returncode, stderr

    assert reader_leaves("recommend", "nobody", "--target", server.address) == (141, "")
    assert reader_leaves("loadtest", "--call", "grpc.health.v1.Health/Check", "-n", "3",
                         "--target", server.address) == (141, "")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # nothing listens: every call fails
        code, stderr = reader_leaves("loadtest", "--call", "grpc.health.v1.Health/Check", "-n", "3",
                                     "--target", f"127.0.0.1:{unused.getsockname()[1]}")
    assert code == 1 and stderr.strip() == "halflife loadtest: error: none of the 3 calls succeeded", stderr


def test_recommend_shows_an_explanation_whose_item_was_deleted(server):
    """The explanation's event names the deleted item; GetItems' NOT_FOUND for
    its text stopped the command with nothing printed (an audit)."""
    with HalflifeClient(server.address) as client:
        vector = np.eye(384, dtype=np.float32)
        client.upsert_items([Item(id="doomed-1", text="a doomed thing", vector=vector[0] + vector[1]),
                             Item(id="kept-1", text="a kept thing", vector=vector[0])])
        client.record_events([Event(event_id="doomed-e1", user_id="doomed-fan", type=interest_pb2.EVENT_TYPE_LIKE,
                                    item_id="doomed-1")])
        assert client.delete_items(["doomed-1"]) == 1
    shown = halflife("recommend", "doomed-fan", "--target", server.address, "--limit", "1")
    assert shown.returncode == 0, shown.stderr
    assert "kept-1" in shown.stdout and "because of doomed-1" in shown.stdout


def test_recommend_shows_a_list_whose_items_and_explanations_name_over_1000_items(server):
    """Their texts came from one GetItems, which takes at most 1,000 ids: a
    limit of 1,000 failed whole, nothing printed (a review)."""
    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(1200, 384)).astype(np.float32)
    with HalflifeClient(server.address, timeout=60) as client:
        for start in (0, 600):
            client.upsert_items([Item(id=f"many-{n:04d}", text=f"thing {n}", vector=vectors[n])
                                 for n in range(start, start + 600)])
        client.record_events([Event(event_id=f"many-e{n}", user_id="many-fan", type=interest_pb2.EVENT_TYPE_LIKE,
                                    item_id=f"many-{n:04d}") for n in range(0, 1200, 20)])
    shown = halflife("recommend", "many-fan", "--target", server.address, "--limit", "1000")
    assert shown.returncode == 0, shown.stderr
    assert len(re.findall(r"^\s*1000\s", shown.stdout, flags=re.M)) == 1  # the 1,000th row


def test_client_commands_show_control_characters_in_texts_and_user_ids_literally(server):
    """An item text with ESC sequences and a line break cleared the screen,
    set the window title and printed a row of its own (an audit): they are
    shown as escapes, and line breaks as spaces; so is a user id's C1
    control or bidirectional override (ids refuse C0 and DEL only), which
    the commands' first lines printed as they were (a review)."""
    evil = "Shoes \x1b[2J\x1b]0;pwned\x07 sale\r\nFAKE LINE \u202e"
    fan = "evil-fan\u202e\x9b2J"
    with HalflifeClient(server.address) as client:
        client.upsert_items([Item(id="evil-1", text=evil, vector=np.eye(384, dtype=np.float32)[5]),
                             Item(id="evil-2", text=evil, vector=np.eye(384, dtype=np.float32)[5])])
        client.record_events([Event(event_id="evil-e1", user_id=fan, type=interest_pb2.EVENT_TYPE_LIKE,
                                    item_id="evil-1")])
    for command in ("recommend", "profile", "events"):
        shown = halflife(command, fan, "--target", server.address)
        assert shown.returncode == 0, shown.stderr
        assert r"Shoes \x1b[2J\x1b]0;pwned\x07 sale  FAKE LINE \u202e" in shown.stdout, shown.stdout
        assert r"evil-fan\u202e\x9b2J" in shown.stdout.splitlines()[0]
        assert not any(c in shown.stdout for c in "\x1b\x07\r\u202e\x9b")
        assert not any(line.startswith("FAKE LINE") for line in shown.stdout.splitlines())


def test_profile_shows_a_share_that_rounds_to_0_as_under_1_percent():
    from halflife.commands import _percent

    assert [_percent(s) for s in (0.0, 0.001, 0.005, 0.0051, 0.42, 1.0)] == ["0%", "<1%", "<1%", "1%", "42%", "100%"]


def test_events_shows_values_as_sent():
    """`:g` kept 6 digits: 1234567.5 showed as 1.23457e+06 (a review)."""
    from halflife.commands import _value

    assert [_value(v) for v in (5.0, 4.5, 12345.67, 1234567.5, 0.1)] == ["5", "4.5", "12345.67", "1234567.5", "0.1"]


def test_recommend_says_why_it_shows_no_items(model_dir, tmp_path):
    with ServerThread(ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path)) as empty:
        shown = halflife("recommend", "anyone", "--target", empty.address)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["recommendations for user anyone (trending)",
                                         "no items: the catalogue is empty, or this user has seen every item in it"]


def test_a_user_id_that_is_not_utf8_is_a_usage_error():
    for command in ("recommend", "profile"):
        result = halflife(command, "caf\udce9")  # the shell passed the byte 0xE9 alone
        assert result.returncode == 2 and "argument user_id: must be valid UTF-8, got b'caf\\xe9'" in result.stderr, \
            result.stderr


def test_load_movielens_event_ids_keep_dashed_ids_apart():
    """User "1-2" on movie "3" and user "1" on movie "2-3" were one event id (an audit)."""
    from halflife.commands import _event_id

    assert _event_id("rating", "1-2", "3", 7) != _event_id("rating", "1", "2-3", 7)
    assert _event_id("rating", 1, 2, 964982703) == "rating-1-2-964982703"  # numeric ids: as loaded before


def test_client_commands_report_errors_in_one_line(server, tmp_path):
    bad = halflife("recommend", "1", "--target", server.address, "--limit", "0")
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("halflife recommend: error: INVALID_ARGUMENT: limit (--limit): must be between 1 "
                                  "and 1000, got 0")
    missing = halflife("load-movielens", str(tmp_path / "nowhere"), "--target", server.address)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("halflife load-movielens: error:")
    broken = tmp_path / "broken"
    write_movielens(broken)
    with open(broken / "ratings.csv", "a") as handle:
        handle.write("1,31,2.5\n")  # a truncated last line
    bad_csv = halflife("load-movielens", str(broken), "--target", server.address)
    assert bad_csv.returncode == 1 and "Traceback" not in bad_csv.stderr
    assert bad_csv.stderr.strip() == ("halflife load-movielens: error: ratings.csv line 10: 3 fields, expected 4 "
                                      "(userId,movieId,rating,timestamp)"), bad_csv.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    bad_out = halflife("eval", "--data", str(broken), "--out", str(a_file))
    assert bad_out.returncode == 1 and "Traceback" not in bad_out.stderr
    assert bad_out.stderr.strip() == f"halflife eval: error: output directory {a_file}: not a directory", bad_out.stderr


def test_load_movielens_checks_everything_before_it_sends_anything(tmp_path):
    """A rating stamped in 2100 stopped the load at the server's
    INVALID_ARGUMENT after the items and earlier batches were stored, naming
    events[499] (an audit). Refused here before any connection: the target
    is a closed port, and the error is the file's line."""
    data = write_movielens(tmp_path / "future")
    with open(data / "ratings.csv", "a") as handle:
        handle.write("1,3,4.0,4102444800\n")
    result = halflife("load-movielens", str(data), "--target", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("halflife load-movielens: error: ratings.csv line 10: timestamp '4102444800' "
                                    "is not a time from 1970-01-01T00:00:00Z to "), result.stderr


def test_a_load_the_server_stopped_says_that_running_it_again_is_safe(tmp_path):
    """A load cut off by a server's restart ended with the failed call alone;
    that a re-run resumes, storing nothing twice, went unsaid (a review)."""
    result = halflife("load-movielens", str(write_movielens(tmp_path / "ok")), "--target", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("halflife load-movielens: error: UNAVAILABLE: ")
    assert result.stderr.rstrip().endswith("(run it again when the server answers: what is stored is not stored twice)")

def test_movielens_event_ids_stay_valid_and_the_same_for_long_ids():
    from halflife.commands import _event_id

    assert _event_id("rating", "12", "345") == "rating-12-345"
    long = _event_id("rating", "u" * 200, "i" * 200)
    assert len(long.encode()) <= 256 and long.startswith("rating-sha256-")
    assert long == _event_id("rating", "u" * 200, "i" * 200) != _event_id("rating", "u" * 200, "j" * 200)


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "70000"], "argument --port: must be 0 to 65535, got 70000"),  # gRPC would wrap it to 4464
    (["serve", "--port=-1"], "argument --port: must be 0 to 65535, got -1"),
    (["serve", "--max-queued-inputs", "0"], "argument --max-queued-inputs: must be at least 256 (one full Embed)"),
    (["serve", "--max-queued-inputs", "100"], "argument --max-queued-inputs: must be at least 256 (one full Embed)"),
    (["serve", "--max-batch-tokens", "-5"], "argument --max-batch-tokens: must be at least 1, got -5"),
    # 10**20 workers were started one by one until the machine gave out.
    (["serve", "--workers", "99999999999999999999"], "argument --workers: must be at most 256, got 99999999999999999999"),
    # Not "invalid _positive_int value": a usage error names no function of ours.
    (["serve", "--workers", "abc"], "argument --workers: must be a whole number, got 'abc'"),
    (["serve", "--port", "1.5"], "argument --port: must be a whole number, got '1.5'"),
    (["serve", "--max-queued-inputs", "x"], "argument --max-queued-inputs: must be a whole number, got 'x'"),
    # int() takes these: `--workers 1_0` started 10 workers (an operations review).
    (["serve", "--workers", "1_0"], "argument --workers: must be a whole number, got '1_0'"),
    (["serve", "--workers", "\u0663"], "argument --workers: must be a whole number, got '\u0663'"),
    (["load-movielens", "x", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    # The server takes at most 1000 events per RecordEvents: 1001 failed only after every item was sent.
    (["load-movielens", "x", "--batch-size", "1001"], "argument --batch-size: must be at most 1000 (the server's limit)"),
    (["recommend", "1", "--as-of", "inf"], "argument --as-of: unix seconds out of range (years 1 to 9999): 'inf'"),
    (["profile", "1", "--as-of=1e20"], "argument --as-of: unix seconds out of range (years 1 to 9999): '1e20'"),
    (["recommend", "1", "--target", ""], "argument --target: must be host:port, got an empty string"),
    # Found by an audit: protobuf's ValueError, and an OverflowError from an offset, came out as tracebacks.
    (["recommend", "1", "--limit", "3000000000"], "argument --limit: must be a 32-bit whole number, got 3000000000"),
    (["recommend", "1", "--as-of", "9999-12-31T23:59:59-01:00"], "argument --as-of: out of range in UTC (years 1 to 9999)"),
    (["profile", "1", "--as-of", "0001-01-01T00:00:00+01:00"], "argument --as-of: out of range in UTC (years 1 to 9999)"),
    # Path("") is the current directory, which a server then filled.
    (["serve", "--data-dir", ""], "argument --data-dir: must not be empty"),
    # eval wrote its results and cache into it, load-movielens read it (a review).
    (["eval", "--out", ""], "argument --out: must not be empty"),
    (["eval", "--cache-dir", ""], "argument --cache-dir: must not be empty"),
    (["load-movielens", ""], "argument directory: must not be empty"),
    (["loadtest", "--call", "grpc.health.v1.Health.Check", "--target", " "], "argument --target: must be host:port"),
    # gRPC wraps a port out of range: 99999 reached port 34463.
    (["recommend", "1", "--target", "127.0.0.1:99999"], "argument --target: port must be 1 to 65535, got 99999"),
    (["profile", "1", "--target", "[::1]:0"], "argument --target: port must be 1 to 65535, got 0"),
    (["load-movielens", "x", "--target", "localhost:70000"], "argument --target: port must be 1 to 65535, got 70000"),
    (["eval", "--target", "127.0.0.1:65536"], "argument --target: port must be 1 to 65535, got 65536"),
    (["loadtest", "--call", "grpc.health.v1.Health.Check", "--target", "127.0.0.1:99999"],
     "argument --target: port must be 1 to 65535, got 99999"),
    # gRPC took these for host names: UNAVAILABLE at the call, "Misformatted domain name", "Failed to parse port".
    (["recommend", "1", "--target", "http://127.0.0.1:52401"], "argument --target: give host:port, not a URL: drop the http://"),
    (["loadtest", "--call", "grpc.health.v1.Health.Check", "https://localhost"],
     "argument host: give host:port, not a URL: drop the https://"),
    (["profile", "1", "--target", "localhost:abc"], "argument --target: port must be 1 to 65535, got abc"),
    (["events", "1", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["events", "1", "--since", "2026-02-01", "--until", "2026-01-01"], "argument --until: must be after --since"),
    (["events", "1", "--since", "2026"], "argument --since: '2026' reads as unix seconds, within three hours of 1970: "
                                         "for a year give a date (2026-01-01)"),
    (["recommend", "1", "--as-of", "1999"], "argument --as-of: '1999' reads as unix seconds"),
    # Past sys.maxsize, itertools.islice raised in a traceback (a review).
    (["events", "1", "--limit", str(2**63)], f"argument --limit: must be a 32-bit whole number, got {2**63}"),
])
def test_out_of_range_flags_are_usage_errors(args, message):
    result = halflife(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    """Parsing imports what a command needs (the server's modules for every
    one): a Ctrl-C there was a traceback, and one before `serve`'s event
    loop ran left its coroutine never awaited (an audit)."""
    import warnings

    from halflife import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["recommend", "1"]) == 130
    assert capsys.readouterr().err == "halflife recommend: interrupted\n"

    async def serve():
        pass

    monkeypatch.setattr(cli, "_uvloop", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" is a RuntimeWarning
        coroutine = serve()
        with pytest.raises(KeyboardInterrupt):
            cli.run_event_loop(coroutine)
        assert coroutine.cr_frame is None  # closed, so never reported as never awaited


# A line gRPC's C core logs itself (absl's prefix: severity, date, time, thread, file:line]).
GRPC_CORE_LOG = re.compile(r"[EWIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+:\d+\] ")


def test_ctrl_c_is_one_line_and_exit_130():
    import signal
    import socket

    with socket.socket() as silent:  # accepts connections, never speaks HTTP/2: the call waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        # As from a terminal: a shell's background job (a CI step run with &) ignores SIGINT, and a child
        # inherits that, where Python then installs no handler and the call ran to its deadline. Restored in the
        # child's own Python, not by a preexec_fn, which can deadlock a child forked beside gRPC's threads (once
        # in CI: the command never got to its call in 60 s).
        as_from_a_terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                              "runpy.run_module('halflife.cli', run_name='__main__', alter_sys=True)")
        process = subprocess.Popen(
            [sys.executable, "-c", as_from_a_terminal, "recommend", "1", "--target",
             f"127.0.0.1:{silent.getsockname()[1]}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        silent.settimeout(60)
        connection, _ = silent.accept()  # the command is past its imports, in the call
        with connection:
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
    # gRPC's C core may log a line of its own as the interrupted channel closes (rarely: "epoll_wait error:
    # Bad file descriptor", once in a CI run under load); ours must be the only other one, and no traceback.
    ours = [line for line in stderr.splitlines() if line.strip() and not GRPC_CORE_LOG.match(line)]
    assert process.returncode == 130 and ours == ["halflife recommend: interrupted"], stderr


class FlakyEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Answers UNAVAILABLE, then CANCELLED (as a server shutting down does to a
    call no handler took yet) to the first two GetModelInfo calls, and always
    INVALID_ARGUMENT to Embed; counts the attempts it sees."""

    def __init__(self):
        self.attempts = {"GetModelInfo": 0, "Embed": 0}

    def GetModelInfo(self, request, context):
        self.attempts["GetModelInfo"] += 1
        if self.attempts["GetModelInfo"] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if self.attempts["GetModelInfo"] == 2:
            context.abort(grpc.StatusCode.CANCELLED, "shutting down")
        return embedding_pb2.GetModelInfoResponse(model_id="flaky", dimension=3)

    def Embed(self, request, context):
        self.attempts["Embed"] += 1
        if request.inputs[0].startswith("big") and self.attempts["Embed"] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if request.inputs[0].startswith("big"):
            return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[1.0])] * len(request.inputs))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "never retried")


def test_client_retries_unavailable_and_a_servers_cancel_only():
    flaky = FlakyEmbedding()
    with stand_in(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, flaky, threads=2) as address:
        with HalflifeClient(address) as client:
            assert client.model_info().model_id == "flaky"
            assert flaky.attempts["GetModelInfo"] == 3  # UNAVAILABLE and CANCELLED, retried with backoff
            with pytest.raises(grpc.RpcError) as invalid:
                client.embed(["x"])
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert flaky.attempts["Embed"] == 1
    # Past gRPC's default retry buffer (256 KiB) a request was never retried (an audit).
    flaky = FlakyEmbedding()
    with stand_in(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, flaky, threads=2) as address:
        with HalflifeClient(address) as client:
            assert client.embed(["big" + "x" * 40_000] * 10).shape == (10, 1)
            assert flaky.attempts["Embed"] == 2


class InterestBeforeNewestFirst(interest_pb2_grpc.InterestServiceServicer):
    """ListEvents as a server from before `newest_first` answered: that field
    unknown to it, its events in the order recorded, no echo."""

    def ListEvents(self, request, context):
        events = [interest_pb2.Event(event_id=f"e{n}", user_id=request.user_id, type=VIEW, item_id="x")
                  for n in range(3)]
        return interest_pb2.ListEventsResponse(events=events)


def test_newest_first_or_a_time_range_from_a_server_that_predates_it_is_an_error_not_other_events():
    """Such a server dropped the field and listed oldest first, which the
    clients and `halflife events` showed as the events recorded last (a
    review)."""
    import asyncio

    from halflife_client import AsyncHalflifeClient, ServerTooOldError

    with stand_in(interest_pb2_grpc.add_InterestServiceServicer_to_server, InterestBeforeNewestFirst()) as address:
        with HalflifeClient(address) as client:
            assert [e.event_id for e in client.iter_events("u")] == ["e0", "e1", "e2"]  # the order it knows
            for call in (lambda: client.list_events("u", newest_first=True),
                         lambda: list(client.iter_events("u", newest_first=True))):
                with pytest.raises(ServerTooOldError, match="predates ListEvents' newest_first"):
                    call()
            since = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
            for call in (lambda: client.list_events("u", start_time=since),
                         lambda: list(client.iter_events("u", end_time=since))):
                with pytest.raises(ServerTooOldError, match="predates ListEvents' start_time and end_time"):
                    call()

        async def main():
            async with AsyncHalflifeClient(address) as client:
                with pytest.raises(ServerTooOldError):
                    [e async for e in client.iter_events("u", newest_first=True)]
                with pytest.raises(ServerTooOldError, match="start_time and end_time"):
                    await client.list_events("u", start_time=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))

        asyncio.run(main())
        shown = halflife("events", "u", "--target", address)
        assert shown.returncode == 1 and shown.stdout == "" and "Traceback" not in shown.stderr
        assert shown.stderr.startswith("halflife events: error: the server listed the events oldest first")


class ChurnedInterest(interest_pb2_grpc.InterestServiceServicer):
    """Answers ABORTED to the first two RecordEvents calls (as the server does
    when the events' items change under each of its tries) and to every
    GetProfile; counts the attempts it sees."""

    def __init__(self):
        self.attempts = {"RecordEvents": 0, "GetProfile": 0}

    def RecordEvents(self, request, context):
        self.attempts["RecordEvents"] += 1
        if self.attempts["RecordEvents"] <= 2:
            context.abort(grpc.StatusCode.ABORTED, "items changed; nothing was recorded, retry")
        return interest_pb2.RecordEventsResponse(accepted_count=len(request.events))

    def GetProfile(self, request, context):
        self.attempts["GetProfile"] += 1
        context.abort(grpc.StatusCode.ABORTED, "never retried")


def test_client_retries_aborted_for_record_events_only():
    churned = ChurnedInterest()
    with stand_in(interest_pb2_grpc.add_InterestServiceServicer_to_server, churned, threads=2) as address:
        with HalflifeClient(address) as client:
            assert client.record_events([Event("e-1", "u-1", VIEW, "i-1")]) == (1, 0)
            assert churned.attempts["RecordEvents"] == 3  # ABORTED twice: nothing recorded, resent
            with pytest.raises(grpc.RpcError) as aborted:
                client.profile("u-1")
            assert aborted.value.code() == grpc.StatusCode.ABORTED
            assert churned.attempts["GetProfile"] == 1


@pytest.mark.parametrize("timeout", [float("inf"), 1e10])
def test_a_client_deadline_past_any_wait_is_none(server, timeout):
    """gRPC took them for deadlines already passed: every call failed at once (an audit)."""
    with HalflifeClient(server.address, timeout=timeout) as client:
        assert client.model_info().dimension == 384
    with HalflifeClient(server.address) as client:
        assert client.model_info(timeout=timeout).dimension == 384
        with pytest.raises(ValueError, match="timeout is NaN"):
            client.model_info(timeout=float("nan"))
    with pytest.raises(ValueError, match="timeout is NaN"):
        HalflifeClient(server.address, timeout=float("nan"))


def eval_refused(tmp_path, target: str) -> str:
    """`halflife eval --target target` on a tiny MovieLens, which must fail
    (exit 1, no traceback) before writing any results; returns its stderr."""
    data = write_movielens(tmp_path / "ml")
    result = halflife("eval", "--data", str(data), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                      "--target", target)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    return result.stderr


def test_eval_checks_its_target_before_the_evaluation(tmp_path):
    # It used to evaluate in process first (~3 min on MovieLens), then end in a traceback.
    began = time.monotonic()
    stderr = eval_refused(tmp_path, "127.0.0.1:1")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("halflife eval: error: --target 127.0.0.1:1: UNAVAILABLE: "), stderr
    assert time.monotonic() - began < 60


def test_eval_refuses_a_target_that_holds_items_before_the_evaluation(server, tmp_path):
    """A used server's items rank among the dataset's: the run ended minutes
    in, in a traceback (KeyError on an item the dataset lacks; an audit)."""
    with HalflifeClient(server.address) as client:
        client.upsert_items([Item(id="already-here", text="An item from before the evaluation")])
    stderr = eval_refused(tmp_path, server.address)
    assert stderr.startswith(f"halflife eval: error: --target {server.address} already holds items (e.g. "), stderr


def test_eval_refuses_a_target_with_events_of_the_datasets_users(model_dir, tmp_path):
    """Its items deleted, a used server passed the probe for items, and its
    users' old events would have joined the dataset's users' profiles."""
    config = ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path / "used")
    with ServerThread(config) as used, HalflifeClient(used.address) as client:
        client.upsert_items([Item(id="old", text="An item from before the evaluation")])
        client.record_events([Event("old-1", "2", VIEW, "old")])  # user "2" rates in write_movielens
        assert client.delete_items(["old"]) == 1
        stderr = eval_refused(tmp_path, used.address)
    assert stderr.startswith(f"halflife eval: error: --target {used.address} already holds events of the "
                             "dataset's user '2'"), stderr
    assert not (tmp_path / "cache").exists()


def test_eval_refuses_a_target_whose_lists_are_too_short_before_the_evaluation(model_dir, tmp_path):
    """A server with a smaller ranking.max_limit passed the probe, then
    refused the first test user's list of 1,000, minutes in, and the run
    wrote nothing (a review)."""
    short_lists = Config(ranking=RankingConfig(max_limit=500))
    config = ServerConfig(port=0, model_dir=model_dir, data_dir=tmp_path / "data", halflife=short_lists)
    with ServerThread(config) as short:
        stderr = eval_refused(tmp_path, short.address)
    assert stderr == (f"halflife eval: error: --target {short.address} refuses lists of 1000 items (limit: must "
                      "be between 1 and 500, got 1000); eval needs its ranking.max_limit at 1000 or more\n")
    assert not (tmp_path / "cache").exists()


def test_output_the_streams_cannot_hold_is_no_traceback(server):
    """A title's character outside stdout's encoding, and a closed stdout,
    each ended `halflife recommend` in a traceback (an audit)."""
    with HalflifeClient(server.address) as client:
        client.upsert_items([Item(id="amélie-2001", text="Amélie (2001)")])
        client.record_events([Event("output-1", "output-fan", VIEW, "amélie-2001")])
    args = [sys.executable, "-m", "halflife.cli", "recommend", "nobody", "--target", server.address, "--limit", "1000"]
    ascii_only = subprocess.run(args, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert ascii_only.returncode == 0 and "am\\xe9lie-2001" in ascii_only.stdout, ascii_only.stderr
    closed = subprocess.run(args, stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr


class LostConnection(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "Socket closed"

    def trailing_metadata(self):
        return ()


def test_eval_reports_a_call_failing_during_the_run_in_one_line(monkeypatch, tmp_path, capsys):
    from halflife.cli import main
    from halflife.eval import runner

    def fail(*args, **kwargs):
        raise LostConnection()

    monkeypatch.setattr(runner, "run", fail)
    assert main(["eval", "--out", str(tmp_path / "out"), "--target", "127.0.0.1:50051"]) == 1
    assert capsys.readouterr().err == "halflife eval: error: --target 127.0.0.1:50051: UNAVAILABLE: Socket closed\n"


def test_client_timeout_0_is_a_deadline_and_none_the_default():
    """Against a server that never answers (a socket that listens, accepts
    nothing): timeout=0 fails at once (it was taken for "unset": the client's
    default), None waits the client's timeout."""

    with silent_server() as address:
        with HalflifeClient(address, timeout=3) as client:
            for timeout, least, most in ((0, 0.0, 1.5), (None, 3, 10)):
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as expired:
                    client.model_info(timeout=timeout)
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert least <= time.monotonic() - began < most, timeout


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:-1", "", "::1", "fe80::1",
                                    "http://127.0.0.1:1", "localhost:abc"])
def test_client_refuses_a_target_gRPC_would_wrap_or_cannot_use(target):
    with pytest.raises(ValueError, match="port must be 1 to 65535|must be host:port|goes in brackets|not a URL"):
        HalflifeClient(target)


# The Go and Node clients' tests hold the same tables (clients/go/target_test.go, clients/node/test/client.test.ts).
def test_the_log_level_is_read_in_any_case():
    """`--log-level debug` was a usage error (an operations review)."""
    from halflife.cli import build_parser

    assert build_parser().parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"


@pytest.mark.parametrize("argv", [
    ["serve", "--model-id", "mine"],  # export's flag: it set serve's hidden --model-identity
    ["serve", "--parent", "1"],  # --parent-pid: the server stopped at once, "orphaned"
    ["serve", "--data", "var/x"],
    ["recommend", "1", "--lim", "5"],
])
def test_flags_are_not_taken_abbreviated(argv):
    """argparse took any prefix of a flag: `serve --model-id NAME`, as `export` spells it, reached serve's
    internal --model-identity, and the server refused its own model as "changed since this worker's group
    started". A usage error instead, as for any flag a command does not have."""
    from halflife.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    result = halflife(*argv)
    assert result.returncode == 2 and f"unrecognized arguments: {argv[-2]}" in result.stderr, result.stderr


@pytest.mark.parametrize("target, expected", [
    ("localhost", "localhost:50051"),
    ("10.0.0.7", "10.0.0.7:50051"),
    ("[::1]", "[::1]:50051"),
    ("localhost:", "localhost:50051"),
    ("[::1]:", "[::1]:50051"),
    (" localhost ", "localhost:50051"),
    ("localhost:8080", "localhost:8080"),
    ("[::1]:1", "[::1]:1"),
    ("10.0.0.7:65535", "10.0.0.7:65535"),
    ("unix:/run/halflife.sock", "unix:/run/halflife.sock"),
    ("unix:halflife.sock", "unix:halflife.sock"),
    ("unix-abstract:halflife", "unix-abstract:halflife"),
    ("dns:///example.com:50051", "dns:///example.com:50051"),
    ("dns:///example.com", "dns:///example.com"),
    ("ipv4:10.0.0.7:50051", "ipv4:10.0.0.7:50051"),
    ("ipv6:[::1]:50051", "ipv6:[::1]:50051"),
    ("DNS:///example.com:50051", "DNS:///example.com:50051"),  # gRPC reads schemes in any case
    ("IPV4:10.0.0.7:50051", "IPV4:10.0.0.7:50051"),
    ("127.0.0.1:+80", "127.0.0.1:80"),  # as gRPC parses a port: these failed only at the first call (a review)
    ("localhost:0080", "localhost:80"),
])
def test_server_target_gives_a_host_without_a_port_serves_port(target, expected):
    from halflife_client.client import server_target

    assert server_target(target) == expected


@pytest.mark.parametrize("target, error", [
    ("", "must be host:port, got an empty string"),
    ("  ", "must be host:port, got an empty string"),
    ("127.0.0.1:0", "port must be 1 to 65535, got 0"),
    ("127.0.0.1:65536", "port must be 1 to 65535, got 65536"),
    ("127.0.0.1:99999", "port must be 1 to 65535, got 99999"),
    ("127.0.0.1:-1", "port must be 1 to 65535, got -1"),
    ("[::1]:70000", "port must be 1 to 65535, got 70000"),
    ("dns:///example.com:0", "port must be 1 to 65535, got 0"),
    ("::1", "an IPv6 address goes in brackets: [::1]:port"),
    ("fe80::1", "an IPv6 address goes in brackets: [fe80::1]:port"),
    # gRPC took these for host names, and failed only at the first call.
    ("http://127.0.0.1:52401", "give host:port, not a URL: drop the http://"),
    ("HTTPS://example.com/", "give host:port, not a URL: drop the HTTPS://"),
    ("localhost:abc", "port must be 1 to 65535, got abc"),
    ("[::1]:http", "port must be 1 to 65535, got http"),
    ("localhost:50051/", "port must be 1 to 65535, got 50051/"),
    # An IPv6 address with a port, a second colon, no host: these went on to gRPC too (an audit).
    ("2001:db8::1:50051", "an IPv6 address goes in brackets: [2001:db8::1]:50051"),
    ("::ffff:127.0.0.1:56110", "an IPv6 address goes in brackets: [::ffff:127.0.0.1]:56110"),
    ("h:1:2", "must be host:port (an IPv6 host in brackets), got 'h:1:2'"),
    ("[::1:50051", "must be host:port (an IPv6 host in brackets), got '[::1:50051'"),
    (":50051", "no host: give host:port, got ':50051'"),
    (":", "no host: give host:port, got ':'"),
    ("[]:5", "no host: give host:port, got '[]:5'"),
    # A second colon, then none for a port: these became "h:1:50051" and so on (a review).
    ("h:1:", "must be host:port (an IPv6 host in brackets), got 'h:1:'"),
    ("localhost::", "must be host:port (an IPv6 host in brackets), got 'localhost::'"),
    ("[::1]:80:", "must be host:port (an IPv6 host in brackets), got '[::1]:80:'"),
    ("::1:", "an IPv6 address goes in brackets: [::1]:port"),
    # A path, query, user or space in the host: gRPC failed it UNAVAILABLE at the first call, after every retry.
    ("localhost/x", "must be host:port, got 'localhost/x': a host holds no '/'"),
    ("localhost/x:50051", "must be host:port, got 'localhost/x:50051': a host holds no '/'"),
    ("user@h:5", "must be host:port, got 'user@h:5': a host holds no '@'"),
    ("h?x", "must be host:port, got 'h?x': a host holds no '?'"),
    ("h#x:1", "must be host:port, got 'h#x:1': a host holds no '#'"),
    ("h\\x", "must be host:port, got 'h\\\\x': a host holds no '\\\\'"),
    ("a b:1", "must be host:port, got 'a b:1': a host holds no ' '"),
    ("h\x01:1", "must be host:port, got 'h\\x01:1': a target holds no '\\x01'"),
    ("h\udcff:1", "must be host:port, got 'h\\udcff:1': a target holds no '\\udcff'"),
    ("unix:/run/h\udcff.sock", "must be host:port, got 'unix:/run/h\\udcff.sock': a target holds no '\\udcff'"),
])
def test_server_target_refuses_what_grpc_would_wrap_or_misread(target, error):
    from halflife_client.client import server_target

    with pytest.raises(ValueError) as refused:
        server_target(target)
    assert str(refused.value) == error


def test_an_item_takes_none_for_what_it_does_not_have():
    """None is "not given" for an item's text, and was an AttributeError for its attributes, a TypeError for its
    categories (a review)."""
    from halflife_client import Item

    bare = Item(id="x", text=None, categories=None, attributes=None).to_proto()
    assert (bare.id, bare.text, list(bare.categories), dict(bare.attributes)) == ("x", "", [], {})
    with pytest.raises(TypeError, match="attribute 'year' must be a string"):
        Item(id="x", attributes={"year": 1999}).to_proto()


def test_an_item_or_filter_made_of_generators_sends_the_same_every_time():
    """to_proto read a generator once: the same Item sent again (a resend after DEADLINE_EXCEEDED) went without
    its categories, and the upsert replaced the stored item's; a Filter reused excluded nothing (a review)."""
    from halflife_client import Item

    item = Item(id="x", text="t", categories=(genre.lower() for genre in ["Drama", "War"]))
    assert [list(item.to_proto().categories) for _ in range(2)] == [["drama", "war"]] * 2
    reused = Filter(include_categories=iter(["a"]), exclude_item_ids=(i for i in ["b", "c"]))
    assert reused.to_proto() == reused.to_proto() == Filter(include_categories=["a"], exclude_item_ids=["b", "c"]).to_proto()


def test_an_items_vector_past_float32s_range_keeps_its_direction():
    """The wire's vector is float32 and the server keeps only a vector's direction. A float64 vector with an
    entry past float32's range went out with inf in it (the server: "holds NaN or infinite values", of finite
    values), and one of entries all below its smallest as zeros ("is all zeros: it has no direction")."""
    from halflife_client import Item

    direction = np.array([3.0, -4.0, 0.0, 1e-3])
    for scale in (1e39, 1e300, 1e-46, 1e-300):
        sent = np.asarray(Item(id="x", vector=direction * scale).to_proto().vector, dtype=np.float64)
        assert np.isfinite(sent).all() and sent.any(), scale
        np.testing.assert_allclose(sent / np.linalg.norm(sent), direction / np.linalg.norm(direction), rtol=1e-6)
    # A vector float32 holds goes as it is; one that is not finite is the server's to refuse.
    assert list(Item(id="x", vector=[0.5, 1e-40, 3e38]).to_proto().vector) == list(np.float32([0.5, 1e-40, 3e38]))
    assert np.isnan(Item(id="x", vector=[np.nan, 1e39]).to_proto().vector[0])


@pytest.mark.parametrize("vector, kind, message", [
    (np.ones((1, 384)), ValueError, "vector must be one sequence of numbers, not an array of shape (1, 384)"),
    (np.float32(1.0), TypeError, "vector must be a sequence of numbers, not float32"),
    ((v for v in [1.0, 2.0]), TypeError, "vector must be a sequence of numbers, not generator"),
    (["0.5", "1"], TypeError, "vector[0] must be a real number, not str '0.5'"),
    (np.ones(3, dtype=bool), TypeError, "vector[0] must be a real number, not bool True"),
    (np.array([1 + 2j, 3]), TypeError, "vector[0] must be a real number, not complex (1+2j)"),
    ([1.0, None], TypeError, "vector[1] must be a real number, not NoneType None"),
], ids=["2-D", "0-d", "generator", "strings", "bools", "complex", "None"])
def test_an_items_vector_that_is_no_row_of_real_numbers_is_refused(vector, kind, message):
    """A 2-D array or a scalar failed as protobuf's "must be real number, not list" and "must assign iterable";
    strings were parsed ("0.5" went out as 0.5), bools went as 1 and 0, complex numbers lost their imaginary part
    (a ComplexWarning) and None went as NaN, which the server refused as "holds NaN or infinite values"."""
    with pytest.raises(kind) as refused:
        Item(id="x", vector=vector).to_proto()
    assert type(refused.value) is kind and str(refused.value).startswith(message)
    # What is a row of real numbers goes, in any dtype: ints, float16, an object array of Python numbers.
    for fine in ([1, 2], np.array([1, 2], dtype=np.float16), np.array([1.0, 2], dtype=object), (0.5, 1.5)):
        assert list(Item(id="x", vector=fine).to_proto().vector) == [float(v) for v in fine]


def test_the_package_exports_the_names_the_readme_gives_it():
    """clients/python/README.md names these as halflife_client's; DEFAULT_PORT
    and server_target were only in halflife_client.client (an AttributeError)."""
    import halflife_client

    named = {"HalflifeClient", "AsyncHalflifeClient", "Item", "Event", "Filter", "ModelInfo", "field_violations",
             "rich_status", "to_timestamp", "CHANNEL_OPTIONS", "DEFAULT_PORT", "DEFAULT_TIMEOUT_S", "server_target",
             "ServerTooOldError"}
    assert named <= set(halflife_client.__all__)
    assert halflife_client.DEFAULT_PORT == 50051 and halflife_client.server_target("localhost") == "localhost:50051"
    assert halflife_client.HalflifeClient().timeout == halflife_client.DEFAULT_TIMEOUT_S == 10.0


@pytest.mark.parametrize("client", ["HalflifeClient", "AsyncHalflifeClient"])
def test_a_client_of_a_host_without_a_port_connects_to_serves_port(client, monkeypatch):
    """HalflifeClient("localhost") went to gRPC's default port, 443. 50051
    may be taken here: DEFAULT_PORT is pointed at a listener of the test's."""
    import asyncio

    import halflife_client
    from halflife_client import client as module

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(10)
        monkeypatch.setattr(module, "DEFAULT_PORT", listener.getsockname()[1])
        make = getattr(halflife_client, client)

        async def call() -> None:  # a call makes gRPC connect; the listener never answers it
            async with make("127.0.0.1", timeout=0.5) as connecting:
                await connecting.model_info()

        with pytest.raises(grpc.RpcError) as expired:
            if client == "HalflifeClient":
                with make("127.0.0.1", timeout=0.5) as connecting:
                    connecting.model_info()
            else:
                asyncio.run(call())
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        connection, _ = listener.accept()
        connection.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.1:", "[::1]:"])
def test_a_target_without_a_port_gets_serves_default_port(host, tmp_path):
    """gRPC sends a target without a port (or with an empty one: an audit)
    to 443; the CLI's commands talk to `halflife serve`, whose default port
    is 50051, and so does a ghz config's "host" in loadtest."""
    from halflife.cli import DEFAULT_PORT, build_parser
    from halflife.loadtest import options_from_ghz_config

    expected = f"{host.rstrip(':')}:{DEFAULT_PORT}"
    for command in (["recommend", "1"], ["profile", "1"], ["load-movielens", "x"], ["eval"],
                    ["loadtest", "--call", "grpc.health.v1.Health.Check"]):
        assert build_parser().parse_args([*command, "--target", host]).target == expected
    config = tmp_path / "ghz.json"
    config.write_text(json.dumps({"call": "grpc.health.v1.Health.Check", "host": host}))
    assert options_from_ghz_config(config).target == expected
    assert build_parser().parse_args(["recommend", "1", "--target", "unix:/run/halflife.sock"]).target == \
        "unix:/run/halflife.sock"


@pytest.mark.parametrize("spelled", ["::1", "[::1]", " [::] "])
def test_serve_takes_an_ipv6_host_with_or_without_brackets(spelled):
    """`--host ::1` reached gRPC bare ("Misformatted domain name") and
    `--host [::1]` the workers' parent's socket bracketed (an audit): no
    spelling served with --workers. The host is kept bare, as sockets take
    it, and bracketed for gRPC."""
    from halflife.cli import build_parser
    from halflife_client.client import host_port

    host = build_parser().parse_args(["serve", "--host", spelled]).host
    assert host == spelled.strip().strip("[]")
    assert host_port(host, 50051) == f"[{host}]:50051" and host_port("127.0.0.1", 1) == "127.0.0.1:1"
    assert halflife("serve", "--host", "[]").returncode == 2


def test_serve_batching_flags_default_to_the_batchers_and_say_so():
    from halflife.cli import build_parser
    from halflife.embedding.batcher import BatchingConfig
    from halflife.embedding.engine import BATCH_TOKENS, CPU, CUDA

    parser = build_parser()
    args = parser.parse_args(["serve"])
    # No --max-batch-tokens: the server takes its engine's batch_tokens.
    assert (args.max_batch_tokens, args.max_queued_inputs) == (None, BatchingConfig.max_queued_inputs)
    assert BatchingConfig.max_batch_tokens is None
    serve_help = " ".join(halflife("serve", "--help").stdout.split())  # argparse wraps lines
    assert (f"padded tokens per model batch (default: the provider's best, {BATCH_TOKENS[CPU]} on CPU, "
            f"{BATCH_TOKENS[CUDA]} on CUDA)") in serve_help
    assert f"RESOURCE_EXHAUSTED (default {BatchingConfig.max_queued_inputs};" in serve_help


@pytest.mark.parametrize("make, message", [
    (lambda: HalflifeClient(None), "target must be a string such as '127.0.0.1:50051', not NoneType"),
    (lambda: HalflifeClient("127.0.0.1:1", timeout="5"), "timeout must be seconds (a number) or None, not str '5'"),
    (lambda: HalflifeClient("127.0.0.1:1").embed(["x"], timeout="5"), "timeout must be seconds"),
    (lambda: HalflifeClient("127.0.0.1:1").upsert_items([Item(id=5)]), "Item id must be a string, not int 5"),
    (lambda: HalflifeClient("127.0.0.1:1").upsert_items([Item(id="a", attributes={"size": 9})]),
     "Item 'a' attribute 'size' must be a string, not int 9"),
    (lambda: HalflifeClient("127.0.0.1:1").record_events([Event("e", "u", 1, item_id=3)]),
     "Event item_id must be a string, not int 3"),
    # Passed straight to a request: protobuf's own errors named nothing (an onboarding review).
    (lambda: HalflifeClient("127.0.0.1:1").get_items(["a", 2]), "ids[1] must be a string, not int 2"),
    (lambda: HalflifeClient("127.0.0.1:1").recommend(1), "user_id must be a string, not int 1"),
    (lambda: HalflifeClient("127.0.0.1:1").similar_items(item_id=1), "item_id must be a string, not int 1"),
    (lambda: HalflifeClient("127.0.0.1:1").embed([1]), "inputs[0] must be a string, not int 1"),
    (lambda: HalflifeClient("127.0.0.1:1").list_events("u", page_size="9"),
     "page_size must be a 32-bit whole number, not str '9'"),
], ids=["target", "client timeout", "call timeout", "item id", "attribute", "event item", "get ids", "user id",
        "similar item id", "embed input", "page size"])
def test_arguments_of_the_wrong_type_are_type_errors_that_name_them(make, message):
    """None as the target was an AttributeError about .strip, a string
    timeout a comparison error, an int id protobuf's "bad argument type for
    built-in operation", naming no field (an audit)."""
    with pytest.raises(TypeError, match=re.escape(message)):
        make()


def test_values_protobuf_cannot_encode_are_value_errors_that_name_them():
    """protobuf's "Value out of range: 1099511627776" named no field."""
    import asyncio

    from halflife_client import AsyncHalflifeClient

    with pytest.raises(ValueError, match=re.escape("limit must be a 32-bit whole number, not int 1099511627776")):
        HalflifeClient("127.0.0.1:1").recommend("u", limit=2**40)
    # protobuf's UnicodeEncodeError takes 5 arguments: rebuilt with one, it was a TypeError about that (a review).
    for call, message in ((lambda c: c.get_items(["ok", "caf\udce9"]), "ids[1] must be valid UTF-8 text"),
                          (lambda c: c.recommend(b"\xff"), "user_id must be valid UTF-8 text, not b'\\xff'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(HalflifeClient("127.0.0.1:1"))

    async def main():
        async with AsyncHalflifeClient("127.0.0.1:1", timeout=1) as client:
            with pytest.raises(ValueError, match=re.escape("items_per_interest must be a 32-bit whole number")):
                await client.profile("u", items_per_interest=-2**31 - 1)
            with pytest.raises(ValueError, match=re.escape("user_id must be valid UTF-8 text")):
                await client.profile("\udcff")

    asyncio.run(main())


@pytest.mark.parametrize("call", [
    lambda client: client.delete_items("audit"),
    lambda client: client.get_items("123"),
    lambda client: client.embed("hello"),
    lambda client: client.upsert_items([Item(id="shoe", text="Trail shoes", categories="Shoes")]),
    lambda client: client.recommend("u", item_filter=Filter(include_categories="hiking")),
    lambda client: client.similar_items(text="tents", item_filter=Filter(exclude_item_ids="tent-2p")),
], ids=["delete_items", "get_items", "embed", "categories", "recommend filter", "similar filter"])
def test_one_string_where_the_client_takes_several_is_a_type_error(call):
    """delete_items("audit") deleted the items a, u, d, i and t (an audit):
    a string is a sequence of its characters. Refused before any call."""
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(TypeError, match="not one string"):
            call(client)


@pytest.mark.parametrize("call, message", [
    (lambda client: client.embed({"sku-1": "Trail shoes"}), "embed() takes a sequence of strings, not dict"),
    (lambda client: client.get_items(None), "ids takes a sequence of strings, not NoneType None"),
    (lambda client: client.delete_items(7), "ids takes a sequence of strings, not int 7"),
    (lambda client: client.upsert_items([Item(id="a", categories={"shoes": 1})]),
     "items[0]: categories takes a sequence of strings, not dict"),
    (lambda client: client.recommend("u", item_filter=Filter(exclude_item_ids=5)),
     "item_filter: exclude_item_ids takes a sequence of strings, not int 5"),
], ids=["embed dict", "None ids", "int ids", "dict categories", "int filter"])
def test_a_dict_or_no_sequence_where_the_client_takes_several_strings_is_a_type_error(call, message):
    """A dict went as its keys (embed({id: text}) embedded the ids, not the texts), and None or a number failed
    as "'NoneType' object is not iterable", naming nothing (a review)."""
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(TypeError) as refused:
            call(client)
    assert str(refused.value).startswith(message)


def test_the_async_client_refuses_one_string_too():
    import asyncio

    from halflife_client import AsyncHalflifeClient

    async def main():
        async with AsyncHalflifeClient("127.0.0.1:1", timeout=1) as client:
            for call in (client.delete_items, client.get_items):
                with pytest.raises(TypeError, match="not one string"):
                    await call("audit")

    asyncio.run(main())


@pytest.mark.parametrize("call, message", [
    (lambda c: c.upsert_items([Item(id="a"), {"id": "b"}]), "items[1] must be Item or halflife.v1.Item, not dict {'id': 'b'}"),
    (lambda c: c.upsert_items([None]), "items[0] must be Item or halflife.v1.Item, not NoneType None"),
    (lambda c: c.upsert_items(Item(id="a")), "items takes a list of Items or halflife.v1.Item messages, not one Item"),
    (lambda c: c.upsert_items([Item(id="a", attributes=[("k", "v")])]),
     "items[0]: Item 'a' attributes must be a dict of strings, not list [('k', 'v')]"),
    (lambda c: c.upsert_items([Item(id="a"), Item(id=2)]), "items[1]: Item id must be a string, not int 2"),
    (lambda c: c.record_events([Item(id="a")]), "events[0] must be Event or halflife.v1.Event, not Item"),
    (lambda c: c.record_events(None), "events takes a list of Events or halflife.v1.Event messages, not NoneType None"),
    (lambda c: c.recommend("u", item_filter={"include_categories": ["a"]}),
     "item_filter must be Filter or halflife.v1.ItemFilter, not dict {'include_categories': ['a']}"),
    (lambda c: c.similar_items(text="x", item_filter=[]), "item_filter must be Filter or halflife.v1.ItemFilter, not list"),
], ids=["dict item", "None item", "one item", "attribute pairs", "second item's id", "item as event", "None events",
        "dict filter", "list filter"])
def test_what_is_no_item_event_or_filter_is_a_type_error_naming_where(call, message):
    """A dict or None among items or events, or a dict as a filter, was an AttributeError ("'dict' object has no
    attribute 'to_proto'"), an Event among items protobuf's "must be 10", one Item for the list "'Item' object is
    not iterable", and an Item's error did not say which of 1,000 items it was (a review; the Node client names
    items[i] so)."""
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(TypeError) as refused:
            call(client)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("call, kind, message", [
    (lambda c: c.upsert_items([Item(id="a"), Item(id="b\udc80")]), ValueError,
     "items[1]: id must be valid UTF-8 text, not 'b\\udc80' (surrogates not allowed)"),
    (lambda c: c.upsert_items([Item(id="a", text="\ud83d")]), ValueError, "items[0]: text must be valid UTF-8 text"),
    (lambda c: c.upsert_items([Item(id="a", categories=["x", "\ud800"])]), ValueError,
     "items[0]: categories[1] must be valid UTF-8 text"),
    (lambda c: c.upsert_items([Item(id="a", attributes={"k": "\ud800"})]), ValueError,
     "items[0]: attributes['k'] must be valid UTF-8 text"),
    (lambda c: c.upsert_items([Item(id="a", attributes={"\ud800": "v"})]), ValueError,
     "items[0]: attributes key must be valid UTF-8 text, not '\\ud800'"),
    (lambda c: c.upsert_items([Item(id="a", categories=["x", 1])]), TypeError,
     "items[0]: categories[1] must be a string, not int 1"),
    (lambda c: c.record_events([Event("e", "u", 1), Event("f", "\udfff", 1)]), ValueError,
     "events[1]: user_id must be valid UTF-8 text"),
    (lambda c: c.record_events([Event("e", "u", "view")]), ValueError,
     "events[0]: type must be one of EventType's values, not str 'view'"),
    (lambda c: c.record_events([Event("e", "u", 1.5)]), TypeError, "events[0]: type must be one of EventType's values"),
    (lambda c: c.record_events([Event("e", "u", 2**31)]), ValueError, "events[0]: type must be one of EventType's"),
    (lambda c: c.record_events([Event("e", "u", 6, value="4.5")]), TypeError,
     "events[0]: value must be a number, not str '4.5'"),
    (lambda c: c.record_events([Event("e", "u", 6, value=10**400)]), ValueError, "events[0]: value must be a number"),
    (lambda c: c.recommend("u", item_filter=Filter(include_categories=["a", 1])), TypeError,
     "item_filter: include_categories[1] must be a string, not int 1"),
    (lambda c: c.similar_items(text="x", item_filter=Filter(exclude_item_ids=["\ud800"])), ValueError,
     "item_filter: exclude_item_ids[0] must be valid UTF-8 text"),
], ids=["id surrogate", "text surrogate", "category surrogate", "attribute surrogate", "attribute key surrogate",
        "int category", "user surrogate", "type name", "float type", "type out of range", "str value", "huge value",
        "int filter category", "filter id surrogate"])
def test_an_item_event_or_filter_field_protobuf_refuses_is_named(call, kind, message):
    """Item, Event and Filter built their messages outside _request: protobuf's UnicodeEncodeError ("'utf-8'
    codec can't encode character '\\ud800' in position 1"), "bad argument type for built-in operation",
    "unknown enum label", "Value out of range: 2147483648", "must be real number, not str" and an
    OverflowError named no field (a review: the Node and Go clients name each)."""
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(kind) as refused:
            call(client)
    assert type(refused.value) is kind and str(refused.value).startswith(message)


def test_a_bool_where_a_number_goes_is_a_type_error():
    """protobuf takes a bool for a double (not for an int): value=True was sent as a rating of 1 and
    diversity=True as 1 (a review; the Node client refuses both)."""
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(TypeError, match=re.escape("events[0]: value must be a number, not bool True")):
            client.record_events([Event("e", "u", 6, item_id="i", value=True)])
        with pytest.raises(TypeError, match=re.escape("diversity must be a number, not bool np.True_")):
            client.recommend("u", diversity=np.bool_(True))
    assert Event("e", "u", 6, value=np.float32(4.5)).to_proto().value == 4.5


def test_a_filters_none_is_no_list():
    """Filter(include_categories=None) was "'NoneType' object is not iterable"; None is none, as Item's
    categories and the Node client's null take it."""
    none = Filter(include_categories=None, exclude_categories=None, exclude_item_ids=None).to_proto()
    assert none == Filter().to_proto() and not none.ListFields()


def test_embeds_normalize_is_checked_as_a_bool():
    """normalize goes out negated, as skip_normalize, so protobuf never saw it: normalize="false" asked for
    unit rows, and None (elsewhere "not given") for the raw ones (a review)."""
    from halflife_client.client import _embed_request

    with pytest.raises(TypeError, match=re.escape("normalize must be a bool, not str 'false'")):
        HalflifeClient("127.0.0.1:1").embed(["x"], normalize="false")
    assert not _embed_request(["x"], False, None).skip_normalize
    assert _embed_request(["x"], False, np.bool_(False)).skip_normalize and _embed_request(["x"], False, 0).skip_normalize
    assert not _embed_request(["x"], False, True).skip_normalize


def test_the_async_client_names_the_element_too():
    import asyncio

    from halflife_client import AsyncHalflifeClient

    async def main():
        async with AsyncHalflifeClient("127.0.0.1:1", timeout=1) as client:
            with pytest.raises(TypeError, match=re.escape("events[1] must be Event or halflife.v1.Event, not dict")):
                await client.record_events([Event("e", "u", 1), {"event_id": "f"}])

    asyncio.run(main())


def test_a_command_whose_server_is_not_running_asks_whether_it_is(capsys):
    """gRPC's "failed to connect to all addresses ... Connection refused"
    said nothing of what to do; a server's own UNAVAILABLE gets no hint."""
    from halflife import cli

    with socket.socket() as closed:  # bound, never listening: a connection is refused, and the port stays ours
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        assert cli.main(["recommend", "1", "--target", target]) == cli.EXIT_FAILURE
    refused = capsys.readouterr().err
    assert refused.startswith("halflife recommend: error: UNAVAILABLE: failed to connect to all addresses;")
    assert refused.endswith(f"Connection refused; is `halflife serve` running on {target}?\n")
    assert refused.count("\n") == 1

    class StoreUnavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "the store cannot write; retry"

    assert cli._rpc_failure("profile", StoreUnavailable(), target) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "halflife profile: error: UNAVAILABLE: the store cannot write; retry\n"


def test_errors_that_are_no_calls_carry_no_violations():
    """field_violations(ValueError()) raised AttributeError (an audit): a
    handler's `except Exception` may pass any error."""
    from halflife_client import field_violations, rich_status

    assert field_violations(ValueError("not a call")) == [] and rich_status(KeyError("x")) is None


def test_a_time_that_is_no_datetime_is_a_type_error():
    with HalflifeClient("127.0.0.1:1", timeout=1) as client:
        with pytest.raises(TypeError, match="times are datetime.datetime values, got str '2018-09-25'"):
            client.recommend("u", 3, as_of="2018-09-25")


def test_a_time_past_what_a_timestamp_holds_in_utc_is_a_value_error_naming_it():
    """Year 1 at UTC+14 is year 0 in UTC: protobuf raised a bare OverflowError, "date value out of range"."""
    from halflife_client import to_timestamp

    early = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=14)))
    late = dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-14)))
    for when in (early, late):
        with pytest.raises(ValueError, match=re.escape(f"time {when.isoformat()} is, in UTC, outside")):
            to_timestamp(when)
    assert to_timestamp(dt.datetime(1, 1, 1, 14, tzinfo=dt.timezone(dt.timedelta(hours=14)))).seconds == -62135596800

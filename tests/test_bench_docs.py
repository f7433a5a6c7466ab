"""The READMEs quote the committed benchmark results (bench/results/*.json):
a re-run that replaced those files once left the quotes on the run before."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _results(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())


def _quoted(text: str, pattern: str) -> tuple[str, ...]:
    match = re.search(pattern, " ".join(text.split()))  # across line breaks
    assert match, pattern
    return match.groups()


def _same(quoted: str, value: float) -> bool:
    """`value` rounded as the quote is (to its decimals) gives the quote."""
    decimals = len(quoted.partition(".")[2])
    return round(value, decimals) == float(quoted)


def test_the_readmes_quote_the_committed_ranking_results():
    ranking = _results("ranking")
    sizes = [ranking["sizes"][n] for n in ("10000", "100000", "1000000")]
    readme = (ROOT / "README.md").read_text()
    trending = _quoted(readme, r"A user without events \(trending\) takes ([\d.]+) / ([\d.]+) / ([\d.]+) ms "
                               r"in-process at 10k / 100k / 1M items in the committed run")
    assert all(_same(q, s["engine"]["trending"]["median_s"] * 1e3) for q, s in zip(trending, sizes)), trending
    no_events = _quoted(readme, r"and before any event, when every item ties at 0, ([\d.]+) / ([\d.]+) / ([\d.]+) ms")
    assert all(_same(q, s["engine"]["trending_no_events"]["median_s"] * 1e3) for q, s in zip(no_events, sizes)), no_events
    grpc = _quoted(readme, r"\(([\d.]+) / ([\d.]+) in the committed run on the (.+?),")
    assert all(_same(q, s["grpc"]["recommend_p50_s"] * 1e3) for q, s in zip(grpc[:2], sizes)) and grpc[2] == ranking["machine"]["cpu"], grpc

    ratio, faiss, gemv, core = _quoted(readme, r"\(([\d.]+) in the committed run, [\d-]+, where FAISS on one thread took "
                                               r"([\d.]+) ms, NumPy GEMV on 2 ([\d.]+), and the core ([\d.]+);")
    q = sizes[0]["per_query"]
    assert (_same(ratio, q["ratio_multi"]) and _same(faiss, q["faiss_1"]["median_s"] * 1e3)
            and _same(faiss, q["best_baseline_s"] * 1e3) and _same(gemv, q["numpy_2"]["median_s"] * 1e3)
            and _same(core, q["core_multi"]["median_s"] * 1e3)), (ratio, faiss, gemv, core)

    bench = (ROOT / "bench" / "README.md").read_text()
    ratio, machine = _quoted(bench, r"([\d.]+)x, p50 / \(engine \+ empty RPC\), in the committed results/ranking\.md, ([^,)]+)")
    assert _same(ratio, sizes[0]["grpc"]["ratio_vs_engine"]) and machine == ranking["machine"]["cpu"], (ratio, machine)



def test_the_readme_quotes_the_committed_ingest_results():
    """It gave the 4-stream ratio from empty as 0.29x, where the committed run's is 0.2848."""
    ingest = _results("ingest")
    growing, uuid4 = ingest["throughput_at_scale"]
    assert (growing["event_ids"], uuid4["event_ids"]) == ("growing", "uuid4")
    readme = (ROOT / "README.md").read_text()
    # Each quote as (1 stream, 4 streams, raw SQLite) in thousands of events/s, then the two ratios.
    one, four, raw, *ratios = _quoted(readme, r"RecordEvents takes ([\d.]+)k \(1 stream\) / ([\d.]+)k \(4 streams\) "
                                              r"durable events/s into an empty store .*? against raw SQLite's bare "
                                              r"inserts at ([\d.]+)k, .*?: ([\d.]+) / ([\d.]+)×")
    quotes = [(ingest["throughput"], (one, four, raw, *ratios))]
    raw, one, four, *ratios = _quoted(readme, r"raw SQLite falls to ([\d.]+)k and the server takes ([\d.]+)k / "
                                              r"([\d.]+)k: ([\d.]+) / ([\d.]+)×")
    quotes.append((growing, (one, four, raw, *ratios)))
    raw, one, four, *ratios = _quoted(readme, r"random UUIDs as event ids .*? raw ([\d.]+)k, the server ([\d.]+)k / "
                                              r"([\d.]+)k \(([\d.]+) / ([\d.]+)×")
    quotes.append((uuid4, (one, four, raw, *ratios)))
    for runs, quoted in quotes:
        measured = [runs["grpc_1"]["events_per_s"] / 1e3, runs["grpc_4"]["events_per_s"] / 1e3,
                    runs["raw_sqlite"]["events_per_s"] / 1e3, runs["grpc_1"]["ratio_vs_raw"],
                    runs["grpc_4"]["ratio_vs_raw"]]
        assert all(_same(q, v) for q, v in zip(quoted, measured)), (quoted, measured)

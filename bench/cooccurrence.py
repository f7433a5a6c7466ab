"""Co-occurrence cost as the log grows, exact and within `blend.max_co_users`.

    python -m bench.cooccurrence [--quick]

A Recommend's co-occurrence signal (`cooccurrence_scores`, cosine, the
default) passes over the pairs of every user who shares an item with the
user: behind popular items that is most of the log. Here 10,000 items in 40
topics of 250, each user's ~50 items from 3 topics (Zipf popularity within a
topic), from 100k to 16M user-item pairs drawn (`--quick`: to 1M), of which
the index holds the distinct ones (~83%: a user draws some items twice); query
users of 20 and 200 items from 3 topics. For each: the exact signal (the
baseline, same run) and the estimate from the newest users of each item
within a budget of co-users (halflife.core.cooccurrence, `max_co_users`), its
time and how many of the exact top 10 (the user's own items left out) it
keeps.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import markdown_table, save_plot, summary, timings, write_results
from halflife.config import BlendConfig
from halflife.core.cooccurrence import Cooccurrence, cooccurrence_scores

ITEMS, TOPICS, PER_USER, USER_TOPICS = 10_000, 40, 50, 3
BUDGETS = (BlendConfig().max_co_users, 10_000, 2_000)
QUERY_SIZES = (20, 200)
QUERIES = 10  # users per query size, each timed and compared


def _zipf(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** 0.9
    return p / p.sum()


def _items_of(topics: np.ndarray, rng) -> np.ndarray:
    """An item of each of `topics` ((n,) ints), by popularity within its topic: (n,) rows."""
    per_topic = ITEMS // TOPICS
    return topics * per_topic + rng.choice(per_topic, topics.shape[0], p=_zipf(per_topic))


def incidence(pairs: int, rng) -> Cooccurrence:
    users = np.arange(pairs) // PER_USER
    user_topics = rng.integers(0, TOPICS, (users[-1] + 1, USER_TOPICS))
    topics = user_topics[users, rng.integers(0, USER_TOPICS, pairs)]
    return Cooccurrence.from_pairs(ITEMS, users, _items_of(topics, rng), np.zeros(pairs))


def query(size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A user's distinct items (from 3 topics) and their affinities: (h,) each."""
    items: np.ndarray = np.empty(0, dtype=np.int64)
    topics = rng.integers(0, TOPICS, USER_TOPICS)
    while items.size < size:
        items = np.unique(np.concatenate([items, _items_of(rng.choice(topics, size), rng)]))
    items = rng.permutation(items)[:size]
    return items, rng.uniform(0.5, 1.0, size)


def top10(scores: np.ndarray, own: np.ndarray) -> set[int]:
    scores = scores.copy()
    scores[own] = -np.inf
    return set(np.argpartition(-scores, 10)[:10].tolist())


def run(quick: bool = False) -> dict:
    rng = np.random.default_rng(0)
    sizes = (100_000, 1_000_000) if quick else (100_000, 1_000_000, 4_000_000, 16_000_000)
    rows, results = [], []
    for pairs in sizes:
        view = incidence(pairs, rng).view()
        distinct = len(view)  # a user draws some items twice: the index holds each pair once
        for size in QUERY_SIZES:
            runs = {budget: {"s": [], "kept": []} for budget in (None, *BUDGETS)}
            for _ in range(QUERIES):
                items, affinity = query(size, rng)
                exact = top10(cooccurrence_scores(view, items, affinity, "cosine"), items)
                for budget, out in runs.items():
                    out["s"] += timings(lambda: cooccurrence_scores(view, items, affinity, "cosine", budget),
                                        repeat=3, warmup=1)
                    out["kept"].append(len(top10(cooccurrence_scores(view, items, affinity, "cosine", budget),
                                                 items) & exact) / 10)
            entry = {"pairs": pairs, "distinct_pairs": distinct, "query_items": size,
                     "runs": {str(b): {**summary(r["s"]), "top10_kept": float(np.mean(r["kept"]))}
                              for b, r in runs.items()}}
            results.append(entry)
            exact_ms = entry["runs"]["None"]["median_s"] * 1e3
            rows.append([pairs, distinct, size, exact_ms] + [
                f"{entry['runs'][str(b)]['median_s'] * 1e3:.3g} ({entry['runs'][str(b)]['median_s'] * 1e3 / exact_ms:.2f}x,"
                f" {entry['runs'][str(b)]['top10_kept']:.2f})" for b in BUDGETS])
            print(rows[-1], flush=True)
    headers = ["pairs drawn", "distinct pairs (the index)", "query items", "exact ms"] + [
        f"max_co_users {b:,} ms (/ exact, top 10 kept)" for b in BUDGETS]
    table = markdown_table(headers, rows)

    def plot(ax) -> None:
        for size, style in zip(QUERY_SIZES, ("-", "--")):
            mine = [r for r in results if r["query_items"] == size]
            for color, budget in enumerate((None, *BUDGETS)):
                ax.plot([r["distinct_pairs"] for r in mine], [r["runs"][str(budget)]["median_s"] * 1e3 for r in mine], style,
                        color=f"C{color}", marker="o", label=f"{'exact' if budget is None else f'{budget:,}'}, {size} items")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pairs (distinct user-item) in the log")
        ax.set_ylabel("ms per co-occurrence signal")
        ax.legend(fontsize=7)

    table += "\n" + save_plot("cooccurrence", plot, "Co-occurrence signal vs log size, exact and within max_co_users")
    notes = (f"Medians of {QUERIES} query users x 3 calls each; top 10 kept: the share of the exact signal's top 10 "
             "(the user's own items left out) that the estimate's top 10 holds, mean over the users. Exact is the "
             "baseline in the same run. The default `blend.max_co_users` is "
             f"{BlendConfig().max_co_users:,}.")
    payload = {"quick": quick, "items": ITEMS, "topics": TOPICS, "pairs_per_user": PER_USER, "results": results}
    write_results("cooccurrence", payload, table, notes)
    print(table)
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 1M pairs, for smoke testing")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()

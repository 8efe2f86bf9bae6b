"""Hit@K against a brute-force computation."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from saviorrec_pipeline.method.retrieval import consecutive_click_pairs, hit_at_k

pytestmark = pytest.mark.unit


def _brute_force(item_ids, embeddings, clicks: list[tuple[int, int, int]], k: int) -> tuple[int, int]:
    by_user: dict[int, list[tuple[int, int]]] = {}
    for user, item, ts in clicks:
        by_user.setdefault(user, []).append((ts, item))
    row = {item: i for i, item in enumerate(item_ids)}
    queries = hits = 0
    for events in by_user.values():
        events.sort()
        for (_, query), (_, nxt) in zip(events, events[1:]):
            if query == nxt or query not in row or nxt not in row:
                continue
            sims = embeddings @ embeddings[row[query]]
            order = [i for i in np.argsort(-sims, kind="stable") if i != row[query]][:k]
            queries += 1
            hits += row[nxt] in order
    return queries, hits


@pytest.mark.parametrize("seed, k", [(0, 1), (1, 5), (2, 30)])
def test_hit_at_k_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    item_ids = rng.choice(10_000, size=80, replace=False)
    embeddings = rng.normal(size=(80, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    # Clicks on catalog items and a few unknown ones; distinct timestamps per user.
    clicks = [
        (int(u), int(rng.choice(item_ids) if rng.random() < 0.9 else 99_999), int(t))
        for u in range(30)
        for t in rng.choice(1000, size=int(rng.integers(1, 12)), replace=False)
    ]
    frame = pl.DataFrame(clicks, schema=["user_id", "item_id", "ts"], orient="row").with_columns(
        pl.col("ts").cast(pl.Datetime("us"))
    )
    result = hit_at_k(item_ids, embeddings, consecutive_click_pairs(frame), k=k)
    assert (result.queries, result.hits) == _brute_force(item_ids, embeddings, clicks, k)
    assert result.queries > 0


def test_consecutive_pairs_follow_each_user_in_time_order():
    t = dt.datetime(2025, 7, 1)
    clicks = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 1],
            "item_id": [10, 30, 20, 10, 10, 40],
            "ts": [t, t + dt.timedelta(minutes=2), t + dt.timedelta(minutes=1), t, t, t + dt.timedelta(minutes=3)],
        }
    )
    pairs = consecutive_click_pairs(clicks)
    # User 1: 10 -> 20 -> 30 -> 40; user 2 clicks item 10 twice: a repeat, not counted.
    assert pairs.rows() == [(10, 20), (20, 30), (30, 40)]


def test_perfect_embeddings_hit_everything_and_no_pairs_give_no_rate():
    item_ids = np.array([1, 2, 3, 4])
    embeddings = np.eye(4, dtype=np.float32)
    embeddings[1] = embeddings[0]  # 1 and 2 identical: 2 is 1's nearest neighbour
    pairs = pl.DataFrame({"query": [1], "next": [2]})
    assert hit_at_k(item_ids, embeddings, pairs, k=1).hit_rate == 1.0
    assert hit_at_k(item_ids, embeddings, pairs.clear(), k=1).hit_rate is None

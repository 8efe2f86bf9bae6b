"""i2i retrieval Hit@K (paper 4.3, Table 4): do an item's nearest neighbours hold the next click?

For each pair of consecutive clicks of a user (query, next), ordered by (ts, item_id), the query's
K nearest items by inner product of L2-normalised embeddings (cosine), the query itself excluded,
are retrieved from the whole catalog with faiss; a hit is `next` among them. Pairs whose next
click repeats the query, or whose items have no embedding, are not counted.
"""

from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl

from saviorrec_pipeline.method.item_rows import with_item_rows


@dataclass(frozen=True)
class HitRate:
    k: int
    queries: int
    hits: int

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None


def consecutive_click_pairs(clicks: pl.DataFrame) -> pl.DataFrame:
    """(query, next) item pairs: each click of a user and the user's next click."""
    return (
        clicks.sort("user_id", "ts", "item_id")
        .select(
            pl.col("item_id").alias("query"),
            pl.col("item_id").shift(-1).alias("next"),
            (pl.col("user_id").shift(-1) == pl.col("user_id")).alias("same_user"),
        )
        .filter(pl.col("same_user") & (pl.col("query") != pl.col("next")))
        .select("query", "next")
    )


def hit_at_k(item_ids: np.ndarray, embeddings: np.ndarray, pairs: pl.DataFrame, k: int = 30) -> HitRate:
    """Hit@K of `pairs` (query, next) against the catalog `item_ids` x `embeddings` (normalised)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = with_item_rows(pairs, item_ids, ("query", "next"))
    if rows.is_empty():
        return HitRate(k, 0, 0)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    queries = np.unique(rows["query_row"].to_numpy())
    # One extra neighbour, because the query usually retrieves itself first.
    _, neighbours = index.search(vectors[queries], min(k + 1, len(vectors)))
    not_self = neighbours != queries[:, None]
    # Keep the first k neighbours other than the query itself.
    kept = np.where(not_self & (np.cumsum(not_self, axis=1) <= k), neighbours, -1)
    position = np.searchsorted(queries, rows["query_row"].to_numpy())
    hits = (kept[position] == rows["next_row"].to_numpy()[:, None]).any(axis=1)
    return HitRate(k, len(rows), int(hits.sum()))

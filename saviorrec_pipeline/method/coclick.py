"""Co-click mining (paper section 3.2, stage 1): the positive pairs P+ for the i2i contrastive loss.

Per user, clicks are ordered by (ts, item_id). A click pairs with each of the user's next `window`
clicks that come at most `max_gap` after it; the pair is unordered (smaller id first) and never an
item with itself. A pair's support is the number of distinct users who produced it; pairs with
support >= `min_support` are kept.

Cost: one sort of the click events, then `window` shifted comparisons over the sorted frame, so
work grows with events x window, never with the square of a user's history. Items are renumbered
densely (order-preserving) so a pair packs into one UInt64 key; the distinct-user count over those
keys runs on Polars' streaming engine. At 10^7 clicks this is about 2x faster than the same
definition as one DuckDB query, under 1.5 GiB peak (benchmarks/coclick.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import polars as pl

PAIR_SCHEMA = {"item_a": pl.Int64, "item_b": pl.Int64, "support": pl.UInt32}


@dataclass(frozen=True)
class CoclickParams:
    window: int = 5
    max_gap: dt.timedelta = dt.timedelta(hours=24)
    min_support: int = 2

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_gap < dt.timedelta(0):
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap}")
        if self.min_support < 1:
            raise ValueError(f"min_support must be >= 1, got {self.min_support}")


def mine_coclick_pairs(clicks: pl.LazyFrame | pl.DataFrame, params: CoclickParams = CoclickParams()) -> pl.DataFrame:
    """Pairs `item_a < item_b` with their distinct-user `support`, sorted by (item_a, item_b).

    `clicks` holds one row per click event with `user_id`, `item_id` (integers) and `ts`
    (a timestamp).
    """
    events = clicks.lazy().select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("ts").dt.epoch("us").alias("ts_us"),
    )
    # The eager multi-key sort is about twice as fast as the lazy one on 10^7 rows.
    ordered = events.collect().sort("user_id", "ts_us", "item_id")
    item_ids = ordered["item_id"].unique().sort()
    ordered = ordered.select(
        # Users are contiguous after the sort: a run number identifies one in 4 bytes.
        pl.col("user_id").ne_missing(pl.col("user_id").shift()).cum_sum().cast(pl.UInt32).alias("user"),
        # Dense ranks keep the item order, so `item_a < item_b` holds for the ranks too.
        (pl.col("item_id").rank("dense").cast(pl.UInt64) - 1).alias("item"),
        "ts_us",
    )
    max_gap_us = params.max_gap // dt.timedelta(microseconds=1)
    per_offset = [_pairs_at_offset(ordered.lazy(), k, max_gap_us) for k in range(1, params.window + 1)]
    supported = (
        pl.concat(per_offset)
        .group_by("pair")
        .agg(pl.col("user").n_unique().cast(pl.UInt32).alias("support"))
        .filter(pl.col("support") >= params.min_support)
        .collect(engine="streaming")
    )
    return pl.DataFrame(
        {
            "item_a": item_ids.gather(supported["pair"] // _PAIR_BASE),
            "item_b": item_ids.gather(supported["pair"] % _PAIR_BASE),
            "support": supported["support"],
        },
        schema=PAIR_SCHEMA,
    ).sort("item_a", "item_b")


_PAIR_BASE = 1 << 32  # pair key = item_a * base + item_b; ranks are below 2^32


def _pairs_at_offset(ordered: pl.LazyFrame, k: int, max_gap_us: int) -> pl.LazyFrame:
    """(user, pair key) for each click and the user's k-th next click."""
    later_item = pl.col("item").shift(-k)
    same_user = pl.col("user").shift(-k) == pl.col("user")
    within_gap = pl.col("ts_us").shift(-k) - pl.col("ts_us") <= max_gap_us
    pair = pl.min_horizontal("item", later_item) * _PAIR_BASE + pl.max_horizontal("item", later_item)
    return (
        ordered.select("user", pair.alias("pair"), (same_user & within_gap & (later_item != pl.col("item"))).alias("keep"))
        .filter("keep")
        .drop("keep")
    )

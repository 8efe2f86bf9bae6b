"""Co-click mining (paper section 3.2, stage 1): the positive pairs P+ for the i2i contrastive loss.

Per user, clicks are ordered by (ts, item_id). A click pairs with each of the user's next `window`
clicks that come at most `max_gap` after it; the pair is unordered (smaller id first) and never an
item with itself. A pair's support is the number of distinct users who produced it; pairs with
support >= `min_support` are kept.

Cost: one sort of the click events, then `window` shifted comparisons over the sorted frame, so
work grows with events x window, never with the square of a user's history. Items are renumbered
densely (order-preserving) so that (item_a, item_b, user) packs into one 64-bit key; the distinct
users of a pair are then runs in those keys once sorted, which scales better than a hash group-by
with a distinct count (exponent 0.97-1.03 between 10^6 and 10^7 clicks, against 1.07-1.13). At
10^7 clicks this is about 4.5x faster than the same definition as one DuckDB query, at 1.1 GiB
peak (benchmarks/coclick.py).
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


@dataclass(frozen=True)
class MinedPairs:
    """A window's mined pairs and what they were mined from."""

    pairs: pl.DataFrame
    click_events: int
    clicking_users: int


def mine_window(clicks: pl.DataFrame, params: CoclickParams) -> MinedPairs:
    return MinedPairs(mine_coclick_pairs(clicks, params), clicks.height, clicks["user_id"].n_unique())


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
        # Users are contiguous after the sort: a run number (from 1) identifies one in 4 bytes.
        pl.col("user_id").ne_missing(pl.col("user_id").shift()).cum_sum().cast(pl.UInt32).alias("user"),
        # Positions in the sorted ids keep the item order, so `item_a < item_b` holds for them too.
        item_ids.search_sorted(ordered["item_id"]).cast(pl.UInt64).alias("item"),
        "ts_us",
    )
    layout = _KeyLayout.fitting(len(item_ids), ordered["user"].max() or 0)
    max_gap_us = params.max_gap // dt.timedelta(microseconds=1)
    keys = pl.concat([_pair_keys_at_offset(ordered.lazy(), k, max_gap_us, layout) for k in range(1, params.window + 1)]).collect()
    parts = keys.partition_by("part", as_dict=True) if layout.part_bits else {(0,): keys}
    supported = pl.concat([_supported_pairs(part["key"], part_id, layout, params.min_support) for (part_id,), part in parts.items()])
    return pl.DataFrame(
        {
            "item_a": item_ids.gather(supported["item_a"]),
            "item_b": item_ids.gather(supported["item_b"]),
            "support": supported["support"],
        },
        schema=PAIR_SCHEMA,
    ).sort("item_a", "item_b")


KEY_BITS = 64


@dataclass(frozen=True)
class _KeyLayout:
    """How (item_a, item_b, user) packs into one unsigned key of KEY_BITS bits, item_a highest.

    One integer key sorts several times faster than a multi-column sort or a hash group-by with a
    distinct count, and once sorted, distinct users per pair are runs. When the three do not fit,
    the top `part_bits` of item_a pick a partition instead, and each partition is sorted on its own."""

    item_bits: int
    user_bits: int
    part_bits: int

    @classmethod
    def fitting(cls, items: int, max_user: int) -> "_KeyLayout":
        item_bits, user_bits = max(1, (items - 1).bit_length()), max(1, int(max_user).bit_length())
        return cls(item_bits, user_bits, max(0, 2 * item_bits + user_bits - KEY_BITS))

    @property
    def low_a_bits(self) -> int:
        return self.item_bits - self.part_bits


def _pair_keys_at_offset(ordered: pl.LazyFrame, k: int, max_gap_us: int, layout: _KeyLayout) -> pl.LazyFrame:
    """The key of each click paired with the same user's k-th next click, and its partition when
    the layout has any."""
    later_item = pl.col("item").shift(-k)
    same_user = pl.col("user").shift(-k) == pl.col("user")
    within_gap = pl.col("ts_us").shift(-k) - pl.col("ts_us") <= max_gap_us
    item_a, item_b = pl.min_horizontal("item", later_item), pl.max_horizontal("item", later_item)
    low_a = item_a % (1 << layout.low_a_bits)
    key = (low_a * (1 << layout.item_bits) + item_b) * (1 << layout.user_bits) + pl.col("user")
    part = [(item_a // (1 << layout.low_a_bits)).alias("part")] if layout.part_bits else []
    return (
        ordered.select(key.alias("key"), *part, (same_user & within_gap & (later_item != pl.col("item"))).alias("keep"))
        .filter("keep")
        .drop("keep")
    )


def _supported_pairs(keys: pl.Series, part: int, layout: _KeyLayout, min_support: int) -> pl.DataFrame:
    """(item_a, item_b, support) from one partition's keys: sorted, the first of each run is one
    distinct (pair, user), and the runs of a pair among those count its users."""
    keys = keys.sort()
    distinct = keys.filter(keys.ne_missing(keys.shift()))
    runs = (distinct // (1 << layout.user_bits)).rle().struct.unnest().filter(pl.col("len") >= min_support)
    pair = pl.col("value")
    return runs.select(
        (pair // (1 << layout.item_bits) + part * (1 << layout.low_a_bits)).alias("item_a"),
        (pair % (1 << layout.item_bits)).alias("item_b"),
        pl.col("len").cast(pl.UInt32).alias("support"),
    )

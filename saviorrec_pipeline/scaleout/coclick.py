"""Co-click mining on Ray, equal to `mine_window` on the whole window.

A user's pairs depend on that user's clicks alone and a pair's support counts distinct users, so:
one task per day reads its clicks and splits them by a hash of the user; one task per user shard
mines it with `mine_coclick_pairs` keeping every pair (min_support 1) and splits the pairs by a hash
of item_a; one task per pair shard sums each pair's supports over the user shards and applies
`min_support`. Users in different shards are different users, so the sums are the distinct-user
counts of the whole window.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable

import polars as pl
import ray

from saviorrec_pipeline.method.coclick import PAIR_SCHEMA, CoclickParams, MinedPairs, mine_coclick_pairs
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.scaleout.shards import ShardReport, refs, split_by_hash


def mine_on_ray(
    read_day: Callable[[dt.date], pl.DataFrame], days: list[dt.date], params: CoclickParams, shards: int,
) -> tuple[MinedPairs, list[ShardReport]]:
    """`read_day(day)`: that day's click events (`user_id`, `item_id`, `ts`), run inside a task."""
    split = ray.remote(_read_and_split).options(num_returns=shards + 1)
    by_day = [refs(split.remote(read_day, day, index, shards)) for index, day in enumerate(days)]
    mine = ray.remote(_mine_shard).options(num_returns=shards + 1)
    mined = [refs(mine.remote(shard, params, shards, *[parts[shard] for parts in by_day])) for shard in range(shards)]
    total = ray.remote(_sum_supports).options(num_returns=2)
    summed = [refs(total.remote(shard, params.min_support, *[parts[shard] for parts in mined])) for shard in range(shards)]
    pairs = pl.concat([pl.DataFrame(schema=PAIR_SCHEMA), *ray.get([out[0] for out in summed])]).sort("item_a", "item_b")
    read_reports = ray.get([parts[-1] for parts in by_day])
    mine_reports = ray.get([parts[-1] for parts in mined])
    reports = [*read_reports, *(report for report, _ in mine_reports), *ray.get([out[1] for out in summed])]
    # A user is in one shard only, so the shards' distinct users add up to the window's.
    return MinedPairs(pairs, sum(report.rows for report in read_reports), sum(users for _, users in mine_reports)), reports


def _read_and_split(read_day: Callable[[dt.date], pl.DataFrame], day: dt.date, index: int, shards: int) -> list:
    with track_usage() as usage:
        clicks = read_day(day).select("user_id", "item_id", "ts")
        parts = split_by_hash(clicks, "user_id", shards)
    return [*parts, ShardReport.of("read clicks", index, clicks.height, usage)]


def _mine_shard(shard: int, params: CoclickParams, shards: int, *days: pl.DataFrame) -> list:
    with track_usage() as usage:
        clicks = pl.concat(days)
        pairs = mine_coclick_pairs(clicks, dataclasses.replace(params, min_support=1))
        parts = split_by_hash(pairs, "item_a", shards)
    return [*parts, (ShardReport.of("mine user shard", shard, clicks.height, usage), clicks["user_id"].n_unique())]


def _sum_supports(shard: int, min_support: int, *parts: pl.DataFrame) -> tuple[pl.DataFrame, ShardReport]:
    with track_usage() as usage:
        candidates = pl.concat(parts)
        pairs = (
            candidates.group_by("item_a", "item_b").agg(pl.col("support").sum())
            .filter(pl.col("support") >= min_support).cast(PAIR_SCHEMA)
        )
    return pairs, ShardReport.of("sum pair shard", shard, candidates.height, usage)

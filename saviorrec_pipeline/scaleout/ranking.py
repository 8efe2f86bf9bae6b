"""The ranking dataset on Ray, equal to `ranking_rows` on the whole window.

A row's candidate statistics and pv, and a click's statistics just before it, depend on one item's
timeline; its behaviour sequence and profile on one user's history (`item_features`,
`user_features`). So: one task per day reads its impressions, keeps the catalog's items and splits
them by a hash of the item; one task per item shard joins its timelines as-of and splits the rows
and clicks by a hash of the user; one task per user shard builds the sequences. Impressions are
unique per (user, item, ts), so sorting the shards' rows by that key gives the in-process order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import polars as pl
import ray

from saviorrec_pipeline.method.ranking_features import FeatureSpec, RankingRows, item_features, user_features
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.scaleout.shards import ShardReport, in_shard, refs, split_by_hash

ROW_ORDER = ("ts", "user_id", "item_id")


def rows_on_ray(
    read_day: Callable[[dt.date], pl.DataFrame], days: list[dt.date], catalog_ids: pl.DataFrame, profiles: pl.DataFrame | None,
    eval_start: dt.datetime, spec: FeatureSpec, shards: int,
) -> tuple[RankingRows, list[ShardReport]]:
    """`read_day(day)`: that day's impressions (`ranking_input`'s columns), run inside a task."""
    catalog = ray.put(catalog_ids.select("item_id"))
    split = ray.remote(_read_and_split).options(num_returns=shards + 1)
    by_day = [refs(split.remote(read_day, day, index, catalog, shards)) for index, day in enumerate(days)]
    timelines = ray.remote(_item_shard).options(num_returns=2 * shards + 1)
    by_item = [refs(timelines.remote(shard, eval_start, spec, shards, *[parts[shard] for parts in by_day])) for shard in range(shards)]
    sequences = ray.remote(_user_shard).options(num_returns=2)
    user_profiles = ray.put(profiles)
    by_user = [
        refs(sequences.remote(shard, spec, shards, user_profiles, *[parts[shard] for parts in by_item], *[parts[shards + shard] for parts in by_item]))
        for shard in range(shards)
    ]
    read_reports = ray.get([parts[-1] for parts in by_day])
    reports = [report for report, _ in read_reports] + ray.get([parts[-1] for parts in by_item]) + ray.get([out[1] for out in by_user])
    shards_rows = ray.get([out[0] for out in by_user])
    del by_day, by_item, by_user  # the object store may free the shards' copies before the sort
    rows = pl.concat(shards_rows, how="diagonal_relaxed").sort(*ROW_ORDER)
    return RankingRows(rows, sum(unknown for _, unknown in read_reports)), reports


def _read_and_split(read_day: Callable[[dt.date], pl.DataFrame], day: dt.date, index: int, catalog: pl.DataFrame, shards: int) -> list:
    with track_usage() as usage:
        impressions = read_day(day)
        kept = impressions.join(catalog, on="item_id", how="semi")
        parts = split_by_hash(kept, "item_id", shards)
    return [*parts, (ShardReport.of("read impressions", index, impressions.height, usage), impressions.height - kept.height)]


def _item_shard(shard: int, eval_start: dt.datetime, spec: FeatureSpec, shards: int, *days: pl.DataFrame) -> list:
    with track_usage() as usage:
        kept = pl.concat(days, how="diagonal_relaxed")
        rows, clicks = (frame.collect(engine="streaming") for frame in item_features(kept.lazy(), eval_start, spec))
        parts = split_by_hash(rows, "user_id", shards) + split_by_hash(clicks, "user_id", shards)
    return [*parts, ShardReport.of("item timelines", shard, kept.height, usage)]


def _user_shard(shard: int, spec: FeatureSpec, shards: int, profiles: pl.DataFrame | None, *parts: pl.DataFrame) -> tuple[pl.DataFrame, ShardReport]:
    with track_usage() as usage:
        rows, clicks = pl.concat(parts[: len(parts) // 2], how="diagonal_relaxed"), pl.concat(parts[len(parts) // 2 :])
        mine = profiles.filter(in_shard("user_id", shard, shards)).lazy() if profiles is not None else None
        out = user_features(rows.lazy(), clicks.lazy(), mine, spec).collect(engine="streaming")
    return out, ShardReport.of("user sequences", shard, rows.height, usage)

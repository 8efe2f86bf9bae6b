"""ranking_dataset: one row per impression of the training and evaluation windows (paper 3.1)."""

import datetime as dt

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline.assets.common import RANKING_GROUP, engine_metadata
from saviorrec_pipeline.method.ranking_features import EVAL, TRAIN, FeatureSpec
from saviorrec_pipeline.partitions import TrainEvalWindow, daily_partitions, full_window_mapping
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore


class RankingDatasetConfig(dg.Config):
    sequence_length: int = Field(default=50, ge=1, description="N: the user's last N clicked items before the impression")
    prior_ctr: float = Field(default=0.05, gt=0, lt=1, description="smoothed CTR = (clicks + strength * prior) / (impressions + strength)")
    prior_strength: float = Field(default=20.0, ge=0)

    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.sequence_length, self.prior_ctr, self.prior_strength)


@dg.asset(
    group_name=RANKING_GROUP,
    partitions_def=daily_partitions,
    deps=[dg.AssetDep("impressions", partition_mapping=full_window_mapping()), "item_catalog", "user_profiles"],
    io_manager_key="parquet_io_manager",
    description="Impressions of the training and evaluation windows with user profile, behaviour sequence, "
    "statistics from strictly earlier data, base pCTR and item PV; embeddings and codes by item id.",
)
def ranking_dataset(
    context: dg.AssetExecutionContext, config: RankingDatasetConfig, raw: RawStore, window: TrainEvalWindow, compute: Compute
) -> dg.Output[pl.DataFrame]:
    days = window.training_days(context.partition_key) + window.evaluation_days(context.partition_key)
    eval_start = dt.datetime.combine(window.evaluation_days(context.partition_key)[0], dt.time(), tzinfo=dt.timezone.utc)
    context.log.info(f"joining the impressions of {days[0]}..{days[-1]} ({compute.engine})")
    with track_usage() as usage:
        catalog = raw.inspect_items().checked().select("item_id")
        users = raw.inspect_users().checked()
        profiles = users if users.height else None
        built, shard_reports = compute.ranking_rows(raw, days, catalog, profiles, eval_start, config.spec())
    rows, unknown = built.rows, built.dropped_unknown
    if unknown:
        context.log.warning(f"dropped {unknown} impressions of items missing from the catalog")
    split_counts = dict(rows.group_by("split").len().iter_rows())
    evaluation = rows.filter(pl.col("split") == EVAL)
    if evaluation.is_empty():
        raise ValueError(f"ranking_dataset {context.partition_key}: no impressions in the evaluation window {days[-window.eval_days]} .. {days[-1]}")
    return dg.Output(
        rows,
        metadata={
            "window": f"train {days[0]} .. {days[-window.eval_days - 1]}, eval {days[-window.eval_days]} .. {days[-1]}",
            "rows": rows.height,
            "train_rows": split_counts.get(TRAIN, 0),
            "eval_rows": split_counts.get(EVAL, 0),
            "dropped_unknown_item_impressions": unknown,
            "users": rows["user_id"].n_unique(),
            "items": rows["item_id"].n_unique(),
            "eval_ctr": round(float(evaluation["clicked"].mean()), 5),
            "eval_items_never_shown_before": int((evaluation.group_by("item_id").agg(pl.col("pv").first())["pv"] == 0).sum()),
            "mean_sequence_length": round(float(rows["seq_length"].mean()), 2),
            "profile_columns": ", ".join(c for c in (profiles.columns if profiles is not None else []) if c != "user_id") or "none",
            "has_base_pctr": "base_pctr" in rows.columns,
            **usage.metadata(rows.height, unit="rows"),
            **engine_metadata(compute.engine, shard_reports),
        },
    )

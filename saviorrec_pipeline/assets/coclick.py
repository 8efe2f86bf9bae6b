"""coclick_pairs: positive item pairs mined from the training window's clicks (paper 3.2)."""

import datetime as dt

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline.assets.common import SAVIORENC_GROUP, engine_metadata
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.coclick import CoclickParams
from saviorrec_pipeline.partitions import TrainEvalWindow, daily_partitions, training_window_mapping
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore


class CoclickConfig(dg.Config):
    window: int = Field(default=5, ge=1, description="a click pairs with the user's next `window` clicks")
    max_gap_hours: float = Field(default=24.0, ge=0, description="... that come at most this long after it")
    min_support: int = Field(default=2, ge=1, description="keep pairs clicked together by at least this many users")

    def params(self) -> CoclickParams:
        return CoclickParams(self.window, dt.timedelta(hours=self.max_gap_hours), self.min_support)


@dg.asset(
    group_name=SAVIORENC_GROUP,
    partitions_def=daily_partitions,
    deps=[dg.AssetDep("impressions", partition_mapping=training_window_mapping())],
    io_manager_key="parquet_io_manager",
    description="Item pairs (item_a < item_b) co-clicked by >= min_support users in the training window.",
)
def coclick_pairs(
    context: dg.AssetExecutionContext, config: CoclickConfig, raw: RawStore, window: TrainEvalWindow, compute: Compute
) -> dg.Output[pl.DataFrame]:
    days = window.training_days(context.partition_key)
    context.log.info(f"mining pairs from the clicks of {days[0]}..{days[-1]} ({compute.engine})")
    with track_usage() as usage:
        mined, shard_reports = compute.coclick_pairs(raw, days, config.params())
    pairs = mined.pairs
    context.log.info(f"{mined.click_events} click events; kept {pairs.height} pairs with support >= {config.min_support}")
    return dg.Output(
        pairs,
        metadata={
            "training_window": f"{days[0]} .. {days[-1]} ({len(days)} days)",
            "click_events": mined.click_events,
            "clicking_users": mined.clicking_users,
            "pairs_kept": pairs.height,
            "items_in_pairs": pl.concat([pairs["item_a"], pairs["item_b"]]).n_unique(),
            "support_distribution": dg.MetadataValue.md(_support_table(pairs)),
            **usage.metadata(mined.click_events, unit="click_events"),
            **engine_metadata(compute.engine, shard_reports),
        },
    )


def _support_table(pairs: pl.DataFrame) -> str:
    if pairs.is_empty():
        return "no pairs"
    quantiles = [0.5, 0.9, 0.99, 1.0]
    values = [pairs["support"].quantile(q, interpolation="nearest") for q in quantiles]
    return table([f"p{int(q * 100)}" for q in quantiles] + ["mean"], [[int(v) for v in values] + [f"{pairs['support'].mean():.2f}"]])

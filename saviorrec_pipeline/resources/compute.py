"""Where the heavy stages run: in the step's own process (Polars and PyTorch, the default) or on Ray.

The stages call this resource's methods and get the same results either way (the data stages
exactly); which engine runs them is configuration (SAVIORREC_RAY_ADDRESS), never stage code. Ray is
imported only when it is asked for.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable

import dagster as dg
import polars as pl
from pydantic import Field, PrivateAttr

from saviorrec_pipeline.method.coclick import CoclickParams, MinedPairs, mine_window
from saviorrec_pipeline.method.ctr_training import CTRTraining, train_ctr
from saviorrec_pipeline.method.encoder import SaviorEnc
from saviorrec_pipeline.method.encoder_training import embedded_catalog
from saviorrec_pipeline.method.ranking_features import FeatureSpec, RankingRows, ranking_input, ranking_rows
from saviorrec_pipeline.resources.raw import RawStore, clicks_of_day, impressions_of_day

LOCAL_RAY = "local"


class Compute(dg.ConfigurableResource):
    """`ray_address` unset: every stage in the step's process. `local`: a Ray instance started inside
    the process (all its CPUs). `auto`, `ray://host:port` or a head's `host:port`: a running Ray cluster."""

    ray_address: str | None = Field(default=None, description="unset: no Ray; local, auto, ray://host:port or host:port: Ray")
    shards: int | None = Field(default=None, ge=1, description="shards of the data stages on Ray (unset: the cluster's CPUs)")
    embedding_actors: int | None = Field(
        default=None, ge=1, description="Ray Data actors embedding the catalog (unset: one per GPU, or per CPU without GPUs)",
    )
    train_workers: int = Field(default=2, ge=1, description="DDP workers of CTR training on Ray (a GPU each where the cluster has them)")
    train_storage: str | None = Field(default=None, description="where Ray Train keeps its runs: shared storage (s3://) on a multi-node "
                                      "cluster; unset: a local temporary folder")
    _started_ray: bool = PrivateAttr(default=False)

    @property
    def on_ray(self) -> bool:
        return bool(self.ray_address)

    @property
    def engine(self) -> str:
        return f"ray ({self.ray_address})" if self.on_ray else "local"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if not self.on_ray:
            return
        import ray

        if not ray.is_initialized():
            if self.ray_address == LOCAL_RAY:
                # Workers' own logs stay in Ray's session folder: Ray Train's monitors repeat
                # themselves hundreds of times a run, which would bury the step's log.
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.ray_address)
            self._started_ray = True

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()

    def shard_count(self) -> int:
        from saviorrec_pipeline.scaleout.shards import cluster_cpus

        return self.shards or cluster_cpus()

    def coclick_pairs(self, raw: RawStore, days: list[dt.date], params: CoclickParams) -> tuple[MinedPairs, list[dict]]:
        """The window's co-click pairs, and on Ray what each shard's task did."""
        if not self.on_ray:
            return mine_window(raw.read_clicks(days), params), []
        from saviorrec_pipeline.scaleout.coclick import mine_on_ray

        raw.require_days(days)
        mined, reports = mine_on_ray(functools.partial(clicks_of_day, raw.root), days, params, self.shard_count())
        return mined, [report.as_dict() for report in reports]

    def ranking_rows(
        self, raw: RawStore, days: list[dt.date], catalog_ids: pl.DataFrame, profiles: pl.DataFrame | None,
        eval_start: dt.datetime, spec: FeatureSpec,
    ) -> tuple[RankingRows, list[dict]]:
        """The ranking rows of the window, and on Ray what each shard's task did."""
        if not self.on_ray:
            return ranking_rows(raw.read_window(days, ranking_input), catalog_ids, profiles, eval_start, spec), []
        from saviorrec_pipeline.scaleout.ranking import rows_on_ray

        raw.require_days(days)
        rows, reports = rows_on_ray(functools.partial(impressions_of_day, raw.root), days, catalog_ids, profiles, eval_start, spec, self.shard_count())
        return rows, [report.as_dict() for report in reports]

    def item_embeddings(self, model: SaviorEnc, catalog: pl.DataFrame) -> pl.DataFrame:
        """`embedded_catalog`: z, `has_image` and `has_title` of every catalog item, in catalog order."""
        if not self.on_ray:
            return embedded_catalog(model, catalog)
        from saviorrec_pipeline.scaleout.embedding import embed_on_ray
        from saviorrec_pipeline.scaleout.shards import cluster_cpus, cluster_gpus

        return embed_on_ray(model, catalog, self.embedding_actors or cluster_gpus() or cluster_cpus())

    def ctr_trainer(self) -> Callable[..., CTRTraining]:
        """`train_ctr`, or its DDP run on Ray Train with the same arguments."""
        if not self.on_ray:
            return train_ctr
        from saviorrec_pipeline.scaleout.training import train_on_ray

        return functools.partial(train_on_ray, workers=self.train_workers, storage_path=self.train_storage)

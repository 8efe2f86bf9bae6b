"""Parquet storage for every stage: `{root}/{asset}/{partition}.parquet` on disk or S3, written
atomically (a failed write leaves the previous file as it was), and the root of the training
checkpoints."""

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline.checkpoints import CheckpointFile, checkpoint_file, clear_checkpoints
from saviorrec_pipeline.files import filesystem, safe_name, write_parquet_atomic
from saviorrec_pipeline.resources.tracking import MlflowTracking


class ParquetStorage(dg.ConfigurableResource):
    """Where stage outputs live: a local directory or an `s3://bucket/prefix`."""

    root: str
    checkpoint_every_epochs: int = Field(
        default=1, ge=0,
        description="training stages save a checkpoint every this many epochs (0: never); a killed run resumes from the last",
    )

    def uri(self, asset: str, partition: str) -> str:
        root = self.root.rstrip("/")
        return f"{root}/{safe_name(asset, 'asset name')}/{safe_name(partition, 'partition key')}.parquet"

    def checkpoint(self, asset: str, partition: str, name: str) -> CheckpointFile:
        """Where a training loop of `asset` for `partition` keeps its latest epoch."""
        return checkpoint_file(self.root, asset, partition, name, self.checkpoint_every_epochs)

    def clear_checkpoints(self, asset: str, partition: str) -> None:
        clear_checkpoints(self.root, asset, partition)

    def write(self, df: pl.DataFrame, asset: str, partition: str) -> str:
        uri = self.uri(asset, partition)
        write_parquet_atomic(df, uri)
        return uri

    def read(self, asset: str, partition: str) -> pl.DataFrame:
        uri = self.uri(asset, partition)
        fs, path = filesystem(uri)
        if not fs.exists(path):
            raise FileNotFoundError(
                f"{uri} does not exist: materialize {asset} for partition {partition} first"
            )
        with fs.open(path, "rb") as f:
            return pl.read_parquet(f)


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores Polars frames returned by partitioned assets through ParquetStorage.

    A training stage registers its model before returning its output; when storing that output
    fails, the step fails, so what it registered in `tracking` is withdrawn (MlflowTracking.withdraw_failed_step).
    """

    storage: ParquetStorage
    tracking: MlflowTracking | None = None

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        asset = context.asset_key.path[-1]
        try:
            uri = self.storage.write(obj, asset, context.partition_key)
        except Exception as exc:
            if self.tracking is not None:
                self.tracking.withdraw_failed_step(context.log, context.run_id, context.asset_key.to_user_string(), context.partition_key)
            raise OSError(f"{asset}: could not store {self.storage.uri(asset, context.partition_key)}: {exc}") from exc
        # Only now: had the write failed, a retry would have resumed from the final checkpoint.
        self.storage.clear_checkpoints(asset, context.partition_key)
        context.add_output_metadata({"uri": dg.MetadataValue.path(uri), "rows": obj.height})

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        keys = context.asset_partition_keys
        if len(keys) != 1:
            raise ValueError(
                f"{context.asset_key.to_user_string()}: expected one partition, got {len(keys)}"
            )
        return self.storage.read(context.asset_key.path[-1], keys[0])

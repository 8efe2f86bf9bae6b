"""Parquet storage for every stage: `{root}/{asset}/{partition}.parquet` on disk or S3, and the
training checkpoints: `{root}/checkpoints/{asset}/{partition}/{name}.safetensors`.

Writes are atomic, so a failed write leaves the previous file as it was: on disk the file is
written beside the target and renamed over it once complete; on S3 it is uploaded once complete, and
the object appears whole or not at all.
"""

import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import dagster as dg
import fsspec
import polars as pl
from pydantic import Field
from fsspec.implementations.local import LocalFileSystem

from saviorrec_pipeline.method.training_loop import saved_position
from saviorrec_pipeline.resources.tracking import MlflowTracking

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")  # whole name (fullmatch), at most 128 characters
# s3fs does not retry a refused or dropped connection itself; botocore's "standard" mode does, with
# jittered exponential backoff (up to 1, 2, 4, ... 20 s). Its default of 5 attempts waits 7.5 s on
# average (0 to 15 s), shorter than a restart of the S3 server; 10 wait about a minute in all.
# AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, botocore's own variables, override both.
S3_MAX_ATTEMPTS = 10


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a local path or `s3://` URI, and the path inside it.

    S3 credentials come from the standard AWS variables; the endpoint from AWS_ENDPOINT_URL
    (SeaweedFS, MinIO, ...). Nothing here logs them.
    """
    options = {}
    if uri.startswith("s3://"):
        options = {
            "endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None,
            "use_listings_cache": False,
            "config_kwargs": {
                "retries": {
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
                    "mode": os.environ.get("AWS_RETRY_MODE") or "standard",
                }
            },
        }
    return fsspec.core.url_to_fs(uri, **options)


def safe_name(value: str, what: str) -> str:
    """Refuse names that could leave the storage root (`..`, `/`, empty) or are not plain file names."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"unsafe {what} {value!r}: use at most 128 letters, digits, '_', '-', '.', '='")
    return value


def write_atomic(uri: str, write: Callable[[BinaryIO], object]) -> None:
    """`write` fills a temporary file that then replaces `uri` whole; on any failure `uri` stays as
    it was and no temporary is left where readers look."""
    fs, path = filesystem(uri)
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        # Beside the target, so that the rename is atomic; readers skip names starting with ".".
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    # An object store has no rename (s3fs' mv is a copy, then a delete: a failure between them leaves
    # the temporary object behind), but an upload is atomic: one PUT, or a multipart upload that
    # appears only once completed. So the file is made locally, then uploaded, retried by botocore
    # (S3_MAX_ATTEMPTS); a failed upload leaves nothing.
    with tempfile.TemporaryDirectory(prefix="saviorrec-upload-") as folder:
        with open(f"{folder}/{name}", "wb") as f:
            write(f)
        fs.put_file(f"{folder}/{name}", path)


def write_parquet_atomic(df: pl.DataFrame, uri: str) -> None:
    write_atomic(uri, lambda f: df.write_parquet(f, compression="zstd", statistics=True))


class CheckpointFile:
    """One training loop's checkpoint (a `CheckpointStore`), replaced whole by every `every`-th
    epoch's save (0: none are kept)."""

    def __init__(self, uri: str, every: int = 1):
        self.uri = uri
        self.every = every
        self._offered = 0

    def read(self) -> bytes | None:
        fs, path = filesystem(self.uri)
        return fs.cat_file(path) if fs.exists(path) else None

    def saved_position(self) -> tuple[str, int] | None:
        """(phase, epochs done) of the latest save, read by byte ranges from its header only."""
        fs, path = filesystem(self.uri)
        return saved_position(lambda start, end: fs.cat_file(path, start=start, end=end)) if fs.exists(path) else None

    def write(self, data: bytes) -> None:
        self._offered += 1
        if self.every and self._offered % self.every == 0:
            write_atomic(self.uri, lambda f: f.write(data))


def resume_point(context: dg.AssetExecutionContext, checkpoints: CheckpointFile) -> str:
    """Where a stage's training picks up, logged when it is not the start: after the saved epoch of
    an interrupted run with the same inputs and settings."""
    saved = checkpoints.saved_position()
    if saved is None:
        return "start"
    phase, epochs_done = saved
    where = f"{phase} epoch {epochs_done}"
    context.log.info(f"resuming from the checkpoint after {where}: {checkpoints.uri}")
    return where


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
        uri = f"{self._checkpoints(asset, partition)}/{safe_name(name, 'checkpoint name')}.safetensors"
        return CheckpointFile(uri, self.checkpoint_every_epochs)

    def clear_checkpoints(self, asset: str, partition: str) -> None:
        """Drop the partition's checkpoints: its output is stored, so a later run starts afresh."""
        fs, path = filesystem(self._checkpoints(asset, partition))
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def _checkpoints(self, asset: str, partition: str) -> str:
        return f"{self.root.rstrip('/')}/checkpoints/{safe_name(asset, 'asset name')}/{safe_name(partition, 'partition key')}"

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

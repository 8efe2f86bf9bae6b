"""Parquet storage for every stage: `{root}/{asset}/{partition}.parquet` on disk or S3.

Writes are atomic: the frame goes to a temporary object beside the target and is moved over it
only once complete, so a failed write leaves the previous file as it was.
"""

import os
import re
import uuid

import dagster as dg
import fsspec
import polars as pl

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")  # whole name (fullmatch), at most 128 characters


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
            "config_kwargs": {"retries": {"max_attempts": 5, "mode": "standard"}},
        }
    return fsspec.core.url_to_fs(uri, **options)


def safe_name(value: str, what: str) -> str:
    """Refuse names that could leave the storage root (`..`, `/`, empty) or are not plain file names."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"unsafe {what} {value!r}: use at most 128 letters, digits, '_', '-', '.', '='")
    return value


def write_parquet_atomic(df: pl.DataFrame, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            df.write_parquet(f, compression="zstd", statistics=True)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


class ParquetStorage(dg.ConfigurableResource):
    """Where stage outputs live: a local directory or an `s3://bucket/prefix`."""

    root: str

    def uri(self, asset: str, partition: str) -> str:
        root = self.root.rstrip("/")
        return f"{root}/{safe_name(asset, 'asset name')}/{safe_name(partition, 'partition key')}.parquet"

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
    """Stores Polars frames returned by partitioned assets through ParquetStorage."""

    storage: ParquetStorage

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        uri = self.storage.write(obj, context.asset_key.path[-1], context.partition_key)
        context.add_output_metadata({"uri": dg.MetadataValue.path(uri), "rows": obj.height})

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        keys = context.asset_partition_keys
        if len(keys) != 1:
            raise ValueError(
                f"{context.asset_key.to_user_string()}: expected one partition, got {len(keys)}"
            )
        return self.storage.read(context.asset_key.path[-1], keys[0])

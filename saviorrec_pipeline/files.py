"""Files on disk or S3 through fsspec: the filesystem of a URI, safe names, atomic writes.

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

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

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

"""Hash partitioning of frames between Ray tasks, and what each task reports about its shard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import polars as pl
import ray

from saviorrec_pipeline.profiling import Usage

T = TypeVar("T")
HASH_SEED = 0  # fixed, so that every task sends a key to the same shard


@dataclass(frozen=True)
class ShardReport:
    """One task's work on one shard: its input rows, seconds, the worker's peak memory and how much
    of it the task added (Ray reuses worker processes, so their memory before a task varies)."""

    step: str
    shard: int
    rows: int
    seconds: float
    peak_rss_mib: float
    added_mib: float

    @classmethod
    def of(cls, step: str, shard: int, rows: int, usage: Usage) -> ShardReport:
        return cls(step, shard, rows, round(usage.seconds, 3), round(usage.peak_rss_bytes / 2**20, 1),
                   round(max(usage.peak_rss_bytes - usage.start_rss_bytes, 0) / 2**20, 1))

    def as_dict(self) -> dict:
        return asdict(self)


def split_by_hash(frame: pl.DataFrame, column: str, shards: int) -> list[pl.DataFrame]:
    """`frame` in `shards` parts by a hash of `column`: every row of one key lands in one part."""
    shard = (pl.col(column).hash(HASH_SEED) % shards).alias("_shard")
    parts = frame.with_columns(shard).partition_by("_shard", as_dict=True, include_key=False)
    empty = frame.clear()
    return [parts.get((s,), empty) for s in range(shards)]


def in_shard(column: str, shard: int, shards: int) -> pl.Expr:
    """True for the rows `split_by_hash` puts in `shard`."""
    return pl.col(column).hash(HASH_SEED) % shards == shard


def refs(returned: ray.ObjectRef | list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """A task's returns as a list: Ray hands back a single reference when num_returns is 1."""
    return returned if isinstance(returned, list) else [returned]


def on_cluster(function: Callable[..., T], *args) -> T:
    """`function(*args)`, run in a task on the cluster when this process is a Ray Client: Ray Data
    and Ray Train drive their work from a process inside the cluster, which a client is not."""
    if ray.util.client.ray.is_connected():
        return ray.get(ray.remote(num_cpus=0)(function).remote(*args))
    return function(*args)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))

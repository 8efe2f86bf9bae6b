"""Catalog embedding on Ray Data: the catalog's rows in batches through a pool of actors, each
holding the encoder, rebuilt once from its architecture and safetensors weights (nothing
unpickled), on a GPU of its own when the cluster has GPUs. Each batch is embedded by
`embedded_catalog`, as in-process; results come back in catalog order."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import ray
from safetensors.torch import load, save

from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc
from saviorrec_pipeline.method.encoder_training import embedded_catalog
from saviorrec_pipeline.scaleout.shards import cluster_gpus, on_cluster

ROW = "_row"  # the catalog position, to restore the order Ray Data does not keep


class _Embedder:
    def __init__(self, architecture: dict, weights: bytes):
        self.model = SaviorEnc(EncoderConfig.from_dict(architecture))
        self.model.load_state_dict(load(weights))
        self.model.to(device_for_training()).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = pl.from_arrow(batch)
        return embedded_catalog(self.model, rows.drop(ROW)).with_columns(rows[ROW]).to_arrow()


def embed_on_ray(model: SaviorEnc, catalog: pl.DataFrame, actors: int, batch_size: int = 1024) -> pl.DataFrame:
    """`embedded_catalog(model, catalog)` by `actors` Ray Data actors (one GPU each where the
    cluster has as many GPUs)."""
    return on_cluster(_embed, model.config.to_dict(), save(model.state_dict()), catalog, actors, batch_size)


def _embed(architecture: dict, weights: bytes, catalog: pl.DataFrame, actors: int, batch_size: int) -> pl.DataFrame:
    gpus = 1 if cluster_gpus() >= actors else 0
    # One block per batch, so that every actor of the pool gets work.
    blocks = [part.to_arrow() for part in catalog.with_row_index(ROW).iter_slices(batch_size)]
    embedded = ray.data.from_arrow(blocks).map_batches(
        _Embedder, fn_constructor_args=(architecture, weights), batch_format="pyarrow",
        batch_size=batch_size, concurrency=actors, num_gpus=gpus,
    )
    tables = ray.get(embedded.to_arrow_refs())
    return pl.concat([pl.from_arrow(table) for table in tables]).sort(ROW).drop(ROW)

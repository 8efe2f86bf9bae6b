"""i2i retrieval Hit@K (paper 4.3, Table 4): do an item's nearest neighbours hold the next click?

For each pair of consecutive clicks of a user (query, next), ordered by (ts, item_id), the query's
K nearest items by inner product of L2-normalised embeddings (cosine), the query itself excluded,
are retrieved from the whole catalog with faiss; a hit is `next` among them. Pairs whose next
click repeats the query, or whose items have no embedding, are not counted.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl

from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder import SaviorEnc
from saviorrec_pipeline.method.encoder_training import (
    TrainConfig, applicable_training, catalog_tensors, embed_catalog, initial_encoder, train_item_encoder,
)
from saviorrec_pipeline.method.item_rows import with_item_rows


@dataclass(frozen=True)
class HitRate:
    k: int
    queries: int
    hits: int

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None


def consecutive_click_pairs(clicks: pl.DataFrame) -> pl.DataFrame:
    """(query, next) item pairs: each click of a user and the user's next click."""
    return (
        clicks.sort("user_id", "ts", "item_id")
        .select(
            pl.col("item_id").alias("query"),
            pl.col("item_id").shift(-1).alias("next"),
            (pl.col("user_id").shift(-1) == pl.col("user_id")).alias("same_user"),
        )
        .filter(pl.col("same_user") & (pl.col("query") != pl.col("next")))
        .select("query", "next")
    )


def hit_at_k(item_ids: np.ndarray, embeddings: np.ndarray, pairs: pl.DataFrame, k: int = 30) -> HitRate:
    """Hit@K of `pairs` (query, next) against the catalog `item_ids` x `embeddings` (normalised)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = with_item_rows(pairs, item_ids, ("query", "next"))
    if rows.is_empty():
        return HitRate(k, 0, 0)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    queries = np.unique(rows["query_row"].to_numpy())
    # One extra neighbour, because the query usually retrieves itself first.
    _, neighbours = index.search(vectors[queries], min(k + 1, len(vectors)))
    not_self = neighbours != queries[:, None]
    # Keep the first k neighbours other than the query itself.
    kept = np.where(not_self & (np.cumsum(not_self, axis=1) <= k), neighbours, -1)
    position = np.searchsorted(queries, rows["query_row"].to_numpy())
    hits = (kept[position] == rows["next_row"].to_numpy()[:, None]).any(axis=1)
    return HitRate(k, len(rows), int(hits.sum()))


TABLE4_VARIANTS = (  # (name, domain adaptation, i2i alignment)
    ("untuned", False, False),
    ("domain_adaptation", True, False),
    ("i2i_alignment", False, True),
    ("both", True, True),
)
TABLE4_SCHEMA = {
    "variant": pl.String, "domain_adaptation": pl.Boolean, "i2i_alignment": pl.Boolean, "k": pl.Int64,
    "queries": pl.Int64, "hits": pl.Int64, "hit_rate": pl.Float64, "note": pl.String,
}


def table_4(
    catalog: pl.DataFrame, coclick_pairs: pl.DataFrame, queries: pl.DataFrame, registered: SaviorEnc,
    base_training: TrainConfig, initial_weights: str | None, k: int, log: Callable[[str], None] = print,
) -> pl.DataFrame:
    """Hit@K of every encoder training variant of Table 4, from the same start and seed as the
    `registered` encoder (trained with `base_training`): a variant whose training is that one is the
    registered model, the others are trained here; `untuned` is that start itself (a pretrained
    tower or checkpoint where one is configured, as the paper's official CLIP). A variant that needs
    domain adaptation on a catalog that cannot have it does not apply: its row says why instead of a rate."""
    tensors = catalog_tensors(catalog, registered.config)
    rows = []
    for name, adapt, align in TABLE4_VARIANTS:
        wanted = dataclasses.replace(
            base_training,
            domain_adaptation_epochs=(base_training.domain_adaptation_epochs or 1) if adapt else 0,
            epochs=base_training.epochs if align else 0,
        )
        training, skipped_because = applicable_training(wanted, tensors)
        if skipped_because:
            # Without its domain adaptation it would be another row's training: it does not apply.
            log(f"Table 4 variant {name}: n/a, {skipped_because}")
            rows.append((name, adapt, align, k, None, None, None, f"n/a: {skipped_because}"))
            continue
        if training == base_training:
            log(f"Table 4 variant {name}: the registered encoder")
            model = registered
        elif not (adapt or align):
            model = initial_encoder(registered.config, training.seed, initial_weights)
        else:
            log(f"Table 4 variant {name}: training {training.domain_adaptation_epochs} DA + {training.epochs} i2i epochs")
            model = train_item_encoder(catalog, coclick_pairs, registered.config, training, initial_weights=initial_weights).model
        result = hit_at_k(tensors.item_ids, embed_catalog(model, tensors, device_for_training()), queries, k)
        rows.append((name, adapt, align, k, result.queries, result.hits, result.hit_rate, None))
    return pl.DataFrame(rows, schema=TABLE4_SCHEMA, orient="row")

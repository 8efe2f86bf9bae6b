"""A stock DIN (deepctr-torch's `DIN`, its defaults) trained on the pipeline's `ranking_dataset` rows.

What it sees is what a team's own DIN would: the user id, the candidate item id and the user's
profile columns as sparse features, and the behaviour sequence (the last N clicked items strictly
before the impression, the column `seq_items`) as the history the attention pools over, sharing
the item id embedding. Not the statistics, the base pCTR nor the content embeddings. Trained with
Adagrad (deepctr's own, lr 0.01) on batches of 1,024, as deepctr's examples do.
"""

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
from deepctr_torch.models import DIN

from saviorrec_pipeline.method.ctr_training import ItemIndex, profile_numbers, profile_vocabularies

EMBEDDING_DIM = 8  # deepctr's examples and DIN's paper
BATCH_SIZE = 1024
SEED = 1024  # deepctr's default


@dataclass
class DinResult:
    scores_per_epoch: list[np.ndarray]  # evaluation scores after each epoch, in `evaluation` order
    train_seconds: float  # fitting only, not the predictions
    samples_trained: int

    @property
    def samples_per_s(self) -> float:
        return self.samples_trained / self.train_seconds


def _numbers(ids: np.ndarray) -> ItemIndex:
    """Ids (users or items) to dense numbers in sorted order; DIN's inputs add one, 0 being padding."""
    return ItemIndex(np.unique(ids))


def _inputs(
    rows: pl.DataFrame, users: ItemIndex, items: ItemIndex, vocabularies: dict[str, list[str]], max_length: int
) -> dict[str, np.ndarray]:
    sequences = rows["seq_items"].list.tail(max_length)
    lengths = sequences.list.len().to_numpy().astype(np.int64)
    history = np.zeros((rows.height, max_length), dtype=np.int64)
    flat = items.numbers(sequences.explode(empty_as_null=False).drop_nulls().to_numpy(), "DIN history") + 1
    if len(flat):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        positions = np.arange(max_length)[None, :]
        filled = positions < lengths[:, None]
        history = np.where(filled, flat[(starts[:, None] + positions).clip(max=len(flat) - 1)], 0)
    x = {"user_id": users.numbers(rows["user_id"].to_numpy(), "DIN users") + 1,
         "item_id": items.numbers(rows["item_id"].to_numpy(), "DIN items") + 1}
    x |= dict(zip(vocabularies, profile_numbers(rows, vocabularies).T))
    return x | {"hist_item_id": history, "seq_length": lengths}


def train_din(train: pl.DataFrame, evaluation: pl.DataFrame, item_ids: np.ndarray, profile_columns: list[str],
              epochs: int, max_length: int = 50) -> DinResult:
    """DIN trained `epochs` passes over `train`, scoring `evaluation` after each pass. Ids and
    profile values are numbered over both splits (an id first seen in evaluation keeps its
    untrained, near-zero embedding), items over the catalog."""
    users = _numbers(np.concatenate([train["user_id"].to_numpy(), evaluation["user_id"].to_numpy()]))
    items = _numbers(item_ids)
    vocabularies = profile_vocabularies(pl.concat([train.select(profile_columns), evaluation.select(profile_columns)]), profile_columns)
    features = [SparseFeat("user_id", len(users) + 1, embedding_dim=EMBEDDING_DIM),
                SparseFeat("item_id", len(items) + 1, embedding_dim=EMBEDDING_DIM)]
    features += [SparseFeat(c, len(values) + 1, embedding_dim=EMBEDDING_DIM) for c, values in vocabularies.items()]
    features.append(VarLenSparseFeat(SparseFeat("hist_item_id", len(items) + 1, embedding_dim=EMBEDDING_DIM, embedding_name="item_id"),
                                     maxlen=max_length, length_name="seq_length"))
    x_train = _inputs(train, users, items, vocabularies, max_length)
    x_eval = _inputs(evaluation, users, items, vocabularies, max_length)
    labels = train["clicked"].to_numpy().astype(np.float32)
    torch.manual_seed(SEED)
    model = DIN(features, ["item_id"], device="cpu", seed=SEED)
    model.compile("adagrad", "binary_crossentropy")
    scores, seconds = [], 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.fit(x_train, labels, batch_size=BATCH_SIZE, epochs=1, verbose=0)
        seconds += time.perf_counter() - start
        scores.append(model.predict(x_eval, batch_size=8192).ravel())
    return DinResult(scores, seconds, len(labels) * epochs)

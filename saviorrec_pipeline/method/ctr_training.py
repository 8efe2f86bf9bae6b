"""Ranking rows -> tensors, and the CTR training loop (paper 4.1.4: Adagrad, lr 0.01 -> 0.001,
batch 1024, BCE of eq. 17).

Sequences stay flat (one array of all sequence items plus offsets) and are padded per batch, so
memory grows with the clicks the rows hold, not with rows x N.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from saviorrec_pipeline.method.ctr_model import Batch, CTRModel
from saviorrec_pipeline.method.encoder_training import deterministic_on_cpu
from saviorrec_pipeline.method.metrics import roc_auc
from saviorrec_pipeline.method.training_loop import Checkpoint, CheckpointStore, check_finite, latest_checkpoint

STAT_COLUMNS = ("impressions", "clicks", "ctr")


class ItemIndex:
    """Dense item numbers 0..n-1 in catalog order (the rows of the item tables)."""

    def __init__(self, item_ids: np.ndarray):
        self.item_ids = np.array(item_ids, dtype=np.int64)  # a copy: Polars' ids are read-only, and torch takes these
        self._order = np.argsort(self.item_ids, kind="stable")
        self._sorted = self.item_ids[self._order]

    def __len__(self) -> int:
        return len(self.item_ids)

    def numbers(self, ids: np.ndarray, where: str) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        position = np.searchsorted(self._sorted, ids).clip(max=len(self._sorted) - 1)
        found = self._sorted[position] == ids
        if not found.all():
            raise ValueError(f"{where}: {int((~found).sum())} item id(s) have no embedding, e.g. {int(ids[~found][0])}")
        return self._order[position]


def profile_vocabularies(train_rows: pl.DataFrame, columns: list[str]) -> dict[str, list[str]]:
    """Per profile column, the values seen in training; index 0 is kept for unknown or missing."""
    return {c: sorted(train_rows[c].drop_nulls().cast(pl.String).unique().to_list()) for c in columns}


def _stats(frame: pl.DataFrame, prefix: str) -> np.ndarray:
    impressions = frame[f"{prefix}impressions"].to_numpy().astype(np.float32)
    clicks = frame[f"{prefix}clicks"].to_numpy().astype(np.float32)
    ctr = frame[f"{prefix}ctr"].to_numpy().astype(np.float32)
    return np.stack([np.log1p(impressions), np.log1p(clicks), ctr], axis=1)


@dataclass
class EncodedRows:
    user: torch.Tensor
    profile: torch.Tensor
    item: torch.Tensor
    stats: torch.Tensor
    seq_items: torch.Tensor  # flat
    seq_stats: torch.Tensor  # flat (total, 3)
    seq_start: torch.Tensor
    seq_length: torch.Tensor
    base_pctr: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.item)

    def batch(self, rows: torch.Tensor, sequence_length: int, padding_item: int) -> Batch:
        lengths = self.seq_length[rows].clamp(max=sequence_length)
        # The last `lengths` clicks of each row, left-aligned and padded to the batch's longest.
        width = max(int(lengths.max()) if len(rows) else 0, 1)
        offsets = torch.arange(width)
        mask = offsets[None, :] < lengths[:, None]
        start = self.seq_start[rows] + self.seq_length[rows] - lengths
        positions = (start[:, None] + offsets[None, :]).clamp(max=max(len(self.seq_items) - 1, 0))
        if len(self.seq_items):
            seq_items = torch.where(mask, self.seq_items[positions], padding_item)
            seq_stats = torch.where(mask[..., None], self.seq_stats[positions], 0.0)
        else:
            seq_items = torch.full(mask.shape, padding_item)
            seq_stats = torch.zeros(*mask.shape, 3)
        return Batch(
            user=self.user[rows], profile=self.profile[rows], item=self.item[rows], stats=self.stats[rows],
            seq_items=seq_items, seq_stats=seq_stats, seq_mask=mask, base_pctr=self.base_pctr[rows], label=self.label[rows],
        )


def encode_rows(
    rows: pl.DataFrame, items: ItemIndex, vocabularies: dict[str, list[str]], user_buckets: int, where: str
) -> EncodedRows:
    """Model inputs for ranking rows (the columns of the `ranking_dataset` asset)."""
    profile_columns = []
    for column, values in vocabularies.items():
        lookup = pl.DataFrame({column: values, "index": np.arange(1, len(values) + 1)}, schema={column: pl.String, "index": pl.Int64})
        indices = rows.select(pl.col(column).cast(pl.String)).join(lookup, on=column, how="left", maintain_order="left")["index"]
        profile_columns.append(indices.fill_null(0).to_numpy())
    profile = np.stack(profile_columns, axis=1) if profile_columns else np.zeros((rows.height, 0), dtype=np.int64)
    lengths = rows["seq_items"].list.len().to_numpy().astype(np.int64)
    flat_ids = rows["seq_items"].explode(empty_as_null=False).to_numpy()
    flat_stats = rows.select(
        pl.col(f"seq_{name}").explode(empty_as_null=False).alias(name) for name in STAT_COLUMNS
    )
    base = rows["base_pctr"].fill_null(0.0).to_numpy() if "base_pctr" in rows.columns else np.zeros(rows.height)
    return EncodedRows(
        user=torch.from_numpy(rows["user_id"].to_numpy() % user_buckets),
        profile=torch.from_numpy(profile.astype(np.int64)),
        item=torch.from_numpy(items.numbers(rows["item_id"].to_numpy(), where)),
        stats=torch.from_numpy(_stats(rows, "item_")),
        seq_items=torch.from_numpy(items.numbers(flat_ids, f"{where} (sequence items)")),
        seq_stats=torch.from_numpy(_stats(flat_stats, "")),
        seq_start=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)),
        seq_length=torch.from_numpy(lengths),
        base_pctr=torch.from_numpy(base.astype(np.float32)).unsqueeze(-1),
        label=torch.from_numpy(rows["clicked"].to_numpy().astype(np.float32)),
    )


@dataclass(frozen=True)
class CTRTrainConfig:
    epochs: int = 1
    batch_size: int = 1024
    lr_start: float = 0.01
    lr_end: float = 0.001
    sequence_length: int = 50
    seed: int = 0


@torch.no_grad()
def predict(model: CTRModel, rows: EncodedRows, sequence_length: int, device: torch.device, batch_size: int = 8192) -> np.ndarray:
    model.to(device).eval()
    out = []
    for start in range(0, len(rows), batch_size):
        index = torch.arange(start, min(start + batch_size, len(rows)))
        batch = rows.batch(index, sequence_length, model.config.num_items).to(device)
        out.append(torch.sigmoid(model(batch)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def train_ctr(
    model: CTRModel, train: EncodedRows, evaluation: EncodedRows | None, settings: CTRTrainConfig, device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None, checkpoints: CheckpointStore | None = None,
) -> list[dict[str, float]]:
    """Adagrad with the learning rate decaying geometrically from
    lr_start to lr_end over all steps; reports train loss, and evaluation log loss / AUC when
    `evaluation` rows are given, per epoch. Given a `CheckpointStore`, saves after every epoch and
    resumes from the latest save."""
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(device)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=settings.lr_start)
    steps_per_epoch = max(1, -(-len(train) // settings.batch_size))
    total = settings.epochs * steps_per_epoch
    ratio = settings.lr_end / settings.lr_start
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ratio ** (min(step, total - 1) / max(total - 1, 1)))
    history, first_epoch = [], 0
    saved = latest_checkpoint(checkpoints)
    if saved is not None:
        saved.restore(model, optimizer, generator, schedule)
        history, first_epoch = saved.history, saved.epochs_done
    with deterministic_on_cpu(device):
        for epoch in range(first_epoch, settings.epochs):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            loss_sum = 0.0
            for step, index in enumerate(order.split(settings.batch_size)):
                batch = train.batch(index, settings.sequence_length, model.config.num_items).to(device)
                loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)  # eq. 17
                value = check_finite(loss.item(), "ctr training", epoch, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += value * len(index)
            figures = {"train_logloss": loss_sum / max(len(train), 1), "lr": schedule.get_last_lr()[0]}
            if evaluation is not None and len(evaluation):
                scores = predict(model, evaluation, settings.sequence_length, device)
                figures["eval_logloss"] = F.binary_cross_entropy(torch.from_numpy(scores).clamp(1e-7, 1 - 1e-7), evaluation.label).item()
                auc = roc_auc(evaluation.label.numpy(), scores)
                if auc is not None:
                    figures["eval_auc"] = auc
            history.append(figures)
            if checkpoints is not None:
                checkpoints.write(Checkpoint.capture("ctr", epoch + 1, history, model, optimizer, generator, schedule).to_bytes())
            if on_epoch:
                on_epoch(epoch, figures)
    model.eval()
    return history

"""Requests scored by a trained ranker: rows shaped like `ranking_dataset`'s in, pCTR out.

A request row holds what a ranking row holds at serving time: the user (`user_id` and the profile
columns the model learnt), the behaviour sequence (`seq_items`, oldest first, with each click's
`seq_impressions`, `seq_clicks`, `seq_ctr`), the candidate (`item_id` with `item_impressions`,
`item_clicks`, `item_ctr`) and `base_pctr` when the model reads it. No label, timestamp or split.

A candidate missing from the model's item tables (an item onboarded after the ranker trained) is
scored through its multimodal features: its row brings `embedding` (saviorrec-item-encoder's z)
and `codes` (saviorrec-rqvae's semantic ID). Its z is standardised like the catalog's and passes
through MBA at its codes into the multimodal attention blocks and the DNN; its ID row is zero, as
for any item the ranker has no ID row for, and its statistics are whatever the request says (zero
impressions for a brand-new item). Sequence items missing from the tables are left out of the
sequence: the model has neither an ID row nor a z for them.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
import torch

from saviorrec_pipeline.method.ctr_model import CTRModel
from saviorrec_pipeline.method.ctr_training import STAT_COLUMNS, EncodedRows, ItemIndex, encode_rows, predict
from saviorrec_pipeline.method.device import device_for_training

SEQUENCE_COLUMNS = ("seq_items", *(f"seq_{name}" for name in STAT_COLUMNS))
NEW_ITEM_COLUMNS = ("embedding", "codes")  # optional: the multimodal features of a candidate the tables lack


class RequestError(ValueError):
    """A request the ranker cannot score; `column` names the field at fault."""

    def __init__(self, column: str, problem: str):
        super().__init__(f"column {column!r}: {problem}")
        self.column = column


@dataclass
class Ranker:
    model: CTRModel
    vocabularies: dict[str, list[str]]  # per profile column, the values seen in training
    sequence_length: int

    def __post_init__(self):
        self.items = ItemIndex(self.model.item_ids.cpu().numpy())
        self.device = device_for_training()

    @classmethod
    def from_saved(cls, model: CTRModel, saved: dict) -> "Ranker":
        """`model` with the config the ctr_model stage saved beside it."""
        return cls(model.eval(), saved["vocabularies"], saved["sequence_length"])

    def columns(self) -> dict[str, pl.DataType]:
        """Every column a request must have, with the type it is read as."""
        numbers = {"user_id": pl.Int64, "item_id": pl.Int64, **{f"item_{name}": pl.Float64 for name in STAT_COLUMNS}}
        sequences = {"seq_items": pl.List(pl.Int64), **{f"seq_{name}": pl.List(pl.Float64) for name in STAT_COLUMNS}}
        profile = {column: pl.String for column in self.vocabularies}
        return numbers | sequences | profile | ({"base_pctr": pl.Float64} if self.model.config.use_base_pctr else {})

    def optional_columns(self) -> dict[str, pl.DataType]:
        return {"embedding": pl.List(pl.Float32), "codes": pl.List(pl.Int64)}

    def missing_columns(self, present: list[str]) -> list[str]:
        return [column for column in self.columns() if column not in present]

    def score(self, rows: pd.DataFrame | pl.DataFrame) -> np.ndarray:
        """pCTR per request row, in row order (float32); RequestError names the column at fault."""
        encoded, new_items = self.encode(rows)
        return predict(self.model, encoded, self.sequence_length, self.device, new_items=new_items)

    def encode(self, rows: pd.DataFrame | pl.DataFrame) -> tuple[EncodedRows, tuple[torch.Tensor, torch.Tensor] | None]:
        """The model's inputs for request rows, and (z, codes) of the candidates its tables lack."""
        frame = self.checked(rows)
        _, known = self.items.find(frame["item_id"].to_numpy())
        new_ids = np.unique(frame["item_id"].to_numpy()[~known])
        new_items = self._new_items(frame, known, new_ids) if len(new_ids) else None
        frame = self._without_unknown_clicks(frame)
        return encode_rows(frame, _RequestItems(self.items, new_ids), self.vocabularies, self.model.config.user_buckets, "request"), new_items

    def checked(self, rows: pd.DataFrame | pl.DataFrame) -> pl.DataFrame:
        """The request as typed columns, refused with the column at fault when one is missing,
        of the wrong type, null, or a sequence whose lists disagree in length."""
        present = list(rows.columns)
        missing = self.missing_columns(present)
        if missing:
            raise RequestError(missing[0], f"missing; a request needs {', '.join(missing)} (and has {', '.join(map(str, present)) or 'no columns'})")
        wanted = self.columns() | {c: t for c, t in self.optional_columns().items() if c in present}
        frame = pl.DataFrame([_typed(rows, column, dtype) for column, dtype in wanted.items()])
        for column in [c for c in wanted if c not in NEW_ITEM_COLUMNS and c not in self.vocabularies and c != "base_pctr"]:
            _refuse_nulls(frame[column], column)
        lengths = frame["seq_items"].list.len()
        for column in SEQUENCE_COLUMNS[1:]:
            differs = frame[column].list.len() != lengths
            if differs.any():
                row = int(differs.arg_max())
                raise RequestError(column, f"row {row} has {frame[column].list.len()[row]} values for {lengths[row]} seq_items")
        return frame

    def _new_items(self, frame: pl.DataFrame, known: np.ndarray, new_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, codes) of the candidates the tables lack, in `new_ids` order, from their rows."""
        config = self.model.config
        first_unknown = int(np.flatnonzero(~known)[0])
        for column in NEW_ITEM_COLUMNS:
            if column not in frame.columns or frame[column].filter(pl.Series(~known)).null_count():
                raise RequestError(column, f"item_id {frame['item_id'][first_unknown]} (row {first_unknown}) is not in the model's item tables: "
                                   "send its `embedding` (saviorrec-item-encoder) and `codes` (saviorrec-rqvae)")
        rows = frame.filter(pl.Series(~known)).unique("item_id", keep="first").sort("item_id")
        for column, width in (("embedding", config.embedding_dim), ("codes", config.num_levels)):
            wrong = rows[column].list.len() != width
            if wrong.any():
                raise RequestError(column, f"item_id {rows['item_id'][int(wrong.arg_max())]} has {rows[column].list.len()[int(wrong.arg_max())]} values, the model reads {width}")
        z = np.array(rows["embedding"].to_list(), dtype=np.float32)
        codes = np.array(rows["codes"].to_list(), dtype=np.int64)
        if not np.isfinite(z).all():
            raise RequestError("embedding", "holds NaN or infinite values")
        if ((codes < 0) | (codes >= config.codebook_size)).any():
            raise RequestError("codes", f"holds a code outside 0..{config.codebook_size - 1}")
        return torch.from_numpy(z), torch.from_numpy(codes)

    def _without_unknown_clicks(self, frame: pl.DataFrame) -> pl.DataFrame:
        clicked = frame["seq_items"].explode(empty_as_null=False).drop_nulls().to_numpy()
        if self.items.find(clicked)[1].all():
            return frame
        keep = pl.int_range(pl.len()).filter(pl.element().is_in(pl.lit(pl.Series(self.items.item_ids))))
        positions = frame.select(pl.col("seq_items").list.eval(keep).alias("positions"))["positions"]
        return frame.with_columns(pl.col(column).list.gather(positions) for column in SEQUENCE_COLUMNS)


class _RequestItems:
    """Item numbers of a request: the model's own, then its new candidates past the padding row."""

    def __init__(self, known: ItemIndex, new_ids: np.ndarray):
        self.known, self.new, self.padding = known, ItemIndex(new_ids), len(known)

    def numbers(self, ids: np.ndarray, where: str) -> np.ndarray:
        numbers, found = self.known.find(ids)
        new_numbers, _ = self.new.find(ids)
        return np.where(found, numbers, self.padding + 1 + new_numbers)


def _typed(rows: pd.DataFrame | pl.DataFrame, column: str, dtype: pl.DataType) -> pl.Series:
    """One request column read as `dtype`, or a RequestError saying what it holds instead."""
    try:
        if isinstance(rows, pl.DataFrame):
            return rows[column].cast(dtype, strict=True)
        values = rows[column].to_list()
        if dtype == pl.String:
            return pl.Series(column, values, strict=False).cast(pl.String, strict=True)
        return pl.Series(column, [_plain(v) for v in values], dtype=dtype, strict=True)
    except (TypeError, ValueError, pl.exceptions.PolarsError) as exc:
        kind = {pl.Int64: "integers", pl.Float64: "numbers", pl.String: "values"}.get(dtype, f"lists ({dtype})")
        raise RequestError(column, f"expected {kind}: {str(exc).splitlines()[0]}") from None


def _plain(value):
    """A pandas cell as Polars reads it: numpy arrays (MLflow's list cells) as lists, NaN as null."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _refuse_nulls(series: pl.Series, column: str) -> None:
    if series.null_count():
        raise RequestError(column, f"row {int(series.is_null().arg_max())} is null")
    if series.dtype.is_nested():
        holds_null = series.list.eval(pl.element().is_null().any()).explode()
        if holds_null.any():
            raise RequestError(column, f"row {int(holds_null.arg_max())} holds a null value")

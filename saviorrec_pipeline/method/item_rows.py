"""Item ids to row positions in an item table (catalog order, embedding order)."""

import numpy as np
import polars as pl


def with_item_rows(frame: pl.DataFrame, item_ids: np.ndarray, columns: tuple[str, ...]) -> pl.DataFrame:
    """`frame` with a `{column}_row` position in `item_ids` for each item-id column; rows naming
    an item that is not in `item_ids` are dropped. Row order is kept."""
    positions = pl.DataFrame({"item_id": item_ids, "row": np.arange(len(item_ids))})
    for column in columns:
        frame = frame.join(
            positions.rename({"item_id": column, "row": f"{column}_row"}), on=column, maintain_order="left"
        )
    return frame


def pair_rows(pairs: pl.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """Co-click pairs (`item_a`, `item_b`) as (pairs, 2) row positions in `item_ids`."""
    return with_item_rows(pairs, item_ids, ("item_a", "item_b")).select("item_a_row", "item_b_row").to_numpy()


def embedding_matrix(item_embeddings: pl.DataFrame) -> np.ndarray:
    """An `item_embeddings` table's vectors as one (items, d) float32 array, in row order. A
    writable copy: Polars hands out a read-only view, which torch warns about."""
    return np.array(item_embeddings["embedding"].to_numpy(), dtype=np.float32, order="C")

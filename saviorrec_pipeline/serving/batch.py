"""Batch scoring of a Parquet file of requests, in bounded memory.

The file is read in record batches, each scored and appended to the output, so memory holds one
batch of rows at a time whatever the file's size. Columns are checked before the first row is
read; the output replaces its target only once whole (a failed run leaves no partial file).
"""

from collections.abc import Callable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from saviorrec_pipeline.files import filesystem, write_atomic
from saviorrec_pipeline.serving.ranker import Ranker, RequestError

KEY_COLUMNS = ("user_id", "item_id", "ts")  # carried from each request row to its score, where present
OUTPUT_BATCH_ROWS = 65_536  # rows read, scored and written at a time


def score_file(
    ranker: Ranker, source: str, target: str, batch_rows: int = OUTPUT_BATCH_ROWS, progress: bool = True,
    score: Callable[[pl.DataFrame], object] | None = None,
) -> int:
    """Score every row of the Parquet file `source` (local or s3://) and write `target`: the
    request's key columns and `pctr`, in the source's row order. `score` is the ranker's own unless
    given (an onnxruntime session's, say). Returns the row count; a RequestError names the column
    at fault, a missing one before any row is read."""
    score = score or ranker.score
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source} does not exist")
    with fs.open(path, "rb") as handle:
        file = pq.ParquetFile(handle)
        present = file.schema_arrow.names
        missing = ranker.missing_columns(present)
        if missing:
            raise RequestError(missing[0], f"{source} lacks {', '.join(missing)}; the model reads {', '.join(ranker.columns())}")
        wanted = [c for c in (*ranker.columns(), *ranker.optional_columns(), *KEY_COLUMNS) if c in present]
        keys = [c for c in KEY_COLUMNS if c in present]
        total = file.metadata.num_rows

        def write(out) -> None:
            writer = None
            done = 0
            with tqdm(total=total, unit="rows", desc=f"scoring {source}", disable=not progress, unit_scale=True) as bar:
                for record_batch in file.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(wanted))):
                    rows = pl.from_arrow(record_batch)
                    try:
                        pctr = score(rows)
                    except RequestError as error:
                        raise RequestError(error.column, f"{source}, rows {done}..{done + rows.height - 1}: {error}") from None
                    table = rows.select(keys).with_columns(pl.Series("pctr", pctr, dtype=pl.Float32)).to_arrow()
                    writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
                    writer.write_table(table)
                    done += rows.height
                    bar.update(rows.height)
            if writer is None:  # no rows: still a file with the output's columns
                schema = pa.schema([file.schema_arrow.field(c) for c in keys] + [pa.field("pctr", pa.float32())])
                writer = pq.ParquetWriter(out, schema)
            writer.close()

        write_atomic(target, write)
    return total

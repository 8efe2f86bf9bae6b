"""Every violation of the raw input contract is refused with file, column and problem named,
and leaves the outputs of the previous good run untouched."""

import datetime as dt
from pathlib import Path
from typing import Callable

import dagster as dg
import polars as pl
import pytest

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.raw import impressions, item_catalog, user_profiles
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage

DAYS = [dt.date(2025, 7, 1) + dt.timedelta(days=i) for i in range(4)]
EVAL_DAY = DAYS[-1]


def _day_frame(day: dt.date) -> pl.DataFrame:
    """Six users clicking overlapping items in sessions, plus some non-clicks."""
    rows = []
    for user in range(6):
        for k, item in enumerate([10 + user % 2, 20, 30 + day.day % 3, 40]):
            ts = dt.datetime(day.year, day.month, day.day, 8 + user, 5 * k, tzinfo=dt.timezone.utc)
            rows.append((user, item, ts, int(k < 3)))
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us", "UTC"), "clicked": pl.Int8}, orient="row")


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)


def _day_file(root: Path, day: dt.date) -> Path:
    return root / "impressions" / f"date={day.isoformat()}" / "part-0.parquet"


@pytest.fixture
def raw_root(tmp_path) -> Path:
    root = tmp_path / "raw"
    for day in DAYS:
        _write(_day_frame(day), _day_file(root, day))
    items = pl.DataFrame({"item_id": [10, 11, 20, 30, 31, 32, 40], "title": ["a", "b", "c", None, "e", "f", "g"]})
    _write(items, root / "items" / "part-0.parquet")
    _write(pl.DataFrame({"user_id": range(6), "segment": ["x", "y"] * 3}), root / "users" / "part-0.parquet")
    return root


def _materialize(raw_root: Path, storage: ParquetStorage) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [impressions, item_catalog, user_profiles, coclick_pairs],
        partition_key=EVAL_DAY.isoformat(),
        resources={
            "raw": RawStore(root=str(raw_root)),
            "window": TrainEvalWindow(train_days=3, eval_days=1),
            "parquet_io_manager": ParquetIOManager(storage=storage),
        },
        raise_on_error=False,
    )


def _failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {e.step_key: e.step_failure_data.error.to_string() for e in result.get_step_failure_events()}


def _drop_column(path: Path, column: str) -> None:
    _write(pl.read_parquet(path).drop(column), path)


def _set_first(path: Path, column: str, value, dtype: pl.DataType) -> None:
    frame = pl.read_parquet(path)
    values = frame[column].cast(dtype).to_list()
    values[0] = value
    _write(frame.with_columns(pl.Series(column, values, dtype=dtype)), path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not parquet")


def _move_first_row_a_day_earlier(path: Path) -> None:
    frame = pl.read_parquet(path)
    shifted = frame["ts"].to_list()
    shifted[0] -= dt.timedelta(days=1)
    _write(frame.with_columns(pl.Series("ts", shifted, dtype=pl.Datetime("us", "UTC"))), path)


def _remove_folder(path: Path) -> None:
    path.unlink()
    path.parent.rmdir()


TRAIN_DAY = DAYS[1]
# (what breaks, the step that refuses it, column named in the error, problem named in the error)
CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path], Path], str, str | None, str]] = {
    "missing column": (lambda p: _drop_column(p, "clicked"), lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", "clicked", "missing required column"),
    "wrong type": (lambda p: _write(pl.read_parquet(p).with_columns(pl.col("item_id").cast(pl.String)), p), lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", "item_id", "expected int64"),
    "null id": (lambda p: _set_first(p, "user_id", None, pl.Int64), lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", "user_id", "1 null id(s)"),
    "clicked not 0/1": (lambda p: _set_first(p, "clicked", 2, pl.Int8), lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", "clicked", "not 0/1, e.g. 2"),
    "row on another day": (_move_first_row_a_day_earlier, lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", "ts", f"1 row(s) not on {TRAIN_DAY}"),
    "unreadable file": (_garbage, lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", None, "unreadable Parquet file"),
    "missing day folder": (_remove_folder, lambda r: _day_file(r, TRAIN_DAY), "coclick_pairs", None, "no Parquet files"),
    "broken evaluation day": (lambda p: _set_first(p, "clicked", 7, pl.Int8), lambda r: _day_file(r, EVAL_DAY), "impressions", "clicked", "not 0/1, e.g. 7"),
    "catalog without title": (lambda p: _drop_column(p, "title"), lambda r: r / "items" / "part-0.parquet", "item_catalog", "title", "missing required column"),
    "duplicate item ids": (lambda p: _set_first(p, "item_id", 20, pl.Int64), lambda r: r / "items" / "part-0.parquet", "item_catalog", "item_id", "1 duplicated id(s), e.g. 20"),
    "user profile with null id": (lambda p: _set_first(p, "user_id", None, pl.Int64), lambda r: r / "users" / "part-0.parquet", "user_profiles", "user_id", "1 null id(s)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_by_name_and_keeps_earlier_outputs(case, raw_root, tmp_path):
    storage = ParquetStorage(root=str(tmp_path / "storage"))
    assert _materialize(raw_root, storage).success
    output = Path(storage.uri("coclick_pairs", EVAL_DAY.isoformat()))
    before = (output.read_bytes(), output.stat().st_mtime_ns)
    assert pl.read_parquet(output).height > 0

    corrupt, target, failing_step, column, problem = CASES[case]
    bad_file = target(raw_root)
    corrupt(bad_file)
    result = _materialize(raw_root, storage)

    assert not result.success
    failures = _failures(result)
    assert failing_step in failures, f"expected {failing_step} to fail, failures: {list(failures)}"
    message = failures[failing_step]
    where = str(bad_file.parent) if case == "missing day folder" else str(bad_file)
    assert where in message
    assert (f"column '{column}'" if column else "file") in message
    assert problem in message
    if failing_step in ("impressions", "coclick_pairs"):
        # The previous good output downstream of the impressions is still there, untouched.
        assert (output.read_bytes(), output.stat().st_mtime_ns) == before


def test_failed_rules_show_as_asset_checks(raw_root, tmp_path):
    _set_first(_day_file(raw_root, EVAL_DAY), "user_id", None, pl.Int64)
    result = _materialize(raw_root, ParquetStorage(root=str(tmp_path / "storage")))
    outcomes = {e.check_name: e.passed for e in result.get_asset_check_evaluations() if e.asset_key == dg.AssetKey("impressions")}
    assert outcomes["null_ids"] is False
    assert outcomes["schema"] is True and outcomes["clicked_domain"] is True and outcomes["rows_on_day"] is True


def test_duplicate_impressions_are_dropped_and_reported(raw_root, tmp_path):
    path = _day_file(raw_root, EVAL_DAY)
    frame = pl.read_parquet(path)
    _write(pl.concat([frame, frame.head(2)]), path)
    result = _materialize(raw_root, ParquetStorage(root=str(tmp_path / "storage")))
    assert result.success
    duplicates = [e for e in result.get_asset_check_evaluations() if e.check_name == "duplicate_impressions"]
    assert [e.passed for e in duplicates] == [False]
    rows = result.asset_materializations_for_node("impressions")[0].metadata["rows"].value
    assert rows == frame.height

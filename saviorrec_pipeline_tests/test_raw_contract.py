"""The bad-input corpus: every violation of the raw input contract is refused with file, column
and problem named, and leaves every output of the previous good run untouched; every tolerated
oddity (empty day, day without clicks, unknown item, zoned timestamps, stray files) gives the
documented result, counted in metadata. In both, a re-run on the fixed input succeeds and writes
the good outputs again."""

import datetime as dt
import io
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import dagster as dg
import polars as pl
import pytest
from PIL import Image

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.ranking_dataset import ranking_dataset
from saviorrec_pipeline.assets.raw import impressions, item_catalog, user_profiles
from saviorrec_pipeline.contract import ITEMS, OVERSIZED, RULE_IMAGE_DECODABLE, image_problem, value_violations
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.coclick import CoclickParams
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline_tests.test_coclick import brute_force

pytestmark = pytest.mark.unit

DAYS = [dt.date(2025, 7, 1) + dt.timedelta(days=i) for i in range(4)]
EVAL_DAY = DAYS[-1]
TRAIN_DAYS = DAYS[:-1]
TRAIN_DAY = DAYS[1]
UTC_TS = pl.Datetime("us", "UTC")


def _day_frame(day: dt.date) -> pl.DataFrame:
    """Six users clicking overlapping items in sessions, plus some non-clicks."""
    rows = []
    for user in range(6):
        for k, item in enumerate([10 + user % 2, 20, 30 + day.day % 3, 40]):
            ts = dt.datetime(day.year, day.month, day.day, 8 + user, 5 * k, tzinfo=dt.timezone.utc)
            rows.append((user, item, ts, int(k < 3)))
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": UTC_TS, "clicked": pl.Int8}, orient="row")


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def _encoded(picture: Image.Image, image_format: str, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, format=image_format, **options)
    return out.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header declares `width` x `height` pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)


def _day_file(root: Path, day: dt.date) -> Path:
    return root / "impressions" / f"date={day.isoformat()}" / "part-0.parquet"


def _items_file(root: Path) -> Path:
    return root / "items" / "part-0.parquet"


@pytest.fixture
def raw_root(tmp_path) -> Path:
    root = tmp_path / "raw"
    for day in DAYS:
        _write(_day_frame(day), _day_file(root, day))
    png = _png()
    # As in the demo data: some items lack an image or a title, none both.
    items = pl.DataFrame(
        {
            "item_id": [10, 11, 20, 30, 31, 32, 40],
            "title": ["a", "b", "c", None, "e", "f", "g"],
            "image": [png, None, png, png, None, png, None],
        }
    )
    _write(items, _items_file(root))
    _write(pl.DataFrame({"user_id": range(6), "segment": ["x", "y"] * 3}), root / "users" / "part-0.parquet")
    return root


def _materialize(raw_root: Path, storage: ParquetStorage) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [impressions, item_catalog, user_profiles, coclick_pairs, ranking_dataset],
        partition_key=EVAL_DAY.isoformat(),
        resources={
            "raw": RawStore(root=str(raw_root)),
            "window": TrainEvalWindow(train_days=len(TRAIN_DAYS), eval_days=1), "compute": Compute(),
            "parquet_io_manager": ParquetIOManager(storage=storage),
        },
        raise_on_error=False,
    )


def _outputs(storage: ParquetStorage) -> dict[str, tuple[bytes, int]]:
    """Every file under the storage root (stage outputs, and any temporary left behind): bytes, mtime."""
    root = Path(storage.root)
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _contents(outputs: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    return {name: data for name, (data, _) in outputs.items()}


def _failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {e.step_key: e.step_failure_data.error.to_string() for e in result.get_step_failure_events()}


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


class Snapshot(NamedTuple):
    """The good run's raw input (a copy) and outputs, to break the input and then fix it."""

    raw_root: Path
    good_raw: Path
    storage: ParquetStorage
    outputs: dict[str, tuple[bytes, int]]

    def fix_and_rerun(self) -> None:
        shutil.rmtree(self.raw_root)
        shutil.copytree(self.good_raw, self.raw_root)
        result = _materialize(self.raw_root, self.storage)
        assert result.success, _failures(result)
        assert _contents(_outputs(self.storage)) == _contents(self.outputs)


@pytest.fixture
def good_run(raw_root, tmp_path) -> Snapshot:
    storage = ParquetStorage(root=str(tmp_path / "storage"))
    assert _materialize(raw_root, storage).success
    outputs = _outputs(storage)
    assert sorted(outputs) == [f"coclick_pairs/{EVAL_DAY}.parquet", f"ranking_dataset/{EVAL_DAY}.parquet"]
    assert pl.read_parquet(Path(storage.uri("coclick_pairs", EVAL_DAY.isoformat()))).height > 0
    good_raw = tmp_path / "good-raw"
    shutil.copytree(raw_root, good_raw)
    return Snapshot(raw_root, good_raw, storage, outputs)


# ---- input that breaks the contract: refused ---------------------------------------------------


def _drop_column(path: Path, column: str) -> None:
    _write(pl.read_parquet(path).drop(column), path)


def _set(path: Path, column: str, row: int, value, dtype: pl.DataType) -> None:
    frame = pl.read_parquet(path)
    values = frame[column].cast(dtype).to_list()
    values[row] = value
    _write(frame.with_columns(pl.Series(column, values, dtype=dtype)), path)


def _set_first(path: Path, column: str, value, dtype: pl.DataType) -> None:
    _set(path, column, 0, value, dtype)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not parquet")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _move_first_row_a_day_earlier(path: Path) -> None:
    frame = pl.read_parquet(path)
    shifted = frame["ts"].to_list()
    shifted[0] -= dt.timedelta(days=1)
    _write(frame.with_columns(pl.Series("ts", shifted, dtype=UTC_TS)), path)


def _tokyo_local_day_not_utc_day(path: Path) -> None:
    """Tokyo-zoned stamps; the first row at 05:00 Tokyo on the folder's day, 20:00 UTC the day before
    (the mistake of a writer that partitions by local date)."""
    frame = pl.read_parquet(path).with_columns(pl.col("ts").dt.convert_time_zone("Asia/Tokyo"))
    stamps = frame["ts"].to_list()
    stamps[0] = dt.datetime.combine(TRAIN_DAY, dt.time(5), tzinfo=stamps[0].tzinfo)
    _write(frame.with_columns(pl.Series("ts", stamps, dtype=pl.Datetime("us", "Asia/Tokyo"))), path)


def _remove_folder(path: Path) -> None:
    path.unlink()
    path.parent.rmdir()


def _only_a_marker(path: Path) -> None:
    path.unlink()
    (path.parent / "_SUCCESS").write_bytes(b"")


def _images_that_are_not_images(path: Path) -> None:
    """Items 10, 20 and 30 (rows 0, 2, 3): bytes that are no image, a PNG cut in half, a GIF."""
    png = _encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")
    gif = _encoded(Image.new("RGB", (8, 8)), "GIF")
    for row, data in ((0, b"not an image"), (2, png[: len(png) // 2]), (3, gif)):
        _set(path, "image", row, data, pl.Binary)


class Refused(NamedTuple):
    target: Callable[[Path], Path]  # the file broken, given the raw root
    corrupt: Callable[[Path], None]
    step: str  # the step that refuses it
    column: str | None  # the column named in the error (None: the file as a whole)
    problem: str  # named in the error
    names_folder: bool = False  # the error names the file's folder (no data file left in it)


def _train_file(root: Path) -> Path:
    return _day_file(root, TRAIN_DAY)


REFUSED: dict[str, Refused] = {
    "missing column": Refused(_train_file, lambda p: _drop_column(p, "clicked"), "coclick_pairs", "clicked", "missing required column"),
    "wrong type": Refused(_train_file, lambda p: _write(pl.read_parquet(p).with_columns(pl.col("item_id").cast(pl.String)), p), "coclick_pairs", "item_id", "expected int64"),
    "null id": Refused(_train_file, lambda p: _set_first(p, "user_id", None, pl.Int64), "coclick_pairs", "user_id", "1 null id(s)"),
    "clicked not 0/1": Refused(_train_file, lambda p: _set_first(p, "clicked", 2, pl.Int8), "coclick_pairs", "clicked", "not 0/1, e.g. 2"),
    "row on another day": Refused(_train_file, _move_first_row_a_day_earlier, "coclick_pairs", "ts", f"1 row(s) not on {TRAIN_DAY}"),
    "zoned row on another UTC day": Refused(_train_file, _tokyo_local_day_not_utc_day, "coclick_pairs", "ts", f"1 row(s) not on {TRAIN_DAY} (UTC), e.g. {TRAIN_DAY - dt.timedelta(days=1)} 20:00:00+00:00"),
    "unreadable file": Refused(_train_file, _garbage, "coclick_pairs", None, "unreadable Parquet file"),
    "truncated Parquet file": Refused(_train_file, _truncate, "coclick_pairs", None, "unreadable Parquet file"),
    "missing day folder": Refused(_train_file, _remove_folder, "coclick_pairs", None, "no Parquet files", names_folder=True),
    "day folder with only a marker file": Refused(_train_file, _only_a_marker, "coclick_pairs", None, "no Parquet files (*.parquet) found (skipped: _SUCCESS)", names_folder=True),
    "broken evaluation day": Refused(lambda r: _day_file(r, EVAL_DAY), lambda p: _set_first(p, "clicked", 7, pl.Int8), "impressions", "clicked", "not 0/1, e.g. 7"),
    "catalog without title": Refused(_items_file, lambda p: _drop_column(p, "title"), "item_catalog", "title", "missing required column"),
    "duplicate item ids": Refused(_items_file, lambda p: _set_first(p, "item_id", 20, pl.Int64), "item_catalog", "item_id", "1 duplicated id(s), e.g. 20"),
    # Item 31 has no image; with its title gone (null or blank) there is nothing to embed it from.
    "item without image and title": Refused(_items_file, lambda p: _set(p, "title", 4, None, pl.String), "item_catalog", "title", "1 item(s) with neither a title nor an image, e.g. item_id 31"),
    "item with blank title and no image": Refused(_items_file, lambda p: _set(p, "title", 4, "  ", pl.String), "item_catalog", "title", "1 item(s) with neither a title nor an image, e.g. item_id 31"),
    "images that do not decode": Refused(_items_file, _images_that_are_not_images, "item_catalog", "image", "3 image(s) that do not decode as PNG or JPEG: item_id 10, 20, 30"),
    "decompression bomb image": Refused(_items_file, lambda p: _set(p, "image", 5, _png_declaring(20_000, 20_000), pl.Binary), "item_catalog", "image", "1 image(s) that are larger than 4096x4096 pixels: item_id 32 (a decompression bomb)"),
    "user profile with null id": Refused(lambda r: r / "users" / "part-0.parquet", lambda p: _set_first(p, "user_id", None, pl.Int64), "user_profiles", "user_id", "1 null id(s)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_input_is_refused_by_name_keeps_earlier_outputs_and_reruns_once_fixed(case, good_run):
    bad = REFUSED[case]
    bad_file = bad.target(good_run.raw_root)
    bad.corrupt(bad_file)
    result = _materialize(good_run.raw_root, good_run.storage)

    assert not result.success
    failures = _failures(result)
    assert bad.step in failures, f"expected {bad.step} to fail, failures: {list(failures)}"
    message = failures[bad.step]
    assert str(bad_file.parent if bad.names_folder else bad_file) in message
    assert (f"column '{bad.column}'" if bad.column else "file") in message
    assert bad.problem in message
    # Every output of the good run is still there, byte for byte, and nothing else was written;
    # those of the steps that failed (or were skipped after a failure) were not even rewritten.
    after = _outputs(good_run.storage)
    assert _contents(after) == _contents(good_run.outputs)
    rewritten = {name for name in after if result.asset_materializations_for_node(name.split("/")[0])}
    assert {n: after[n] for n in after if n not in rewritten} == {n: good_run.outputs[n] for n in after if n not in rewritten}

    good_run.fix_and_rerun()


def test_failed_rules_show_as_asset_checks(raw_root, tmp_path):
    _set_first(_day_file(raw_root, EVAL_DAY), "user_id", None, pl.Int64)
    _set(_items_file(raw_root), "title", 4, None, pl.String)
    _set(_items_file(raw_root), "image", 0, b"not an image", pl.Binary)
    result = _materialize(raw_root, ParquetStorage(root=str(tmp_path / "storage")))
    outcomes = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert outcomes[("impressions", "null_ids")] is False
    assert outcomes[("impressions", "schema")] and outcomes[("impressions", "clicked_domain")] and outcomes[("impressions", "rows_on_day")]
    assert outcomes[("item_catalog", "image_or_title")] is False
    assert outcomes[("item_catalog", "image_decodable")] is False
    assert outcomes[("item_catalog", "unique_ids")] is True
    assert ("user_profiles", "image_or_title") not in outcomes


def test_images_over_the_size_limit_are_refused_from_their_header():
    """The limit is 4096 pixels a side, checked before any pixel is decoded; a bomb past Pillow's
    own limit is refused as one."""
    at_limit = _encoded(Image.new("1", (4096, 4096)), "PNG")
    over = _encoded(Image.new("1", (5000, 40)), "PNG")
    jpeg = _encoded(Image.new("RGB", (4096, 16)), "JPEG")
    assert image_problem(at_limit) is None and image_problem(jpeg) is None
    assert image_problem(over) == (OVERSIZED, "5000x40")
    assert image_problem(_png_declaring(4097, 4097)) == (OVERSIZED, "4097x4097")
    assert image_problem(_png_declaring(20_000, 20_000)) == (OVERSIZED, "a decompression bomb")


def test_every_bad_image_is_named_up_to_fifty_ids_and_a_count_of_the_rest():
    items = pl.DataFrame({"item_id": range(100, 160), "title": "t", "image": [_png()] * 5 + [b"junk"] * 55})
    [violation] = value_violations(ITEMS, items, "items/part-0.parquet")
    assert (violation.rule, violation.file, violation.column) == (RULE_IMAGE_DECODABLE, "items/part-0.parquet", "image")
    listed = ", ".join(str(item) for item in range(105, 155))
    assert violation.problem == f"55 image(s) that do not decode as PNG or JPEG: item_id {listed} and 5 more"


def test_every_missing_day_of_a_window_is_named_at_once_with_how_to_declare_an_empty_day(tmp_path):
    """Day folders without data have not landed: the stages that read the window refuse it, each
    naming every missing day and how to declare a day that had no traffic, and write nothing.
    Declared as empty files, the same days are read as days with no rows."""
    raw = tmp_path / "raw"
    generate_demo(raw, DemoSpec(start_date=DAYS[0], days=len(DAYS), users=150, items=200, seed=5))
    storage = ParquetStorage(root=str(tmp_path / "storage"))
    assert _materialize(raw, storage).success
    before = _outputs(storage)
    missing = [TRAIN_DAYS[0], TRAIN_DAYS[2]]
    for day in missing:
        shutil.rmtree(_day_file(raw, day).parent)

    result = _materialize(raw, storage)
    failures = _failures(result)
    assert sorted(failures) == ["coclick_pairs", "ranking_dataset"]
    for message in failures.values():
        for day in missing:
            assert f"{_day_file(raw, day).parent}: file: no Parquet files (*.parquet) found" in message
        assert f"2 day(s) with no data file: {missing[0]}, {missing[1]}." in message
        assert "to declare a day with no traffic, write a Parquet file with the impression columns" in message
        assert "and no rows into impressions/date=YYYY-MM-DD/" in message
    assert _outputs(storage) == before

    for day in missing:
        _write(_day_frame(day).head(0), _day_file(raw, day))
    declared = _materialize(raw, storage)
    assert declared.success, _failures(declared)
    assert _metadata(declared, "ranking_dataset")["window"].startswith(f"train {TRAIN_DAYS[0]} ..")


# ---- input the contract tolerates: the documented result, counted in metadata -------------------


def _tolerated(good_run: Snapshot, change: Callable[[Path], None]) -> tuple[dg.ExecuteInProcessResult, dict[str, bytes], dict]:
    """Run on the changed input (it must succeed), then on the original again (the good outputs
    come back). Returns the changed run, its outputs, and the co-click pairs a brute-force reading
    of its raw files expects."""
    change(good_run.raw_root)
    result = _materialize(good_run.raw_root, good_run.storage)
    assert result.success, _failures(result)
    outputs = _contents(_outputs(good_run.storage))
    expected = _expected_pairs(good_run.raw_root)
    good_run.fix_and_rerun()
    return result, outputs, expected


def _training_clicks(raw_root: Path) -> list[tuple[int, int, dt.datetime]]:
    frames = [pl.read_parquet(path) for day in TRAIN_DAYS for path in sorted(_day_file(raw_root, day).parent.glob("*.parquet"))]
    clicks = pl.concat([f.with_columns(pl.col("ts").dt.convert_time_zone("UTC")) for f in frames]).filter(pl.col("clicked") == 1)
    return list(clicks.select("user_id", "item_id", "ts").iter_rows())


def _expected_pairs(raw_root: Path) -> dict[tuple[int, int], int]:
    return brute_force(_training_clicks(raw_root), CoclickParams())


def _pairs(outputs: dict[str, bytes]) -> dict[tuple[int, int], int]:
    frame = pl.read_parquet(io.BytesIO(outputs[f"coclick_pairs/{EVAL_DAY}.parquet"]))
    return {(a, b): s for a, b, s in frame.iter_rows()}


def test_empty_training_day_is_legal_and_mines_no_pairs_from_it(good_run):
    def empty(root: Path) -> None:
        _write(_day_frame(TRAIN_DAY).head(0), _day_file(root, TRAIN_DAY))

    result, outputs, expected = _tolerated(good_run, empty)
    assert _pairs(outputs) == expected != _pairs(_contents(good_run.outputs))
    assert _metadata(result, "coclick_pairs")["click_events"] == 3 * 6 * (len(TRAIN_DAYS) - 1)


def test_empty_evaluation_day_is_read_as_zero_rows_and_leaves_nothing_to_evaluate(good_run):
    """The impressions asset accepts the empty day (rows 0); ranking_dataset, which needs impressions
    to evaluate, refuses it by name and keeps its earlier output; the fixed day re-runs."""
    _write(_day_frame(EVAL_DAY).head(0), _day_file(good_run.raw_root, EVAL_DAY))
    result = _materialize(good_run.raw_root, good_run.storage)
    meta = _metadata(result, "impressions")
    assert (meta["rows"], meta["clicks"], meta["files"]) == (0, 0, 1)
    assert list(_failures(result)) == ["ranking_dataset"]
    assert "no impressions in the evaluation window" in _failures(result)["ranking_dataset"]
    ranking = f"ranking_dataset/{EVAL_DAY}.parquet"
    assert _outputs(good_run.storage)[ranking] == good_run.outputs[ranking]
    good_run.fix_and_rerun()


def test_day_without_clicks_mines_no_pairs_from_it(good_run):
    def no_clicks(root: Path) -> None:
        path = _day_file(root, TRAIN_DAY)
        _write(pl.read_parquet(path).with_columns(pl.lit(0, pl.Int8).alias("clicked")), path)

    result, outputs, expected = _tolerated(good_run, no_clicks)
    assert _pairs(outputs) == expected != _pairs(_contents(good_run.outputs))
    assert _metadata(result, "coclick_pairs")["click_events"] == 3 * 6 * (len(TRAIN_DAYS) - 1)


UNKNOWN_ITEM = 99


def test_impressions_of_unknown_items_are_mined_and_dropped_from_ranking_counted(good_run):
    """Co-click mining reads clicks alone, so an item missing from the catalog still forms pairs
    (the encoder keeps only pairs of catalog items); ranking_dataset drops its impressions and
    counts them."""

    def unknown_item(root: Path) -> None:
        for day, users in ((TRAIN_DAY, range(3)), (EVAL_DAY, range(1))):
            path = _day_file(root, day)
            extra = [(u, UNKNOWN_ITEM, dt.datetime.combine(day, dt.time(8 + u, 20), tzinfo=dt.timezone.utc), 1) for u in users]
            added = pl.DataFrame(extra, schema=pl.read_parquet_schema(path), orient="row")
            _write(pl.concat([pl.read_parquet(path), added]), path)

    result, outputs, expected = _tolerated(good_run, unknown_item)
    pairs = _pairs(outputs)
    assert pairs == expected
    assert any(UNKNOWN_ITEM in pair for pair in pairs)
    assert _metadata(result, "ranking_dataset")["dropped_unknown_item_impressions"] == 4
    ranking = pl.read_parquet(io.BytesIO(outputs[f"ranking_dataset/{EVAL_DAY}.parquet"]))
    assert UNKNOWN_ITEM not in ranking["item_id"].to_list()


def test_zoned_timestamps_are_read_as_their_utc_instants(good_run):
    """Kiritimati is UTC+14: most of these rows fall on the next local date, all on the folder's
    UTC day. The outputs are those of the same instants written in UTC, byte for byte."""

    def zoned(root: Path) -> None:
        for day in (TRAIN_DAY, EVAL_DAY):
            path = _day_file(root, day)
            frame = pl.read_parquet(path).with_columns(pl.col("ts").dt.convert_time_zone("Pacific/Kiritimati"))
            assert (frame["ts"].dt.date() != day).any()
            _write(frame, path)

    _, outputs, _ = _tolerated(good_run, zoned)
    assert outputs == _contents(good_run.outputs)


def test_files_that_are_not_parquet_data_are_skipped_and_listed(good_run):
    """Spark's `_SUCCESS`, checksum files and notes beside the data are not read; each raw asset
    names what it skipped."""

    def stray_files(root: Path) -> None:
        for folder in (_day_file(root, EVAL_DAY).parent, _day_file(root, TRAIN_DAY).parent, root / "items"):
            (folder / "_SUCCESS").write_bytes(b"")
            (folder / ".part-0.parquet.crc").write_bytes(b"crc")
        (_day_file(root, EVAL_DAY).parent / "notes.txt").write_text("loaded by hand")

    result, outputs, _ = _tolerated(good_run, stray_files)
    assert outputs == _contents(good_run.outputs)
    day_meta, item_meta = _metadata(result, "impressions"), _metadata(result, "item_catalog")
    assert (day_meta["files"], day_meta["ignored_files"], day_meta["ignored_file_names"]) == (1, 3, ".part-0.parquet.crc, _SUCCESS, notes.txt")
    assert (item_meta["ignored_files"], item_meta["ignored_file_names"]) == (2, ".part-0.parquet.crc, _SUCCESS")
    assert _metadata(result, "user_profiles")["ignored_files"] == 0


def test_duplicate_impressions_are_dropped_and_reported(raw_root, tmp_path):
    path = _day_file(raw_root, EVAL_DAY)
    frame = pl.read_parquet(path)
    _write(pl.concat([frame, frame.head(2)]), path)
    result = _materialize(raw_root, ParquetStorage(root=str(tmp_path / "storage")))
    assert result.success
    duplicates = [e for e in result.get_asset_check_evaluations() if e.check_name == "duplicate_impressions"]
    assert [e.passed for e in duplicates] == [False]
    assert _metadata(result, "impressions")["rows"] == frame.height

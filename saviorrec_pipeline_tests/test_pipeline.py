"""The asset graph materialized through Dagster on demo data, on local disk and on a real S3 server."""

import datetime as dt
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.raw import impressions, item_catalog, user_profiles
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.coclick import mine_coclick_pairs
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage, filesystem

pytestmark = pytest.mark.integration

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=6, users=300, items=400, seed=11)
EVAL_DAY = SPEC.start_date + dt.timedelta(days=SPEC.days - 1)
WINDOW = TrainEvalWindow(train_days=SPEC.days - 1, eval_days=1)


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "raw"
    generate_demo(root, SPEC)
    return root


def _expected_pairs(raw: Path) -> pl.DataFrame:
    """The training window's clicks read straight from the files, mined directly."""
    days = [SPEC.start_date + dt.timedelta(days=i) for i in range(SPEC.days - 1)]
    clicks = pl.concat(
        pl.read_parquet(raw / "impressions" / f"date={d}" / "*.parquet").filter(pl.col("clicked") == 1) for d in days
    )
    return mine_coclick_pairs(clicks.unique(["user_id", "item_id", "ts"]))


def _materialize(raw_root: str, storage: ParquetStorage) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [impressions, item_catalog, user_profiles, coclick_pairs],
        partition_key=EVAL_DAY.isoformat(),
        resources={"raw": RawStore(root=raw_root), "window": WINDOW, "compute": Compute(), "parquet_io_manager": ParquetIOManager(storage=storage)},
    )


def _check_run(result: dg.ExecuteInProcessResult, expected: pl.DataFrame, storage: ParquetStorage) -> pl.DataFrame:
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    pairs = storage.read("coclick_pairs", EVAL_DAY.isoformat())
    assert pairs.height > 0
    assert pairs.equals(expected)
    metadata = result.asset_materializations_for_node("coclick_pairs")[0].metadata
    assert metadata["pairs_kept"].value == pairs.height
    for key in ("click_events", "support_distribution", "seconds", "peak_rss_mib", "click_events_per_s"):
        assert key in metadata
    return pairs


def test_materialize_on_local_storage_and_again_identically(demo_raw, tmp_path):
    storage = ParquetStorage(root=str(tmp_path / "storage"))
    expected = _expected_pairs(demo_raw)
    first = _check_run(_materialize(str(demo_raw), storage), expected, storage)
    second = _check_run(_materialize(str(demo_raw), storage), expected, storage)
    assert first.equals(second)
    assert sorted(p.name for p in (tmp_path / "storage" / "coclick_pairs").iterdir()) == [f"{EVAL_DAY}.parquet"]


def test_materialize_on_s3(demo_raw, s3_root):
    fs, path = filesystem(s3_root)
    fs.put(str(demo_raw), f"{path}/raw", recursive=True)
    storage = ParquetStorage(root=f"{s3_root}/storage")
    _check_run(_materialize(f"{s3_root}/raw", storage), _expected_pairs(demo_raw), storage)
    assert fs.exists(f"{path}/storage/coclick_pairs/{EVAL_DAY}.parquet")

"""The commands users type, run as subprocesses: demo generation, the demo, a CLI backfill."""

import datetime as dt
import subprocess
from pathlib import Path

import polars as pl
import pytest

from saviorrec_pipeline.method.coclick import mine_coclick_pairs
from saviorrec_pipeline_tests.services import executable, project_env

pytestmark = pytest.mark.integration

START = dt.date(2025, 7, 1)
DAYS = 5
LAST_DAY = START + dt.timedelta(days=DAYS - 1)
SIZE = ["--days", str(DAYS), "--users", "200", "--items", "300", "--seed", "5"]


def _env(home: Path) -> dict[str, str]:
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    return project_env(home, START, train_days=DAYS - 1)


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _mined_directly(raw: Path) -> pl.DataFrame:
    days = [START + dt.timedelta(days=i) for i in range(DAYS - 1)]
    clicks = pl.concat(pl.read_parquet(raw / "impressions" / f"date={d}" / "*.parquet") for d in days)
    return mine_coclick_pairs(clicks.filter(pl.col("clicked") == 1).unique(["user_id", "item_id", "ts"]))


def test_generate_demo_then_backfill_one_partition_from_the_dagster_cli(tmp_path):
    env = _env(tmp_path / "home")
    raw = tmp_path / "home" / "raw"
    out = _run([executable("saviorrec"), "generate-demo", "--out", str(raw), "--start-date", START.isoformat(), *SIZE], env, tmp_path)
    assert "impressions" in out.stdout
    assert sorted(p.name for p in (raw / "impressions").iterdir())[-1] == f"date={LAST_DAY}"

    _run(
        [executable("dagster"), "asset", "materialize", "-m", "saviorrec_pipeline.definitions",
         "--select", "coclick_pairs", "--partition", LAST_DAY.isoformat()],
        env, tmp_path,
    )
    pairs = pl.read_parquet(tmp_path / "home" / "storage" / "coclick_pairs" / f"{LAST_DAY}.parquet")
    assert pairs.height > 0
    assert pairs.equals(_mined_directly(raw))


def test_demo_command_generates_runs_the_chain_and_summarises(tmp_path):
    env = _env(tmp_path / "home")
    out = _run([executable("saviorrec"), "demo", "--start-date", START.isoformat(), *SIZE], env, tmp_path)
    assert f"partition {LAST_DAY}: succeeded" in out.stdout
    for asset in ("impressions", "item_catalog", "user_profiles", "coclick_pairs", "semantic_ids", "ranking_dataset", "ctr_model", "champion_gate", "auc_report"):
        assert f"  {asset}:" in out.stdout
    assert "AUC (%) by item-PV bucket" in out.stdout and "| saviorrec |" in out.stdout
    assert "base64" not in out.stdout  # the chart stays in the UI
    # The first model becomes champion; the demo says so, and which version is in use.
    assert f"champion gate for {LAST_DAY}: promoted: no champion yet" in out.stdout and "in use: models:/saviorrec-ctr/1" in out.stdout
    assert (tmp_path / "home" / "storage" / "coclick_pairs" / f"{LAST_DAY}.parquet").exists()

"""Operations: the daily schedule, the raw-day sensor, the training pool."""

import pytest
import datetime as dt
import os
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl

from saviorrec_pipeline.definitions import defs
from saviorrec_pipeline.assets.common import TRAINING_POOL
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.sensors import raw_day_landed
from saviorrec_pipeline_tests.deployment_files import REPO
from saviorrec_pipeline_tests.services import executable


@pytest.mark.unit
def test_daily_retrain_requests_yesterdays_partition_of_the_whole_chain():
    schedule = defs.get_schedule_def("daily_retrain")
    assert schedule.job_name == "saviorrec_chain" and schedule.cron_schedule == "0 2 * * *"
    context = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2025, 7, 23, 2, tzinfo=dt.timezone.utc))
    (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == "2025-07-22"
    assert request.tags["saviorrec/trigger"] == "daily_retrain"


@pytest.mark.integration
def test_schedule_is_listed_by_the_dagster_cli(tmp_path):
    result = subprocess.run(
        [executable("dagster"), "schedule", "list", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "daily_retrain" in result.stdout


def _land(raw: Path, day: str, with_file: bool = True) -> None:
    folder = raw / "impressions" / f"date={day}"
    folder.mkdir(parents=True)
    if with_file:
        pl.DataFrame({"user_id": [1]}).write_parquet(folder / "part-0.parquet")


@pytest.mark.unit
def test_sensor_is_off_by_default_and_requests_each_landed_day_once(tmp_path):
    assert raw_day_landed.default_status == dg.DefaultSensorStatus.STOPPED
    raw = tmp_path / "raw"
    store = RawStore(root=str(raw))
    _land(raw, "2025-07-20")
    _land(raw, "2025-07-21")
    _land(raw, "2025-07-22", with_file=False)  # still being written: no Parquet yet
    (raw / "impressions" / "_tmp").mkdir()

    first = raw_day_landed(dg.build_sensor_context(resources={"raw": store}))
    assert [r.partition_key for r in first.run_requests] == ["2025-07-20", "2025-07-21"]
    assert first.run_requests[0].run_key == "raw-2025-07-20"

    again = raw_day_landed(dg.build_sensor_context(cursor=first.cursor, resources={"raw": store}))
    assert again.run_requests == []
    pl.DataFrame({"user_id": [1]}).write_parquet(raw / "impressions" / "date=2025-07-22" / "part-0.parquet")
    later = raw_day_landed(dg.build_sensor_context(cursor=again.cursor, resources={"raw": store}))
    assert [r.partition_key for r in later.run_requests] == ["2025-07-22"]


@pytest.mark.unit
def test_training_stages_share_one_pool():
    # Its limit of one step at a time is set by both instance files (test_deployment).
    graph = defs.resolve_asset_graph()
    pooled = {key.to_user_string() for key in graph.get_all_asset_keys() if TRAINING_POOL in graph.get(key).pools}
    assert pooled == {"item_encoder", "i2i_retrieval", "semantic_ids", "rq_comparison", "ctr_model", "ctr_ablations", "mba_dimensions"}

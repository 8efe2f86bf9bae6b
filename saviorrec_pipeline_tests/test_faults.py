"""Faults on real services: a SeaweedFS S3 server stopped while a stage stores its output, and an MLflow
server down when a training stage starts, both stopped by pid and started again on the same address
with the same data. A failed stage is named with its cause, leaves no Parquet object it did not
finish and no registered model version; a short S3 outage is ridden out by retries; once the service
is back, the next run succeeds."""

import dataclasses
import datetime as dt
import io
import logging
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dagster as dg
import polars as pl
import pytest
import s3fs
import torch
from botocore.exceptions import BotoCoreError
from dagster._serdes import serialize_value
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.encoder import ENCODER_MODEL, item_encoder
from saviorrec_pipeline.assets.raw import impressions, item_catalog, user_profiles
from saviorrec_pipeline.definitions import deployment_resources
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.partitions import SETTINGS, daily_partitions
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetStorage, filesystem
from saviorrec_pipeline.resources.tracking import EXPERIMENT, MlflowTracking
from saviorrec_pipeline.sensors import raw_day_landed
from saviorrec_pipeline.serving.pyfunc import rqvae_served
from saviorrec_pipeline_tests.services import (
    S3Server, free_port, free_ports, isolated_environ, start_mlflow_server, start_seaweedfs, stop, wait_for_s3, wait_until,
)

pytestmark = pytest.mark.integration

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=4, users=150, items=120, seed=13)
EVAL_DAY = (SPEC.start_date + dt.timedelta(days=SPEC.days - 1)).isoformat()
CHAIN = [impressions, item_catalog, user_profiles, coclick_pairs, item_encoder]
UPSTREAM = ["impressions", "item_catalog", "user_profiles", "coclick_pairs"]
FAST_ENCODER = {"ops": {"item_encoder": {"config": {"epochs": 1, "batch_size": 64, "domain_adaptation_epochs": 0}}}}
BUCKET = "faults"
PASSWORD = "planted-mlflow-password"


@dataclass
class Restartable:
    """A server of this module: stopped by its pid with SIGKILL (no goodbye to its clients), started
    again on the same address with the same data."""

    launch: Callable[[], subprocess.Popen]
    ready: Callable[[subprocess.Popen], None]
    process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        self.process = self.launch()
        if wait:
            self.ready(self.process)

    def stop(self) -> None:
        stop(self.process, timeout_s=5, sig=signal.SIGKILL)

    def running(self) -> None:
        """Started again if a test left it stopped; waited for either way."""
        if self.process.poll() is not None:
            self.start(wait=False)
        self.ready(self.process)


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-demo") / "raw"
    generate_demo(root, SPEC)
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> tuple[Restartable, S3Server]:
    """This module's own SeaweedFS (the session's is shared: never stopped)."""
    workdir, ports = tmp_path_factory.mktemp("faults-seaweedfs"), free_ports(8)
    launched: dict[str, S3Server] = {}

    def launch() -> subprocess.Popen:
        process, launched["server"] = start_seaweedfs(workdir, ports=ports)
        return process

    service = Restartable(launch, lambda process: wait_for_s3(process, launched["server"], workdir / "weed.log"))
    service.start()
    server = launched["server"]
    try:
        fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint_url, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield service, server
    finally:
        stop(service.process, timeout_s=5)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> tuple[Restartable, str]:
    """`mlflow server` with a SQLite store and local artifacts; its URL."""
    workdir, port = tmp_path_factory.mktemp("faults-mlflow"), free_port()
    url = f"http://127.0.0.1:{port}"

    def launch() -> subprocess.Popen:
        return start_mlflow_server(workdir, f"sqlite:///{workdir}/mlflow.db", str(workdir / "artifacts"), isolated_environ(), port=port)[0]

    def ready(process: subprocess.Popen) -> None:
        wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, "MLflow server", process,
                   workdir / "mlflow.log", timeout_s=120)

    service = Restartable(launch, ready)
    service.start()
    try:
        yield service, url
    finally:
        stop(service.process, timeout_s=5)


@dataclass
class Stage:
    """One test's view of the services: its own storage prefix on the module's S3 server."""

    raw: Path
    storage_root: str
    tracking_uri: str
    home: Path
    instance: dg.DagsterInstance

    def resources(self, tracking_uri: str | None = None) -> dict:
        """The resources of saviorrec_pipeline.definitions, for this test's raw data, S3 and MLflow."""
        settings = dataclasses.replace(
            SETTINGS, home=str(self.home), raw_root=str(self.raw), storage_root=self.storage_root,
            mlflow_tracking_uri=tracking_uri or self.tracking_uri, mlflow_artifact_root=str(self.home / "artifacts"),
            train_days=SPEC.days - 1, eval_days=1,
        )
        return deployment_resources(settings)

    def materialize(self, resources: dict, selection: list[str] | None = None, assets: list | None = None) -> dg.ExecuteInProcessResult:
        """`assets` (default: the chain to item_encoder) for EVAL_DAY, `selection` of them alone."""
        return dg.materialize(
            assets or CHAIN, partition_key=EVAL_DAY, resources=resources, selection=selection, instance=self.instance,
            run_config=FAST_ENCODER if assets is None and "item_encoder" in (selection or ["item_encoder"]) else None,
            raise_on_error=False,
        )

    def logged(self, result: dg.ExecuteInProcessResult, text: str) -> list[str]:
        """The run's log messages (Dagster's and the stages') that hold `text`."""
        return [entry.user_message for entry in self.instance.all_logs(result.run_id) if text in entry.user_message]

    def objects(self) -> dict[str, bytes]:
        """Every object under the storage prefix but the training checkpoints, by name: the stage
        outputs and anything else a write may have left."""
        fs, prefix = filesystem(self.storage_root)
        return {key.removeprefix(prefix + "/"): fs.cat_file(key) for key in fs.find(prefix)
                if not key.removeprefix(prefix + "/").startswith("checkpoints/")}


@pytest.fixture
def stage(demo_raw, s3, mlflow_server, tmp_path, request, monkeypatch) -> Stage:
    service, server = s3
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    with dg.DagsterInstance.ephemeral() as instance:
        yield Stage(demo_raw, f"s3://{BUCKET}/{request.node.name}", mlflow_server[1], tmp_path, instance)
    service.running()  # for the next test, whatever this one did
    mlflow_server[0].running()


def _failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return {e.step_key: e.step_failure_data.error.to_string() for e in result.get_step_failure_events()}


def _step_runs(client: MlflowClient, dagster_run_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:  # nothing tracked on this server yet
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`dagster.run_id` = '{dagster_run_id}'", run_view_type=ViewType.ALL)


def _versions(client: MlflowClient, name: str) -> set[str]:
    return {v.version for v in client.search_model_versions(f"name = '{name}'")}


def _stopping_s3_when(monkeypatch, asset: str, then: Callable[[], None]) -> None:
    """`then` (which stops the S3 server) runs as `asset`'s output starts to be stored."""
    write = ParquetStorage.write

    def stop_then_write(self, df: pl.DataFrame, name: str, partition: str) -> str:
        if name == asset:
            then()
        return write(self, df, name, partition)

    monkeypatch.setattr(ParquetStorage, "write", stop_then_write)


# --- S3 -----------------------------------------------------------------------------------------


def test_s3_stopping_while_a_stage_stores_its_output_fails_it_keeps_outputs_and_withdraws_its_model(stage, s3, monkeypatch):
    """item_encoder registers its model, then the S3 server stops as its output is stored: the step
    fails naming the stage and the object it could not write; earlier outputs stay byte for byte and
    nothing is left beside them; the version it registered is withdrawn and its MLflow run FAILED.
    With S3 back, the next run succeeds."""
    service, server = s3
    resources = stage.resources()
    client = MlflowClient(stage.tracking_uri)
    first = stage.materialize(resources)
    assert first.success, _failures(first)
    before, registered = stage.objects(), _versions(client, ENCODER_MODEL)
    assert sorted(before) == sorted(f"{asset}/{EVAL_DAY}.parquet" for asset in ("coclick_pairs", "item_encoder"))

    with monkeypatch.context() as patch:
        patch.setenv("AWS_MAX_ATTEMPTS", "2")  # the server stays down: give up at once
        _stopping_s3_when(patch, "item_encoder", service.stop)
        failed = stage.materialize(resources, selection=["item_encoder"])
    service.start()

    assert not failed.success
    failures = _failures(failed)
    assert list(failures) == ["item_encoder"]
    assert f"item_encoder: could not store {stage.storage_root}/item_encoder/{EVAL_DAY}.parquet" in failures["item_encoder"]
    assert f"Could not connect to the endpoint URL: \"{server.endpoint_url}/" in failures["item_encoder"]
    assert stage.objects() == before

    [run] = _step_runs(client, failed.run_id)  # it trained and registered, then could not store
    assert run.data.tags["dagster.asset"] == "item_encoder" and run.info.status == "FAILED"
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []
    assert _versions(client, ENCODER_MODEL) == registered
    assert stage.logged(failed, "item_encoder failed: withdrew model saviorrec-item-encoder version")

    again = stage.materialize(resources, selection=["item_encoder"])
    assert again.success, _failures(again)
    reference = ParquetStorage(root=stage.storage_root).read("item_encoder", EVAL_DAY)
    version = client.get_model_version(ENCODER_MODEL, reference["model_uri"][0].rsplit("/", 1)[1])
    assert version.tags["dagster.run_id"] == again.run_id
    assert _versions(client, ENCODER_MODEL) == registered | {version.version}


def test_a_short_s3_outage_while_a_stage_stores_its_output_is_ridden_out_by_retries(stage, s3, monkeypatch, caplog):
    """The S3 server is killed as item_encoder's output is stored and started again at once (it serves
    again seconds later): botocore's retries carry the write over the gap, with the default settings."""
    service, _ = s3
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    _stopping_s3_when(monkeypatch, "item_encoder", lambda: (service.stop(), service.start(wait=False)))
    result = stage.materialize(stage.resources())

    assert result.success, _failures(result)
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Retry needed, retrying request")]
    assert retries, "the write never met the outage"
    reference = ParquetStorage(root=stage.storage_root).read("item_encoder", EVAL_DAY)
    assert reference["run_id"].to_list() == [run.info.run_id for run in _step_runs(MlflowClient(stage.tracking_uri), result.run_id)]
    assert sorted(stage.objects()) == sorted(f"{asset}/{EVAL_DAY}.parquet" for asset in ("coclick_pairs", "item_encoder"))


def _frame(rows: int) -> pl.DataFrame:
    return pl.DataFrame({"item_a": range(rows), "item_b": range(1, rows + 1), "support": [2] * rows})


def test_s3_stopping_at_any_request_of_a_write_leaves_the_old_file_or_the_new_one_and_nothing_else(stage, s3, monkeypatch):
    """For each request a write makes, the server is killed once that request has been answered:
    afterwards the folder holds the target alone, the old bytes if the write failed, the new ones if
    it returned. (A temporary object moved over the target would be left behind by a kill between
    its upload and the move.)"""
    service, _ = s3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage = ParquetStorage(root=stage.storage_root)
    old, new = _frame(5), _frame(9)
    storage.write(old, "coclick_pairs", EVAL_DAY)
    fs, target = filesystem(storage.uri("coclick_pairs", EVAL_DAY))  # the cached instance every write here uses
    fs.ls(target.rsplit("/", 1)[0])  # connects: its client exists from here on
    answered: list[str] = []

    def count(event_name: str, **_) -> None:
        answered.append(event_name)

    fs.s3.meta.events.register("after-call.s3", count)
    storage.write(new, "coclick_pairs", EVAL_DAY)
    requests = list(answered)
    assert any(name.endswith("PutObject") for name in requests), requests

    outcomes = []
    try:
        for stop_after in range(1, len(requests) + 1):
            storage.write(old, "coclick_pairs", EVAL_DAY)
            answered.clear()

            def stop_server(event_name: str, stop_after=stop_after, **_) -> None:
                if len(answered) == stop_after:
                    service.stop()

            fs.s3.meta.events.register("after-call.s3", stop_server)
            try:
                storage.write(new, "coclick_pairs", EVAL_DAY)
                returned = True
            except (OSError, BotoCoreError):
                returned = False
            finally:
                fs.s3.meta.events.unregister("after-call.s3", stop_server)
            service.running()
            listing = [key.rsplit("/", 1)[1] for key in fs.find(target.rsplit("/", 1)[0])]
            assert listing == [f"{EVAL_DAY}.parquet"], (requests[:stop_after], listing)
            expected = new if returned else old
            assert pl.read_parquet(io.BytesIO(fs.cat_file(target))).equals(expected), (requests[:stop_after], returned)
            outcomes.append(returned)
    finally:
        fs.s3.meta.events.unregister("after-call.s3", count)
    # A kill before the upload's answer fails the write; after it, the write is done.
    assert outcomes == [False] * (len(requests) - 1) + [True], (requests, outcomes)


def test_leftover_temporary_objects_are_ignored_by_readers_and_the_sensor(stage):
    """A `.tmp-*` object (what a writer killed mid-move would leave, or an upload tool's part) in an
    output folder or a raw day folder is never read, and a day folder holding only one is not a day."""
    fs, root = filesystem(stage.storage_root)
    storage, raw = ParquetStorage(root=stage.storage_root), RawStore(root=f"{stage.storage_root}/raw")
    output = _frame(3)
    storage.write(output, "coclick_pairs", EVAL_DAY)
    fs.pipe_file(f"{root}/coclick_pairs/.tmp-0123abcd-{EVAL_DAY}.parquet", b"PAR1 half a file")
    landed, half_landed = "2025-07-02", "2025-07-03"
    clicks = pl.DataFrame({"user_id": [1], "item_id": [2], "ts": [dt.datetime(2025, 7, 2, 8, tzinfo=dt.timezone.utc)],
                           "clicked": pl.Series([1], dtype=pl.Int8)})
    buffer = io.BytesIO()
    clicks.write_parquet(buffer)
    fs.pipe_file(f"{root}/raw/impressions/date={landed}/part-0.parquet", buffer.getvalue())
    for day in (landed, half_landed):
        fs.pipe_file(f"{root}/raw/impressions/date={day}/.tmp-0123abcd-part-1.parquet", b"PAR1 half a file")

    assert storage.read("coclick_pairs", EVAL_DAY).equals(output)
    assert [day.isoformat() for day in raw.days_with_impressions()] == [landed]
    read = raw.inspect_impressions(dt.date.fromisoformat(landed))
    assert read.ignored == [".tmp-0123abcd-part-1.parquet"] and read.checked().height == 1
    evaluation = raw_day_landed(dg.build_sensor_context(resources={"raw": raw}))
    assert [request.partition_key for request in evaluation.run_requests] == [landed]


# --- MLflow -------------------------------------------------------------------------------------


def test_mlflow_down_when_a_training_stage_starts_fails_it_promptly_by_name_and_without_credentials(stage, mlflow_server, caplog):
    """The tracking URI holds a password; the MLflow server is down as item_encoder starts. The step
    fails in seconds, not after MLflow's own minutes of retries, naming the stage, the server (no
    password) and the cause; the password is in no error, log or event; nothing is stored or
    registered. With the server back, the next run succeeds."""
    service, url = mlflow_server
    resources = stage.resources(tracking_uri=url.replace("http://", f"http://saviorrec:{PASSWORD}@"))
    upstream = stage.materialize(resources, selection=UPSTREAM)
    assert upstream.success, _failures(upstream)
    before = stage.objects()

    caplog.set_level(logging.DEBUG)
    service.stop()
    started = time.monotonic()
    failed = stage.materialize(resources, selection=["item_encoder"])
    seconds = time.monotonic() - started
    service.start()

    assert not failed.success
    failures = _failures(failed)
    assert list(failures) == ["item_encoder"]
    message = failures["item_encoder"]
    # Its first MLflow call asks which encoder is in use.
    assert f"item_encoder could not look up saviorrec-item-encoder@champion: MLflow tracking at {url} failed" in message
    assert "Connection refused" in message
    assert seconds < 60, f"{seconds:.0f} s to notice that MLflow is down"
    places = {"the step's error": message, "Python's logs": caplog.text,
              "Dagster's event log": serialize_value(stage.instance.all_logs(failed.run_id))}
    assert "Connection refused" in places["Python's logs"] and "could not look up" in places["Dagster's event log"]
    assert [place for place, text in places.items() if PASSWORD in text] == []
    assert stage.objects() == before

    client = MlflowClient(url)
    assert _step_runs(client, failed.run_id) == []
    again = stage.materialize(resources, selection=["item_encoder"])
    assert again.success, _failures(again)
    [run] = _step_runs(client, again.run_id)
    assert run.info.status == "FINISHED"
    assert [v.tags["dagster.run_id"] for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")] == [again.run_id]


FAULT_MODEL = "saviorrec-faults-test"


@dg.asset(partitions_def=daily_partitions)
def registers_then_fails(context: dg.AssetExecutionContext, tracking: MlflowTracking) -> None:
    """ctr_model's shape: a parent run, a child run that registers its model, then a later failure."""
    with tracking.start_run(context, "parent") as parent:
        with tracking.start_run(context, "child", parent=parent) as child:
            child.log_model(rqvae_served(pl.DataFrame({"embedding": [[0.0, 1.0]]})), {"weight": torch.zeros(2)}, {"shape": [2]}, "config.json")
            child.register(FAULT_MODEL, "model", tracking.origin_tags(context))
        raise RuntimeError("a later variant failed")


def test_a_stage_failing_after_it_registered_a_model_withdraws_it(stage, mlflow_server):
    result = stage.materialize({"tracking": stage.resources()["tracking"]}, assets=[registers_then_fails])

    assert "a later variant failed" in _failures(result)["registers_then_fails"]
    client = MlflowClient(mlflow_server[1])
    runs = _step_runs(client, result.run_id)
    assert sorted(run.info.run_name for run in runs) == ["child", "parent"]
    assert {run.info.status for run in runs} == {"FAILED"}
    assert client.search_model_versions(f"name = '{FAULT_MODEL}'") == []
    assert stage.logged(result, f"registers_then_fails failed: withdrew model {FAULT_MODEL} version 1")

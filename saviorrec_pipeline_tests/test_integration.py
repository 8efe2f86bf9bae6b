"""The deployment's services run natively and the whole chain runs on them.

PostgreSQL (Dagster's run, event-log and schedule storage; MLflow's backend store), SeaweedFS's S3
gateway (raw data, stage outputs, MLflow's artifacts) and `mlflow server`, configured with the
variables docker-compose.yml passes to its containers (all but its Ray cluster's address). A date range is backfilled from the CLI with
`dagster job backfill`; the daemon runs the queued runs one at a time.
"""

import datetime as dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import psycopg2
import pytest
import s3fs
import yaml

from saviorrec_pipeline.definitions import defs
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline_tests.deployment_files import REPO, env_example
from saviorrec_pipeline_tests.services import (
    S3Server, executable, isolated_environ, start_mlflow_server, start_postgres, stop, wait_until,
)

pytestmark = pytest.mark.integration

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=5, users=200, items=300, seed=5)
DAYS = ["2025-07-04", "2025-07-05"]  # the backfilled range: the last two days of the demo
TRAIN_DAYS = 3
MODELS = {"saviorrec-item-encoder", "saviorrec-rqvae", "saviorrec-ctr"}
CHAIN_TIMEOUT_S = 900


def _env_file(s3: S3Server) -> dict[str, str]:
    """What .env holds in the deployment, for this test's services (the same names as .env.example)."""
    env = {
        "POSTGRES_USER": "saviorrec",
        "POSTGRES_PASSWORD": "integration-postgres-secret",
        "DAGSTER_POSTGRES_DB": "dagster",
        "MLFLOW_POSTGRES_DB": "mlflow",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": "us-east-1",
        "SAVIORREC_BUCKET": "saviorrec-integration",
        "MLFLOW_BUCKET": "mlflow-integration",
        "SAVIORREC_START_DATE": SPEC.start_date.isoformat(),
        "SAVIORREC_TRAIN_DAYS": str(TRAIN_DAYS),
        "SAVIORREC_EVAL_DAYS": "1",
    }
    assert env.keys() == env_example().keys(), "the deployment's env file changed: update this test"
    return env


def _compose_service_env(env_file: dict[str, str], addresses: dict[str, str]) -> dict[str, str]:
    """The pipeline containers' environment from docker-compose.yml, with in-network addresses
    (postgres, s3:8333, mlflow:5000, the image's paths) replaced by this machine's."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    declared = compose["x-pipeline"]["environment"]
    assert addresses.keys() <= declared.keys(), "the compose file no longer sets these"
    resolved = {key: str(value).replace("${", "{").format(**env_file) for key, value in declared.items()}
    return {**env_file, **resolved, **addresses}


def _command_env(service_env: dict[str, str], dagster_home: Path) -> dict[str, str]:
    inherited = isolated_environ()
    # This environment's interpreter first, as in the image, for commands the compose file names.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**inherited, **service_env, "DAGSTER_HOME": str(dagster_home), "PATH": path}


@pytest.fixture(scope="module")
def postgres():
    # Not under pytest's tmp_path: the server runs as the `postgres` user, who cannot enter it.
    workdir = Path(tempfile.mkdtemp(prefix="saviorrec-postgres-"))
    process, server = start_postgres(workdir, user="saviorrec", password="integration-postgres-secret")
    try:
        wait_until(lambda: psycopg2.connect(server.url("postgres")).close() is None, "PostgreSQL", process, workdir / "postgres.log")
        yield server
    finally:
        stop(process, sig=signal.SIGINT)  # fast shutdown: ends open sessions
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(postgres, s3_server, tmp_path_factory):
    """Databases and buckets made as the compose file makes them, an MLflow server, the raw data
    on S3, and a Dagster daemon on the Postgres instance; yields the environment of its services."""
    work = tmp_path_factory.mktemp("deployment")
    env_file = _env_file(s3_server)
    assert env_file["POSTGRES_USER"] == postgres.user and env_file["POSTGRES_PASSWORD"] == postgres.password

    # The postgres image creates $POSTGRES_DB, then runs deploy/postgres-init.sh.
    connection = psycopg2.connect(postgres.url("postgres"))
    connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
    connection.cursor().execute(f'CREATE DATABASE "{env_file["DAGSTER_POSTGRES_DB"]}"')
    connection.close()
    subprocess.run(
        ["sh", str(REPO / "deploy" / "postgres-init.sh")], check=True, capture_output=True,
        env={**_command_env(env_file, work), "POSTGRES_DB": env_file["DAGSTER_POSTGRES_DB"],
             "PGHOST": postgres.host, "PGPORT": str(postgres.port), "PGPASSWORD": postgres.password},
    )

    dagster_home = work / "dagster"
    dagster_home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", dagster_home)
    service_env = _compose_service_env(env_file, {
        "DAGSTER_POSTGRES_HOST": postgres.host,
        "DAGSTER_POSTGRES_PORT": str(postgres.port),
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "SAVIORREC_HOME": str(work / "home"),
        "MLFLOW_TRACKING_URI": "",  # set below, once the server has its port
        # Checkpoints go to S3 too, but not after each of the tiny presets' 175 short epochs a day.
        "SAVIORREC_CHECKPOINT_EVERY_EPOCHS": "5",
        # The stages in the runs' own processes: the compose file's Ray cluster is left out here
        # (test_scaleout.py runs every stage on a local Ray cluster against the in-process engine).
        "SAVIORREC_RAY_ADDRESS": "",
    })
    command_env = _command_env(service_env, dagster_home)

    # The compose file's bucket-creation command, run as it is.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    subprocess.run(shlex.split(compose["services"]["create-buckets"]["command"]), check=True, env=command_env)

    mlflow_process, mlflow_url = start_mlflow_server(
        work / "mlflow",
        # The driver named as in docker-compose.yml: SQLAlchemy's default for postgresql:// is psycopg 3.
        backend_store_uri=postgres.url(env_file["MLFLOW_POSTGRES_DB"]).replace("postgresql://", "postgresql+psycopg2://"),
        artifacts_destination=f"s3://{env_file['MLFLOW_BUCKET']}/artifacts",
        env={**command_env, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url},
    )
    daemon = None
    try:
        wait_until(lambda: urllib.request.urlopen(f"{mlflow_url}/health").status == 200, "mlflow server",
                   mlflow_process, work / "mlflow" / "mlflow.log", timeout_s=120)
        command_env["MLFLOW_TRACKING_URI"] = service_env["MLFLOW_TRACKING_URI"] = mlflow_url

        raw = work / "raw"
        generate_demo(raw, SPEC)
        fs = s3fs.S3FileSystem(key=s3_server.access_key, secret=s3_server.secret_key, endpoint_url=s3_server.endpoint_url)
        fs.put(str(raw), service_env["SAVIORREC_RAW_ROOT"].removeprefix("s3://"), recursive=True)

        daemon_log = work / "daemon.log"
        with daemon_log.open("wb") as out:
            daemon = subprocess.Popen(
                [executable("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                cwd=REPO, env=command_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        yield {"env": service_env, "command_env": command_env, "postgres": postgres, "fs": fs, "work": work, "daemon_log": daemon_log}
    finally:
        if daemon is not None:
            stop(daemon, timeout_s=30)
        stop(mlflow_process)


def _runs(postgres, database: str) -> list[dict]:
    with psycopg2.connect(postgres.url(database)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, pipeline_name, status, partition, backfill_id, start_time, end_time FROM runs ORDER BY start_time")
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
    connection.close()
    return rows


@pytest.fixture(scope="module")
def backfill(deployment):
    """`dagster job backfill` over DAYS, waited for until both runs end."""
    started = time.monotonic()
    result = subprocess.run(
        [executable("dagster"), "job", "backfill", "-w", str(REPO / "workspace.yaml"), "-j", "saviorrec_chain",
         "--from", DAYS[0], "--to", DAYS[-1], "--noprompt"],
        cwd=REPO, env=deployment["command_env"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Launched backfill job" in result.stdout

    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while True:
        runs = _runs(deployment["postgres"], deployment["env"]["DAGSTER_POSTGRES_DB"])
        if len(runs) == len(DAYS) and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"backfill not done after {CHAIN_TIMEOUT_S}s: {runs}\n{deployment['daemon_log'].read_text()[-3000:]}")
        time.sleep(2)
    failed = [r for r in runs if r["status"] != "SUCCESS"]
    assert not failed, f"runs failed: {failed}\n{deployment['daemon_log'].read_text()[-3000:]}"
    return {"runs": runs, "seconds": time.monotonic() - started, "stdout": result.stdout}


def test_backfill_runs_one_partition_per_run_one_run_at_a_time_recorded_in_postgres(deployment, backfill):
    runs = backfill["runs"]
    assert sorted(r["partition"] for r in runs) == DAYS
    assert {r["pipeline_name"] for r in runs} == {"saviorrec_chain"}
    assert len({r["backfill_id"] for r in runs}) == 1 and runs[0]["backfill_id"] is not None
    # The run queue lets one chain run at a time (deploy/dagster.yaml), in the days' order.
    first, second = runs
    assert first["end_time"] <= second["start_time"], runs
    assert [first["partition"], second["partition"]] == DAYS
    with psycopg2.connect(deployment["postgres"].url(deployment["env"]["DAGSTER_POSTGRES_DB"])) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        (materializations,) = cursor.fetchone()
    connection.close()
    assert materializations == len(DAYS) * len(chain_job.selection.resolve(defs.resolve_asset_graph()))


def test_every_stage_output_is_a_parquet_object_in_s3(deployment, backfill):
    fs, storage_root = deployment["fs"], deployment["env"]["SAVIORREC_STORAGE_ROOT"].removeprefix("s3://")
    written = {path.removeprefix(storage_root + "/") for path in fs.find(storage_root)}
    stages = {"coclick_pairs", "item_encoder", "item_embeddings", "semantic_ids", "ranking_dataset", "ctr_model", "champion_gate", "auc_report"}
    assert written == {f"{stage}/{day}.parquet" for stage in stages for day in DAYS}
    assert all(fs.info(f"{storage_root}/{path}")["size"] > 0 for path in written)


def test_models_are_registered_in_the_mlflow_server_with_artifacts_in_s3(deployment, backfill):
    client = mlflow.MlflowClient(deployment["env"]["MLFLOW_TRACKING_URI"])
    dagster_runs = {r["run_id"]: r["partition"] for r in backfill["runs"]}
    for name in MODELS:
        versions = client.search_model_versions(f"name = '{name}'")
        # The encoder and the RQ-VAE train on the first day and are reused on the next (their
        # refresh is weekly); the ranker trains every day, the second day going on from the first's.
        assert len(versions) == (len(DAYS) if name == "saviorrec-ctr" else 1), (name, versions)
        assert client.get_model_version_by_alias(name, "champion").tags["dagster.partition"] in DAYS
        for version in versions:
            assert version.tags["dagster.run_id"] in dagster_runs
            assert version.tags["dagster.partition"] == dagster_runs[version.tags["dagster.run_id"]]
    runs = client.search_runs([client.get_experiment_by_name("saviorrec").experiment_id])
    assert {run.data.tags.get("dagster.run_id") for run in runs} == set(dagster_runs)
    second_day = [run for run in runs if run.info.run_name == "ctr_model" and run.data.tags["dagster.partition"] == DAYS[1]]
    first_ctr = next(v for v in client.search_model_versions("name = 'saviorrec-ctr'") if v.tags["dagster.partition"] == DAYS[0])
    assert [run.data.params["warm_start_from"] for run in second_day] == [f"models:/saviorrec-ctr/{first_ctr.version}"]
    assert second_day[0].data.params["trained_days"] == DAYS[0]  # the day the first day's ranker had not trained on
    # The server proxies artifacts into its bucket: every model's weights are objects there.
    weights = deployment["fs"].glob(f"{deployment['env']['MLFLOW_BUCKET']}/artifacts/**/model.safetensors")
    assert len(weights) >= len(MODELS) * len(DAYS), weights
    # And MLflow's own records are in Postgres, not a file.
    with psycopg2.connect(deployment["postgres"].url(deployment["env"]["MLFLOW_POSTGRES_DB"])) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models")
        assert {name for (name,) in cursor.fetchall()} == MODELS
    connection.close()

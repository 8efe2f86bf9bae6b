"""The deployment files are valid as their tools read them (no Docker engine here: see README)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef

from saviorrec_pipeline_tests.deployment_files import REPO, compose_config, env_example
from saviorrec_pipeline_tests.services import executable

pytestmark = pytest.mark.integration


def test_compose_file_is_valid_and_complete(tmp_path):
    config = compose_config(tmp_path)
    services = config["services"]
    assert {"postgres", "s3", "create-buckets", "mlflow", "ray-head", "ray-worker", "code-location", "webserver", "daemon"} == services.keys()
    for name, service in services.items():
        build = service.get("build") or {}
        if build:
            assert (REPO / build["dockerfile"]).exists(), f"{name}: {build['dockerfile']} missing"
        # Every long-running service says when it is healthy; the one-shot bucket job is awaited.
        if name != "create-buckets":
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for port in service.get("ports", []):
            published = port if isinstance(port, dict) else {"host_ip": str(port).split(":")[0]}
            assert published.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]  # a named volume, or a bind mount made absolute by compose
            assert source in config["volumes"] or Path(source).exists(), f"{name} mounts missing {source}"
    assert {"postgres-data", "s3-data"} <= config["volumes"].keys()
    assert "ports" not in services["postgres"] and "ports" not in services["code-location"]
    # Start order: nothing of the pipeline starts before its stores are healthy.
    needs = {name: service.get("depends_on", {}) for name, service in services.items()}
    assert needs["create-buckets"]["s3"]["condition"] == "service_healthy"
    assert needs["mlflow"]["postgres"]["condition"] == "service_healthy"
    assert needs["mlflow"]["create-buckets"]["condition"] == "service_completed_successfully"
    assert needs["code-location"]["mlflow"]["condition"] == "service_healthy"
    for name in ("webserver", "daemon"):
        assert needs[name]["code-location"]["condition"] == "service_healthy"
    # The Ray cluster: the head before the worker and the code location, both in the project image,
    # and the pipeline's address is the head's Ray Client port.
    assert needs["ray-worker"]["ray-head"]["condition"] == needs["code-location"]["ray-head"]["condition"] == "service_healthy"
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["image"] == worker["image"] == services["code-location"]["image"]
    client_port = re.search(r"--ray-client-server-port (\d+)", head["command"]).group(1)
    gcs_port = re.search(r"--port (\d+)", head["command"]).group(1)
    assert services["code-location"]["environment"]["SAVIORREC_RAY_ADDRESS"] == f"ray://ray-head:{client_port}"
    assert f"--address ray-head:{gcs_port}" in worker["command"]
    assert "--num-cpus 0" in head["command"]  # the head schedules; the workers compute
    # The buckets the pipeline and MLflow write to are the ones created at start.
    env = env_example()
    assert "'SAVIORREC_BUCKET', 'MLFLOW_BUCKET'" in services["create-buckets"]["command"]
    pipeline_env = services["code-location"]["environment"]
    assert pipeline_env["SAVIORREC_STORAGE_ROOT"].startswith(f"s3://{env['SAVIORREC_BUCKET']}/")
    assert "s3://$$MLFLOW_BUCKET/" in services["mlflow"]["command"]
    assert '--backend-store-uri "postgresql+psycopg2://' in services["mlflow"]["command"]  # psycopg2 is installed
    # $$VAR is left to the container's shell: its environment (env file and `environment`) has it.
    for name, service in services.items():
        shell_text = json.dumps([service.get("command"), service.get("healthcheck")])
        for variable in re.findall(r"\$\$(\w+)", shell_text):
            assert variable in service["environment"], f"{name} uses ${variable}, not in its environment"


def test_every_compose_variable_is_defined_in_theenv_example():
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", (REPO / "docker-compose.yml").read_text()))
    assert used, "no ${VAR} found: the pattern is wrong"
    missing = used - env_example().keys()
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_compose_file_holds_no_secret():
    text = (REPO / "docker-compose.yml").read_text()
    secrets = {k: v for k, v in env_example().items() if "PASSWORD" in k or "SECRET" in k}
    assert secrets, ".env.example should name the secrets"
    for key, value in secrets.items():
        assert value not in text, f"{key}'s value is written in docker-compose.yml"
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*[^$\s{]", text), "a secret is set literally"


def test_embedded_instance_is_sqlite_with_the_training_limits(tmp_path):
    shutil.copy(REPO / "dagster.yaml", tmp_path)
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path))) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert (tmp_path / "history" / "runs.db").exists()
        limits = instance.get_concurrency_config()
        assert limits.run_queue_config.max_concurrent_runs == 1
        assert limits.pool_config.default_pool_limit == 1


def test_production_instance_file_selects_postgres_from_the_environment(tmp_path, monkeypatch):
    for name in ("HOST", "PORT", "DB", "USER", "PASSWORD"):
        monkeypatch.setenv(f"DAGSTER_POSTGRES_{name}", "5432" if name == "PORT" else "x")
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path)
    config, _ = dagster_instance_config(str(tmp_path))
    database = config["storage"]["postgres"]["postgres_db"]
    assert {key: value["env"] for key, value in database.items() if key != "scheme"} == {
        "hostname": "DAGSTER_POSTGRES_HOST", "port": "DAGSTER_POSTGRES_PORT", "db_name": "DAGSTER_POSTGRES_DB",
        "username": "DAGSTER_POSTGRES_USER", "password": "DAGSTER_POSTGRES_PASSWORD",
    }
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    embedded, _ = dagster_instance_config(str(REPO))
    assert config["concurrency"] == embedded["concurrency"]  # the same limits in both modes


def test_workspace_files_name_the_definitions_module():
    local = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert local["load_from"][0]["python_module"]["module_name"] == "saviorrec_pipeline.definitions"
    deployed = yaml.safe_load((REPO / "deploy" / "workspace.yaml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grpc = deployed["load_from"][0]["grpc_server"]
    assert grpc["host"] in compose["services"]
    assert f"-p {grpc['port']}" in compose["services"][grpc["host"]]["command"]


def test_dagster_loads_the_local_workspace(tmp_path):
    result = subprocess.run(
        [executable("dagster"), "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Validation successful for code location saviorrec_pipeline" in result.stdout + result.stderr

"""The deployment files are valid as their tools read them (no Docker engine here: see README)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from saviorrec_pipeline_tests.services import executable

REPO = Path(__file__).resolve().parents[1]


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_compose_file_is_valid_with_the_example_env(tmp_path):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose not found: `apt-get install docker-compose` (.ci/run installs it)")
    shutil.copy(REPO / "docker-compose.yml", tmp_path)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    result = subprocess.run([compose, "config"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "is not set" not in result.stderr, result.stderr  # every ${VAR} comes from the env file
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "s3", "mlflow", "code-location", "webserver", "daemon"} <= services.keys()
    for name, service in services.items():
        for arg in (service.get("build") or {}).values():
            if isinstance(arg, str) and arg.startswith("deploy/"):
                assert (REPO / arg).exists(), f"{name}: {arg} missing"


def test_compose_file_holds_no_secret():
    text = (REPO / "docker-compose.yml").read_text()
    secrets = {k: v for k, v in _env_example().items() if "PASSWORD" in k or "SECRET" in k}
    assert secrets, ".env.example should name the secrets"
    for key, value in secrets.items():
        assert value not in text, f"{key}'s value is written in docker-compose.yml"
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*[^$\s{]", text), "a secret is set literally"


def test_dagster_instance_file_matches_dagster_schema(tmp_path, monkeypatch):
    for name in ("HOST", "PORT", "DB", "USER", "PASSWORD"):
        monkeypatch.setenv(f"DAGSTER_POSTGRES_{name}", "5432" if name == "PORT" else "x")
    shutil.copy(REPO / "dagster.yaml", tmp_path)
    config, _ = dagster_instance_config(str(tmp_path))
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


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

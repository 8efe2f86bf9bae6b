"""The checkout's deployment files as the tests read them."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def env_example() -> dict[str, str]:
    """.env.example's variables and their example values."""
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def compose_config(tmp_path: Path) -> dict:
    """The compose file as `docker-compose config` resolves it with .env.example as .env."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose not found: `apt-get install docker-compose` (.ci/run installs it)")
    shutil.copy(REPO / "docker-compose.yml", tmp_path)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    result = subprocess.run([compose, "config"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "is not set" not in result.stderr, result.stderr
    return yaml.safe_load(result.stdout)

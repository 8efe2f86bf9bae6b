"""The SAVIORREC_* environment, read in one place.

Every default is documented in README.md ("Configuration"); nothing else in the package reads
these variables.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg


@dataclass(frozen=True)
class Settings:
    home: str
    raw_root: str
    storage_root: str
    mlflow_tracking_uri: str  # dg.EnvVar when set: it may hold credentials (see load_settings)
    mlflow_artifact_root: str  # where a new experiment keeps artifacts when the store is local
    start_date: dt.date
    train_days: int
    eval_days: int
    k8s_executor_config: str | None  # a k8s_job_executor YAML: every step its own Kubernetes Job
    checkpoint_every_epochs: int  # training checkpoints; 0: none
    refresh_days: int  # the encoder and RQ-VAE retrain when the champion's are this many days old
    ray_address: str | None  # the heavy stages on Ray (local, auto, ray://host:port); None: in-process


def _int_at_least(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be at least {minimum}")
    return value


def _date(name: str, default: str) -> dt.date:
    raw = os.environ.get(name, default)
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a date (YYYY-MM-DD)") from None


def load_settings() -> Settings:
    home = str(Path(os.environ.get("SAVIORREC_HOME", ".saviorrec")).resolve())
    return Settings(
        home=home,
        raw_root=os.environ.get("SAVIORREC_RAW_ROOT", f"{home}/raw"),
        storage_root=os.environ.get("SAVIORREC_STORAGE_ROOT", f"{home}/storage"),
        # A set URI may carry credentials (postgresql://user:password@..., https://user:token@...):
        # as an EnvVar, Dagster resolves it at run time and stores and shows only its name, never
        # its value, in job snapshots and on the UI's resource page.
        mlflow_tracking_uri=(
            dg.EnvVar("MLFLOW_TRACKING_URI") if os.environ.get("MLFLOW_TRACKING_URI") else f"sqlite:///{home}/mlflow/mlflow.db"
        ),
        mlflow_artifact_root=f"{home}/mlflow/artifacts",
        start_date=_date("SAVIORREC_START_DATE", "2025-07-01"),
        train_days=_int_at_least("SAVIORREC_TRAIN_DAYS", 21),
        eval_days=_int_at_least("SAVIORREC_EVAL_DAYS", 1),
        k8s_executor_config=os.environ.get("SAVIORREC_K8S_EXECUTOR_CONFIG") or None,
        checkpoint_every_epochs=_int_at_least("SAVIORREC_CHECKPOINT_EVERY_EPOCHS", 1, minimum=0),
        refresh_days=_int_at_least("SAVIORREC_REFRESH_DAYS", 7),
        ray_address=os.environ.get("SAVIORREC_RAY_ADDRESS") or None,
    )

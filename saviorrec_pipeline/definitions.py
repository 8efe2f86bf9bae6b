"""Dagster definitions: assets, checks, resources and jobs of the SaviorRec pipeline.

Loaded by `dagster dev` through workspace.yaml, and by `-m saviorrec_pipeline.definitions`.
Where data lives comes from the environment (settings.py); switching disk to S3 is a change of
SAVIORREC_RAW_ROOT / SAVIORREC_STORAGE_ROOT, never of code. Likewise SAVIORREC_K8S_EXECUTOR_CONFIG
moves the steps from the run's process to Kubernetes Jobs (deploy/k8s/executor.yaml), and
SAVIORREC_RAY_ADDRESS the heavy stages onto Ray.
"""

from pathlib import Path

import dagster as dg
import yaml

from saviorrec_pipeline.assets import auc_report, champion, coclick, ctr_model, encoder, ranking_dataset, raw, semantic_ids
from saviorrec_pipeline.jobs import chain_job, paper_tables_job
from saviorrec_pipeline.partitions import SETTINGS, TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.schedules import daily_retrain
from saviorrec_pipeline.sensors import raw_day_landed
from saviorrec_pipeline.settings import Settings

STAGES = [raw, coclick, encoder, semantic_ids, ranking_dataset, ctr_model, champion, auc_report]
all_assets = dg.load_assets_from_modules(STAGES)
all_checks = dg.load_asset_checks_from_modules(STAGES)


def deployment_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Every resource the stages use, configured by `settings` (the environment, settings.py)."""
    storage = ParquetStorage(root=settings.storage_root, checkpoint_every_epochs=settings.checkpoint_every_epochs)
    tracking = MlflowTracking(tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root)
    return {
        "raw": RawStore(root=settings.raw_root),
        "window": TrainEvalWindow(train_days=settings.train_days, eval_days=settings.eval_days),
        "storage": storage,
        # With the tracking: a stage whose output cannot be stored withdraws the model it registered.
        "parquet_io_manager": ParquetIOManager(storage=storage, tracking=tracking),
        "tracking": tracking,
        # Ray Train's runs go beside the stage outputs when those are on shared storage (S3), which
        # every node of a cluster reaches; otherwise in a temporary folder (one machine).
        "compute": Compute(
            ray_address=settings.ray_address,
            train_storage=f"{settings.storage_root.rstrip('/')}/ray-train" if settings.storage_root.startswith("s3://") else None,
        ),
    }


def k8s_executor(config_file: str) -> dg.ExecutorDefinition:
    """dagster-k8s' k8s_job_executor configured by `config_file` (the optional extra `k8s`)."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(yaml.safe_load(Path(config_file).read_text()), name="saviorrec_k8s")


defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[chain_job, paper_tables_job],
    schedules=[daily_retrain],
    sensors=[raw_day_landed],
    # On one machine, steps run in the run's own process: a process per step would import torch
    # again for each (seconds per step), and the training pool lets one training step run at a time.
    executor=k8s_executor(SETTINGS.k8s_executor_config) if SETTINGS.k8s_executor_config else dg.in_process_executor,
    resources=deployment_resources(SETTINGS),
)

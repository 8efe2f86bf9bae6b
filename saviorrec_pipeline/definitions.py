"""Dagster definitions: assets, checks, resources and jobs of the SaviorRec pipeline.

Loaded by `dagster dev` through workspace.yaml, and by `-m saviorrec_pipeline.definitions`.
Where data lives comes from the environment (settings.py); switching disk to S3 is a change of
SAVIORREC_RAW_ROOT / SAVIORREC_STORAGE_ROOT, never of code.
"""

import dagster as dg

from saviorrec_pipeline.assets import auc_report, coclick, ctr_model, encoder, ranking_dataset, raw, semantic_ids
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.partitions import SETTINGS, TrainEvalWindow
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.schedules import daily_retrain
from saviorrec_pipeline.sensors import raw_day_landed

STAGES = [raw, coclick, encoder, semantic_ids, ranking_dataset, ctr_model, auc_report]
all_assets = dg.load_assets_from_modules(STAGES)
all_checks = dg.load_asset_checks_from_modules(STAGES)

storage = ParquetStorage(root=SETTINGS.storage_root)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[chain_job],
    schedules=[daily_retrain],
    sensors=[raw_day_landed],
    resources={
        "raw": RawStore(root=SETTINGS.raw_root),
        "window": TrainEvalWindow(),
        "storage": storage,
        "parquet_io_manager": ParquetIOManager(storage=storage),
        "tracking": MlflowTracking(tracking_uri=SETTINGS.mlflow_tracking_uri, artifact_root=SETTINGS.mlflow_artifact_root),
    },
)

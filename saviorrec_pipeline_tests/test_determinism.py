"""The same partition materialized twice with the same seeds gives the same rows and metrics (CPU)."""

from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from saviorrec_pipeline.definitions import all_assets
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.demo import generate_demo
from saviorrec_pipeline_tests.test_encoder import EVAL_DAY, FAST, SPEC, _resources

pytestmark = pytest.mark.integration

RUN_CONFIG = {
    "ops": {
        "item_encoder": {"config": FAST},
        "semantic_ids": {"config": {"num_levels": 2, "codebook_size": 16, "code_dim": 8, "epochs": 3, "batch_size": 128}},
        "ctr_model": {"config": {"epochs": 1, "batch_size": 256, "attention_dim": 16, "id_dim": 8}},
    }
}
# Columns naming the MLflow run a row came from: a new run each time by design.
RUN_REFERENCES = {"run_id", "model_uri", "artifact_uri", "rqvae_run_id", "rqvae_model_uri"}
# Metrics of the machine, not of the model.
MACHINE_METRICS = ("per_s", "seconds", "rss_mib")


def _materialize_chain(raw: Path, home: Path) -> tuple[dict[str, pl.DataFrame], dict[str, dict[str, float]]]:
    result = dg.materialize(all_assets, selection=chain_job.selection, partition_key=EVAL_DAY, resources=_resources(raw, home), run_config=RUN_CONFIG)
    assert result.success
    outputs = {
        path.parent.name: pl.read_parquet(path).drop(RUN_REFERENCES, strict=False)
        for path in sorted((home / "storage").rglob("*.parquet"))
    }
    client = mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("saviorrec").experiment_id])
    metrics = {
        run.info.run_name: {k: v for k, v in run.data.metrics.items() if not k.endswith(MACHINE_METRICS)} for run in runs
    }
    return outputs, metrics


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("determinism") / "raw"
    generate_demo(root, SPEC)
    return root


def test_same_partition_twice_gives_the_same_rows_and_metrics(demo_raw, tmp_path):
    first_outputs, first_metrics = _materialize_chain(demo_raw, tmp_path / "first")
    second_outputs, second_metrics = _materialize_chain(demo_raw, tmp_path / "second")

    stages = {"coclick_pairs", "item_encoder", "item_embeddings", "semantic_ids", "ranking_dataset", "ctr_model", "champion_gate", "auc_report"}
    assert first_outputs.keys() == second_outputs.keys() == stages
    for stage in sorted(stages):
        assert first_outputs[stage].height > 0, stage
        assert_frame_equal(first_outputs[stage], second_outputs[stage], check_exact=True)
    assert first_metrics.keys() == second_metrics.keys() and len(first_metrics) >= 6
    assert first_metrics == second_metrics

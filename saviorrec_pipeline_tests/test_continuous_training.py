"""Consecutive days through saviorrec_chain: the encoder and RQ-VAE reused until they are due, the
ranker going on from the champion, the gate deciding what `@champion` is."""

import datetime as dt
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest

from saviorrec_pipeline.definitions import all_assets
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking

pytestmark = pytest.mark.integration

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=10, users=300, items=400, seed=11)
DAYS = ["2025-07-06", "2025-07-07", "2025-07-08", "2025-07-09", "2025-07-10"]
WINDOW = TrainEvalWindow(train_days=4, eval_days=1)
TINY = {
    "item_encoder": {"preset": "tiny", "epochs": 1, "batch_size": 64, "domain_adaptation_epochs": 0},
    "semantic_ids": {"num_levels": 2, "codebook_size": 16, "code_dim": 8, "epochs": 3, "batch_size": 128},
    "ctr_model": {"epochs": 1, "batch_size": 256, "attention_dim": 16, "id_dim": 8},
}
MODELS = ("saviorrec-item-encoder", "saviorrec-rqvae", "saviorrec-ctr")


class Chain:
    """One project home (storage, MLflow on SQLite) and the chain run for a day in it."""

    def __init__(self, raw: Path, home: Path):
        storage = ParquetStorage(root=str(home / "storage"))
        self.storage, self.client = storage, mlflow.MlflowClient(f"sqlite:///{home}/mlflow.db")
        self.resources = {
            "raw": RawStore(root=str(raw)), "window": WINDOW, "compute": Compute(), "storage": storage, "parquet_io_manager": ParquetIOManager(storage=storage),
            "tracking": MlflowTracking(tracking_uri=f"sqlite:///{home}/mlflow.db", artifact_root=str(home / "artifacts")),
        }

    def run(self, day: str, **overrides: dict) -> dg.ExecuteInProcessResult:
        config = {"ops": {op: {"config": TINY.get(op, {}) | overrides.get(op, {})} for op in {*TINY, *overrides}}}
        return dg.materialize(all_assets, selection=chain_job.selection, partition_key=day, resources=self.resources, run_config=config, raise_on_error=False)

    def champion(self, name: str) -> str:
        return str(self.client.get_model_version_by_alias(name, "champion").version)


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(asset)[0].metadata.items()}


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continuous") / "raw"
    generate_demo(root, SPEC)
    return root


@pytest.fixture(scope="module")
def five_days(demo_raw, tmp_path_factory):
    """Days 1 and 2 at the defaults; day 3 asks the RQ-VAE to refresh, day 4 the encoder (going on
    from the champion's, asked for a domain-adaptation phase it skips), day 5 the encoder again from initial weights."""
    chain = Chain(demo_raw, tmp_path_factory.mktemp("home"))
    results, champions = [], []
    refreshes = [{}, {}, {"semantic_ids": {"refresh": True}}, {"item_encoder": {"refresh": True, "domain_adaptation_epochs": 1}},
                 {"item_encoder": {"refresh": True, "refresh_from_champion": False}}]
    for day, overrides in zip(DAYS, refreshes):
        results.append(chain.run(day, **overrides))
        assert results[-1].success, day
        champions.append({name: chain.champion(name) for name in MODELS})
    return chain, results, champions


def test_day_one_trains_everything_and_its_models_become_champion(five_days):
    chain, (first, *_), champions = five_days
    assert metadata(first, "item_encoder")["training"] == metadata(first, "semantic_ids")["training"] == "trained"
    ctr = metadata(first, "ctr_model")
    assert ctr["warm_start_from"] == "scratch" and ctr["trained_days"] == WINDOW.train_days
    assert ctr["saviorrec_level_norms"].startswith("![saviorrec: norms per residual level](data:image/png;base64,")
    assert "base_level_norms" not in ctr  # base has no MBA
    shares = [value for key, value in metadata(first, "semantic_ids").items() if key.startswith("share_")]
    assert len(shares) == 3 and sum(shares) == pytest.approx(1, abs=1e-3)
    gate = metadata(first, "champion_gate")
    assert gate["decision"] == "promoted" and "first model" in gate["reason"]
    assert champions[0] == {name: "1" for name in MODELS}


def test_day_two_reuses_the_encoder_and_rqvae_and_goes_on_from_the_champion_on_one_day(five_days):
    chain, (first, second, *_), champions = five_days
    for stage in ("item_encoder", "semantic_ids"):
        assert metadata(second, stage)["training"] == "reused"
        assert metadata(second, stage)["model_uri"] == metadata(first, stage)["model_uri"]
    assert len(chain.client.search_model_versions("name = 'saviorrec-item-encoder'")) == 3  # days 4 and 5 refreshed it
    ctr = metadata(second, "ctr_model")
    assert ctr["warm_start_from"] == "models:/saviorrec-ctr/1"
    assert ctr["trained_day_list"] == "2025-07-06" and ctr["trained_days"] == 1
    # An item new since day 1's catalog has its embedding and codes on day 2 (every catalog item does).
    day_two = chain.storage.read("semantic_ids", DAYS[1])
    assert day_two.height == chain.storage.read("item_embeddings", DAYS[1]).height == SPEC.items
    # The alias moved exactly as the gate said.
    gate = metadata(second, "champion_gate")
    expected = "2" if gate["decision"] == "promoted" else "1"
    assert champions[1]["saviorrec-ctr"] == expected and champions[1]["saviorrec-item-encoder"] == "1"


def test_a_refresh_day_renumbers_codes_to_the_champions_and_reports_their_churn(five_days):
    chain, (_, second, third, *_), champions = five_days
    assert metadata(third, "item_encoder")["training"] == "reused" and metadata(third, "semantic_ids")["training"] == "trained"
    previous = chain.storage.read("semantic_ids", "2025-07-06")  # the day the champion RQ-VAE trained
    current = chain.storage.read("semantic_ids", DAYS[2])
    both = previous.join(current, on="item_id", suffix="_new")
    old, new = np.stack(both["codes"].to_numpy()), np.stack(both["codes_new"].to_numpy())
    figures = metadata(third, "semantic_ids")
    for level in range(2):
        changed = sum(int(old[i, level] != new[i, level]) for i in range(len(old))) / len(old)
        prefix = sum(int(any(old[i, l] != new[i, l] for l in range(level + 1))) for i in range(len(old))) / len(old)
        assert figures[f"code_churn_level_{level + 1}"] == pytest.approx(changed, abs=1e-12)
        assert figures[f"prefix_churn_level_{level + 1}"] == pytest.approx(prefix, abs=1e-12)
    assert "changed before matching" in figures["code_churn"]
    # The ranker goes on across an RQ-VAE refresh: the codes it learnt keep their numbers.
    ctr = metadata(third, "ctr_model")
    assert ctr["warm_start_from"] == f"models:/saviorrec-ctr/{champions[1]['saviorrec-ctr']}" and ctr["trained_days"] >= 1


def test_an_encoder_refresh_goes_on_from_the_champion_and_so_does_the_rqvae_while_the_ranker_starts_afresh(five_days):
    chain, (*_, fourth, _), champions = five_days
    encoder = metadata(fourth, "item_encoder")
    assert encoder["training"] == "trained" and encoder["trained_from"] == "models:/saviorrec-item-encoder/1"
    assert encoder["domain_adaptation"] == "skipped: goes on from a trained encoder"
    semantic_ids = metadata(fourth, "semantic_ids")
    assert semantic_ids["training"] == "trained" and "the encoder changed" in semantic_ids["refresh_reason"]
    assert semantic_ids["trained_from"] == f"models:/saviorrec-rqvae/{champions[2]['saviorrec-rqvae']}"
    # New embeddings under the champion's weights: the ranker trains afresh on the whole window.
    ctr = metadata(fourth, "ctr_model")
    assert ctr["warm_start_from"] == "scratch" and encoder["model_uri"] in ctr["warm_start_reason"] and ctr["trained_days"] == WINDOW.train_days
    # The lineage the RQ-VAE followed is in the new encoder's saved config.
    saved = mlflow.artifacts.load_dict(chain.client.get_model_version_download_uri("saviorrec-item-encoder", "2") + "/artifacts/encoder_config.json")
    assert saved["continued_from"] == ["models:/saviorrec-item-encoder/1"]


def test_an_encoder_from_initial_weights_retrains_the_rqvae_afresh_and_the_ranker_from_scratch(five_days):
    chain, (*_, fifth), champions = five_days
    encoder = metadata(fifth, "item_encoder")
    assert encoder["training"] == "trained" and encoder["trained_from"] == "initial weights"
    semantic_ids = metadata(fifth, "semantic_ids")
    assert semantic_ids["training"] == "trained" and semantic_ids["trained_from"] == "initial weights"
    ctr = metadata(fifth, "ctr_model")
    assert ctr["warm_start_from"] == "scratch" and ctr["trained_days"] == WINDOW.train_days


@pytest.fixture(scope="module")
def first_day(demo_raw, tmp_path_factory) -> Chain:
    chain = Chain(demo_raw, tmp_path_factory.mktemp("gate"))
    assert chain.run(DAYS[0]).success
    return chain


def test_a_worse_challenger_is_not_promoted_and_the_check_warns(first_day):
    # A fresh start that barely moves from its initial weights scores near chance.
    result = first_day.run(DAYS[1], ctr_model={"from_scratch": True, "lr_start": 1e-9, "lr_end": 1e-9})
    assert result.success
    gate = metadata(result, "champion_gate")
    assert gate["decision"] == "held back" and "worse than the champion" in gate["reason"]
    assert gate["challenger_total_auc"] < gate["champion_total_auc"] - 0.002
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "challenger_not_worse"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert {name: first_day.champion(name) for name in MODELS} == {name: "1" for name in MODELS}
    held_back = first_day.client.get_model_version("saviorrec-ctr", "2")
    assert held_back.tags["gate.decision"] == "held back" and "champion" not in held_back.aliases


def test_a_champion_of_another_rq_shape_is_refused_and_nothing_is_promoted(first_day):
    # Without a refresh the RQ-VAE stage itself refuses: the champion has L=2, K=16.
    reused = first_day.run(DAYS[1], semantic_ids={"codebook_size": 8})
    assert not reused.success
    assert "refresh: true" in _failure(reused, "semantic_ids") and "codebook_size" in _failure(reused, "semantic_ids")
    # With one, the new RQ-VAE trains, and the ranker's warm start refuses the champion's shape.
    refreshed = first_day.run(DAYS[1], semantic_ids={"codebook_size": 8, "refresh": True})
    message = _failure(refreshed, "ctr_model")
    assert "codebook_size=16" in message and "codebook_size=8" in message and "from_scratch: true" in message
    assert {name: first_day.champion(name) for name in MODELS} == {name: "1" for name in MODELS}


def _failure(result: dg.ExecuteInProcessResult, step: str) -> str:
    (event,) = [e for e in result.all_events if e.is_step_failure and e.step_key == step]
    error = event.step_failure_data.error
    while error.cause:
        error = error.cause
    return error.message

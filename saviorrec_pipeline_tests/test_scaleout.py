"""The heavy stages on a local Ray cluster (2 CPUs, started for the session and stopped by its pid)
give the in-process results: co-click pairs and ranking rows exactly."""

import datetime as dt

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.ranking_dataset import ranking_dataset
from saviorrec_pipeline.assets.raw import impressions, item_catalog, user_profiles
from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.encoder import read_catalog
from saviorrec_pipeline.checkpoints import CheckpointFile
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.encoder_training import build_model
from saviorrec_pipeline.method.coclick import CoclickParams
from saviorrec_pipeline.method.ctr_training import Champion, CTRTrainConfig, ctr_inputs, train_variant
from saviorrec_pipeline.method.metrics import roc_auc
from saviorrec_pipeline.method.ranking_features import FeatureSpec
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.scaleout.embedding import embed_on_ray

pytestmark = pytest.mark.integration

SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=6, users=300, items=400, seed=11)
EVAL_DAY = SPEC.start_date + dt.timedelta(days=SPEC.days - 1)
WINDOW = TrainEvalWindow(train_days=SPEC.days - 1, eval_days=1)
SHARDS = 3  # more shards than the cluster's CPUs, and not a divisor of the days


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> RawStore:
    root = tmp_path_factory.mktemp("scaleout") / "raw"
    generate_demo(root, SPEC)
    return RawStore(root=str(root))


def test_coclick_pairs_on_ray_equal_the_local_ones(raw, ray_cluster):
    days = WINDOW.training_days(EVAL_DAY.isoformat())
    params = CoclickParams(min_support=2)
    local, no_reports = Compute().coclick_pairs(raw, days, params)
    on_ray, reports = Compute(ray_address=ray_cluster, shards=SHARDS).coclick_pairs(raw, days, params)
    assert no_reports == []
    assert local.pairs.height > 40 and local.pairs["support"].max() >= 3
    assert on_ray.pairs.equals(local.pairs)
    assert (on_ray.click_events, on_ray.clicking_users) == (local.click_events, local.clicking_users)
    mined = [r for r in reports if r["step"] == "mine user shard"]
    assert sorted(r["shard"] for r in mined) == list(range(SHARDS)) and sum(r["rows"] for r in mined) == local.click_events
    # Each shard alone, at min_support, would miss the pairs whose users fall in different shards.
    assert sum(r["rows"] for r in reports if r["step"] == "sum pair shard") > local.pairs.height


def test_ranking_rows_on_ray_equal_the_local_ones(raw, ray_cluster):
    key = EVAL_DAY.isoformat()
    days = WINDOW.training_days(key) + WINDOW.evaluation_days(key)
    eval_start = dt.datetime.combine(EVAL_DAY, dt.time(), tzinfo=dt.timezone.utc)
    # A catalog without some items, so that impressions are dropped on both sides.
    catalog = raw.inspect_items().checked().select("item_id").filter(pl.col("item_id") % 10 != 3)
    profiles = raw.inspect_users().checked()
    spec = FeatureSpec(sequence_length=7)
    local, _ = Compute().ranking_rows(raw, days, catalog, profiles, eval_start, spec)
    on_ray, reports = Compute(ray_address=ray_cluster, shards=SHARDS).ranking_rows(raw, days, catalog, profiles, eval_start, spec)
    assert local.rows.height > 1000 and local.dropped_unknown > 0 and local.rows["seq_length"].max() == 7
    assert on_ray.rows.columns == local.rows.columns
    assert on_ray.rows.equals(local.rows)
    assert on_ray.dropped_unknown == local.dropped_unknown
    assert {r["step"] for r in reports} == {"read impressions", "item timelines", "user sequences"}


def test_catalog_embeddings_on_ray_data_equal_the_local_ones(raw, ray_cluster):
    catalog = read_catalog(raw).with_columns(
        # The first batch has no image at all (its vision tower never runs), others a mix; some titles are blank.
        pl.when(pl.col("item_id") < 150).then(None).otherwise(pl.col("image")).alias("image"),
        pl.when(pl.col("item_id") % 7 == 0).then(None).otherwise(pl.col("title")).alias("title"),
    ).sort("item_id")
    model = build_model(presets.encoder("tiny")[0], seed=0).eval()
    local = Compute().item_embeddings(model, catalog)
    on_ray = embed_on_ray(model, catalog, actors=2, batch_size=96)
    assert on_ray["item_id"].equals(catalog["item_id"])
    assert on_ray.select("item_id", "has_image", "has_title").equals(local.select("item_id", "has_image", "has_title"))
    assert not on_ray["has_image"].head(96).any() and on_ray["has_image"].any()
    difference = np.abs(on_ray["embedding"].to_numpy() - local["embedding"].to_numpy()).max()
    assert difference <= 1e-5, difference


def test_two_ddp_workers_on_ray_train_reach_the_auc_of_one_process(raw, ray_cluster, tmp_path):
    key = EVAL_DAY.isoformat()
    days = WINDOW.training_days(key) + WINDOW.evaluation_days(key)
    eval_start = dt.datetime.combine(EVAL_DAY, dt.time(), tzinfo=dt.timezone.utc)
    catalog = raw.inspect_items().checked().select("item_id")
    rows = Compute().ranking_rows(raw, days, catalog, raw.inspect_users().checked(), eval_start, FeatureSpec(sequence_length=10))[0].rows
    generator = np.random.default_rng(0)
    items = catalog.height
    embeddings = catalog.with_columns(pl.Series("embedding", generator.normal(size=(items, 16)).astype(np.float32), dtype=pl.Array(pl.Float32, 16)))
    codes = catalog.with_columns(pl.Series("codes", generator.integers(0, 8, size=(items, 2)).tolist(), dtype=pl.Array(pl.Int64, 2)))
    inputs = ctr_inputs(rows, embeddings, codes, torch.randn(2, 8, 4), user_buckets=1009, use_base_pctr=False, where="test")
    architecture = {"id_dim": 16, "user_buckets": 1009, "user_dim": 8, "profile_dim": 4, "attention_dim": 16, "heads": 2, "dnn_dims": [32, 16]}
    settings = CTRTrainConfig(epochs=2, batch_size=128, sequence_length=10)
    one = train_variant(inputs, "saviorrec", architecture, settings)
    reported, saved = [], CheckpointFile(str(tmp_path / "ctr.safetensors"))
    two = train_variant(inputs, "saviorrec", architecture, settings, on_epoch=reported.append, checkpoints=lambda run_key: saved,
                        trainer=Compute(ray_address=ray_cluster, train_workers=2).ctr_trainer())
    labels = inputs.evaluation.label.numpy()
    auc_one, auc_two = roc_auc(labels, one.scores), roc_auc(labels, two.scores)
    assert auc_one > 0.6, auc_one  # it learnt something
    assert abs(auc_two - auc_one) <= 0.005, (auc_one, auc_two)
    # Averaged gradients keep the two runs' weights together (0.006 apart in pCTR when measured);
    # two workers each training alone on their half of every batch end 0.15 apart.
    assert np.abs(one.scores - two.scores).max() < 0.03
    assert two.training.history[-1]["eval_auc"] == pytest.approx(auc_two, abs=1e-6)  # the weights came back
    # Both workers' rows counted: every training row once per epoch, but a last batch smaller than the world.
    assert len(inputs.train) * 2 - 1 <= sum(r.examples for r in reported) <= len(inputs.train) * 2
    assert two.training.final_state is not None and two.training.total_steps == one.training.total_steps
    # Rank 0's checkpoint is the one in-process training resumes from: its last epoch, the same model.
    resumed = train_variant(inputs, "saviorrec", architecture, settings, checkpoints=lambda run_key: saved)
    assert resumed.training.history == two.training.history
    assert np.abs(resumed.scores - two.scores).max() <= 1e-6
    # And its final state is one the next day's warm start goes on from, along its schedule.
    champion = Champion(two.model.config, two.model.state_dict(), two.training.final_state, two.training.steps_done, two.training.total_steps)
    warm = train_variant(inputs, "saviorrec", architecture, CTRTrainConfig(epochs=1, batch_size=128, sequence_length=10), warm_from=champion)
    assert warm.training.steps_done == two.training.steps_done + -(-len(inputs.train) // 128)
    assert roc_auc(labels, warm.scores) > 0.6


def test_the_stage_assets_run_on_ray_through_the_compute_resource(raw, ray_cluster, tmp_path):
    """The same asset code, only the resource differs; the metadata says where each ran."""
    outputs = {}
    for name, compute in (("local", Compute()), ("ray", Compute(ray_address=ray_cluster, shards=2))):
        storage = ParquetStorage(root=str(tmp_path / name))
        result = dg.materialize(
            [impressions, item_catalog, user_profiles, coclick_pairs, ranking_dataset], partition_key=EVAL_DAY.isoformat(),
            resources={"raw": raw, "window": WINDOW, "compute": compute, "parquet_io_manager": ParquetIOManager(storage=storage)},
        )
        assert result.success
        outputs[name] = {asset: storage.read(asset, EVAL_DAY.isoformat()) for asset in ("coclick_pairs", "ranking_dataset")}
        for asset in ("coclick_pairs", "ranking_dataset"):
            metadata = result.asset_materializations_for_node(asset)[0].metadata
            assert metadata["engine"].value == compute.engine
            assert ("shards" in metadata) == (name == "ray")
    for asset in ("coclick_pairs", "ranking_dataset"):
        assert outputs["ray"][asset].equals(outputs["local"][asset]), asset

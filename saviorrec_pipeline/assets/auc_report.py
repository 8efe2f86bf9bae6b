"""auc_report: AUC per CTR variant, total and per item-PV bucket (paper Tables 1-2)."""

import base64
import io
import tempfile
from pathlib import Path
from typing import Iterator

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline.assets.common import RANKING_GROUP
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.metrics import PAPER_PV_EDGES, auc_report as build_report, format_edges
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.resources.tracking import MlflowTracking

DEFINED_CHECK = "auc_defined_for_every_variant"
NOT_BELOW_BASE_CHECK = "saviorrec_not_below_base"


class AucReportConfig(dg.Config):
    pv_edges: list[float] = Field(
        default=list(PAPER_PV_EDGES),
        description="lower edges of the item-PV buckets [lo, hi); the last runs to infinity (paper: 0 100 500 1000 5000 10000 20000)",
    )


@dg.asset(
    group_name=RANKING_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"ctr_model": dg.AssetIn()},
    check_specs=[
        dg.AssetCheckSpec(DEFINED_CHECK, asset="auc_report", description="total AUC defined and finite for every variant"),
        dg.AssetCheckSpec(NOT_BELOW_BASE_CHECK, asset="auc_report", description="saviorrec's total AUC is not below base's"),
    ],
    description="AUC per variant, total and per item-PV bucket, with samples, clicks, items and the delta to base.",
)
def auc_report(context: dg.AssetExecutionContext, config: AucReportConfig, ctr_model: pl.DataFrame, tracking: MlflowTracking) -> Iterator:
    edges = tuple(config.pv_edges)
    report = build_report(ctr_model, edges)
    table = markdown_table(report, edges)
    chart = bar_chart_png(report)
    with tracking.start_run(context, "auc_report") as run:
        run.log_params({"pv_edges": format_edges(edges)})
        totals = report.filter(pl.col("bucket") == "total")
        run.log_metrics({f"{v}_auc": a for v, a in totals.select("variant", "auc").iter_rows() if a is not None})
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "auc_report.md").write_text(table)
            Path(folder, "auc_by_pv_bucket.png").write_bytes(chart)
            report.write_parquet(Path(folder, "auc_report.parquet"))
            run.log_artifacts(Path(folder), "report")
    totals = {v: a for v, a in report.filter(pl.col("bucket") == "total").select("variant", "auc").iter_rows()}
    yield dg.Output(
        report,
        metadata={
            "pv_edges": format_edges(edges),
            "report": dg.MetadataValue.md(table),
            "auc_by_pv_bucket": dg.MetadataValue.md(f"![AUC by PV bucket](data:image/png;base64,{base64.b64encode(chart).decode()})"),
            "mlflow_run_id": run.run_id,
            **{f"{v}_total_auc": round(a, 5) for v, a in totals.items() if a is not None},
        },
    )
    undefined = [v for v, a in totals.items() if a is None or a != a]
    yield dg.AssetCheckResult(check_name=DEFINED_CHECK, passed=not undefined, metadata={"undefined": ", ".join(undefined) or "none"})
    if "saviorrec" in totals and "base" in totals and None not in (totals["saviorrec"], totals["base"]):
        passed, delta = totals["saviorrec"] >= totals["base"], totals["saviorrec"] - totals["base"]
        details = {"delta_total_auc": round(delta, 5)}
    else:
        passed, details = False, {"reason": "needs both base and saviorrec with a defined AUC"}
    yield dg.AssetCheckResult(check_name=NOT_BELOW_BASE_CHECK, passed=passed, severity=dg.AssetCheckSeverity.WARN, metadata=details)


def markdown_table(report: pl.DataFrame, edges: tuple[float, ...]) -> str:
    """Variants as rows, buckets as columns (AUC in %, delta to base), then the bucket sizes (Table 1)."""
    buckets = report["bucket"].unique(maintain_order=True).to_list()
    by_variant = []
    for variant in report["variant"].unique(maintain_order=True):
        rows = {r["bucket"]: r for r in report.filter(pl.col("variant") == variant).iter_rows(named=True)}
        cells = []
        for bucket in buckets:
            auc, delta = rows[bucket]["auc"], rows[bucket]["delta_vs_base"]
            cell = "n/a" if auc is None else f"{100 * auc:.2f}"
            if delta is not None and variant != "base":
                cell += f" ({100 * delta:+.2f})"
            cells.append(cell)
        by_variant.append([variant, *cells])
    first = report.filter(pl.col("variant") == report["variant"][0])
    sizes = [(r["bucket"], r["samples"], r["clicks"], r["items"]) for r in first.iter_rows(named=True)]
    return "\n\n".join([
        f"PV bucket edges: {format_edges(edges)}", table(["variant", *buckets], by_variant), table(["bucket", "samples", "clicks", "items"], sizes)
    ])


def bar_chart_png(report: pl.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = report["bucket"].unique(maintain_order=True).to_list()
    variants = report["variant"].unique(maintain_order=True).to_list()
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(buckets)), 3.5))
    for i, variant in enumerate(variants):
        rows = {r["bucket"]: r["auc"] for r in report.filter(pl.col("variant") == variant).iter_rows(named=True)}
        axis.bar([b + i * width for b in range(len(buckets))], [100 * (rows[b] or 0) for b in buckets], width, label=variant)
    defined = [a for a in report["auc"].to_list() if a is not None]
    if defined:
        axis.set_ylim(100 * min(defined) - 2, 100 * max(defined) + 1)
    axis.set_xticks([b + width * (len(variants) - 1) / 2 for b in range(len(buckets))], buckets, rotation=30, ha="right")
    axis.set_ylabel("AUC (%)")
    axis.set_xlabel("item PV bucket")
    axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()

"""AUC per CTR variant, total and per item-PV bucket: the daily `auc_report` (paper Tables 1-2), and
`ablation_report` (Tables 3 and 5, Fig. 4) over the paper_tables job's variants."""

import io
from typing import Iterator

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline.assets.common import PAPER_GROUP, RANKING_GROUP
from saviorrec_pipeline.charts import figure, markdown_image
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.metrics import PAPER_PV_EDGES, auc_report as build_report, difference_to, format_edges
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.resources.tracking import MlflowTracking, TrackedRun

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
        log_report(run, report, {"auc_report.md": table.encode(), "auc_by_pv_bucket.png": chart})
    totals = {v: a for v, a in report.filter(pl.col("bucket") == "total").select("variant", "auc").iter_rows()}
    yield dg.Output(
        report,
        metadata={
            "pv_edges": format_edges(edges),
            "report": dg.MetadataValue.md(table),
            "auc_by_pv_bucket": dg.MetadataValue.md(markdown_image("AUC by PV bucket", chart)),
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


def log_report(run: TrackedRun, report: pl.DataFrame, files: dict[str, bytes]) -> None:
    """The report's Parquet and its rendered `files` as the run's artifacts, under report/."""
    parquet = io.BytesIO()
    report.write_parquet(parquet)
    run.log_files({**files, "report.parquet": parquet.getvalue()}, "report")


def markdown_table(report: pl.DataFrame, edges: tuple[float, ...], baseline: str = "base", labels: dict[str, str] | None = None) -> str:
    """Variants as rows (named by `labels` where given), buckets as columns (AUC in %, with the
    delta to `baseline`), then the bucket sizes (Table 1)."""
    buckets = report["bucket"].unique(maintain_order=True).to_list()
    delta = f"delta_vs_{baseline}"
    by_variant = []
    for variant in report["variant"].unique(maintain_order=True):
        rows = {r["bucket"]: r for r in report.filter(pl.col("variant") == variant).iter_rows(named=True)}
        cells = []
        for bucket in buckets:
            auc, difference = rows[bucket]["auc"], rows[bucket][delta]
            cell = "n/a" if auc is None else f"{100 * auc:.2f}"
            if difference is not None and variant != baseline:
                cell += f" ({100 * difference:+.2f})"
            cells.append(cell)
        by_variant.append([(labels or {}).get(variant, variant), *cells])
    first = report.filter(pl.col("variant") == report["variant"][0])
    sizes = [(r["bucket"], r["samples"], r["clicks"], r["items"]) for r in first.iter_rows(named=True)]
    return "\n\n".join([
        f"PV bucket edges: {format_edges(edges)}; AUC %, in brackets the difference to {baseline}",
        table(["variant", *buckets], by_variant), table(["bucket", "samples", "clicks", "items"], sizes),
    ])


def bar_chart_png(report: pl.DataFrame, value: str = "auc", ylabel: str = "AUC (%)", labels: dict[str, str] | None = None) -> bytes:
    """Per PV bucket, a bar per variant of `value` (in %)."""
    buckets = report["bucket"].unique(maintain_order=True).to_list()
    variants = report["variant"].unique(maintain_order=True).to_list()
    width = 0.8 / len(variants)
    with figure(max(6, 1.1 * len(buckets)), 3.5) as (axis, out):
        for i, variant in enumerate(variants):
            rows = {r["bucket"]: r[value] for r in report.filter(pl.col("variant") == variant).iter_rows(named=True)}
            bars = [100 * (rows[b] or 0) for b in buckets]
            axis.bar([b + i * width for b in range(len(buckets))], bars, width, label=(labels or {}).get(variant, variant))
        defined = [100 * a for a in report[value].to_list() if a is not None]
        if defined and value == "auc":
            axis.set_ylim(min(defined) - 2, max(defined) + 1)
        else:
            axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks([b + width * (len(variants) - 1) / 2 for b in range(len(buckets))], buckets, rotation=30, ha="right")
        axis.set_ylabel(ylabel)
        axis.set_xlabel("item PV bucket")
        axis.legend(fontsize="small")
    return out["png"]


TABLE_3 = ("base", "no_mba", "no_mm_embedding", "no_bidir", "saviorrec")  # in the paper's order
MBA_DIM = "_mba_dim_"  # mba_dimensions' labels: {variant}_mba_dim_{dimension}
FIG_4 = {"no_item_id": "w/o item ID", "no_statistics": "w/o statistics", "base": "w/o multimodal (= base)"}


@dg.asset(
    group_name=PAPER_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"ctr_ablations": dg.AssetIn(), "mba_dimensions": dg.AssetIn()},
    description="Paper Table 3 (ablations), Table 5 (MBA codebook dimension) and Fig. 4 (AUC drop without item ID, statistics or "
    "multimodal features) on the evaluation window: AUC per variant, total and per item-PV bucket, with deltas to base and to saviorrec.",
)
def ablation_report(
    context: dg.AssetExecutionContext, config: AucReportConfig, ctr_ablations: pl.DataFrame, mba_dimensions: pl.DataFrame, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    edges = tuple(config.pv_edges)
    report = paper_ablation_report(ctr_ablations, mba_dimensions, edges)
    tables, charts = ablation_views(report, edges)
    with tracking.start_run(context, "ablation_report") as run:
        run.log_params({"pv_edges": format_edges(edges)})
        totals = report.filter(pl.col("bucket") == "total")
        run.log_metrics({f"{v}_auc": a for v, a in totals.select("variant", "auc").iter_rows() if a is not None})
        log_report(run, report, {**{f"{name}.md": text.encode() for name, text in tables.items()}, **{f"{name}.png": png for name, png in charts.items()}})
    return dg.Output(report, metadata={
        "pv_edges": format_edges(edges), "mlflow_run_id": run.run_id, **{name: dg.MetadataValue.md(text) for name, text in tables.items()},
        **{name: dg.MetadataValue.md(markdown_image(name, png)) for name, png in charts.items()},
    })


def paper_ablation_report(ablations: pl.DataFrame, dimensions: pl.DataFrame, edges: tuple[float, ...]) -> pl.DataFrame:
    """Every variant's AUC rows (`auc_report`'s columns) with the difference to saviorrec beside
    the one to base; Table 5's models compared with the ablations' base."""
    predictions = pl.concat([ablations, dimensions], how="diagonal_relaxed").select("variant", "item_id", "pv", "label", "pctr")
    if "base" not in predictions["variant"]:
        raise ValueError("ablation_report: ctr_ablations has no base variant to compare with (add it to ctr_ablations' variants)")
    return difference_to(build_report(predictions, edges), "saviorrec", "delta_vs_saviorrec")


def ablation_views(report: pl.DataFrame, edges: tuple[float, ...]) -> tuple[dict[str, str], dict[str, bytes]]:
    """The report as the paper shows it, (markdown tables, PNG charts) by name: Table 3 and Table 5
    (deltas to base), Fig. 4's drops against saviorrec (a table and a chart); each where its
    variants were trained."""
    present = report["variant"].unique(maintain_order=True).to_list()
    views: dict[str, str] = {}
    charts: dict[str, bytes] = {}
    table_3 = [v for v in TABLE_3 if v in present]
    if len(table_3) > 1:
        views["table_3"] = markdown_table(_in_order(report, table_3), edges)
    sizes = {v: v.split(MBA_DIM) for v in present if MBA_DIM in v}  # label: (variant, dimension)
    dimensions = sorted(sizes, key=lambda v: (sizes[v][0], -int(sizes[v][1])))
    if dimensions:
        labels = {v: f"{variant}, MBA dimension {dim}" for v, (variant, dim) in sizes.items()}
        views["table_5"] = markdown_table(_in_order(report, ["base", *dimensions]), edges, labels=labels)
    removed = [v for v in FIG_4 if v in present]
    if "saviorrec" in present and removed:
        drops = _in_order(report, ["saviorrec", *removed])
        views["fig_4"] = markdown_table(drops, edges, baseline="saviorrec", labels=FIG_4)
        charts["fig_4_chart"] = bar_chart_png(_in_order(report, removed), "delta_vs_saviorrec", "AUC difference to saviorrec (points)", FIG_4)
    return views, charts


def _in_order(report: pl.DataFrame, variants: list[str]) -> pl.DataFrame:
    order = {v: i for i, v in enumerate(variants)}
    return (report.filter(pl.col("variant").is_in(variants)).with_columns(pl.col("variant").replace_strict(order, return_dtype=pl.Int32).alias("_order"))
            .sort("_order", maintain_order=True).drop("_order"))

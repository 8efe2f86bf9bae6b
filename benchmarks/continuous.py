"""Continuous-training benchmark: consecutive days of the daily chain on the default demo, warm
(what `daily_retrain` now runs) beside from-scratch ranking models, in one run.

    python benchmarks/continuous.py --readme     # a first full day, then 14 days; the table into README.md
    python benchmarks/continuous.py --days 3

Demo data covers the 21-day training window, the first day and `--days` more. The first day runs
the whole chain from nothing, as every day did before the ranker warm-started and the encoder and
RQ-VAE got their own cadence: its time is the cost of a day without continuous training. Each
further day runs:
  (a) `saviorrec_chain` at its defaults: the encoder and RQ-VAE reused until their weekly refresh,
      the ranker going on from the champion on the day it has not seen, the gate;
  (b) the named alternative, from-scratch daily ranking models: the same variants (base and
      saviorrec) trained from fresh weights on the whole window, on the same item tables as (a)
      (through `ctr_ablations` with the `main` preset, which registers nothing), so the AUC
      difference is the warm start's alone.
Per day: seconds, AUC total and at PV<100 of saviorrec and base under (a) and (b), the gate's
decision, and the code churn on refresh days. Targets: a warm day at least 5x faster than the first
day's full chain; mean AUC of (a) at least that of (b) minus 0.005, total and at PV<100.
Writes benchmarks/results/continuous.json after every day.
"""

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import dagster as dg
import polars as pl

from saviorrec_pipeline.cli import DEMO_PV_EDGES
from saviorrec_pipeline.definitions import all_assets
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.metrics import auc_report
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking

from report import paste_into_readme, write_report  # benchmarks/, beside this script

RESULT = Path(__file__).parent / "results" / "continuous.json"
WINDOW = TrainEvalWindow(train_days=21, eval_days=1)
EDGES = {"pv_edges": list(DEMO_PV_EDGES)}
SCRATCH = {"ops": {"ctr_ablations": {"config": {"preset": "main"}}}}


def aucs(predictions: pl.DataFrame) -> dict[str, float | None]:
    """AUC total and at PV<100 per variant."""
    report = auc_report(predictions, (0, 100))
    return {f"{r['variant']}_{'total' if r['bucket'] == 'total' else 'pv_below_100'}": r["auc"]
            for r in report.filter(pl.col("bucket").is_in(["total", "[0,100)"])).iter_rows(named=True)}


def timed(run) -> tuple[dg.ExecuteInProcessResult, float]:
    started = time.perf_counter()
    result = run()
    if not result.success:
        raise SystemExit("a chain run failed; see its log above")
    return result, time.perf_counter() - started


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(asset)[0].metadata.items()}


def run(days: int, folder: Path) -> dict:
    spec = DemoSpec(days=WINDOW.train_days + 1 + days)
    raw = folder / "raw"
    generate_demo(raw, spec)
    storage = ParquetStorage(root=str(folder / "storage"))
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{folder}/mlflow.db", artifact_root=str(folder / "artifacts"))
    resources = {"raw": RawStore(root=str(raw)), "window": WINDOW, "compute": Compute(), "storage": storage, "tracking": tracking,
                 "parquet_io_manager": ParquetIOManager(storage=storage, tracking=tracking)}
    chain_config = {"ops": {"auc_report": {"config": EDGES}, "champion_gate": {"config": EDGES}}}
    first = spec.start_date + dt.timedelta(days=WINDOW.train_days)
    report = {"demo": {"days": spec.days, "users": spec.users, "items": spec.items}, "days": []}
    for offset in range(days + 1):
        day = (first + dt.timedelta(days=offset)).isoformat()
        chain, seconds = timed(lambda: dg.materialize(all_assets, selection=chain_job.selection, partition_key=day, resources=resources,
                                                      run_config=chain_config, raise_on_error=False))
        row = {"day": day, "chain_seconds": round(seconds, 1), "warm": aucs(storage.read("ctr_model", day)),
               "encoder": metadata(chain, "item_encoder")["training"], "rqvae": metadata(chain, "semantic_ids")["training"],
               "warm_start_from": metadata(chain, "ctr_model")["warm_start_from"], "gate": metadata(chain, "champion_gate")["decision"]}
        churn = metadata(chain, "semantic_ids")
        row["churn"] = {key: value for key, value in churn.items() if "churn_level" in key}
        if offset:
            _, scratch_seconds = timed(lambda: dg.materialize(all_assets, selection=["ctr_ablations"], partition_key=day, resources=resources,
                                                              run_config=SCRATCH, raise_on_error=False))
            row |= {"scratch_ctr_seconds": round(scratch_seconds, 1), "scratch": aucs(storage.read("ctr_ablations", day))}
        report["days"].append(row)
        print(row, flush=True)
        write_report(RESULT, report | summary(report["days"]))
    return report | summary(report["days"])


def summary(rows: list[dict]) -> dict:
    """Means over the days after the first, and the targets."""
    later = [row for row in rows[1:] if "scratch" in row]
    if not later:
        return {}
    mean = lambda values: sum(values) / len(values)
    figures = {"first_day_chain_seconds": rows[0]["chain_seconds"], "warm_day_chain_seconds": mean([r["chain_seconds"] for r in later])}
    figures["speedup"] = figures["first_day_chain_seconds"] / figures["warm_day_chain_seconds"]
    for side in ("warm", "scratch"):
        for key in ("saviorrec_total", "saviorrec_pv_below_100", "base_total", "base_pv_below_100"):
            figures[f"{side}_{key}"] = mean([r[side][key] for r in later if r[side].get(key) is not None])
    figures["targets"] = {
        "warm day at least 5x faster": figures["speedup"] >= 5,
        "warm saviorrec total AUC >= scratch - 0.005": figures["warm_saviorrec_total"] >= figures["scratch_saviorrec_total"] - 0.005,
        "warm saviorrec PV<100 AUC >= scratch - 0.005": figures["warm_saviorrec_pv_below_100"] >= figures["scratch_saviorrec_pv_below_100"] - 0.005,
    }
    return {"summary": figures, "table": markdown(rows)}


def markdown(rows: list[dict]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    lines = []
    for row in rows:
        scratch = row.get("scratch", {})
        churn = ", ".join(f"{100 * row['churn'][k]:.0f}%" for k in sorted(row["churn"]) if k.startswith("code_churn")) or "-"
        lines.append((row["day"], f"{row['encoder']}/{row['rqvae']}", row["warm_start_from"], row["gate"], churn, row["chain_seconds"],
                      row.get("scratch_ctr_seconds", "-"), pct(row["warm"].get("saviorrec_total")), pct(scratch.get("saviorrec_total")),
                      pct(row["warm"].get("saviorrec_pv_below_100")), pct(scratch.get("saviorrec_pv_below_100"))))
    header = ["day", "encoder/RQ-VAE", "ranker from", "gate", "code churn per level", "chain s (a)", "scratch ranker s (b)",
              "saviorrec AUC (a)", "(b)", "PV<100 (a)", "(b)"]
    return table(header, lines, numeric_columns=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=14, help="days after the first full one")
    parser.add_argument("--readme", action="store_true", help="paste the table into README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = run(args.days, Path(folder))
    print(report.get("table", ""))
    print(report.get("summary", ""))
    if args.readme and "summary" in report:
        paste_into_readme("continuous.md", readme_text(report))


def readme_text(report: dict) -> str:
    figures = report["summary"]
    means = table(
        ["mean over the later days", "saviorrec total", "saviorrec PV<100", "base total", "base PV<100"],
        [(name, *(f"{100 * figures[f'{side}_{key}']:.2f}" for key in ("saviorrec_total", "saviorrec_pv_below_100", "base_total", "base_pv_below_100")))
         for name, side in (("(a) warm, daily chain", "warm"), ("(b) from-scratch rankers", "scratch"))],
        numeric_columns=4,
    )
    return (
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on 2 CPU cores by `python benchmarks/continuous.py --readme`: the default demo, "
        f"a first full day then {len(report['days']) - 1} days. The first day's whole chain took {figures['first_day_chain_seconds']:.0f} s; a later day's "
        f"chain {figures['warm_day_chain_seconds']:.0f} s on average ({figures['speedup']:.1f}x faster). AUC in %.\n\n"
        f"{report['table']}\n\n{means}\n\n"
        f"Targets: {'; '.join(f'{name}: ' + ('met' if met else 'missed') for name, met in figures['targets'].items())}.\n"
    )


if __name__ == "__main__":
    main()

"""Scale-out benchmark: co-click mining and the ranking join on Ray (a local Ray of 2 CPUs, 4
shards per shuffle over its 2 workers) beside the in-process Polars recipes (the named
alternative), at two sizes each, in one run; the shards' seconds and peak memory per worker; CTR
training samples/s in one process and with 1 and 2 Ray Train DDP workers; and, from the per-shard
figures, a plan for the paper's traffic (10^8 impressions a day, a 21-day window), an extrapolation.

    python benchmarks/scaleout.py --readme     # 10^6 and 10^7 click events; demo scales 3 and 30 (~10^6, ~10^7 impressions)
    python benchmarks/scaleout.py --events 100000 1000000 --scales 0.5 1 --train-rows 20000

Co-click mining reads benchmarks/coclick.py's synthetic click log, written as one raw folder per
day; the ranking join reads demo data. Both engines must give the same pairs and rows, or the
benchmark fails. Peak RSS of an in-process run and of the Ray driver is this process's (the
kernel's high-water mark, reset before each); a worker's is its process's, sampled while it ran a
shard. Writes benchmarks/results/scaleout.json and scaleout.md (with --readme, pasted into
README.md's "Scale-out" section).
"""

import argparse
import dataclasses
import datetime as dt
import math
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import ray
import torch

from saviorrec_pipeline import presets
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.coclick import CoclickParams
from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, ctr_inputs, train_variant
from saviorrec_pipeline.method.ranking_features import FeatureSpec
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore

from coclick import write_click_log  # benchmarks/, beside this script
from measure import measured
from report import write_markdown, write_report

RESULTS = Path(__file__).parent / "results"
CPUS = 2  # the local Ray's: 2 workers
SHARDS = 4  # per shuffle, so that each worker runs two in turn
PAPER_DAY, PAPER_WINDOW_DAYS = 10**8, 21  # impressions a day; training days (+1 evaluation day)
WORKER_MEMORY_GIB, WORKER_CPUS, MAX_WORKERS = 32, 8, 16  # deploy/k8s/raycluster.yaml's cpu group


def compared(stage: str, work: str, run, result: str, folder: Path) -> tuple[dict, object]:
    """`run(compute)` in-process and on Ray; their `result` frames must be equal. The in-process
    result waits on disk while Ray runs, so that the driver's peak memory is Ray's alone."""
    local_figures, (local, _) = measured(lambda: run(Compute()))
    kept = folder / f"{stage}-local.parquet"
    getattr(local, result).write_parquet(kept)
    summary = dataclasses.replace(local, **{result: getattr(local, result).clear()})
    del local
    ray_figures, (distributed, reports) = measured(lambda: run(Compute(ray_address="local", shards=SHARDS)))
    if not pl.read_parquet(kept).equals(getattr(distributed, result)):
        raise SystemExit(f"{stage}: Ray and in-process results differ")
    out = {"stage": stage, "work": work, "local": local_figures, "ray": ray_figures,
           "ray_over_local_seconds": round(ray_figures["seconds"] / local_figures["seconds"], 2), "steps": per_step(reports)}
    return out, dataclasses.replace(summary, **{result: getattr(distributed, result)})


def coclick_stage(folder: Path, events: int) -> dict:
    """Co-click mining of a synthetic click log (benchmarks/coclick.py's) of `events` clicks over 21
    days, written as raw impressions, one folder per day."""
    log = folder / f"clicks-{events}.parquet"
    write_click_log(log, events)
    raw = folder / f"clicks-{events}"
    clicks = pl.read_parquet(log).with_columns(pl.lit(1, pl.Int8).alias("clicked"))
    for (day,), part in clicks.with_columns(pl.col("ts").dt.date().alias("day")).partition_by("day", as_dict=True, include_key=False).items():
        (raw / "impressions" / f"date={day}").mkdir(parents=True)
        part.write_parquet(raw / "impressions" / f"date={day}" / "part-0.parquet")
    store = RawStore(root=str(raw))
    out, local = compared("co-click mining", "click events", lambda compute: compute.coclick_pairs(store, store.days_with_impressions(), CoclickParams()),
                          "pairs", folder)
    return {**out, "size": local.click_events, "clicks": local.click_events}


def ranking_stage(raw: RawStore) -> tuple[dict, pl.DataFrame]:
    """The ranking join of the demo data in `raw` (its last day evaluated); and its rows."""
    days = raw.days_with_impressions()
    eval_start = dt.datetime.combine(days[-1], dt.time(), tzinfo=dt.timezone.utc)
    catalog, profiles = raw.inspect_items().checked().select("item_id"), raw.inspect_users().checked()
    out, local = compared("ranking join", "impressions", lambda compute: compute.ranking_rows(raw, days, catalog, profiles, eval_start, FeatureSpec()),
                          "rows", Path(raw.root).parent)
    return {**out, "size": local.rows.height, "clicks": int(local.rows["clicked"].sum())}, local.rows


def per_step(reports: list[dict]) -> list[dict]:
    """Per step of the stage: its shards' rows, and the slowest and largest shard."""
    steps = {}
    for report in reports:
        steps.setdefault(report["step"], []).append(report)
    return [{"step": step, "shards": len(shards), "rows": sum(r["rows"] for r in shards), "max_rows": max(r["rows"] for r in shards),
             "max_seconds": max(r["seconds"] for r in shards), "max_peak_rss_mib": max(r["peak_rss_mib"] for r in shards),
             "max_added_mib": max(r["added_mib"] for r in shards), "idle_rss_mib": min(r["peak_rss_mib"] - r["added_mib"] for r in shards)}
            for step, shards in steps.items()]


def training(rows: pl.DataFrame, items: pl.DataFrame, train_rows: int) -> list[dict]:
    """One epoch of the main preset's saviorrec on `train_rows` training rows (random item tables:
    the cost does not depend on them) for the catalog's `items`: in-process, then 1 and 2 Ray Train
    DDP workers."""
    rows = pl.concat([rows.filter(pl.col("split") == "train").tail(train_rows), rows.filter(pl.col("split") == "eval").head(1000)])
    generator = np.random.default_rng(0)
    embeddings = items.with_columns(pl.Series("embedding", generator.normal(size=(items.height, 64)).astype(np.float32), dtype=pl.Array(pl.Float32, 64)))
    codes = items.with_columns(pl.Series("codes", generator.integers(0, 256, size=(items.height, 3)).tolist(), dtype=pl.Array(pl.Int64, 3)))
    inputs = ctr_inputs(rows, embeddings, codes, torch.randn(3, 256, 32), user_buckets=100_003, use_base_pctr=False, where="benchmark")
    variants, architecture, settings = presets.ctr("main")
    settings = CTRTrainConfig(**{**vars(settings), "epochs": 1})
    out = []
    for engine, trainer in (("in-process", None), ("Ray Train, 1 worker", Compute(ray_address="local", train_workers=1).ctr_trainer()),
                            ("Ray Train, 2 DDP workers", Compute(ray_address="local", train_workers=2).ctr_trainer())):
        figures, trained = measured(lambda: train_variant(inputs, "saviorrec", architecture, settings, trainer=trainer))
        out.append({"engine": engine, "rows": len(inputs.train), "samples_per_s": round(trained.training.samples_per_s), **figures})
        print(out[-1], flush=True)
    return out


def plan(stages: list[dict]) -> dict:
    """Tasks, memory per task and compute time for the paper's window on the workers of
    deploy/k8s/raycluster.yaml, extrapolated linearly from the largest run's largest shard per
    step: its seconds per row, and the memory it added per row on top of an idle worker's. Read
    steps keep one task per day; the shuffles' transfers between nodes are not counted."""
    slots, task_budget_mib = WORKER_CPUS * MAX_WORKERS, WORKER_MEMORY_GIB * 1024 / WORKER_CPUS
    joins = sorted((s for s in stages if s["stage"] == "ranking join"), key=lambda s: s["size"])
    click_rate = joins[-1]["clicks"] / joins[-1]["size"]  # the demo's, for the paper's clicks
    window_work = {"ranking join": PAPER_DAY * (PAPER_WINDOW_DAYS + 1), "co-click mining": PAPER_DAY * PAPER_WINDOW_DAYS * click_rate}
    out = {"window_days": PAPER_WINDOW_DAYS + 1, "impressions_a_day": PAPER_DAY, "click_rate": round(click_rate, 4),
           "worker": {"cpus": WORKER_CPUS, "memory_gib": WORKER_MEMORY_GIB}, "max_workers": MAX_WORKERS, "stages": []}
    for name in dict.fromkeys(s["stage"] for s in stages):
        large = max((s for s in stages if s["stage"] == name), key=lambda s: s["size"])
        scale = window_work[name] / large["size"]
        steps, total = [], 0.0
        for step in large["steps"]:
            idle_mib, mib_per_row = step["idle_rss_mib"], step["max_added_mib"] / step["max_rows"]
            rows = step["rows"] * scale
            if step["step"].startswith("read"):
                tasks = step["shards"]  # one per day, as measured
            else:  # enough shards that a task fits a worker's memory over its CPUs
                tasks = max(slots, math.ceil(rows * mib_per_row / max(task_budget_mib - idle_mib, 1.0)))
            seconds = step["max_seconds"] / step["max_rows"] * (rows / tasks) * math.ceil(tasks / slots)
            total += seconds
            steps.append({"step": step["step"], "rows": round(rows), "tasks": tasks, "task_memory_mib": round(idle_mib + rows / tasks * mib_per_row),
                          "seconds": round(seconds)})
        out["stages"].append({"stage": name, "steps": steps, "compute_seconds": round(total)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000], help="click events of the co-click runs")
    parser.add_argument("--scales", type=float, nargs="+", default=[3, 30], help="demo scales of the ranking-join runs")
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    stages, ctr = [], []
    with tempfile.TemporaryDirectory() as folder:
        for events in args.events:
            stages.append(coclick_stage(Path(folder), events))
            print(stages[-1], flush=True)
        for scale in args.scales:
            raw = RawStore(root=f"{folder}/demo-{scale:g}")
            generate_demo(Path(raw.root), DemoSpec(scale=scale))
            run, rows = ranking_stage(raw)
            stages.append(run)
            print(stages[-1], flush=True)
            if scale == min(args.scales):
                ctr = training(rows, raw.inspect_items().checked().select("item_id"), args.train_rows)
            del rows
    ray.shutdown()
    paper = plan(stages)
    report = {"benchmark": "scaleout", "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()}, "ray_cpus": CPUS,
              "shards": SHARDS, "stages": stages, "ctr_training": ctr, "paper_plan": paper}
    write_report(RESULTS / "scaleout.json", report)
    markdown = table(["stage", "work", "local s", "local peak MiB", "Ray s", "Ray driver peak MiB", "Ray / local seconds"],
                     [(s["stage"], f"{s['size']:,} {s['work']}", s["local"]["seconds"], s["local"]["peak_rss_mib"], s["ray"]["seconds"],
                       s["ray"]["peak_rss_mib"], s["ray_over_local_seconds"]) for s in stages])
    markdown += "\n\n" + table(["stage", "work", "step", "shards", "largest shard rows", "its seconds", "worker peak MiB", "added by a task, max MiB"],
                             [(s["stage"], f"{s['size']:,}", step["step"], step["shards"], f"{step['max_rows']:,}", step["max_seconds"], step["max_peak_rss_mib"],
                               step["max_added_mib"]) for s in stages for step in s["steps"]])
    markdown += "\n\n" + table(["CTR training (1 epoch)", "rows", "samples/s", "seconds"], [(c["engine"], f"{c['rows']:,}", f"{c['samples_per_s']:,}", c["seconds"]) for c in ctr])
    markdown += (f"\n\nExtrapolated from the shards above, not measured: 10^8 impressions a day over {PAPER_WINDOW_DAYS} training days and 1 "
                 f"evaluation day (clicks at the demo's rate, {paper['click_rate']:.1%}), on up to {MAX_WORKERS} workers of {WORKER_CPUS} CPUs and "
                 f"{WORKER_MEMORY_GIB} GiB:\n\n")
    markdown += table(["stage", "step", "rows", "tasks", "memory per task MiB", "seconds"],
                      [(s["stage"], step["step"], f"{step['rows']:,}", step["tasks"], step["task_memory_mib"], step["seconds"]) for s in paper["stages"] for step in s["steps"]])
    markdown += "\n\n" + table(["stage", "expected compute time (transfers not counted)"],
                               [(s["stage"], f"{s['compute_seconds']:,} s") for s in paper["stages"]]) + "\n"
    budget = WORKER_MEMORY_GIB * 1024 // WORKER_CPUS
    over = sorted({step["step"] for s in paper["stages"] for step in s["steps"] if step["task_memory_mib"] > budget})
    if over:
        markdown += (f"\nOver a task's share of a worker ({budget:,} MiB): {', '.join(over)}. These steps run one task per day, and "
                     "a day of 10^8 impressions does not fit one; they would need a task per file.\n")
    write_markdown(RESULTS / "scaleout.md", markdown, args.readme)


if __name__ == "__main__":
    main()

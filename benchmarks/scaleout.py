"""Scale-out benchmark: co-click mining and the ranking join on Ray (a local Ray of 2 CPUs, shards
spread over its 2 workers) beside the in-process Polars recipes (the named alternative), at two
sizes, in one run; the shards' seconds and peak memory per worker; CTR training samples/s in one
process and with 1 and 2 Ray Train DDP workers; and, from the per-shard figures, a plan for the
paper's traffic (10^8 impressions a day, a 21-day window), an extrapolation.

    python benchmarks/scaleout.py --readme                 # demo scales 3 and 30 (~10^6, ~10^7 impressions)
    python benchmarks/scaleout.py --scales 1 3 --train-rows 50000

Both engines must give the same pairs and rows, or the benchmark fails. Peak RSS of an in-process
run and of the Ray driver is this process's (the kernel's high-water mark, reset before each);
a worker's is its process's, sampled while it ran a shard. Writes benchmarks/results/scaleout.json
and scaleout.md (with --readme, pasted into README.md's "Scale-out" section).
"""

import argparse
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

from measure import measured  # benchmarks/, beside this script
from report import write_markdown, write_report

RESULTS = Path(__file__).parent / "results"
CPUS = 2  # the local Ray's, as the "2 local workers"
PAPER_DAY, PAPER_WINDOW_DAYS = 10**8, 21  # impressions a day; training days (+1 evaluation day)
WORKER_MEMORY_GIB, WORKER_CPUS, MAX_WORKERS = 32, 8, 16  # deploy/k8s/raycluster.yaml's cpu group


def window(raw: RawStore) -> tuple[list[dt.date], dt.datetime]:
    days = raw.days_with_impressions()
    return days, dt.datetime.combine(days[-1], dt.time(), tzinfo=dt.timezone.utc)


def data_stages(raw: RawStore, shards: int) -> tuple[list[dict], pl.DataFrame]:
    """Both stages in-process and on Ray, checked equal; and the ranking rows (for training)."""
    days, eval_start = window(raw)
    catalog, profiles = raw.inspect_items().checked().select("item_id"), raw.inspect_users().checked()
    on_ray = Compute(ray_address="local", shards=shards)
    stages = {
        "co-click mining": lambda compute: compute.coclick_pairs(raw, days[:-1], CoclickParams()),
        "ranking join": lambda compute: compute.ranking_rows(raw, days, catalog, profiles, eval_start, FeatureSpec()),
    }
    out, rows = [], None
    impressions = sum(raw.read_impressions(day).height for day in days)
    for stage, run in stages.items():
        local_figures, (local, _) = measured(lambda: run(Compute()))
        ray_figures, (distributed, reports) = measured(lambda: run(on_ray))
        frame = "pairs" if stage == "co-click mining" else "rows"
        if not getattr(local, frame).equals(getattr(distributed, frame)):
            raise SystemExit(f"{stage}: Ray and in-process results differ")
        size = local.click_events if stage == "co-click mining" else impressions
        out.append({"stage": stage, "size": size, "impressions": impressions, "work": "click events" if stage == "co-click mining" else "impressions",
                    "local": local_figures, "ray": ray_figures, "ray_over_local_seconds": round(ray_figures["seconds"] / local_figures["seconds"], 2),
                    "steps": per_step(reports)})
        print(out[-1], flush=True)
        rows = local.rows if stage == "ranking join" else rows
        del local, distributed
    return out, rows


def per_step(reports: list[dict]) -> list[dict]:
    """Per step of the stage: its shards' rows, and the slowest and largest shard."""
    steps = {}
    for report in reports:
        steps.setdefault(report["step"], []).append(report)
    return [{"step": step, "shards": len(shards), "rows": sum(r["rows"] for r in shards), "max_rows": max(r["rows"] for r in shards),
             "max_seconds": max(r["seconds"] for r in shards), "max_peak_rss_mib": max(r["peak_rss_mib"] for r in shards)}
            for step, shards in steps.items()]


def training(rows: pl.DataFrame, train_rows: int) -> list[dict]:
    """One epoch of the main preset's saviorrec on `train_rows` training rows (random item tables:
    the cost does not depend on them): in-process, then 1 and 2 Ray Train DDP workers."""
    rows = pl.concat([rows.filter(pl.col("split") == "train").tail(train_rows), rows.filter(pl.col("split") == "eval").head(1000)])
    items = rows.select(pl.col("item_id").unique().sort())
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
    """Tasks, memory per task and wall time for the paper's window on the workers of
    deploy/k8s/raycluster.yaml, extrapolated linearly from the measured shards: per step, the
    seconds per row of the largest run's largest shard, and the peak memory as a line through the
    largest shards of the smallest and the largest run. Read steps keep one task per day."""
    names = dict.fromkeys(s["stage"] for s in stages)
    slots, task_budget_mib = WORKER_CPUS * MAX_WORKERS, WORKER_MEMORY_GIB * 1024 / WORKER_CPUS
    out = {"window_days": PAPER_WINDOW_DAYS + 1, "impressions_a_day": PAPER_DAY, "worker": {"cpus": WORKER_CPUS, "memory_gib": WORKER_MEMORY_GIB},
           "max_workers": MAX_WORKERS, "stages": []}
    for name in names:
        runs = sorted((s for s in stages if s["stage"] == name), key=lambda s: s["impressions"])
        small, large = runs[0], runs[-1]
        scale = PAPER_DAY * (PAPER_WINDOW_DAYS + 1) / large["impressions"]
        steps, wall = [], 0.0
        for few, many in zip(small["steps"], large["steps"]):
            mib_per_row = max(many["max_peak_rss_mib"] - few["max_peak_rss_mib"], 0.0) / max(many["max_rows"] - few["max_rows"], 1)
            base_mib = many["max_peak_rss_mib"] - mib_per_row * many["max_rows"]
            rows = many["rows"] * scale
            if many["step"].startswith("read"):
                tasks = many["shards"]  # one per day, as measured
            else:  # enough shards that a task fits a worker's memory over its CPUs
                tasks = max(slots, math.ceil(rows * mib_per_row / max(task_budget_mib - base_mib, 1.0)))
            seconds = many["max_seconds"] / many["max_rows"] * (rows / tasks) * math.ceil(tasks / slots)
            wall += seconds
            steps.append({"step": many["step"], "rows": round(rows), "tasks": tasks, "task_memory_mib": round(base_mib + rows / tasks * mib_per_row),
                          "seconds": round(seconds)})
        out["stages"].append({"stage": name, "steps": steps, "wall_seconds": round(wall)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[3, 30])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    stages, ctr = [], []
    with tempfile.TemporaryDirectory() as folder:
        for scale in args.scales:
            raw = Path(folder) / f"raw-{scale:g}"
            generate_demo(raw, DemoSpec(scale=scale))
            runs, rows = data_stages(RawStore(root=str(raw)), args.shards)
            stages += runs
            if scale == min(args.scales):
                ctr = training(rows, args.train_rows)
            del rows
    ray.shutdown()
    paper = plan(stages)
    report = {"benchmark": "scaleout", "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()}, "ray_cpus": CPUS,
              "shards": args.shards, "stages": stages, "ctr_training": ctr, "paper_plan": paper}
    write_report(RESULTS / "scaleout.json", report)
    markdown = table(["stage", "work", "local s", "local peak MiB", "Ray s", "Ray driver peak MiB", "Ray / local seconds"],
                     [(s["stage"], f"{s['size']:,} {s['work']}", s["local"]["seconds"], s["local"]["peak_rss_mib"], s["ray"]["seconds"],
                       s["ray"]["peak_rss_mib"], s["ray_over_local_seconds"]) for s in stages])
    markdown += "\n\n" + table(["stage", "work", "step", "shards", "largest shard rows", "its seconds", "worker peak MiB"],
                             [(s["stage"], f"{s['size']:,}", step["step"], step["shards"], f"{step['max_rows']:,}", step["max_seconds"], step["max_peak_rss_mib"])
                              for s in stages for step in s["steps"]])
    markdown += "\n\n" + table(["CTR training (1 epoch)", "rows", "samples/s", "seconds"], [(c["engine"], f"{c['rows']:,}", f"{c['samples_per_s']:,}", c["seconds"]) for c in ctr])
    markdown += (f"\n\nExtrapolated from the shards above, not measured: 10^8 impressions a day over {PAPER_WINDOW_DAYS} training days and 1 "
                 f"evaluation day, on up to {MAX_WORKERS} workers of {WORKER_CPUS} CPUs and {WORKER_MEMORY_GIB} GiB:\n\n")
    markdown += table(["stage", "step", "rows", "tasks", "memory per task MiB", "seconds"],
                      [(s["stage"], step["step"], f"{step['rows']:,}", step["tasks"], step["task_memory_mib"], step["seconds"]) for s in paper["stages"] for step in s["steps"]])
    markdown += "\n\n" + table(["stage", "expected wall time"], [(s["stage"], f"{s['wall_seconds'] / 60:.0f} min") for s in paper["stages"]]) + "\n"
    write_markdown(RESULTS / "scaleout.md", markdown, args.readme)


if __name__ == "__main__":
    main()

"""Whole-chain benchmark: `saviorrec demo` (every stage, in-process executor) on demo data at two or
more scales, wall seconds and the peak RSS of its whole process tree, pinned to two CPU cores.

    python benchmarks/chain.py                      # demo scales 0.5 and 1 (1: the default demo)
    python benchmarks/chain.py --scales 1

The named alternative is the same chain on the same data with Dagster's multiprocess executor
(`benchmarks/multiprocess_definitions.py`, run by `dagster job execute`), every step in its own
process. It is Dagster's default and what a code location gets unless told otherwise; the project
chose the in-process executor on one machine because a process per step imports PyTorch and the
pipeline again for each step, and this measures that choice on the whole chain. (A `paper`-size
chain would be the other natural comparison, but it takes hours on CPU.)

Each scale's raw data is generated once (`saviorrec generate-demo`, measured too) and both runs
read it, each with its own fresh project home (storage, MLflow, Dagster instance). The default
demo's target, under 10 minutes on 2 cores, is generation plus the in-process chain.
Writes benchmarks/results/chain.json.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil
import yaml

from saviorrec_pipeline.cli import DEMO_PV_EDGES, EMBEDDED_INSTANCE

from measure import comparison, run_tree  # benchmarks/, beside this script
from ranking import eval_start, impression_count
from report import write_report

CORES = 2  # the target is stated for 2 CPU cores
MULTIPROCESS_DEFINITIONS = Path(__file__).parent / "multiprocess_definitions.py"


def pinned_cpus() -> set[int]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < CORES:
        raise SystemExit(f"the chain benchmark runs on {CORES} CPU cores; this process may use only {len(available)}")
    return set(available[:CORES])


def fresh_home(folder: Path, raw: Path) -> dict[str, str]:
    """The environment of a run in its own project home over the shared raw data, free of the
    caller's SAVIORREC_, DAGSTER_ and MLFLOW_ settings; Dagster's instance is the embedded default
    (SQLite), as `saviorrec demo` sets it up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVIORREC_", "DAGSTER_", "MLFLOW_"))}
    (folder / "dagster").mkdir(parents=True)
    shutil.copyfile(EMBEDDED_INSTANCE, folder / "dagster" / "dagster.yaml")
    return {**env, "SAVIORREC_HOME": str(folder), "SAVIORREC_RAW_ROOT": str(raw), "DAGSTER_HOME": str(folder / "dagster")}


def chain_at(scale: float, folder: Path, cpus: set[int]) -> dict:
    """Generate demo data at `scale`, then run the chain on it with each executor."""
    raw = folder / "raw"
    generation = run_tree([sys.executable, "-m", "saviorrec_pipeline.cli", "generate-demo", "--out", str(raw), "--scale", str(scale)],
                          dict(os.environ), folder / "generate.log", cpus)
    day = eval_start(raw).date().isoformat()
    in_process = run_tree([sys.executable, "-m", "saviorrec_pipeline.cli", "demo"], fresh_home(folder / "in-process", raw),
                          folder / "in-process.log", cpus)
    run_config = folder / "run_config.yaml"
    # The run config `saviorrec demo` passes: the demo's PV bucket edges.
    run_config.write_text(yaml.safe_dump({"ops": {stage: {"config": {"pv_edges": list(DEMO_PV_EDGES)}} for stage in ("auc_report", "champion_gate")}}))
    multiprocess = run_tree(
        [sys.executable, "-m", "dagster", "job", "execute", "-f", str(MULTIPROCESS_DEFINITIONS), "-j", "saviorrec_chain",
         "--tags", json.dumps({"dagster/partition": day}), "-c", str(run_config)],
        fresh_home(folder / "multiprocess", raw), folder / "multiprocess.log", cpus,
    )
    return {"size": impression_count(raw), "scale": scale, "partition": day, "generate": generation, "ours": in_process, "alternative": multiprocess}


def run(scales: list[float]) -> dict:
    """The report: generation and both chains at each demo scale."""
    cpus = pinned_cpus()
    runs = []
    for scale in scales:
        with tempfile.TemporaryDirectory() as folder:
            runs.append(chain_at(scale, Path(folder), cpus))
        print(json.dumps(runs[-1]), flush=True)
    return {
        "benchmark": "chain",
        "cpus": sorted(cpus),
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "stages": [comparison("whole demo chain", "impressions", "saviorrec demo (in-process executor)",
                              "multiprocess executor (a process per step)", runs)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chain.json")
    args = parser.parse_args()
    write_report(args.out, run(args.scales))


if __name__ == "__main__":
    main()

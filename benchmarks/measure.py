"""How every benchmark measures: seconds and peak RSS of one piece of work, a child process's JSON
answer, a process tree's peak, and one stage's comparison in the shape `run_all.py` tabulates.

Peak RSS is the kernel's high-water mark (VmHWM), reset before each piece of work, so two pieces
measured one after the other in the same process each get their own peak (Linux only).
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import polars as pl
import psutil

POLL_SECONDS = 0.2  # how often a process tree's memory is sampled


def reset_peak_rss() -> None:
    """Start a new high-water mark for this process ("5" clears it, see proc(5), /proc/pid/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)


def measured(work: Callable[[], object]) -> tuple[dict, object]:
    """Run `work` once: its seconds and this process's peak RSS while it ran, and what it returned."""
    reset_peak_rss()
    start = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib()}, value


def run_child(script: str, *args: str) -> dict:
    """Run `python script args...` and return the JSON object its last stdout line holds."""
    child = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed ({child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def polars_beside_duckdb(script: str, data: Path, folder: Path) -> dict:
    """Run `script --child ENGINE DATA OUT` for Polars (ours) and DuckDB (the alternative), each in its
    own process so that its peak RSS is its own. Both must write the same table to OUT, or this fails.
    Returns each side's JSON answer."""
    folder.mkdir(parents=True, exist_ok=True)
    sides, outputs = {}, {}
    for side, engine in (("ours", "polars"), ("alternative", "duckdb")):
        outputs[side] = folder / f"{engine}.parquet"
        sides[side] = run_child(script, "--child", engine, str(data), str(outputs[side]))
        print(f"{Path(script).stem} {data.name} {engine:<6} {sides[side]}", flush=True)
    ours, theirs = (pl.read_parquet(outputs[side]) for side in ("ours", "alternative"))
    if not ours.equals(theirs):
        raise SystemExit(f"{Path(script).name} on {data}: Polars and DuckDB disagree: {ours.height} vs {theirs.height} rows, "
                         f"schemas {ours.schema} vs {theirs.schema}")
    return sides


def run_tree(command: list[str], env: dict[str, str], log: Path, cpus: set[int] | None = None) -> dict:
    """Run a command to its end: wall seconds and the peak of its whole process tree's summed RSS,
    sampled every POLL_SECONDS, never below the exact peak of its largest single process.
    Output goes to `log`; `cpus` pins the command (and so its children) to those CPUs."""
    with log.open("w") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        root = psutil.Process(process.pid)
        peak_bytes = 0
        while True:
            try:
                tree = [root, *root.children(recursive=True)]
                peak_bytes = max(peak_bytes, sum(p.memory_info().rss for p in tree))
            except psutil.NoSuchProcess:  # a process ended between listing and reading it
                pass
            # wait4, not Popen.poll: its resource usage is this child's alone (with its descendants').
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(max(peak_bytes, usage.ru_maxrss * 1024) / 2**20, 1)}


def scaling_exponent(sizes: list[float], seconds: list[float]) -> float | None:
    """Slope of log(seconds) against log(work), least squares over the sizes (exactly the slope
    between them for two): 1 is linear, 2 quadratic. None with fewer than two distinct sizes."""
    if len(set(sizes)) < 2:
        return None
    x = [math.log(s) for s in sizes]
    y = [math.log(t) for t in seconds]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)
    return round(slope, 2)


def comparison(stage: str, work: str, ours: str, alternative: str, runs: list[dict]) -> dict:
    """One stage beside its named alternative. `runs`: per data size, `size` (in units of `work`) and
    the `ours` and `alternative` measurements, each with at least `seconds` and `peak_rss_mib`."""
    for run in runs:
        run["alternative_over_ours_seconds"] = round(run["alternative"]["seconds"] / run["ours"]["seconds"], 2)
    sizes = [run["size"] for run in runs]
    return {
        "stage": stage, "work": work, "ours": ours, "alternative": alternative, "runs": runs,
        "scaling_exponent": {side: scaling_exponent(sizes, [run[side]["seconds"] for run in runs]) for side in ("ours", "alternative")},
    }

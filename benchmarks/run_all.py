"""Every stage's benchmark in one run, each beside its named alternative and at two or more sizes:
one JSON (every stage's full report) and one markdown table, with the scaling exponent of each
stage and whether each target is met.

    python benchmarks/run_all.py --readme                 # about 30 minutes on 2 CPU cores
    python benchmarks/run_all.py --stages coclick ranking # a subset, e.g. while working on one stage

Writes benchmarks/results/all.json and benchmarks/results/all.md (each stage's own report, at
these sizes, lands beside them as <stage>.json); with --readme also pastes all.md into README.md's
"Performance" section, between its two `all.md` marker lines. Each stage runs as its own script
(`benchmarks/<stage>.py`, the same code as when run alone) in its own process, at the sizes in
`STAGES`: chosen so the whole run takes about half an hour on 2 cores, large enough that fixed
costs do not hide how cost grows with work.

Targets: co-click mining and the ranking join near-linear (scaling exponent at most 1.1) and at
least as fast as the same query in DuckDB at every size; the whole default demo chain (data
generation included) under 10 minutes on 2 CPU cores.
"""

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from saviorrec_pipeline.markdown import table
from report import paste_into_readme, write_report  # benchmarks/report.py, beside this script

BENCHMARKS = Path(__file__).parent
# Script and arguments per stage, in the order they run.
STAGES = {
    "coclick": ["coclick.py", "--events", "1000000", "10000000"],
    "encoder": ["encoder.py", "--presets", "tiny", "--sizes", "1", "4"],
    "rqvae": ["rqvae.py", "--preset", "tiny", "--train-items", "25000", "100000", "--items", "200000", "1000000", "--skip-sinkhorn"],
    "ranking": ["ranking.py", "--scales", "1", "10"],
    "ctr": ["ctr.py", "--steps", "20", "80"],
    "chain": ["chain.py", "--scales", "0.25", "1"],
}
MAX_EXPONENT = 1.1
CHAIN_SECONDS = 600


def near_linear(stage: dict) -> tuple[bool, str]:
    exponent = stage["scaling_exponent"]["ours"]
    return exponent <= MAX_EXPONENT, f"exponent {exponent}"


def as_fast_as_alternative(stage: dict) -> tuple[bool, str]:
    ratios = [run["alternative_over_ours_seconds"] for run in stage["runs"]]
    return min(ratios) >= 1, "alternative's seconds / ours: " + ", ".join(f"{ratio:g}" for ratio in ratios)


def default_demo_in_time(stage: dict) -> tuple[bool | None, str]:
    default = [run for run in stage["runs"] if run["scale"] == 1]
    if not default:
        return None, "the default demo (scale 1) was not run"
    generation, chain = default[0]["generate"]["seconds"], default[0]["ours"]["seconds"]
    return generation + chain < CHAIN_SECONDS, f"{generation:g} s generation + {chain:g} s chain = {generation + chain:.0f} s"


# Per stage name (as the stage scripts report it): (target, check).
TARGETS = {
    "co-click mining": [(f"near-linear (exponent <= {MAX_EXPONENT})", near_linear),
                        ("at least as fast as DuckDB at every size", as_fast_as_alternative)],
    "ranking join": [(f"near-linear (exponent <= {MAX_EXPONENT})", near_linear),
                     ("at least as fast as DuckDB at every size", as_fast_as_alternative)],
    "whole demo chain": [(f"default demo under {CHAIN_SECONDS // 60} minutes on 2 cores", default_demo_in_time)],
}


def run_stage(name: str, results: Path) -> dict:
    """Run one stage's script; its report is also left at `results/<name>.json`."""
    script, *args = STAGES[name]
    out = results / f"{name}.json"
    print(f"== {name}: {script} {' '.join(args)}", flush=True)
    if subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)]).returncode != 0:
        raise SystemExit(f"the {name} benchmark failed (its output is above): {script} {' '.join(args)}")
    return json.loads(out.read_text())


def targets(stages: list[dict]) -> list[dict]:
    verdicts = []
    for stage in stages:
        for target, check in TARGETS.get(stage["stage"], []):
            met, measured = check(stage)
            verdicts.append({"stage": stage["stage"], "target": target, "measured": measured, "met": met})
    return verdicts


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(report: dict) -> str:
    stages = [stage for name in report["stages"] for stage in report["reports"][name]["stages"]]
    lines = [
        f"Measured {report['finished'][:16].replace('T', ' ')} UTC on {report['machine']['cpus']} CPU cores "
        f"({report['machine']['memory_gib']} GiB), run_all {report['wall_seconds'] / 60:.1f} minutes, by "
        f"`{report['command']}`. Seconds and peak RSS (MiB) of each side at each size; "
        "the exponent is the slope of log(seconds) against log(work) between the sizes.",
        "",
    ]
    rows = []
    for stage in stages:
        for number, run in enumerate(stage["runs"]):
            ours, alternative = run["ours"], run["alternative"]
            named = [stage["stage"], f"{stage['ours']} vs {stage['alternative']}", stage["work"]] if number == 0 else ["", "", ""]
            rows.append([*named, f"{run['size']:,}", _number(ours["seconds"]), _number(alternative["seconds"]),
                         f"{run['alternative_over_ours_seconds']:g}", f"{ours['peak_rss_mib']:,.0f}", f"{alternative['peak_rss_mib']:,.0f}"])
    header = ["stage", "ours vs alternative", "work", "size", "ours s", "alt. s", "alt. s / ours s", "ours MiB", "alt. MiB"]
    lines += [table(header, rows, numeric_columns=6), ""]
    exponents = [(s["stage"], s["scaling_exponent"]["ours"], s["scaling_exponent"]["alternative"]) for s in stages]
    lines += [table(["stage", "scaling exponent, ours", "scaling exponent, alternative"], exponents, numeric_columns=2), ""]
    met_words = {True: "yes", False: "**no**", None: "not measured"}
    targets = [(f"{v['stage']}: {v['target']}", v["measured"], met_words[v["met"]]) for v in report["targets"]]
    lines.append(table(["target", "measured", "met"], targets))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "all.json", help="the markdown goes beside it (.md)")
    parser.add_argument("--readme", action="store_true", help="paste the markdown into README.md's Performance section")
    args = parser.parse_args()
    start = time.perf_counter()
    reports = {name: run_stage(name, args.out.parent) for name in args.stages}
    report = {
        "benchmark": "all",
        "command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - start),
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version()},
        "stages": args.stages,
        "reports": reports,
    }
    report["targets"] = targets([stage for name in args.stages for stage in reports[name]["stages"]])
    write_report(args.out, report)
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(f"wrote {args.out.with_suffix('.md')}\n\n{text}")
    if args.readme:
        paste_into_readme("all.md", text)


if __name__ == "__main__":
    main()

"""Ranker quality beside a stock DIN: the pipeline's `base` and `saviorrec`, each at default settings,
and deepctr-torch's DIN trained on the same `ranking_dataset` rows for the same number of epochs;
AUC in total and per item-PV bucket, and training samples/s, on data shaped unlike the demo too.

    python benchmarks/peer.py --readme                          # every shape in SHAPES; pastes peer.md into README.md
    python benchmarks/peer.py --shapes demo text_long_window    # some of them
    python benchmarks/peer.py --shapes text_long_window --encoder-preset minilm --encoder-epochs 3   # another encoder
    python benchmarks/peer.py --raw DIR --partition 2025-07-22 --train-days 21 --eval-days 1   # your own data

For each shape the demo generator writes the raw data, then the whole `saviorrec_chain` job (and
`paper_tables`' i2i_retrieval) runs on it for its last day in a child process of its own (a fresh project home: storage, MLflow, Dagster
instance; `SAVIORREC_TRAIN_DAYS`/`SAVIORREC_EVAL_DAYS` set to the shape's window), exactly as a
user's run at default settings would. The child then trains DIN on that run's `ranking_dataset`
rows (`benchmarks/din.py`) for as many epochs as each of the pipeline's variants chose, and
scores the evaluation rows the pipeline scored.

Targets, checked per shape from the numbers of the run: `base` at least DIN's total AUC minus
0.005; `saviorrec` at least DIN plus 0.01 in total AUC, and ahead of DIN by more in the lowest PV
bucket with clicks than in total; `saviorrec` trains at least as many samples/s as DIN, with
`base` faster still. Writes benchmarks/results/peer.json and peer.md.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psutil

from saviorrec_pipeline.cli import DEMO_PV_EDGES, EMBEDDED_INSTANCE
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.markdown import table

from report import paste_into_readme, write_report  # benchmarks/, beside this script

RESULTS = Path(__file__).parent / "results"
BASE_MARGIN, SAVIORREC_MARGIN = -0.005, 0.01


@dataclass(frozen=True)
class Shape:
    spec: DemoSpec
    train_days: int
    eval_days: int
    about: str


SHAPES = {
    "demo": Shape(DemoSpec(), 21, 1, "the default demo: images and titles, base pCTR, categorical profile, Zipf 1.1"),
    "text_long_window": Shape(
        DemoSpec(days=180, users=1000, items=1700, modalities="text", base_pctr=False, profile="numeric",
                 activity=0.15, impressions_per_active_day=8, zipf_exponent=0.7, click_bias=-3.0),
        150, 30,
        "text-only items, 30 evaluation days of 180, no base pCTR, numeric profile, flatter tail (Zipf 0.7), "
        "1,000 users with long histories, CTR about 25%",
    ),
    "image_steep_tail": Shape(
        DemoSpec(days=28, users=3000, items=3000, modalities="image", zipf_exponent=1.6, activity=0.3),
        25, 3,
        "image-only items (no titles), 3 evaluation days, much steeper tail (Zipf 1.6), more users with short histories",
    ),
}


def child_environment(home: Path, raw: Path, train_days: int, eval_days: int) -> dict[str, str]:
    """A fresh project home over `raw`, free of the caller's SAVIORREC_, DAGSTER_ and MLFLOW_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVIORREC_", "DAGSTER_", "MLFLOW_"))}
    (home / "dagster").mkdir(parents=True)
    shutil.copyfile(EMBEDDED_INSTANCE, home / "dagster" / "dagster.yaml")
    return {
        **env, "SAVIORREC_HOME": str(home), "SAVIORREC_RAW_ROOT": str(raw), "DAGSTER_HOME": str(home / "dagster"),
        "SAVIORREC_TRAIN_DAYS": str(train_days), "SAVIORREC_EVAL_DAYS": str(eval_days),
    }


def compare(raw: Path, partition: str, train_days: int, eval_days: int, edges: tuple[float, ...], encoder: str, folder: Path,
            encoder_epochs: int | None = None) -> dict:
    """Run the chain and DIN in a child process (its settings come from its environment)."""
    env = child_environment(folder / "home", raw, train_days, eval_days)
    command = [sys.executable, __file__, "--child", partition, "--pv-edges", *map(str, edges), "--encoder-preset", encoder]
    command += [] if encoder_epochs is None else ["--encoder-epochs", str(encoder_epochs)]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    (folder / "child.log").write_text(child.stdout + child.stderr)
    if child.returncode != 0:
        raise RuntimeError(f"the chain on {raw} for {partition} failed ({child.returncode}):\n{child.stderr[-6000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def chain_and_din(partition: str, edges: tuple[float, ...], encoder: str, encoder_epochs: int | None) -> dict:
    """In the child: the whole chain for `partition`, then DIN on its rows for each variant's epochs."""
    import dagster as dg

    from din import train_din
    from saviorrec_pipeline.definitions import defs
    from saviorrec_pipeline.method.metrics import auc_report
    from saviorrec_pipeline.resources.storage import ParquetStorage
    from saviorrec_pipeline.settings import load_settings

    with dg.DagsterInstance.get() as instance:
        encoder_config = {"preset": encoder} | ({} if encoder_epochs is None else {"epochs": encoder_epochs})
        run_config = {"ops": {"item_encoder": {"config": encoder_config}, "auc_report": {"config": {"pv_edges": list(edges)}}}}
        result = defs.get_job_def("saviorrec_chain").execute_in_process(
            partition_key=partition, instance=instance, run_config=run_config, raise_on_error=False
        )
        # Table 4's Hit@K of the day's encoder, from the paper_tables job.
        retrieval = result.success and defs.get_job_def("paper_tables").execute_in_process(
            partition_key=partition, instance=instance, asset_selection=[dg.AssetKey("i2i_retrieval")], raise_on_error=False
        )
    for job, outcome in (("the chain", result), ("i2i_retrieval", retrieval)):
        if outcome and not outcome.success:
            failures = [e.step_failure_data.error for e in outcome.all_events if e.is_step_failure]
            raise SystemExit(f"{job} failed: " + "; ".join(f"{error.message.strip()}" for error in failures))
    metadata = {e.materialization.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    ctr = metadata["ctr_model"]
    variants = [v.strip() for v in ctr["variants"].value.split(",")]
    epochs = {v: ctr[f"{v}_epochs"].value for v in variants}
    speed = {v: ctr[f"{v}_train_samples_per_s"].value for v in variants}

    storage = ParquetStorage(root=load_settings().storage_root)
    rows = storage.read("ranking_dataset", partition)
    predictions = storage.read("ctr_model", partition)
    catalog_ids = storage.read("item_embeddings", partition)["item_id"].to_numpy()
    train, evaluation = rows.filter(pl.col("split") == "train"), rows.filter(pl.col("split") == "eval")
    profile_columns = [c for c in metadata["ranking_dataset"]["profile_columns"].value.split(", ") if c != "none"]
    din = train_din(train, evaluation, catalog_ids, profile_columns, epochs=max(epochs.values()))
    key = ["user_id", "item_id", "ts"]
    din_rows = [
        evaluation.select(*key, pl.lit(f"din@{v}").alias("variant"), pl.Series("pctr", din.scores_per_epoch[epochs[v] - 1], dtype=pl.Float32),
                          pl.col("clicked").cast(pl.Int8).alias("label"), "pv")
        for v in variants
    ]
    report = auc_report(pl.concat([predictions.select(*key, "variant", "pctr", "label", "pv"), *din_rows]), edges)
    retrieval = storage.read("i2i_retrieval", partition)
    return {
        "encoder_preset": encoder,
        "encoder_epochs": metadata["item_encoder"]["epochs"].value,
        "encoder_seconds": metadata["item_encoder"]["seconds"].value,
        "hit_rate": {row["variant"]: row["hit_rate"] for row in retrieval.iter_rows(named=True)},
        "k": retrieval["k"][0],
        "partition": partition,
        "train_rows": train.height, "eval_rows": evaluation.height, "eval_ctr": round(float(evaluation["clicked"].mean()), 4),
        "epochs": epochs,
        "samples_per_s": {**speed, "din": round(din.samples_per_s)},
        "domain_adaptation": metadata["item_encoder"]["domain_adaptation"].value,
        "auc": report.drop("delta_vs_base").to_dicts(),
    }


def verdicts(result: dict) -> list[tuple[str, bool, str]]:
    """Each target of one shape: what it asks, met or not, the measured numbers."""
    auc = {(r["variant"], r["bucket"]): r for r in result["auc"]}
    low = next((r["bucket"] for r in result["auc"] if r["variant"] == "saviorrec" and r["bucket"] != "total" and r["auc"] is not None), None)
    checks = []
    base, din_b = auc[("base", "total")]["auc"], auc[("din@base", "total")]["auc"]
    checks.append((f"base >= DIN {BASE_MARGIN:+}", base >= din_b + BASE_MARGIN, f"{base:.4f} vs DIN {din_b:.4f}"))
    ours, din_s = auc[("saviorrec", "total")]["auc"], auc[("din@saviorrec", "total")]["auc"]
    checks.append((f"saviorrec >= DIN {SAVIORREC_MARGIN:+}", ours >= din_s + SAVIORREC_MARGIN, f"{ours:.4f} vs DIN {din_s:.4f}"))
    if low is not None:
        gap_low = auc[("saviorrec", low)]["auc"] - auc[("din@saviorrec", low)]["auc"]
        checks.append((f"saviorrec's lead over DIN larger in {low} than in total", gap_low > ours - din_s,
                       f"{gap_low:+.4f} vs {ours - din_s:+.4f}"))
    speed = result["samples_per_s"]
    checks.append(("saviorrec samples/s >= DIN's", speed["saviorrec"] >= speed["din"], f"{speed['saviorrec']:,.0f} vs {speed['din']:,.0f}"))
    checks.append(("base samples/s > saviorrec's", speed["base"] > speed["saviorrec"], f"{speed['base']:,.0f} vs {speed['saviorrec']:,.0f}"))
    return checks


def markdown(report: dict) -> str:
    lines = [f"Measured {report['measured']} on {report['machine']['cpus']} CPU cores by `python benchmarks/peer.py`. "
             "AUC of the evaluation window, total and per item-PV bucket (samples / clicks); DIN trained for the epochs "
             "the pipeline's variant chose (`din@base`, `din@saviorrec`).", ""]
    for name, result in report["shapes"].items():
        auc = result["auc"]
        buckets = [b for b in dict.fromkeys(r["bucket"] for r in auc) if any(r["samples"] for r in auc if r["bucket"] == b)]
        counts = {r["bucket"]: (r["samples"], r["clicks"]) for r in auc if r["variant"] == "base"}
        hits = ", ".join(f"{v} {'n/a' if r is None else f'{100 * r:.1f}%'}" for v, r in result["hit_rate"].items())
        lines += [f"**{name}**: {result['about']}; {result['train_rows']:,} training and {result['eval_rows']:,} evaluation rows, "
                  f"evaluation CTR {result['eval_ctr']:.1%}; epochs chosen: "
                  + ", ".join(f"{v} {e}" for v, e in result["epochs"].items())
                  + f". Encoder `{result['encoder_preset']}` ({result['encoder_epochs']} epochs, {result['encoder_seconds']:.0f} s to train), "
                  f"i2i Hit@{result['k']}: {hits}; "
                  f"whole run {result['seconds']} s.", ""]
        header = ["model", *(f"{b} ({counts[b][0]:,} / {counts[b][1]:,})" for b in buckets), "train samples/s"]
        auc_of = {(r["variant"], r["bucket"]): r["auc"] for r in auc}
        speed = result["samples_per_s"]
        rows = []
        for variant in dict.fromkeys(r["variant"] for r in auc):
            cells = ["" if auc_of[(variant, b)] is None else f"{auc_of[(variant, b)]:.4f}" for b in buckets]
            rate = speed.get(variant, speed["din"] if variant.startswith("din") else None)
            rows.append([variant, *cells, f"{rate:,.0f}"])
        lines += [table(header, rows, numeric_columns=len(buckets) + 1), ""]
        lines += [table(["target", "measured", "met"], [(what, numbers, "yes" if met else "no") for what, met, numbers in result["targets"]])]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--raw", type=Path, help="your own raw data (the raw input contract) instead of generated shapes")
    parser.add_argument("--partition", help="with --raw: the day evaluated (default: the last day folder)")
    parser.add_argument("--train-days", type=int, default=21)
    parser.add_argument("--eval-days", type=int, default=1)
    parser.add_argument("--pv-edges", type=float, nargs="+", default=list(DEMO_PV_EDGES))
    parser.add_argument("--encoder-preset", default="tiny", choices=["tiny", "minilm", "paper"], help="item_encoder's preset")
    parser.add_argument("--encoder-epochs", type=int, help="item_encoder's epochs (default: the preset's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "peer.json", help="the markdown goes beside it (.md)")
    parser.add_argument("--readme", action="store_true", help="paste the markdown into README.md's quality section")
    parser.add_argument("--child", metavar="PARTITION", help=argparse.SUPPRESS)
    args = parser.parse_args()
    edges = tuple(args.pv_edges)
    if args.child:
        print(json.dumps(chain_and_din(args.child, edges, args.encoder_preset, args.encoder_epochs)))
        return

    shapes = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.raw:
            partition = args.partition or max(p.name.removeprefix("date=") for p in (args.raw / "impressions").glob("date=*"))
            runs = {args.raw.name: (args.raw.resolve(), partition, args.train_days, args.eval_days, f"your data in {args.raw}")}
        else:
            runs = {}
            for name in args.shapes:
                shape = SHAPES[name]
                raw = Path(folder) / name / "raw"
                print(generate_demo(raw, shape.spec), flush=True)
                runs[name] = (raw, shape.spec.last_day.isoformat(), shape.train_days, shape.eval_days, shape.about)
        failed = {}
        for name, (raw, partition, train_days, eval_days, about) in runs.items():
            started = dt.datetime.now()
            try:
                result = compare(raw, partition, train_days, eval_days, edges, args.encoder_preset, Path(folder) / name, args.encoder_epochs)
            except RuntimeError as error:  # the other shapes still run and are reported
                print(error, file=sys.stderr, flush=True)
                failed[name] = str(error).splitlines()[0]
                continue
            result |= {"about": about, "window": {"train_days": train_days, "eval_days": eval_days},
                       "seconds": round((dt.datetime.now() - started).total_seconds())}
            result["targets"] = verdicts(result)
            shapes[name] = result
            print(name, json.dumps({k: result[k] for k in ("epochs", "samples_per_s", "targets")}), flush=True)
    report = {
        "benchmark": "peer",
        "measured": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "pv_edges": list(edges),
        "shapes": shapes,
    }
    write_report(args.out, report)
    text = markdown(report) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        paste_into_readme("peer.md", text)
    if failed:
        raise SystemExit("failed: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))


if __name__ == "__main__":
    main()

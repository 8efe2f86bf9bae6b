"""The `saviorrec` command: demo data, the end-to-end demo run, and the registered ranker's
batch scoring and ONNX export."""

import argparse
import datetime as dt
import os
import shutil
import sys
from pathlib import Path

from saviorrec_pipeline.demo import DemoSpec, generate_demo

# The checkout's embedded default Dagster instance, used when DAGSTER_HOME is not set.
EMBEDDED_INSTANCE = Path(__file__).resolve().parents[1] / "dagster.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saviorrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate-demo", help="write demo raw data with planted structure")
    gen.add_argument("--out", required=True, help="raw root to write (local directory)")
    _add_spec_arguments(gen)

    demo = commands.add_parser(
        "demo", help="generate demo data if missing, materialize the chain for its last day, print a summary"
    )
    _add_spec_arguments(demo)

    model_help = "the ranker: models:/saviorrec-ctr@champion, models:/saviorrec-ctr/VERSION or runs:/RUN_ID/model"
    score = commands.add_parser("score", help="score a Parquet file of requests (ranking_dataset's columns) in streaming batches")
    score.add_argument("--model", required=True, help=model_help)
    score.add_argument("--input", required=True, help="requests.parquet (local or s3://)")
    score.add_argument("--out", required=True, help="scores.parquet: the requests' user_id, item_id, ts (where present) and pctr")
    score.add_argument("--batch-rows", type=int, default=65_536, help="rows scored at a time (memory holds one batch)")
    export = commands.add_parser("export-onnx", help="write the ranker, its item tables inside, as an ONNX graph")
    export.add_argument("--model", required=True, help=model_help)
    export.add_argument("--out", required=True, help="FILE.onnx")

    args = parser.parse_args(argv)
    if args.command in ("score", "export-onnx"):
        return serve_command(args)
    spec = DemoSpec(
        start_date=args.start_date, days=args.days, users=args.users, items=args.items, seed=args.seed, scale=args.scale
    )
    if args.command == "generate-demo":
        print(generate_demo(args.out, spec))
        return 0
    return run_demo(spec)


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSpec()
    parser.add_argument("--start-date", type=dt.date.fromisoformat, default=defaults.start_date)
    parser.add_argument("--days", type=int, default=defaults.days)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--scale", type=float, default=defaults.scale, help="multiply users, items and impressions")


def serve_command(args: argparse.Namespace) -> int:
    """`score` and `export-onnx`: the ranker read from MLflow (MLFLOW_TRACKING_URI, else the
    project home's store) as safetensors and JSON, rebuilt from code."""
    import time

    from saviorrec_pipeline.assets.ctr_model import load_ctr_model
    from saviorrec_pipeline.resources.tracking import TrackingError
    from saviorrec_pipeline.serving.ranker import Ranker, RequestError

    try:
        ranker = Ranker.from_saved(*load_ctr_model(args.model, _tracking()))
        started = time.perf_counter()
        if args.command == "export-onnx":
            from saviorrec_pipeline.serving.onnx_export import export_onnx

            export_onnx(ranker, args.out)
            print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB, {ranker.model.config.num_items} items) in {time.perf_counter() - started:.1f} s")
        else:
            from saviorrec_pipeline.serving.batch import score_file

            rows = score_file(ranker, args.input, args.out, args.batch_rows)
            seconds = time.perf_counter() - started
            print(f"scored {rows} rows of {args.input} into {args.out} in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)")
    except (RequestError, TrackingError, FileNotFoundError) as error:
        print(f"saviorrec {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _tracking():
    import dagster as dg

    from saviorrec_pipeline.resources.tracking import MlflowTracking
    from saviorrec_pipeline.settings import load_settings

    settings = load_settings()
    uri = settings.mlflow_tracking_uri
    return MlflowTracking(tracking_uri=uri.get_value() if isinstance(uri, dg.EnvVar) else uri, artifact_root=settings.mlflow_artifact_root)


# The demo's evaluation day has about 15,000 impressions and most items have under 100 impressions
# before it, so its PV buckets are finer at the low end than the paper's (which start at 100).
DEMO_PV_EDGES = (0, 25, 100, 500, 2500, 10000)


def run_demo(spec: DemoSpec) -> int:
    # Import late: settings are read from the environment when the definitions load.
    from saviorrec_pipeline.settings import load_settings

    settings = load_settings()
    if "DAGSTER_HOME" not in os.environ:
        # The embedded default instance (the checkout's dagster.yaml): SQLite inside the project home.
        os.environ["DAGSTER_HOME"] = f"{settings.home}/dagster"
        instance_file = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
        if not instance_file.exists():
            if not EMBEDDED_INSTANCE.exists():
                raise SystemExit(f"{EMBEDDED_INSTANCE} not found (not run from a checkout): set DAGSTER_HOME")
            instance_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EMBEDDED_INSTANCE, instance_file)

    raw_root = Path(settings.raw_root)
    if not (raw_root / "impressions").is_dir():
        print(f"generating demo data in {raw_root}", flush=True)
        print(generate_demo(raw_root, spec), flush=True)
    day = max(p.name.removeprefix("date=") for p in (raw_root / "impressions").glob("date=*"))

    import dagster as dg

    from saviorrec_pipeline.definitions import defs

    run_config = {"ops": {stage: {"config": {"pv_edges": list(DEMO_PV_EDGES)}} for stage in ("auc_report", "champion_gate")}}
    with dg.DagsterInstance.get() as instance:
        result = defs.get_job_def("saviorrec_chain").execute_in_process(
            partition_key=day, instance=instance, run_config=run_config, raise_on_error=False
        )
    print(summary(result, day))
    materialized = {e.materialization.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    if "auc_report" in materialized:
        print(f"\nAUC (%) by item-PV bucket for {day}, delta to base in brackets:\n{materialized['auc_report']['report'].value}")
    if "champion_gate" in materialized:
        gate = materialized["champion_gate"]
        print(f"\nchampion gate for {day}: {gate['decision'].value}: {gate['reason'].value}; in use: {gate['champion_after'].value}")
    return 0 if result.success else 1


def summary(result, day: str) -> str:
    """One line per materialized asset with its scalar metadata (not tables or images), then any
    step failure."""
    import dagster as dg

    lines = [f"saviorrec chain for partition {day}: {'succeeded' if result.success else 'FAILED'}"]
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        scalars = {
            key: entry.value
            for key, entry in materialization.metadata.items()
            if isinstance(entry.value, (int, float, bool))
            or (isinstance(entry.value, str) and "\n" not in entry.value and not isinstance(entry, dg.MarkdownMetadataValue))
        }
        shown = ", ".join(f"{key}={value}" for key, value in scalars.items())
        lines.append(f"  {materialization.asset_key.to_user_string()}: {shown}")
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error.cause:  # the user-facing reason is the innermost one
                error = error.cause
            lines.append(f"  step {event.step_key} failed: {error.message.strip()}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

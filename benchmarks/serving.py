"""Serving benchmark: the registered ranker's request latency through `mlflow models serve`, through
onnxruntime in-process and through PyTorch eager in-process (the named alternatives of one
another), measured in one run; and batch scoring (`saviorrec score`'s recipe) in rows/s and peak
memory, PyTorch beside onnxruntime.

    python benchmarks/serving.py                      # 1,000 requests per size; 10^5 and 10^6 rows
    python benchmarks/serving.py --requests 200 --rows 20000 100000

The ranker is a real one: the chain (tiny encoder and RQ-VAE presets, one CTR epoch) runs on the
default demo's last day into a temporary project home, and its `saviorrec-ctr@champion` is
scored. Requests are evaluation rows of that day, drawn at random: a request with 1 candidate is
one row, with 100 candidates 100 rows. The served requests are JSON `dataframe_split` bodies,
serialised before timing; the in-process ones are Polars frames of the same rows. Batch files
repeat the evaluation rows to the size asked. Writes benchmarks/results/serving.json and
benchmarks/results/serving.md (with --readme, pasted into README.md's "Serving" section).
"""

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import psutil

from saviorrec_pipeline.assets.ctr_model import load_ctr_model
from saviorrec_pipeline.definitions import all_assets
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.jobs import chain_job
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.serving.batch import score_file
from saviorrec_pipeline.serving.onnx_export import OnnxRanker, export_onnx
from saviorrec_pipeline.serving.ranker import Ranker

from measure import measured  # benchmarks/, beside this script
from report import write_markdown, write_report

RESULTS = Path(__file__).parent / "results"
TINY = {
    "item_encoder": {"preset": "tiny", "epochs": 1, "domain_adaptation_epochs": 0},
    "semantic_ids": {"epochs": 20},
    "ctr_model": {"epochs": 1},
}
DROPPED = ("ts", "clicked", "split", "pv", "seq_length")  # ranking columns a request does not send


def trained_home(home: Path, spec: DemoSpec) -> tuple[str, pl.DataFrame]:
    """The chain run on the demo's last day in `home`: the tracking URI and the day's evaluation rows."""
    generate_demo(home / "raw", spec)
    day = (spec.start_date + dt.timedelta(days=spec.days - 1)).isoformat()
    storage = ParquetStorage(root=str(home / "storage"), checkpoint_every_epochs=0)
    uri = f"sqlite:///{home}/mlflow.db"
    resources = {"raw": RawStore(root=str(home / "raw")), "window": TrainEvalWindow(train_days=spec.days - 1, eval_days=1), "compute": Compute(), "storage": storage,
                 "parquet_io_manager": ParquetIOManager(storage=storage), "tracking": MlflowTracking(tracking_uri=uri, artifact_root=str(home / "artifacts"))}
    result = dg.materialize(all_assets, selection=chain_job.selection, partition_key=day, resources=resources,
                            run_config={"ops": {op: {"config": config} for op, config in TINY.items()}})
    assert result.success
    return uri, storage.read("ranking_dataset", day).filter(pl.col("split") == "eval")


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3), "requests": len(ms)}


def latencies(score, requests: list) -> list[float]:
    score(requests[0])  # warm-up
    out = []
    for request in requests:
        start = time.perf_counter()
        score(request)
        out.append(time.perf_counter() - start)
    return out


def served(uri: str, home: Path, bodies: list[bytes]) -> list[float]:
    """Latencies through `mlflow models serve` on loopback, one request at a time."""
    port = 5000 + os.getpid() % 1000
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log = (home / "model-server.log").open("wb")
    server = subprocess.Popen([Path(sys.executable).parent / "mlflow", "models", "serve", "-m", "models:/saviorrec-ctr@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"mlflow models serve did not start; see {home / 'model-server.log'}")
                time.sleep(0.5)

        def post(body: bytes) -> None:
            request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()

        return latencies(post, bodies)
    finally:
        os.killpg(server.pid, 15)
        server.wait()


def batch_file(rows: pl.DataFrame, size: int, path: Path) -> Path:
    repeats = -(-size // rows.height)
    pl.concat([rows] * repeats).head(size).write_parquet(path, row_group_size=65_536)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        spec = DemoSpec(days=8)
        uri, rows = trained_home(home, spec)
        tracking = MlflowTracking(tracking_uri=uri, artifact_root=str(home / "artifacts"))
        ranker = Ranker.from_saved(*load_ctr_model("models:/saviorrec-ctr@champion", tracking))
        export_onnx(ranker, home / "ctr.onnx")
        onnx = OnnxRanker(home / "ctr.onnx", ranker)
        request_rows = rows.drop(DROPPED)
        generator = np.random.default_rng(0)
        latency = []
        for candidates in args.candidates:
            frames = [request_rows[int(start):int(start) + candidates] for start in generator.integers(0, rows.height - candidates, args.requests)]
            bodies = [json.dumps({"dataframe_split": {"columns": f.columns, "data": [list(r) for r in f.iter_rows()]}}).encode() for f in frames]
            for path, seconds in (("mlflow models serve", served(uri, home, bodies)), ("onnxruntime in-process", latencies(onnx.score, frames)),
                                  ("PyTorch eager in-process", latencies(ranker.score, frames))):
                latency.append({"path": path, "candidates": candidates, **percentiles(seconds)})
                print(latency[-1], flush=True)
        batch = []
        for size in args.rows:
            source = batch_file(rows, size, home / f"requests-{size}.parquet")
            for engine, score in (("PyTorch", None), ("onnxruntime", onnx.score)):
                figures, _ = measured(lambda: score_file(ranker, str(source), str(home / "scores.parquet"), progress=False, score=score))
                batch.append({"engine": engine, "rows": size, **figures, "rows_per_s": round(size / figures["seconds"])})
                print(batch[-1], flush=True)
    report = {
        "benchmark": "serving", "items_in_ranker": ranker.model.config.num_items, "demo": {"days": spec.days, "users": spec.users, "items": spec.items},
        "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform()}, "latency": latency, "batch": batch,
        "onnx_over_torch_batch_seconds": {str(s): round(next(b["seconds"] for b in batch if b["engine"] == "onnxruntime" and b["rows"] == s)
                                                         / next(b["seconds"] for b in batch if b["engine"] == "PyTorch" and b["rows"] == s), 3) for s in args.rows},
    }
    write_report(RESULTS / "serving.json", report)
    markdown = table(["path", "candidates", "p50 ms", "p99 ms", "requests"], [(r["path"], r["candidates"], r["p50_ms"], r["p99_ms"], r["requests"]) for r in latency])
    markdown += "\n\n" + table(["batch scoring", "rows", "seconds", "rows/s", "peak RSS MiB"],
                             [(b["engine"], f"{b['rows']:,}", b["seconds"], f"{b['rows_per_s']:,}", b["peak_rss_mib"]) for b in batch])
    markdown += "\n"
    write_markdown(RESULTS / "serving.md", markdown, args.readme)


if __name__ == "__main__":
    main()

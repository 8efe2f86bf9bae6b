"""Ranking benchmark: the `ranking_dataset` join at 10^6 and 10^7 impressions (seconds, peak RSS),
and CTR training samples/s of `saviorrec` beside `base` (the named alternative) on the same rows.

    python benchmarks/ranking.py                       # demo data at scale 3 and 30 (~10^6, ~10^7)
    python benchmarks/ranking.py --scales 3            # one size

Impressions come from the demo generator (`saviorrec generate-demo --scale S`); each join runs in
its own subprocess so that its peak RSS is its own. CTR training uses the smallest size's rows
with random item embeddings and codes of the tiny RQ shape (throughput does not depend on them).
Writes benchmarks/results/ranking.json; the number to read is `saviorrec_over_base_time`.
"""

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.ctr_model import CTRConfig, CTRModel
from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, ItemIndex, encode_rows, profile_vocabularies, train_ctr
from saviorrec_pipeline.method.encoder_training import device_for_training
from saviorrec_pipeline.method.ranking_features import build_ranking_rows

from report import write_report  # benchmarks/report.py, beside this script


def _inputs(raw: Path) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.LazyFrame, dt.datetime]:
    impressions = pl.scan_parquet(f"{raw}/impressions/*/*.parquet").select("user_id", "item_id", "ts", "clicked", "base_pctr")
    last = max(p.name.removeprefix("date=") for p in (raw / "impressions").glob("date=*"))
    eval_start = dt.datetime.combine(dt.date.fromisoformat(last), dt.time(), tzinfo=dt.timezone.utc)
    return impressions, pl.scan_parquet(f"{raw}/items/*.parquet").select("item_id"), pl.scan_parquet(f"{raw}/users/*.parquet"), eval_start


def join_once(raw: Path, out: Path) -> None:
    """Child process: build the rows, write them, print seconds and this process's peak RSS."""
    impressions, catalog, users, eval_start = _inputs(raw)
    start = time.perf_counter()
    rows = build_ranking_rows(impressions, catalog, users, eval_start).collect(engine="streaming")
    rows.write_parquet(out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows.height, "seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1)}))


def ctr_throughput(rows_file: Path, steps: int) -> dict:
    rows = pl.read_parquet(rows_file).filter(pl.col("split") == "train")
    items = ItemIndex(np.unique(np.concatenate([rows["item_id"].to_numpy(), rows["seq_items"].explode(empty_as_null=False).to_numpy()])))
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(len(items), 64, generator=generator), dim=-1)
    codes = torch.randint(0, 64, (len(items), 3), generator=generator)
    vocabularies = profile_vocabularies(rows, ["age_band", "region", "device"])
    settings = CTRTrainConfig(epochs=1, batch_size=1024, sequence_length=50)
    device = device_for_training()
    subset = encode_rows(rows.head(steps * settings.batch_size), items, vocabularies, 100_003, str(rows_file))
    result = {"device": str(device), "train_samples": len(subset)}
    for variant in ("base", "saviorrec"):
        torch.manual_seed(0)
        model = CTRModel(CTRConfig(variant=variant, num_items=len(items), embedding_dim=64, num_levels=3, codebook_size=64,
                                   profile_vocab_sizes=tuple(len(v) + 1 for v in vocabularies.values()), use_base_pctr=True))
        model.load_item_tables(torch.from_numpy(items.item_ids), z, codes)
        start = time.perf_counter()
        train_ctr(model, subset, None, settings, device)
        result[f"{variant}_samples_per_s"] = round(len(subset) / (time.perf_counter() - start))
    result["saviorrec_over_base_time"] = round(result["base_samples_per_s"] / result["saviorrec_samples_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[3, 30])
    parser.add_argument("--ctr-steps", type=int, default=100, help="training steps of 1,024 rows per variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ranking.json")
    parser.add_argument("--join-once", nargs=2, type=Path, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join_once:
        join_once(*args.join_once)
        return
    report = {"benchmark": "ranking", "joins": []}
    with tempfile.TemporaryDirectory() as folder:
        first_rows = None
        for scale in args.scales:
            raw = Path(folder) / f"raw-{scale}"
            generate_demo(raw, DemoSpec(scale=scale))
            out = Path(folder) / f"rows-{scale}.parquet"
            child = subprocess.run([sys.executable, __file__, "--join-once", str(raw), str(out)], check=True, capture_output=True, text=True)
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            impressions = pl.scan_parquet(f"{raw}/impressions/*/*.parquet").select(pl.len()).collect().item()
            report["joins"].append({"scale": scale, "impressions": impressions, **figures, "rows_per_s": round(figures["rows"] / figures["seconds"])})
            print(json.dumps(report["joins"][-1]), flush=True)
            first_rows = first_rows or out
        report["ctr_training"] = ctr_throughput(first_rows, args.ctr_steps)
    print(json.dumps(report, indent=2))
    write_report(args.out, report)


if __name__ == "__main__":
    main()

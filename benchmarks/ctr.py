"""CTR training benchmark: `saviorrec` (MBA + bi-directional target attention) beside `base` (target
attention over item ID and statistics only, the named alternative), on the same ranking rows, at
two or more numbers of training samples.

    python benchmarks/ctr.py                          # 25 and 100 batches of 1,024 rows
    python benchmarks/ctr.py --steps 10 40 --scale 1

Rows: the training split of the ranking dataset built from demo data at `--scale`, assembled by
the ctr_model stage's own recipe; item embeddings and codes are random, of the tiny RQ preset's
shape (throughput does not depend on them). Both variants at the `main` preset. Writes
benchmarks/results/ctr.json; the number to read is `alternative_over_ours_seconds` (< 1: `base`
is cheaper, by that factor).
"""

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import torch

from saviorrec_pipeline import presets
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.ctr_training import CTRInputs, build_ctr_model, ctr_inputs, train_ctr
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.ranking_features import TRAIN

from measure import comparison, measured  # benchmarks/, beside this script
from ranking import polars_rows
from report import write_report


def demo_inputs(scale: float, rq_preset: str = "tiny", embedding_dim: int = 64) -> CTRInputs:
    """The ctr_model stage's inputs on demo ranking rows, the training rows shuffled so every prefix
    has the same mix of history lengths (in time order, later rows carry longer click sequences and a
    longer prefix would cost more per row). Item embeddings, codes and codebooks are random, of the
    RQ preset's shape: throughput does not depend on their values."""
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw"
        generate_demo(raw, DemoSpec(scale=scale))
        rows = polars_rows(raw)
    train = rows.filter(pl.col("split") == TRAIN).sample(fraction=1.0, shuffle=True, seed=0)
    rows = pl.concat([train, rows.filter(pl.col("split") != TRAIN)])
    item_ids = np.unique(np.concatenate([rows["item_id"].to_numpy(), rows["seq_items"].explode(empty_as_null=False).to_numpy()]))
    rq, _ = presets.rqvae(rq_preset, embedding_dim)
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(len(item_ids), embedding_dim, generator=generator), dim=-1)
    codes = torch.randint(0, rq.codebook_size, (len(item_ids), rq.num_levels), generator=generator)
    codebooks = torch.randn(rq.num_levels, rq.codebook_size, rq.latent_dim, generator=generator)
    _, architecture, _ = presets.ctr("main")
    return ctr_inputs(
        rows, pl.DataFrame({"item_id": item_ids, "embedding": z.numpy()}), pl.DataFrame({"item_id": item_ids, "codes": codes.numpy()}),
        codebooks, architecture["user_buckets"], use_base_pctr=True, where=f"demo ranking rows at scale {scale:g}",
    )


def run(step_counts: list[int], scale: float) -> dict:
    """The report: `saviorrec` and `base` at the `main` preset, trained one epoch on the first
    `steps` batches of the shuffled rows, per count."""
    inputs = demo_inputs(scale)
    _, architecture, training = presets.ctr("main")
    settings = dataclasses.replace(training, epochs=1, sequence_length=inputs.sequence_length)
    if max(step_counts) * settings.batch_size > len(inputs.train):
        raise SystemExit(f"{max(step_counts)} steps need {max(step_counts) * settings.batch_size} training rows; "
                         f"demo data at scale {scale} has {len(inputs.train)}: raise --scale")
    device = device_for_training()
    runs = []
    for steps in step_counts:
        subset = inputs.train.take(torch.arange(steps * settings.batch_size))
        result: dict = {"size": len(subset)}
        for side, variant in (("ours", "saviorrec"), ("alternative", "base")):
            model = build_ctr_model(inputs, variant, architecture, settings.seed)
            figures, _ = measured(lambda: train_ctr(model, subset, None, settings, device))
            result[side] = {**figures, "samples_per_s": round(len(subset) / figures["seconds"])}
        print(f"CTR training {json.dumps(result)}", flush=True)
        runs.append(result)
    return {
        "benchmark": "ctr",
        "rows": f"training split of the ranking dataset on demo data at scale {scale:g}",
        "device": str(device),
        "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "stages": [comparison("CTR training", "training samples", "saviorrec", "base (TA over ID + statistics)", runs)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100], help="training steps of 1,024 rows per variant, one size each")
    parser.add_argument("--scale", type=float, default=1.0, help="demo data scale the rows come from")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ctr.json")
    args = parser.parse_args()
    write_report(args.out, run(args.steps, args.scale))


if __name__ == "__main__":
    main()

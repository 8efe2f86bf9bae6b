"""CTR training benchmark: `saviorrec` (MBA + bi-directional target attention) beside `base` (target
attention over item ID and statistics only, the named alternative), on the same ranking rows, at
two or more numbers of training samples.

    python benchmarks/ctr.py                          # 25 and 100 batches of 1,024 rows
    python benchmarks/ctr.py --steps 10 40 --scale 1

Rows: the training split of the ranking dataset built from demo data at `--scale`; item embeddings
and codes are random, of the tiny RQ shape (throughput does not depend on them). Writes
benchmarks/results/ctr.json; the number to read is `alternative_over_ours_seconds` (< 1: `base`
is cheaper, by that factor).
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import torch

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.ctr_model import CTRConfig, CTRModel
from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, ItemIndex, encode_rows, profile_vocabularies, train_ctr
from saviorrec_pipeline.method.device import device_for_training

from measure import comparison, measured  # benchmarks/, beside this script
from ranking import polars_rows
from report import write_report

PROFILE_COLUMNS = ["age_band", "region", "device"]  # the demo's user profile
USER_BUCKETS = 100_003


def training_rows(scale: float) -> pl.DataFrame:
    """Shuffled, so every prefix has the same mix of history lengths: in time order, later rows carry
    longer click sequences and a longer prefix would cost more per row."""
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw"
        generate_demo(raw, DemoSpec(scale=scale))
        return polars_rows(raw).filter(pl.col("split") == "train").sample(fraction=1.0, shuffle=True, seed=0)


def run(step_counts: list[int], scale: float) -> dict:
    """The report: `saviorrec` and `base` trained on the first `steps` batches of the shuffled rows, per count."""
    rows = training_rows(scale)
    settings = CTRTrainConfig(epochs=1, batch_size=1024, sequence_length=50)
    if max(step_counts) * settings.batch_size > rows.height:
        raise SystemExit(f"{max(step_counts)} steps need {max(step_counts) * settings.batch_size} training rows; "
                         f"demo data at scale {scale} has {rows.height}: raise --scale")
    items = ItemIndex(np.unique(np.concatenate([rows["item_id"].to_numpy(), rows["seq_items"].explode(empty_as_null=False).to_numpy()])))
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(len(items), 64, generator=generator), dim=-1)
    codes = torch.randint(0, 64, (len(items), 3), generator=generator)
    vocabularies = profile_vocabularies(rows, PROFILE_COLUMNS)
    device = device_for_training()
    runs = []
    for steps in step_counts:
        subset = encode_rows(rows.head(steps * settings.batch_size), items, vocabularies, USER_BUCKETS, f"demo scale {scale}")
        result: dict = {"size": len(subset)}
        for side, variant in (("ours", "saviorrec"), ("alternative", "base")):
            torch.manual_seed(0)
            model = CTRModel(CTRConfig(variant=variant, num_items=len(items), embedding_dim=64, num_levels=3, codebook_size=64,
                                       profile_vocab_sizes=tuple(len(v) + 1 for v in vocabularies.values()), use_base_pctr=True))
            model.load_item_tables(torch.from_numpy(items.item_ids), z, codes)
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

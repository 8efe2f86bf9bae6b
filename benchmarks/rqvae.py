"""RQ-VAE benchmark beside faiss' ResidualQuantizer (the named alternative) on the same embeddings,
at two or more sizes each:
- training: one RQ-VAE epoch (Sinkhorn assignment, the second after the warm-up and k-means
  initialisation) against faiss' whole ResidualQuantizer training, on `--train-items` items;
- code assignment: argmin (the `semantic_ids` default) against faiss' encoding, on `--items` items,
  with the Sinkhorn assignment (`inference_assignment: sinkhorn`) measured beside them unless
  `--skip-sinkhorn` (it takes minutes per 10^5 items on CPU).

    python benchmarks/rqvae.py                                   # tiny shape
    python benchmarks/rqvae.py --preset paper --items 100000 400000 --train-items 25000 100000

Embeddings: dimension 64, L2-normalised, drawn around 1,000 random centres. Writes
benchmarks/results/rqvae.json.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import torch

from saviorrec_pipeline import presets
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, RQVAETrainConfig, assign_codes, train_rqvae

from measure import comparison, measured, peak_rss_mib, reset_peak_rss  # benchmarks/, beside this script
from report import write_report


def embeddings(items: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    z = centres[rng.integers(0, 1000, items)] + 0.5 * rng.normal(size=(items, dim)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def one_rq_epoch(config: RQVAEConfig, training: RQVAETrainConfig, z: np.ndarray, device: torch.device) -> tuple[dict, RQVAE]:
    """Two RQ epochs after a one-epoch warm-up; the second one's seconds and peak RSS, free of the
    warm-up and the k-means initialisation."""
    torch.manual_seed(0)
    model = RQVAE(config)
    epoch_ends: list[float] = []
    peaks: list[float] = []

    def on_epoch(*_) -> None:
        epoch_ends.append(time.perf_counter())
        peaks.append(peak_rss_mib())
        reset_peak_rss()

    two_epochs = dataclasses.replace(training, epochs=2, warmup_epochs=1)
    train_rqvae(model, torch.from_numpy(z), np.zeros((0, 2)), two_epochs, device, on_epoch=on_epoch)
    return {"seconds": round(epoch_ends[1] - epoch_ends[0], 3), "peak_rss_mib": peaks[1]}, model


def run(preset: str, item_counts: list[int], train_item_counts: list[int], sinkhorn: bool = True) -> dict:
    """The report: training at each of `train_item_counts`, assignment at each of `item_counts` with
    the models trained on the most training items."""
    device = device_for_training()
    config, training = presets.rqvae(preset, input_dim=64)
    z = embeddings(max(item_counts + train_item_counts))
    training_runs = []
    for n in sorted(train_item_counts):
        epoch, model = one_rq_epoch(config, training, z[:n], device)
        rq = faiss.ResidualQuantizer(64, config.num_levels, int(np.log2(config.codebook_size)))
        faiss_training, _ = measured(lambda: rq.train(z[:n]))
        training_runs.append({"size": n, "ours": epoch, "alternative": faiss_training})
        print(json.dumps({"training": training_runs[-1]}), flush=True)
    assignment_runs = []
    for n in sorted(item_counts):
        chosen = torch.from_numpy(z[:n])
        argmin, _ = measured(lambda: assign_codes(model, chosen, "argmin", device, training.batch_size))
        faiss_encoding, _ = measured(lambda: rq.compute_codes(z[:n]))
        assignment_runs.append({
            "size": n,
            "ours": {**argmin, "items_per_s": round(n / argmin["seconds"])},
            "alternative": {**faiss_encoding, "items_per_s": round(n / faiss_encoding["seconds"])},
        })
        if sinkhorn:
            balanced, _ = measured(lambda: assign_codes(model, chosen, "sinkhorn", device, training.batch_size))
            assignment_runs[-1]["sinkhorn"] = {**balanced, "items_per_s": round(n / balanced["seconds"])}
            assignment_runs[-1]["sinkhorn_over_argmin_seconds"] = round(balanced["seconds"] / argmin["seconds"], 2)
        print(json.dumps({"assignment": assignment_runs[-1]}), flush=True)
    return {
        "benchmark": "rqvae",
        "preset": preset,
        "shape": {"L": config.num_levels, "K": config.codebook_size, "d": config.latent_dim},
        "device": str(device),
        "cpus": psutil.cpu_count(),
        "stages": [
            comparison(f"RQ-VAE training ({preset})", "training items", "one RQ-VAE epoch (Sinkhorn)",
                       "faiss ResidualQuantizer, whole training", training_runs),
            comparison(f"RQ code assignment ({preset})", "items", "RQ-VAE argmin", "faiss ResidualQuantizer encoding", assignment_runs),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=presets.names("rqvae"), default="tiny")
    parser.add_argument("--items", type=int, nargs="+", default=[250_000, 1_000_000], help="items to assign codes to, one size each")
    parser.add_argument("--train-items", type=int, nargs="+", default=[25_000, 100_000], help="items to train on, one size each")
    parser.add_argument("--skip-sinkhorn", action="store_true", help="leave out the Sinkhorn assignment")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rqvae.json")
    args = parser.parse_args()
    write_report(args.out, run(args.preset, args.items, args.train_items, sinkhorn=not args.skip_sinkhorn))


if __name__ == "__main__":
    main()

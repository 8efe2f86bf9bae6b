"""RQ-VAE throughput: code assignment with argmin against Sinkhorn, training seconds per epoch, and
faiss' ResidualQuantizer training and encoding on the same data (the named alternative).

    python benchmarks/rqvae.py                                   # tiny shape, 10^6 embeddings
    python benchmarks/rqvae.py --preset paper --items 100000

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

from saviorrec_pipeline.assets.semantic_ids import PRESETS
from saviorrec_pipeline.method.encoder_training import device_for_training
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, assign_codes, train_rqvae

from report import write_report  # benchmarks/report.py, beside this script


def embeddings(items: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    z = centres[rng.integers(0, 1000, items)] + 0.5 * rng.normal(size=(items, dim)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--train-items", type=int, default=100_000, help="items for the training epoch and faiss training")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rqvae.json")
    args = parser.parse_args()
    device = device_for_training()
    shape, training = PRESETS[args.preset]
    config = RQVAEConfig(input_dim=64, **shape)
    z = embeddings(args.items)
    sample = torch.from_numpy(z[: args.train_items])
    torch.manual_seed(0)
    model = RQVAE(config)
    # Two RQ epochs after a one-epoch warm-up; the second epoch's time is the one reported, free of
    # the warm-up and the k-means initialisation.
    epoch_ends: list[float] = []
    two_epochs = dataclasses.replace(training, epochs=2, warmup_epochs=1)
    train_rqvae(model, sample, np.zeros((0, 2)), two_epochs, device, on_epoch=lambda *_: epoch_ends.append(time.perf_counter()))
    epoch_s = epoch_ends[1] - epoch_ends[0]
    all_z = torch.from_numpy(z)
    argmin_s = _seconds(lambda: assign_codes(model, all_z, "argmin", device, training.batch_size))
    sinkhorn_s = _seconds(lambda: assign_codes(model, all_z, "sinkhorn", device, training.batch_size))

    rq = faiss.ResidualQuantizer(64, config.num_levels, int(np.log2(config.codebook_size)))
    faiss_train_s = _seconds(lambda: rq.train(z[: args.train_items]))
    faiss_encode_s = _seconds(lambda: rq.compute_codes(z))
    report = {
        "benchmark": "rqvae",
        "preset": args.preset,
        "shape": {"L": config.num_levels, "K": config.codebook_size, "d": config.latent_dim},
        "device": str(device),
        "items": args.items,
        "train_items": args.train_items,
        "train_seconds_per_epoch": round(epoch_s, 2),
        "assign_argmin_items_per_s": round(args.items / argmin_s),
        "assign_sinkhorn_items_per_s": round(args.items / sinkhorn_s),
        "sinkhorn_over_argmin_time": round(sinkhorn_s / argmin_s, 2),
        "faiss_rq_train_seconds": round(faiss_train_s, 2),
        "faiss_rq_encode_items_per_s": round(args.items / faiss_encode_s),
        "argmin_over_faiss_rq_encode_speed": round((args.items / argmin_s) / (args.items / faiss_encode_s), 2),
        "peak_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
        "cpus": psutil.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    write_report(args.out, report)


if __name__ == "__main__":
    main()

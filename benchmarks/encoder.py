"""SaviorEnc throughput: training pairs/s and embedding items/s, per preset, on this machine's device,
at two or more sizes.

    python benchmarks/encoder.py                              # tiny and paper presets, sizes x1 and x4
    python benchmarks/encoder.py --presets tiny --sizes 1 2 4

A size multiplies the preset's timed training steps and its catalog (`BASE_SIZES`). Named
alternatives, measured in the same run on batches of the same size:
- training: the stage's i2i alignment phase against its domain-adaptation phase (the towers and
  CLIP's loss, no fusion, no projection) over as many items per step, both by the stage's own
  training functions, so `alternative_over_ours_seconds` below 1 is the cost of eq. 2's fusion
  transformer and head (alignment encodes an item that recurs in a batch once);
- embedding: one item at a time instead of batches of 256, over the same items, so
  `alternative_over_ours_seconds` is what batching buys.
Writes benchmarks/results/encoder.json.
"""

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import numpy as np
import psutil
import torch

from saviorrec_pipeline import presets
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder_training import CatalogTensors, build_model, embed_catalog, train_alignment, train_domain_adaptation

from measure import comparison, measured  # benchmarks/, beside this script
from report import write_report

# Per preset and device type, at size 1: (pairs per batch, timed steps, catalog items). On CPU the
# paper preset's batch of 4096 pairs would take minutes per step: a small batch measures the same
# per-pair cost.
BASE_SIZES = {
    "tiny": {"cpu": (512, 5, 1024), "cuda": (512, 10, 4096)},
    "minilm": {"cpu": (512, 5, 1024), "cuda": (512, 10, 4096)},
    "paper": {"cpu": (16, 1, 16), "cuda": (256, 10, 2048)},
}
EMBED_BATCH = 256


def synthetic_catalog(items: int, image_size: int, context_length: int, seed: int = 0) -> CatalogTensors:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((items, context_length), dtype=np.int64)
    tokens[:, : context_length // 2] = rng.integers(1, 49_000, (items, context_length // 2))
    return CatalogTensors(
        item_ids=np.arange(items),
        images=torch.from_numpy(rng.integers(0, 256, (items, 3, image_size, image_size), dtype=np.uint8)),
        has_image=torch.ones(items, dtype=torch.bool),
        tokens=torch.from_numpy(tokens),
        has_title=torch.ones(items, dtype=torch.bool),
    )


def _timed(train, warm_up, device: torch.device) -> dict:
    """Seconds and peak RSS of `train()`, after `warm_up()` (allocation, kernel selection)."""
    def synchronized(call) -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()

    synchronized(warm_up)
    figures, _ = measured(lambda: synchronized(train))
    return figures


def measure(name: str, batch: int, steps: int, items: int) -> tuple[dict, dict]:
    """One size: the stage's two training phases as the item_encoder stage runs them, one epoch of
    `steps` batches each (i2i alignment: `batch` random co-click pairs per step; domain adaptation:
    the same 2 x `batch` items per step), and the embedding run (`items`)."""
    device = device_for_training()
    config, training = presets.encoder(name)
    training = dataclasses.replace(training, batch_size=batch, epochs=1, domain_adaptation_epochs=1)
    model = build_model(config, seed=0).to(device).train()

    def catalog_of(size: int, seed: int) -> CatalogTensors:
        return synthetic_catalog(size, config.vision["image_size"], config.text["context_length"], seed)

    catalog = catalog_of(items, seed=0)
    pairs = np.random.default_rng(0).integers(0, items, (steps * batch, 2))
    adaptation = dataclasses.replace(training, batch_size=2 * batch)

    alignment = _timed(lambda: train_alignment(model, catalog, pairs, training, device),
                       lambda: train_alignment(model, catalog, pairs[:batch], training, device), device)
    towers_only = _timed(lambda: train_domain_adaptation(model, catalog_of(steps * 2 * batch, seed=2), adaptation, device),
                         lambda: train_domain_adaptation(model, catalog_of(2 * batch, seed=3), adaptation, device), device)
    # Warm-up in inference mode (kernel selection for the new shapes), outside both timings.
    embed_catalog(model, catalog_of(EMBED_BATCH, seed=1), device, batch_size=EMBED_BATCH)
    batched, _ = measured(lambda: embed_catalog(model, catalog, device, batch_size=EMBED_BATCH))
    one_at_a_time, _ = measured(lambda: embed_catalog(model, catalog, device, batch_size=1))
    trained_pairs = steps * batch
    training_sizes = {"size": trained_pairs, "batch_pairs": batch, "steps": steps,
                      "ours": {**alignment, "pairs_per_s": round(trained_pairs / alignment["seconds"], 1)},
                      "alternative": {**towers_only, "pairs_per_s": round(trained_pairs / towers_only["seconds"], 1)}}
    embedding = {"size": items,
                 "ours": {**batched, "items_per_s": round(items / batched["seconds"], 1)},
                 "alternative": {**one_at_a_time, "items_per_s": round(items / one_at_a_time["seconds"], 1)}}
    return training_sizes, embedding


def run(presets: list[str], sizes: list[int]) -> dict:
    """The report: per preset, training and embedding at each size (a multiple of BASE_SIZES)."""
    device = device_for_training()
    stages = []
    for name in presets:
        batch, base_steps, base_items = BASE_SIZES[name][device.type]
        measured_sizes = []
        for size in sizes:
            measured_sizes.append(measure(name, batch, base_steps * size, base_items * size))
            print(json.dumps({"preset": name, "size": size, "measured": measured_sizes[-1]}), flush=True)
        stages.append(comparison(f"encoder training ({name})", "training pairs", "alignment step (towers, fusion, head; InfoNCE)",
                                 "towers-only CLIP step", [training for training, _ in measured_sizes]))
        stages.append(comparison(f"item embedding ({name})", "catalog items", f"batches of {EMBED_BATCH}",
                                 "one item at a time", [embedding for _, embedding in measured_sizes]))
    cuda = device.type == "cuda"
    return {
        "benchmark": "encoder",
        "device": str(device),
        "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name() if cuda else None},
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=sorted(BASE_SIZES), default=["tiny", "paper"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4], help="multiples of the preset's steps and catalog")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder.json")
    args = parser.parse_args()
    write_report(args.out, run(args.presets, args.sizes))


if __name__ == "__main__":
    main()

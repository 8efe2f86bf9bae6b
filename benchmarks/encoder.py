"""SaviorEnc throughput: training pairs/s and embedding items/s, per preset, on this machine's device,
at two or more sizes.

    python benchmarks/encoder.py                              # tiny and paper presets, sizes x1 and x4
    python benchmarks/encoder.py --presets tiny --sizes 1 2 4

A size multiplies the preset's timed training steps and its catalog (`BASE_SIZES`). Named
alternatives, measured in the same run on batches of the same size:
- training: the domain-adaptation step (the towers and CLIP's loss, no fusion, no projection), so
  `alternative_over_ours_seconds` below 1 is the cost of eq. 2's fusion transformer and head;
- embedding: one item at a time instead of batches of 256, over the same items, so
  `alternative_over_ours_seconds` is what batching buys.
Writes benchmarks/results/encoder.json.
"""

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import psutil
import torch

from saviorrec_pipeline import presets
from saviorrec_pipeline.method.encoder import clip_loss, info_nce
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder_training import CatalogTensors, build_model, embed_catalog

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


def _timed_steps(step, steps: int, device: torch.device) -> dict:
    """Seconds and peak RSS of `steps` steps after one warm-up step (allocation, kernel selection)."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed() -> None:
        for _ in range(steps):
            step()
        synchronize()

    step()
    synchronize()
    figures, _ = measured(timed)
    return figures


def measure(name: str, batch: int, steps: int, items: int) -> tuple[dict, dict]:
    """One size: the training run (`steps` batches of `batch` pairs) and the embedding run (`items`)."""
    device = device_for_training()
    config, _ = presets.encoder(name)
    model = build_model(config, seed=0).to(device).train()
    catalog = synthetic_catalog(items, config.vision["image_size"], config.text["context_length"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)

    def alignment_step() -> None:
        rows = torch.randint(0, items, (2 * batch,), generator=generator)
        with autocast:
            z = model(*catalog.batch(rows, device))
            loss = info_nce(z[:batch].float(), z[batch:].float(), 0.07)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def towers_only_step() -> None:
        rows = torch.randint(0, items, (2 * batch,), generator=generator)
        images, _, tokens, _ = catalog.batch(rows, device)
        with autocast:
            image, text = model.tower_embeddings(images, tokens)
            loss = clip_loss(image.float(), text.float(), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    alignment = _timed_steps(alignment_step, steps, device)
    towers_only = _timed_steps(towers_only_step, steps, device)
    # Warm-up in inference mode (kernel selection for the new shapes), outside both timings.
    embed_catalog(model, synthetic_catalog(EMBED_BATCH, config.vision["image_size"], config.text["context_length"], seed=1),
                  device, batch_size=EMBED_BATCH)
    batched, _ = measured(lambda: embed_catalog(model, catalog, device, batch_size=EMBED_BATCH))
    one_at_a_time, _ = measured(lambda: embed_catalog(model, catalog, device, batch_size=1))
    pairs = steps * batch
    training = {"size": pairs, "batch_pairs": batch, "steps": steps,
                "ours": {**alignment, "pairs_per_s": round(pairs / alignment["seconds"], 1)},
                "alternative": {**towers_only, "pairs_per_s": round(pairs / towers_only["seconds"], 1)}}
    embedding = {"size": items,
                 "ours": {**batched, "items_per_s": round(items / batched["seconds"], 1)},
                 "alternative": {**one_at_a_time, "items_per_s": round(items / one_at_a_time["seconds"], 1)}}
    return training, embedding


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

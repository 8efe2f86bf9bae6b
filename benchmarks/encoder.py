"""SaviorEnc throughput: training pairs/s and embedding items/s, per preset, on this machine's device.

    python benchmarks/encoder.py                         # tiny and paper presets
    python benchmarks/encoder.py --presets tiny --steps 20

Named alternatives, measured in the same run on the same batches:
- training: the domain-adaptation step (the towers and CLIP's loss, no fusion, no projection), so
  `alignment_over_towers_only` is the cost of eq. 2's fusion transformer and head relative to it;
- embedding: one item at a time instead of batches, so `batched_over_one_at_a_time` is what
  batching buys.
Writes benchmarks/results/encoder.json.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from saviorrec_pipeline.method.encoder import clip_loss, info_nce, preset
from saviorrec_pipeline.method.encoder_training import CatalogTensors, build_model, device_for_training, embed_catalog

from report import write_report  # benchmarks/report.py, beside this script


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


def _timed_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, batch: int, steps: int, items: int) -> dict:
    device = device_for_training()
    config = preset(name)
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

    alignment_s = _timed_steps(alignment_step, steps, device)
    towers_s = _timed_steps(towers_only_step, steps, device)
    embed_start = time.perf_counter()
    embed_catalog(model, catalog, device, batch_size=256)
    batched_s = time.perf_counter() - embed_start
    single = CatalogTensors(catalog.item_ids[:32], catalog.images[:32], catalog.has_image[:32], catalog.tokens[:32], catalog.has_title[:32])
    single_start = time.perf_counter()
    embed_catalog(model, single, device, batch_size=1)
    single_per_item = (time.perf_counter() - single_start) / len(single)
    pairs_per_s = steps * batch / alignment_s
    items_per_s = items / batched_s
    return {
        "preset": name,
        "device": str(device),
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch_pairs": batch,
        "steps": steps,
        "train_pairs_per_s": round(pairs_per_s, 1),
        "towers_only_pairs_per_s": round(steps * batch / towers_s, 1),
        "alignment_over_towers_only": round(towers_s / alignment_s, 3),
        "embed_items_per_s": round(items_per_s, 1),
        "embed_one_at_a_time_items_per_s": round(1 / single_per_item, 1),
        "batched_over_one_at_a_time": round(items_per_s * single_per_item, 2),
        "peak_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 10; 2 for paper on CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    # On CPU the paper preset's batch of 4096 pairs would take minutes per step: a small batch
    # measures the same per-pair cost.
    batches = {"tiny": 512, "paper": 256 if cuda else 16, "minilm": 512}
    items = {"tiny": 4096, "paper": 2048 if cuda else 256, "minilm": 4096}
    runs = []
    for name in args.presets:
        steps = args.steps or (2 if name == "paper" and not cuda else 10)
        result = measure(name, batches[name], steps, items[name])
        print(json.dumps(result), flush=True)
        runs.append(result)
    report = {
        "benchmark": "encoder",
        "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name() if cuda else None},
        "runs": runs,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()

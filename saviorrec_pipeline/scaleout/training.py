"""CTR training on Ray Train: `train_ctr` run by N TorchTrainer workers as DDP (gloo on CPUs, NCCL
on GPUs), each with the whole encoded rows and its share of every batch (`DataParallel`).

The workers start from the driver's initial weights (or warm start); rank 0 saves the training
checkpoints where in-process training would (so a killed run resumes on either engine) and, at
the end, the trained weights, the figures and the final training state as a Ray Train checkpoint,
which the driver reads back into its model. The embedding tables take dense gradients here: NCCL
has no sparse all-reduce, and gloo's corrupted the heap of a worker (measured: SIGABRT after
`malloc(): unaligned tcache chunk` with the main preset on 2 CPU workers). Adagrad's update of a row
no batch touched is zero either way, so the result is the same; the cost is an all-reduce of the
whole tables at every step."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load, save, save_file
from torch import nn

from saviorrec_pipeline.checkpoints import Checkpoint, CheckpointStore
from saviorrec_pipeline.method.ctr_model import CTRConfig, CTRModel
from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, CTRTraining, DataParallel, EncodedRows, WarmStart, train_ctr
from saviorrec_pipeline.method.training import EpochReport
from saviorrec_pipeline.scaleout.shards import cluster_gpus, on_cluster

WEIGHTS, FIGURES, FINAL_STATE = "weights.safetensors", "training.json", "final_state.safetensors"


def train_on_ray(
    model: CTRModel, train: EncodedRows, evaluation: EncodedRows | None, settings: CTRTrainConfig, device: torch.device,
    on_epoch: Callable[[EpochReport], None] | None = None, checkpoints: CheckpointStore | None = None, warm: WarmStart | None = None,
    *, workers: int, storage_path: str | None = None,
) -> CTRTraining:
    """`train_ctr`'s arguments, trained by `workers` Ray Train workers (a GPU each when the cluster
    has that many; `device` is the driver's, where `model` ends with the trained weights). Each
    epoch's figures reach `on_epoch` once training ends. Ray Train keeps its run under `storage_path`
    (shared storage, such as s3://, when the cluster has several nodes; unset: a temporary folder
    where the trainer is driven from)."""
    config = {
        "architecture": model.config.to_dict(), "weights": save(_contiguous(model)), "train": train, "evaluation": evaluation,
        "settings": settings, "checkpoints": checkpoints, "warm": (warm.state.to_bytes(), warm.steps_done, warm.total_steps) if warm else None,
    }
    weights, figures, final_state = on_cluster(_fit, config, workers, storage_path)
    model.load_state_dict(load(weights))
    model.to(device)
    reports = [EpochReport(**report) for report in figures.pop("reports")]
    for report in reports:
        if on_epoch is not None:
            on_epoch(report)
    return CTRTraining(**figures, final_state=Checkpoint.from_bytes(final_state) if final_state is not None else None)


def _fit(config: dict, workers: int, storage_path: str | None) -> tuple[bytes, dict, bytes | None]:
    """The TorchTrainer run: (trained weights as safetensors, figures, final training state)."""
    use_gpu = cluster_gpus() >= workers
    with tempfile.TemporaryDirectory(prefix="ray-train-") as scratch:
        trainer = TorchTrainer(_worker, train_loop_config=config, scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                               run_config=RunConfig(storage_path=storage_path or scratch))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            folder = Path(folder)
            final_state = (folder / FINAL_STATE).read_bytes() if (folder / FINAL_STATE).exists() else None
            return (folder / WEIGHTS).read_bytes(), json.loads((folder / FIGURES).read_text()), final_state


def _worker(config: dict) -> None:
    context = ray.train.get_context()
    parallel = DataParallel(context.get_world_rank(), context.get_world_size())
    device = ray.train.torch.get_device()
    model = CTRModel(CTRConfig.from_dict(config["architecture"]))
    model.load_state_dict(load(config["weights"]))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = False
    warm = None
    if config["warm"] is not None:
        state, steps_done, total_steps = config["warm"]
        warm = WarmStart(Checkpoint.from_bytes(state), steps_done, total_steps)
    reports: list[EpochReport] = []

    def collect(report: EpochReport) -> None:
        # Every worker reaches each epoch's end together: sum the examples of all of them.
        examples = torch.tensor([report.examples], dtype=torch.int64)
        dist.all_reduce(examples)
        reports.append(dataclasses.replace(report, examples=int(examples)))

    training = train_ctr(model, config["train"], config["evaluation"], config["settings"], device, collect, config["checkpoints"], warm, parallel)
    if parallel.rank != 0:
        ray.train.report({"epochs": training.epochs})
        return
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        save_file(_contiguous(model), folder / WEIGHTS)
        figures = {
            "epochs": training.epochs, "selection": training.selection, "history": training.history,
            "samples_trained": sum(report.examples for report in reports), "train_seconds": sum(report.seconds for report in reports),
            "steps_done": training.steps_done, "total_steps": training.total_steps, "reports": [dataclasses.asdict(report) for report in reports],
        }
        (folder / FIGURES).write_text(json.dumps(figures))
        if training.final_state is not None:
            (folder / FINAL_STATE).write_bytes(training.final_state.to_bytes())
        ray.train.report({"epochs": training.epochs}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _contiguous(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}

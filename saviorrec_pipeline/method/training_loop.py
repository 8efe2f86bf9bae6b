"""What every training loop here shares: a guard against a loss that stops being finite, and
per-epoch checkpoints from which an interrupted run goes on exactly as if it had never stopped.

A checkpoint is one safetensors file. Its tensors: the model's weights, the optimizer's state and
the shuffling generator's state. Its metadata (JSON): the phase, the epochs done, the history so
far, the optimizer's hyperparameters and the learning-rate schedule's position. Where the file
lives is the caller's business (a `CheckpointStore`); nothing here unpickles anything.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: going on would only spread it through the weights."""


def check_finite(loss: float, phase: str, epoch: int, step: int) -> float:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"{phase}: the loss became {loss} at epoch {epoch + 1}, step {step + 1}, so training stopped; "
            "lower the learning rate or look for extreme input values"
        )
    return loss


class CheckpointStore(Protocol):
    """One checkpoint's place: the bytes of the latest save, or None before the first."""

    def read(self) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...


_MODEL, _OPTIMIZER, _GENERATOR = "model.", "optimizer.", "generator"
_METADATA_KEY = "training_loop"


@dataclass
class Checkpoint:
    phase: str
    epochs_done: int
    history: list
    tensors: dict[str, torch.Tensor]
    optimizer_rest: dict  # param groups and the non-tensor parts of the per-parameter state
    schedule: dict | None

    @classmethod
    def capture(
        cls, phase: str, epochs_done: int, history: list, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        generator: torch.Generator, schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> "Checkpoint":
        tensors = {_MODEL + name: value for name, value in model.state_dict().items()}
        saved = optimizer.state_dict()
        plain_state: dict[str, dict] = {}
        for index, values in saved["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIMIZER}{index}.{name}"] = value
                else:
                    plain_state.setdefault(str(index), {})[name] = value
        tensors[_GENERATOR] = generator.get_state()
        return cls(
            phase, epochs_done, list(history),
            {name: value.detach().cpu().contiguous() for name, value in tensors.items()},
            {"param_groups": saved["param_groups"], "plain_state": plain_state},
            schedule.state_dict() if schedule is not None else None,
        )

    def restore(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
        schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        model.load_state_dict({name.removeprefix(_MODEL): value for name, value in self.tensors.items() if name.startswith(_MODEL)})
        state: dict[int, dict] = {int(index): dict(values) for index, values in self.optimizer_rest["plain_state"].items()}
        for name, value in self.tensors.items():
            if name.startswith(_OPTIMIZER):
                index, key = name.removeprefix(_OPTIMIZER).split(".", 1)
                state.setdefault(int(index), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": self.optimizer_rest["param_groups"]})
        generator.set_state(self.tensors[_GENERATOR])
        if schedule is not None and self.schedule is not None:
            schedule.load_state_dict(self.schedule)

    def to_bytes(self) -> bytes:
        loop = {"phase": self.phase, "epochs_done": self.epochs_done, "history": self.history,
                "optimizer_rest": self.optimizer_rest, "schedule": self.schedule}
        return save_tensors(self.tensors, metadata={_METADATA_KEY: json.dumps(loop)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Checkpoint":
        loop = _loop_metadata(lambda start, end: data[start:end])
        return cls(loop["phase"], loop["epochs_done"], loop["history"], load_tensors(data), loop["optimizer_rest"], loop["schedule"])


def _loop_metadata(read_range: Callable[[int, int], bytes]) -> dict:
    """The training loop's metadata of a checkpoint, from its header alone: safetensors begins with
    the header's length (8 bytes, little-endian), then the JSON header."""
    header_length = int.from_bytes(read_range(0, 8), "little")
    return json.loads(json.loads(read_range(8, 8 + header_length))["__metadata__"][_METADATA_KEY])


def saved_position(read_range: Callable[[int, int], bytes]) -> tuple[str, int]:
    """(phase, epochs done) of a checkpoint whose bytes `read_range(start, end)` reads: only its
    header is read, and the tensors (gigabytes, at the paper's sizes) stay where they are."""
    loop = _loop_metadata(read_range)
    return loop["phase"], loop["epochs_done"]


def latest_checkpoint(store: CheckpointStore | None) -> Checkpoint | None:
    data = store.read() if store is not None else None
    return Checkpoint.from_bytes(data) if data else None


def fingerprint(*parts: object) -> str:
    """A short digest of a training run's inputs and settings: a checkpoint resumes only the run
    it was saved from, never one with other data or hyperparameters."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(asdict(part) if is_dataclass(part) else part, sort_keys=True).encode())
    return digest.hexdigest()[:16]

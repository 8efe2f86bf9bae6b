"""Training checkpoints: their format, where they live, how often they are saved, when they go.

A checkpoint is one safetensors file. Its tensors: the model's weights, the optimizer's state and
the shuffling generator's state. Its metadata (JSON): the phase, the epochs done, the history so
far, the optimizer's hyperparameters and the learning-rate schedule's position. Nothing here
unpickles anything.

A stage's checkpoints for one partition live under
`{storage root}/checkpoints/{asset}/{partition}/{name}.safetensors`, the name carrying a
`fingerprint` of the run's inputs and settings, so a checkpoint resumes only the run it was saved
from. Each save replaces the file whole; the folder is removed once the stage's output is stored.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from saviorrec_pipeline.files import filesystem, safe_name, write_atomic


@dataclass
class TrainingState:
    """What training changes and a checkpoint saves: the weights (a module that may hold more than
    the model, such as its moving average), the optimizer, the shuffling generator and the schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None


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
    def capture(cls, phase: str, epochs_done: int, history: list, state: TrainingState) -> "Checkpoint":
        tensors = {_MODEL + name: value for name, value in state.model.state_dict().items()}
        saved = state.optimizer.state_dict()
        plain_state: dict[str, dict] = {}
        for index, values in saved["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIMIZER}{index}.{name}"] = value
                else:
                    plain_state.setdefault(str(index), {})[name] = value
        tensors[_GENERATOR] = state.generator.get_state()
        return cls(
            phase, epochs_done, list(history),
            # Copies: a capture is a snapshot, which the optimizer's in-place updates must not reach.
            {name: value.detach().to("cpu", copy=True).contiguous() for name, value in tensors.items()},
            {"param_groups": saved["param_groups"], "plain_state": plain_state},
            state.schedule.state_dict() if state.schedule is not None else None,
        )

    def restore(self, state: TrainingState) -> None:
        """Everything back as it was saved: training goes on after `epochs_done`."""
        self.restore_weights(state)
        state.generator.set_state(self.tensors[_GENERATOR])
        if state.schedule is not None and self.schedule is not None:
            state.schedule.load_state_dict(self.schedule)

    def restore_weights(self, state: TrainingState) -> None:
        """The weights and the optimizer's state only (a warm start): the shuffling and the schedule
        stay those of the new run."""
        state.model.load_state_dict({name.removeprefix(_MODEL): value for name, value in self.tensors.items() if name.startswith(_MODEL)})
        per_parameter: dict[int, dict] = {int(index): dict(values) for index, values in self.optimizer_rest["plain_state"].items()}
        for name, value in self.tensors.items():
            if name.startswith(_OPTIMIZER):
                index, key = name.removeprefix(_OPTIMIZER).split(".", 1)
                # A copy: the optimizer updates its state in place, and would change this checkpoint.
                per_parameter.setdefault(int(index), {})[key] = value.clone()
        state.optimizer.load_state_dict({"state": per_parameter, "param_groups": self.optimizer_rest["param_groups"]})

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


class CheckpointFile:
    """One training loop's checkpoint (a `CheckpointStore`), replaced whole by every `every`-th
    epoch's save (0: none are kept)."""

    def __init__(self, uri: str, every: int = 1):
        self.uri = uri
        self.every = every
        self._offered = 0

    def read(self) -> bytes | None:
        fs, path = filesystem(self.uri)
        return fs.cat_file(path) if fs.exists(path) else None

    def saved_position(self) -> tuple[str, int] | None:
        """(phase, epochs done) of the latest save, read by byte ranges from its header only: the
        tensors (gigabytes, at the paper's sizes) stay where they are."""
        fs, path = filesystem(self.uri)
        if not fs.exists(path):
            return None
        loop = _loop_metadata(lambda start, end: fs.cat_file(path, start=start, end=end))
        return loop["phase"], loop["epochs_done"]

    def write(self, data: bytes) -> None:
        self._offered += 1
        if self.every and self._offered % self.every == 0:
            write_atomic(self.uri, lambda f: f.write(data))


def checkpoint_folder(root: str, asset: str, partition: str) -> str:
    return f"{root.rstrip('/')}/checkpoints/{safe_name(asset, 'asset name')}/{safe_name(partition, 'partition key')}"


def checkpoint_file(root: str, asset: str, partition: str, name: str, every: int) -> CheckpointFile:
    """Where a training loop of `asset` for `partition` keeps its latest epoch."""
    return CheckpointFile(f"{checkpoint_folder(root, asset, partition)}/{safe_name(name, 'checkpoint name')}.safetensors", every)


def clear_checkpoints(root: str, asset: str, partition: str) -> None:
    """Drop the partition's checkpoints of `asset`: its output is stored, so a later run starts afresh."""
    fs, path = filesystem(checkpoint_folder(root, asset, partition))
    if fs.exists(path):
        fs.rm(path, recursive=True)

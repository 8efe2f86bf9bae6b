"""The one training loop of every model here: epochs of optimiser steps over the batches a stage
supplies, a guard against a loss that stops being finite, a checkpoint after every epoch from which
an interrupted run goes on exactly as if it had never stopped, and progress reports.

A stage supplies its `Steps`: one epoch's batches (drawn with the run's generator, which the
checkpoint saves, so a resumed run draws the same ones), the loss of a batch, and where it needs
them what follows each optimiser step (moving averages, codebook updates), what each epoch adds to
its figures (held-out scores) and when to stop early. A run begins from its own last checkpoint
(`resume`), from another run's weights and optimizer state (`warm_start`), or from the model as it is.
"""

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saviorrec_pipeline.checkpoints import Checkpoint, CheckpointStore, TrainingState
from saviorrec_pipeline.method.device import autocast

Figures = dict[str, float]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: going on would only spread it through the weights."""


def check_finite(loss: float, label: str, epoch: int, step: int) -> float:
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"{label}: the loss became {loss} at epoch {epoch + 1}, step {step + 1}, so training stopped; "
            "lower the learning rate or look for extreme input values"
        )
    return loss


def shapes_differing(saved: dict, today: dict) -> list[str]:
    """The keys of `today` whose values a saved model's shapes do not match."""
    return [key for key in today if json.dumps(saved.get(key), sort_keys=True) != json.dumps(today[key], sort_keys=True)]


def check_same_shapes(stage: str, saved_uri: str, saved: dict, today: dict, way_out: str) -> None:
    """Refuse to reuse or go on from a saved model whose shapes differ from what today's data and
    configuration give, naming both shapes and the way out."""
    differ = shapes_differing(saved, today)
    if differ:
        raise ValueError(
            f"{stage}: {saved_uri} has {', '.join(f'{key}={saved.get(key)}' for key in differ)}, but today's data and configuration give "
            f"{', '.join(f'{key}={today[key]}' for key in differ)}; {way_out}, or undo the change"
        )


@dataclass(frozen=True)
class StepReport:
    phase: str
    epoch: int  # from 0
    step: int  # from 0
    steps: int  # in this epoch
    loss: float


@dataclass(frozen=True)
class EpochReport:
    phase: str
    epoch: int  # from 0
    epochs: int  # the run's budget
    figures: Figures
    seconds: float  # in optimiser steps, not in what the epoch's end adds
    examples: int  # passed through optimiser steps


@dataclass
class Steps:
    """What a stage trains on and how: the loop does the rest."""

    batches: Callable[[torch.Generator], Sequence[torch.Tensor]]  # one epoch's batches (index tensors)
    loss: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, Figures]]  # and figures to average
    after_step: Callable[[], None] | None = None  # after each optimiser step, before the schedule's
    end_epoch: Callable[[Figures], None] | None = None  # adds to the epoch's figures before they are saved
    stop_early: Callable[[list[Figures]], bool] | None = None  # asked before each epoch, given the history


def train_epochs(
    phase: str, state: TrainingState, steps: Steps, epochs: int, *, label: str | None = None,
    device: torch.device = torch.device("cpu"), mixed_precision: bool = False, loss_name: str = "loss",
    checkpoints: CheckpointStore | None = None, resume: Checkpoint | None = None, warm_start: Checkpoint | None = None,
    history: Sequence[Figures] = (), on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> list[Figures]:
    """Train `state.model` (already on `device`) up to `epochs` epochs of `phase`; returns `history`
    (an earlier phase's figures, kept in this phase's checkpoints) plus one dict per epoch: the
    example-weighted mean loss as `loss_name` and of each figure the loss returns, the learning
    rate, and what `end_epoch` adds.

    `resume`, a checkpoint of this phase, restores everything and continues after its epochs;
    `warm_start` restores the weights and optimizer state and trains all `epochs`. A non-finite loss
    raises NonFiniteLoss naming `label` (default: the phase), the epoch and the step."""
    if resume is not None:
        resume.restore(state)
        history, first_epoch = list(resume.history), resume.epochs_done
    else:
        if warm_start is not None:
            warm_start.restore_weights(state)
        history, first_epoch = list(history), 0
    for epoch in range(first_epoch, epochs):
        if steps.stop_early is not None and steps.stop_early(history):
            break
        state.model.train()
        started, examples, sums = time.perf_counter(), 0, {loss_name: 0.0}
        batches = steps.batches(state.generator)
        for step, batch in enumerate(batches):
            with autocast(device, mixed_precision):
                out = steps.loss(batch)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            value = check_finite(loss.item(), label or phase, epoch, step)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            if steps.after_step is not None:
                steps.after_step()
            if state.schedule is not None:
                state.schedule.step()
            for key, part in {loss_name: value, **parts}.items():
                sums[key] = sums.get(key, 0.0) + part * len(batch)
            examples += len(batch)
            if on_step is not None:
                on_step(StepReport(phase, epoch, step, len(batches), value))
        seconds = time.perf_counter() - started
        figures = {key: total / max(examples, 1) for key, total in sums.items()} | {"lr": state.optimizer.param_groups[0]["lr"]}
        if steps.end_epoch is not None:
            steps.end_epoch(figures)
        history.append(figures)
        if checkpoints is not None:
            checkpoints.write(Checkpoint.capture(phase, epoch + 1, history, state).to_bytes())
        if on_epoch is not None:
            on_epoch(EpochReport(phase, epoch, epochs, figures, seconds, examples))
    state.model.eval()
    return history

"""Training and inference of SaviorEnc: catalog tensors, the two training phases, embedding.

Phase 1 (optional), domain adaptation: CLIP's image-title loss on the catalog.
Phase 2, i2i alignment: InfoNCE over co-click pairs with in-batch negatives (eq. 3).
Both use AdamW with a linear warmup over the first `warmup_epochs`, then cosine decay
(paper 4.1.4: lr 1e-4, one warmup epoch). CUDA with bf16 autocast when available, CPU otherwise.
Given a `CheckpointStore`, each phase saves after every epoch and resumes from the latest save.
"""

import dataclasses
import io
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from PIL import Image

from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc, clip_loss, info_nce
from saviorrec_pipeline.method.training_loop import Checkpoint, CheckpointStore, check_finite, latest_checkpoint

# (phase, epoch, step, steps per epoch, loss) after every optimiser step
StepCallback = Callable[[str, int, int, int, float], None]
# (phase, epoch, mean loss, seconds, examples) after every epoch
EpochCallback = Callable[[str, int, float, float, int], None]
PHASES = ("domain_adaptation", "alignment")  # in training order


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 4096
    lr: float = 1e-4
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    temperature: float = 0.07
    domain_adaptation_epochs: int = 0  # 0: no domain-adaptation phase
    seed: int = 0


# Training defaults per preset: the paper's (4.1.4) for `paper`; `tiny` learns in minutes on CPU,
# so it takes larger steps on smaller batches.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(epochs=10, batch_size=4096, lr=1e-4, domain_adaptation_epochs=1),
    "tiny": TrainConfig(epochs=20, batch_size=512, lr=1e-3, domain_adaptation_epochs=5),
    "minilm": TrainConfig(epochs=20, batch_size=512, lr=1e-3, domain_adaptation_epochs=5),
}


@dataclass
class CatalogTensors:
    """Every catalog item as model input: images resized to the tower's size, titles tokenised."""

    item_ids: np.ndarray
    images: torch.Tensor  # uint8, (items, 3, size, size); zeros where missing, (items, 3, 0, 0) when all are
    has_image: torch.Tensor  # bool
    tokens: torch.Tensor  # int64, (items, context length; a Hugging Face tower's: the longest title)
    has_title: torch.Tensor  # bool

    def __len__(self) -> int:
        return len(self.item_ids)

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        images = self.images[rows].to(device).float().div_(255)
        mean = torch.tensor(OPENAI_DATASET_MEAN, device=device)[:, None, None]
        std = torch.tensor(OPENAI_DATASET_STD, device=device)[:, None, None]
        return (images - mean) / std, self.has_image[rows].to(device), self.tokens[rows].to(device), self.has_title[rows].to(device)


def tokenizer_for(config: EncoderConfig):
    context_length = config.text.get("context_length", 77)
    if config.text.get("hf_model_name"):
        return HFTokenizer(config.text["hf_model_name"], context_length=context_length)
    return SimpleTokenizer(context_length=context_length)


def catalog_tensors(catalog: pl.DataFrame, config: EncoderConfig) -> CatalogTensors:
    """Decode and resize images, tokenise titles. Items without them get masked placeholders; a
    catalog without any image gets no pixels at all (the encoder then never runs its vision tower)."""
    encoded = catalog["image"].to_list() if "image" in catalog.columns else [None] * catalog.height
    has_image = np.array([bool(data) for data in encoded], dtype=bool)
    size = config.vision.get("image_size", 224) if has_image.any() else 0
    images = np.zeros((catalog.height, 3, size, size), dtype=np.uint8)
    for row in np.flatnonzero(has_image):
        picture = Image.open(io.BytesIO(encoded[row])).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        images[row] = np.asarray(picture).transpose(2, 0, 1)
    titles = catalog["title"].fill_null("").to_list()
    tokenizer = tokenizer_for(config)
    tokens = tokenizer(titles).long()
    if isinstance(tokenizer, HFTokenizer):
        # Hugging Face towers mask their padding, so pad columns past the longest title only cost
        # time; open_clip's own tower keeps its full context (its causal mask has a fixed size).
        # (Every title, blank ones too, keeps its start and end tokens, so a catalog with rows keeps >= 2.)
        longest = int((tokens != tokenizer.tokenizer.pad_token_id).sum(dim=1).max()) if len(titles) else 1
        tokens = tokens[:, :longest]
    return CatalogTensors(
        item_ids=catalog["item_id"].to_numpy(),
        images=torch.from_numpy(images),
        has_image=torch.from_numpy(has_image),
        tokens=tokens,
        has_title=torch.tensor([bool(t.strip()) for t in titles]),
    )


def device_for_training() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """torch's deterministic kernels while training on the CPU, so one seed gives one model: some
    CPU backward passes (embedding gradients) otherwise add in thread order. CUDA keeps its fast
    kernels. torch would also fill every new tensor's memory with NaN in this mode, a debugging
    aid that doubled the CTR step's time: no kernel used here reads memory it did not write."""
    if device.type != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _optimizer(model: SaviorEnc, train: TrainConfig, steps_per_epoch: int, epochs: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    warmup = max(1, round(train.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def domain_adaptation_obstacle(catalog: CatalogTensors) -> str | None:
    """Why the domain-adaptation phase has nothing to learn from on `catalog`, or None when it has:
    CLIP's image-title loss contrasts items that have both, at least two of them."""
    if not catalog.has_image.any():
        return "no catalog item has an image"
    if not catalog.has_title.any():
        return "no catalog item has a title"
    both = int((catalog.has_image & catalog.has_title).sum())
    if both < 2:
        return f"{'only one' if both else 'no'} catalog item has both an image and a title (CLIP's loss needs two)"
    return None


def applicable_training(training: TrainConfig, catalog: CatalogTensors) -> tuple[TrainConfig, str | None]:
    """`training` as it can run on `catalog`, and why its domain-adaptation phase is skipped (None
    when it is not): a catalog the raw contract allows may have no image or no title at all, and
    is then trained by i2i alignment alone."""
    obstacle = domain_adaptation_obstacle(catalog) if training.domain_adaptation_epochs else None
    if obstacle is None:
        return training, None
    return dataclasses.replace(training, domain_adaptation_epochs=0), obstacle


def train_domain_adaptation(
    model: SaviorEnc, catalog: CatalogTensors, train: TrainConfig, device: torch.device,
    on_step: StepCallback | None = None, on_epoch: EpochCallback | None = None, checkpoints: CheckpointStore | None = None,
) -> list[float]:
    """CLIP image-title loss over catalog items that have both; mean loss per epoch."""
    obstacle = domain_adaptation_obstacle(catalog)
    if obstacle is not None:
        raise ValueError(f"domain adaptation cannot run: {obstacle}")
    rows = torch.nonzero(catalog.has_image & catalog.has_title).flatten()

    def loss_of(batch_rows: torch.Tensor) -> torch.Tensor:
        images, _, tokens, _ = catalog.batch(batch_rows, device)
        image, text = model.tower_embeddings(images, tokens)
        return clip_loss(image.float(), text.float(), model.logit_scale)

    return _run_phase(
        "domain_adaptation", model, rows, loss_of, train, train.domain_adaptation_epochs, device, on_step, on_epoch, checkpoints
    )


def train_alignment(
    model: SaviorEnc, catalog: CatalogTensors, pair_rows: np.ndarray, train: TrainConfig, device: torch.device,
    on_step: StepCallback | None = None, on_epoch: EpochCallback | None = None, checkpoints: CheckpointStore | None = None,
) -> list[float]:
    """InfoNCE (eq. 3) over co-click pairs given as catalog row indices (pairs x 2)."""
    if len(pair_rows) < 2:
        raise ValueError(f"i2i alignment needs at least 2 co-click pairs, got {len(pair_rows)}")
    pairs = torch.from_numpy(np.ascontiguousarray(pair_rows, dtype=np.int64))
    item_ids = torch.from_numpy(catalog.item_ids.astype(np.int64))

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        a, b = pairs[batch, 0], pairs[batch, 1]
        # Popular items recur within a batch: each is encoded once and its z shared, the same loss
        # and gradients for fewer tower passes.
        rows, slot = torch.cat([a, b]).unique(return_inverse=True)
        z = model(*catalog.batch(rows, device))[slot.to(device)]
        return info_nce(z[: len(a)].float(), z[len(a) :].float(), train.temperature, item_ids[a], item_ids[b])

    return _run_phase(
        "alignment", model, torch.arange(len(pairs)), loss_of, train, train.epochs, device, on_step, on_epoch, checkpoints
    )


def full_batches(examples: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch): the ragged last batch is dropped, since in-batch negatives
    need a full one."""
    batch = min(batch_size, examples)
    return batch, examples // batch


def _run_phase(
    phase: str, model: SaviorEnc, examples: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor],
    train: TrainConfig, epochs: int, device: torch.device, on_step: StepCallback | None, on_epoch: EpochCallback | None,
    checkpoints: CheckpointStore | None,
) -> list[float]:
    generator = torch.Generator().manual_seed(train.seed)
    batch_size, steps = full_batches(len(examples), train.batch_size)
    optimizer, schedule = _optimizer(model, train, steps, epochs)
    model.to(device).train()
    history, first_epoch = [], 0
    saved = latest_checkpoint(checkpoints)
    if saved is not None and PHASES.index(saved.phase) > PHASES.index(phase):
        return []  # a later phase had begun: this one is done, and its weights are in that checkpoint
    if saved is not None and saved.phase == phase:
        saved.restore(model, optimizer, generator, schedule)
        history, first_epoch = saved.history, saved.epochs_done
    for epoch in range(first_epoch, epochs):
        start, total = time.perf_counter(), 0.0
        order = examples[torch.randperm(len(examples), generator=generator)]
        for step in range(steps):
            with _autocast(device):
                loss = loss_of(order[step * batch_size : (step + 1) * batch_size])
            value = check_finite(loss.item(), phase, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += value
            if on_step:
                on_step(phase, epoch, step, steps, value)
        history.append(total / steps)
        if checkpoints is not None:
            checkpoints.write(Checkpoint.capture(phase, epoch + 1, history, model, optimizer, generator, schedule).to_bytes())
        if on_epoch:
            on_epoch(phase, epoch, history[-1], time.perf_counter() - start, steps * batch_size)
    model.eval()
    return history


@torch.no_grad()
def embed_catalog(model: SaviorEnc, catalog: CatalogTensors, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """z for every catalog item, in catalog order: float32, L2-normalised."""
    model.to(device).eval()
    out = np.empty((len(catalog), model.config.embedding_dim), dtype=np.float32)
    for start in range(0, len(catalog), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(catalog)))
        with _autocast(device):
            z = model(*catalog.batch(rows, device))
        out[start : start + len(rows)] = torch.nn.functional.normalize(z.float(), dim=-1).cpu().numpy()
    return out


def build_model(config: EncoderConfig, seed: int) -> SaviorEnc:
    """The same seed gives the same initial weights: the untuned baseline shares them."""
    torch.manual_seed(seed)
    return SaviorEnc(config)

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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from PIL import Image

from safetensors.torch import load_file

from saviorrec_pipeline.checkpoints import CheckpointStore, TrainingState, fingerprint, latest_checkpoint
from saviorrec_pipeline.method.device import autocast, device_for_training
from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc, clip_loss, info_nce
from saviorrec_pipeline.method.item_rows import pair_rows
from saviorrec_pipeline.method.training import EpochReport, Steps, StepReport, train_epochs

OnStep = Callable[[StepReport], None]
OnEpoch = Callable[[EpochReport], None]
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
    on_step: OnStep | None = None, on_epoch: OnEpoch | None = None, checkpoints: CheckpointStore | None = None,
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
    on_step: OnStep | None = None, on_epoch: OnEpoch | None = None, checkpoints: CheckpointStore | None = None,
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
    train: TrainConfig, epochs: int, device: torch.device, on_step: OnStep | None, on_epoch: OnEpoch | None,
    checkpoints: CheckpointStore | None,
) -> list[float]:
    """One phase's mean loss per epoch; [] when the checkpoint is of a later phase (this one is
    done, and its weights are in that checkpoint)."""
    saved = latest_checkpoint(checkpoints)
    if saved is not None and PHASES.index(saved.phase) > PHASES.index(phase):
        return []
    batch_size, steps = full_batches(len(examples), train.batch_size)
    optimizer, schedule = _optimizer(model, train, steps, epochs)
    state = TrainingState(model.to(device), optimizer, torch.Generator().manual_seed(train.seed), schedule)

    def batches(generator: torch.Generator) -> list[torch.Tensor]:
        order = examples[torch.randperm(len(examples), generator=generator)]
        return [order[step * batch_size : (step + 1) * batch_size] for step in range(steps)]

    history = train_epochs(
        phase, state, Steps(batches, loss_of), epochs, device=device, mixed_precision=True, checkpoints=checkpoints,
        resume=saved if saved is not None and saved.phase == phase else None, on_step=on_step, on_epoch=on_epoch,
    )
    return [figures["loss"] for figures in history]


@torch.no_grad()
def embed_catalog(model: SaviorEnc, catalog: CatalogTensors, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """z for every catalog item, in catalog order: float32, L2-normalised."""
    model.to(device).eval()
    out = np.empty((len(catalog), model.config.embedding_dim), dtype=np.float32)
    for start in range(0, len(catalog), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(catalog)))
        with autocast(device):
            z = model(*catalog.batch(rows, device))
        out[start : start + len(rows)] = torch.nn.functional.normalize(z.float(), dim=-1).cpu().numpy()
    return out


def build_model(config: EncoderConfig, seed: int) -> SaviorEnc:
    """The same seed gives the same initial weights: the untuned baseline shares them."""
    torch.manual_seed(seed)
    return SaviorEnc(config)


def initial_encoder(config: EncoderConfig, seed: int, initial_weights: str | None) -> SaviorEnc:
    """The encoder before any training (the untuned baseline): `initial_weights` (a safetensors
    file) when given, else the seed's initialisation, with the pretrained text tower the
    architecture reads from a local folder if it names one."""
    model = build_model(config, seed)
    if initial_weights:
        model.load_state_dict(load_file(initial_weights))
    return model


def initial_weights_note(config: EncoderConfig, seed: int, initial_weights: str | None) -> str:
    """Where `initial_encoder` starts, in words."""
    if initial_weights:
        return f"checkpoint {initial_weights}"
    if config.text.get("hf_model_pretrained"):
        return f"pretrained text tower {config.text['hf_model_name']}; vision tower and fusion initialised from seed {seed}"
    return f"random initialisation from seed {seed} (no pretrained tower or checkpoint configured)"


@dataclass
class TrainedEncoder:
    model: SaviorEnc
    training: TrainConfig  # as it ran: without domain adaptation where the catalog cannot have it
    domain_adaptation: str  # what became of that phase, in words
    history: list[float]  # i2i alignment's mean loss per epoch
    pairs: int  # co-click pairs that name catalog items
    items: int
    pairs_trained: int  # passed through alignment's optimiser steps


def domain_adaptation_note(training: TrainConfig, skipped_because: str | None) -> str:
    if skipped_because:
        return f"skipped: {skipped_because}"
    return f"{training.domain_adaptation_epochs} epoch(s)" if training.domain_adaptation_epochs else "off (domain_adaptation_epochs 0)"


def train_item_encoder(
    catalog: pl.DataFrame, coclick_pairs: pl.DataFrame, architecture: EncoderConfig, training: TrainConfig, *,
    initial_weights: str | None = None, continue_from: dict[str, torch.Tensor] | None = None,
    checkpoints: Callable[[str], CheckpointStore | None] = lambda run_key: None,
    on_step: OnStep | None = None, on_epoch: OnEpoch | None = None, where: str = "", catalog_source: str = "the item catalog",
) -> TrainedEncoder:
    """SaviorEnc stage 1 on a catalog and its co-click pairs: the domain-adaptation phase where
    enabled and the catalog allows it, then i2i alignment; from `initial_weights` (a safetensors
    file) or the seed's initialisation. Given `continue_from` (a trained encoder's weights) it goes
    on from them by alignment alone (that encoder is already domain-adapted).
    `checkpoints(run_key)` gives the place of the run whose inputs and settings have that
    fingerprint; `where` and `catalog_source` name the inputs in errors."""
    if coclick_pairs.is_empty():
        raise ValueError(
            f"coclick_pairs{where} is empty: no item pairs to align the encoder on "
            "(lower coclick_pairs' min_support, or check that the training window has clicks)"
        )
    tensors = catalog_tensors(catalog, architecture)
    training, skipped_because = applicable_training(training, tensors)
    if continue_from is not None and training.domain_adaptation_epochs:
        training, skipped_because = dataclasses.replace(training, domain_adaptation_epochs=0), "goes on from a trained encoder"
    pairs = pair_rows(coclick_pairs, tensors.item_ids)
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} of {coclick_pairs.height} co-click pairs name catalog items: check that {catalog_source} holds the clicked items")
    store = checkpoints(fingerprint(
        architecture.to_dict(), training, initial_weights, pairs, tensors.item_ids, tensors.images, tensors.tokens, *(continue_from or {}).values()
    ))
    model = initial_encoder(architecture, training.seed, initial_weights if continue_from is None else None)
    if continue_from is not None:
        model.load_state_dict(continue_from)
    device = device_for_training()
    if training.domain_adaptation_epochs:
        train_domain_adaptation(model, tensors, training, device, on_step, on_epoch, store)
    history = train_alignment(model, tensors, pairs, training, device, on_step, on_epoch, store) if training.epochs else []
    batch, steps = full_batches(len(pairs), training.batch_size)
    note = domain_adaptation_note(training, skipped_because)
    return TrainedEncoder(model, training, note, history, len(pairs), len(tensors), training.epochs * steps * batch)


def embedding_table(model: SaviorEnc, catalog: pl.DataFrame) -> tuple[pl.DataFrame, CatalogTensors]:
    """(item_id, embedding) for every catalog item, cold ones included, and the catalog as the
    model saw it (which items had an image, a title)."""
    tensors = catalog_tensors(catalog, model.config)
    vectors = embed_catalog(model, tensors, device_for_training())
    table = pl.DataFrame({"item_id": tensors.item_ids, "embedding": pl.Series(vectors, dtype=pl.Array(pl.Float32, vectors.shape[1]))})
    return table, tensors


def embedded_catalog(model: SaviorEnc, catalog: pl.DataFrame) -> pl.DataFrame:
    """`embedding_table` with each item's `has_image` and `has_title` as the model saw them."""
    table, tensors = embedding_table(model, catalog)
    return table.with_columns(pl.Series("has_image", tensors.has_image.numpy()), pl.Series("has_title", tensors.has_title.numpy()))

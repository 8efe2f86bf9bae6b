"""SaviorEnc stage 1 as assets: train the encoder, embed the catalog, report i2i retrieval (Table 4)."""

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field
from safetensors.torch import load_file

from saviorrec_pipeline.jobs import TRAINING_POOL
from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc, preset, with_text_tower
from saviorrec_pipeline.method.encoder_training import (
    TRAIN_PRESETS,
    CatalogTensors,
    TrainConfig,
    applicable_training,
    build_model,
    catalog_tensors,
    device_for_training,
    embed_catalog,
    full_batches,
    train_alignment,
    train_domain_adaptation,
)
from saviorrec_pipeline.method.item_rows import pair_rows
from saviorrec_pipeline.method.retrieval import consecutive_click_pairs, hit_at_k
from saviorrec_pipeline.method.training_loop import CheckpointStore, fingerprint
from saviorrec_pipeline.partitions import TrainEvalWindow, daily_partitions
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetStorage, resume_point
from saviorrec_pipeline.resources.tracking import MlflowTracking, TrackedRun

GROUP = "saviorenc"
ENCODER_MODEL = "saviorrec-item-encoder"
CONFIG = "encoder_config.json"


class ItemEncoderConfig(dg.Config):
    """Unset training fields take the preset's values (paper 4.1.4 for `paper`)."""

    preset: Literal["tiny", "paper", "minilm"] = Field(default="tiny", description="architecture and training defaults")
    epochs: int | None = Field(default=None, ge=1, description="i2i alignment epochs (paper: 10)")
    batch_size: int | None = Field(default=None, ge=2, description="co-click pairs per batch (paper: 4096)")
    lr: float | None = Field(default=None, gt=0, description="AdamW peak learning rate (paper: 1e-4)")
    warmup_epochs: float = Field(default=1.0, ge=0, description="linear warmup, then cosine decay")
    temperature: float = Field(default=0.07, gt=0, description="InfoNCE temperature tau (eq. 3)")
    domain_adaptation_epochs: int | None = Field(default=None, ge=0, description="CLIP image-title phase first; 0 skips it")
    text_tower_path: str | None = Field(default=None, description="local Hugging Face folder to use as the text tower")
    checkpoint_path: str | None = Field(default=None, description="safetensors weights of this architecture to start from")
    seed: int = 0

    def architecture(self) -> EncoderConfig:
        config = preset(self.preset)
        return with_text_tower(config, self.text_tower_path) if self.text_tower_path else config

    def training(self) -> TrainConfig:
        defaults = TRAIN_PRESETS[self.preset]
        chosen = dict(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, domain_adaptation_epochs=self.domain_adaptation_epochs
        )
        return dataclasses.replace(
            defaults,
            warmup_epochs=self.warmup_epochs, temperature=self.temperature, seed=self.seed,
            **{k: v for k, v in chosen.items() if v is not None},
        )


def read_catalog(raw: RawStore) -> pl.DataFrame:
    catalog = raw.inspect_items().checked()
    if catalog.is_empty():
        raise ValueError(f"the item catalog under {raw.root}/items has no rows: nothing to embed")
    return catalog


def domain_adaptation_note(training: TrainConfig, skipped_because: str | None) -> str:
    """What became of the domain-adaptation phase, for metadata and MLflow."""
    if skipped_because:
        return f"skipped: {skipped_because}"
    return f"{training.domain_adaptation_epochs} epoch(s)" if training.domain_adaptation_epochs else "off (domain_adaptation_epochs 0)"


def train_encoder(
    context: dg.AssetExecutionContext, architecture: EncoderConfig, training: TrainConfig, catalog: CatalogTensors,
    pairs: np.ndarray, run: TrackedRun | None, initial_weights: str | None = None, checkpoints: CheckpointStore | None = None,
) -> tuple[SaviorEnc, list[float]]:
    """Both phases (each when enabled), logging progress to Dagster and per-epoch metrics to MLflow;
    with `checkpoints`, each epoch is saved and training resumes from the latest save."""
    model = build_model(architecture, training.seed)
    if initial_weights:
        model.load_state_dict(load_file(initial_weights))
    device = device_for_training()
    log_every = max(1, len(pairs) // training.batch_size // 4)

    def on_step(phase: str, epoch: int, step: int, steps: int, loss: float) -> None:
        if step % log_every == 0 or step == steps - 1:
            context.log.info(f"{phase} epoch {epoch + 1} step {step + 1}/{steps} loss {loss:.4f}")

    def on_epoch(phase: str, epoch: int, loss: float, seconds: float, examples: int) -> None:
        if run:
            run.log_metrics({f"{phase}_loss": loss, f"{phase}_examples_per_s": examples / seconds}, step=epoch)

    if training.domain_adaptation_epochs:
        train_domain_adaptation(model, catalog, training, device, on_step, on_epoch, checkpoints)
    history = train_alignment(model, catalog, pairs, training, device, on_step, on_epoch, checkpoints) if training.epochs else []
    return model, history


@dg.asset(
    group_name=GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"coclick_pairs": dg.AssetIn()},
    pool=TRAINING_POOL,
    deps=["item_catalog"],
    description="SaviorEnc stage 1 trained on the partition's co-click pairs; a reference to the MLflow model.",
)
def item_encoder(
    context: dg.AssetExecutionContext, config: ItemEncoderConfig, coclick_pairs: pl.DataFrame,
    raw: RawStore, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    if coclick_pairs.is_empty():
        raise ValueError(
            f"coclick_pairs for {context.partition_key} is empty: no item pairs to align the encoder on "
            "(lower coclick_pairs' min_support, or check that the training window has clicks)"
        )
    architecture = config.architecture()
    catalog = catalog_tensors(read_catalog(raw), architecture)
    training, skipped_because = applicable_training(config.training(), catalog)
    domain_adaptation = domain_adaptation_note(training, skipped_because)
    if skipped_because:
        context.log.warning(f"domain adaptation {domain_adaptation}; training by i2i alignment alone")
    pairs = pair_rows(coclick_pairs, catalog.item_ids)
    if len(pairs) < 2:
        raise ValueError(
            f"only {len(pairs)} of {coclick_pairs.height} co-click pairs name catalog items: "
            f"check that {raw.root}/items holds the clicked items"
        )
    run_key = fingerprint(
        architecture.to_dict(), training, config.checkpoint_path, pairs, catalog.item_ids, catalog.images, catalog.tokens
    )
    checkpoints = storage.checkpoint("item_encoder", context.partition_key, run_key)
    resumed = resume_point(context, checkpoints)
    with tracking.start_run(context, "item_encoder") as run:
        run.log_params(
            {"preset": config.preset, **dataclasses.asdict(training), "domain_adaptation": domain_adaptation,
             "pairs": len(pairs), "items": len(catalog)}
        )
        run.log_params({f"arch.{k}": json.dumps(v) for k, v in architecture.to_dict().items()})
        with track_usage() as usage:
            model, history = train_encoder(context, architecture, training, catalog, pairs, run, config.checkpoint_path, checkpoints)
        artifact_uri = run.log_model(
            model.state_dict(),
            {"architecture": architecture.to_dict(), "training": dataclasses.asdict(training), "initial_weights": config.checkpoint_path},
            CONFIG,
        )
        batch, steps = full_batches(len(pairs), training.batch_size)
        trained = training.epochs * steps * batch
        run.log_metrics({"final_loss": history[-1], "train_seconds": usage.seconds, "pairs_per_s": trained / usage.seconds})
        version = run.register(ENCODER_MODEL, "model", tracking.origin_tags(context))
    reference = pl.DataFrame(
        {
            "run_id": [run.run_id],
            "model_name": [ENCODER_MODEL],
            "model_version": [str(version)],
            "model_uri": [f"models:/{ENCODER_MODEL}/{version}"],
            "artifact_uri": [artifact_uri],
            "final_loss": [history[-1]],
            "pairs": [len(pairs)],
            "items": [len(catalog)],
        }
    )
    return dg.Output(
        reference,
        metadata={
            "mlflow_run_id": run.run_id,
            "model": f"{ENCODER_MODEL} v{version}",
            "device": str(device_for_training()),
            "pairs": len(pairs),
            "epochs": training.epochs,
            "domain_adaptation": domain_adaptation,
            "resumed_from": resumed,
            "loss_first_epoch": round(history[0], 4),
            "loss_last_epoch": round(history[-1], 4),
            "loss_per_epoch": dg.MetadataValue.md(" | ".join(f"{x:.3f}" for x in history)),
            **usage.metadata(trained, unit="pairs"),
        },
    )


def load_encoder(reference: pl.DataFrame, tracking: MlflowTracking) -> SaviorEnc:
    """Rebuild the encoder from code and its safetensors weights; nothing is unpickled."""
    saved, weights = tracking.load_model_files(reference["artifact_uri"][0], CONFIG)
    model = SaviorEnc(EncoderConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval()


def saved_setup(reference: pl.DataFrame, tracking: MlflowTracking, into: Path) -> tuple[EncoderConfig, TrainConfig, str | None]:
    """The architecture, training and initial weights (a safetensors path, or None for the seed's
    init) the referenced encoder was trained with (its config file only)."""
    saved = json.loads(tracking.download(f"{reference['artifact_uri'][0]}/{CONFIG}", into).read_text())
    return EncoderConfig.from_dict(saved["architecture"]), TrainConfig(**saved["training"]), saved.get("initial_weights")


@dg.asset(
    group_name=GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    deps=["item_catalog"],
    description="z for every catalog item (cold ones included), from the partition's item_encoder.",
)
def item_embeddings(
    context: dg.AssetExecutionContext, item_encoder: pl.DataFrame, raw: RawStore, tracking: MlflowTracking
) -> dg.Output[pl.DataFrame]:
    model = load_encoder(item_encoder, tracking)
    catalog = catalog_tensors(read_catalog(raw), model.config)
    with track_usage() as usage:
        vectors = embed_catalog(model, catalog, device_for_training())
    table = pl.DataFrame(
        {"item_id": catalog.item_ids, "embedding": pl.Series(vectors, dtype=pl.Array(pl.Float32, vectors.shape[1]))}
    )
    return dg.Output(
        table,
        metadata={
            "items": table.height,
            "dimension": vectors.shape[1],
            "items_without_image": int((~catalog.has_image).sum()),
            "items_without_title": int((~catalog.has_title).sum()),
            "encoder": f"{item_encoder['model_name'][0]} v{item_encoder['model_version'][0]}",
            **usage.metadata(table.height, unit="items"),
        },
    )


class RetrievalConfig(dg.Config):
    k: int = Field(default=30, ge=1, description="Hit@K (paper Table 4: 30)")


TABLE4_VARIANTS = (  # (name, domain adaptation, i2i alignment)
    ("untuned", False, False),
    ("domain_adaptation", True, False),
    ("i2i_alignment", False, True),
    ("both", True, True),
)


@dg.asset(
    group_name=GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"coclick_pairs": dg.AssetIn(), "item_encoder": dg.AssetIn()},
    pool=TRAINING_POOL,
    description="Paper Table 4: Hit@K of i2i retrieval on the evaluation window, per encoder training variant.",
)
def i2i_retrieval(
    context: dg.AssetExecutionContext, config: RetrievalConfig, coclick_pairs: pl.DataFrame, item_encoder: pl.DataFrame,
    raw: RawStore, window: TrainEvalWindow, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    queries = consecutive_click_pairs(raw.read_clicks(window.evaluation_days(context.partition_key)))
    with tempfile.TemporaryDirectory() as folder:
        architecture, base_training, initial_weights = saved_setup(item_encoder, tracking, Path(folder))
    catalog = catalog_tensors(read_catalog(raw), architecture)
    pairs = pair_rows(coclick_pairs, catalog.item_ids)
    device = device_for_training()
    rows = []
    with tracking.start_run(context, "i2i_retrieval") as run:
        run.log_params({"k": config.k, "encoder_run_id": item_encoder["run_id"][0], "queries": queries.height})
        for name, adapt, align in TABLE4_VARIANTS:
            wanted = dataclasses.replace(
                base_training,
                domain_adaptation_epochs=(base_training.domain_adaptation_epochs or 1) if adapt else 0,
                epochs=base_training.epochs if align else 0,
            )
            training, skipped_because = applicable_training(wanted, catalog)
            if skipped_because:
                # Without its domain adaptation it would be another row's training: it does not apply.
                context.log.info(f"Table 4 variant {name}: n/a, {skipped_because}")
                run.log_params({f"{name}.domain_adaptation": f"skipped: {skipped_because}"})
                rows.append((name, adapt, align, config.k, None, None, None, f"n/a: {skipped_because}"))
                continue
            if training == base_training:
                # The same training from the same start and seed as item_encoder: its registered model.
                context.log.info(f"Table 4 variant {name}: the registered encoder {item_encoder['model_uri'][0]}")
                model = load_encoder(item_encoder, tracking)
            else:
                context.log.info(f"Table 4 variant {name}: training {training.domain_adaptation_epochs} DA + {training.epochs} i2i epochs")
                model, _ = train_encoder(context, architecture, training, catalog, pairs, run=None, initial_weights=initial_weights)
            result = hit_at_k(catalog.item_ids, embed_catalog(model, catalog, device), queries, config.k)
            rows.append((name, adapt, align, config.k, result.queries, result.hits, result.hit_rate, None))
            if result.hit_rate is not None:
                run.log_metrics({f"hit_at_{config.k}.{name}": result.hit_rate})
    report = pl.DataFrame(
        rows,
        schema={
            "variant": pl.String, "domain_adaptation": pl.Boolean, "i2i_alignment": pl.Boolean, "k": pl.Int64,
            "queries": pl.Int64, "hits": pl.Int64, "hit_rate": pl.Float64, "note": pl.String,
        },
        orient="row",
    )
    return dg.Output(report, metadata={"table_4": dg.MetadataValue.md(table_4(report)), "queries": queries.height, "mlflow_run_id": run.run_id})


def table_4(report: pl.DataFrame) -> str:
    """The report as a markdown table; a variant that does not apply says why instead of a rate."""
    lines = [f"| variant | Hit@{report['k'][0]} | hits / queries |", "|---|---|---|"]
    for row in report.iter_rows(named=True):
        if row["note"]:
            lines.append(f"| {row['variant']} | {row['note']} | - |")
        else:
            rate = "n/a" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.2f}%"
            lines.append(f"| {row['variant']} | {rate} | {row['hits']} / {row['queries']} |")
    return "\n".join(lines)

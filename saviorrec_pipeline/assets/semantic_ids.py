"""SaviorEnc stage 2 as an asset: train the RQ-VAE on the item embeddings, write semantic IDs."""

import dataclasses
import json
from typing import Literal

import dagster as dg
import faiss
import numpy as np
import polars as pl
import torch
from pydantic import Field

from saviorrec_pipeline.jobs import TRAINING_POOL
from saviorrec_pipeline.method.encoder_training import device_for_training
from saviorrec_pipeline.method.item_rows import pair_rows
from saviorrec_pipeline.method.rqvae import (
    RQVAE,
    RQVAEConfig,
    RQVAETrainConfig,
    assign_codes,
    check_embeddings,
    codebook_quality,
    train_rqvae,
)
from saviorrec_pipeline.method.training_loop import fingerprint
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.storage import ParquetStorage, resume_point
from saviorrec_pipeline.resources.tracking import MlflowTracking

RQVAE_MODEL = "saviorrec-rqvae"
CONFIG = "rqvae_config.json"

# (architecture, training) per preset. `paper`: 4.1.4 (the codeword moving average is ours: an epoch
# there has hundreds of steps, so it can be slow). `tiny`: a K the demo catalog (3,000 items) fills.
PRESETS: dict[str, tuple[dict, RQVAETrainConfig]] = {
    "paper": (
        dict(latent_dim=64, num_levels=8, codebook_size=2048, hidden_dims=(512, 256, 128)),
        RQVAETrainConfig(epochs=150, batch_size=16384, lr=0.002, lambda_reconstruct=1000.0, lambda_commit=0.5, codebook_decay=0.99),
    ),
    "tiny": (
        dict(latent_dim=32, num_levels=3, codebook_size=64, hidden_dims=(128, 64)),
        RQVAETrainConfig(epochs=150, batch_size=1024, lr=0.002, lambda_reconstruct=1000.0, lambda_commit=0.5, codebook_decay=0.8),
    ),
}


class SemanticIdsConfig(dg.Config):
    """Unset fields take the preset's values (paper 4.1.4 for `paper`)."""

    preset: Literal["tiny", "paper"] = "tiny"
    num_levels: int | None = Field(default=None, ge=1, description="L codebooks")
    codebook_size: int | None = Field(default=None, ge=2, description="K codes per level")
    code_dim: int | None = Field(default=None, ge=1, description="d, the latent and codeword dimension")
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=2)
    lr: float | None = Field(default=None, gt=0)
    lambda_reconstruct: float = Field(default=1000.0, ge=0, description="lambda0 of eq. 5")
    lambda_commit: float = Field(default=0.5, ge=0, description="lambda1 of eq. 5")
    temperature: float = Field(default=0.07, gt=0, description="InfoNCE temperature on reconstructions")
    inference_assignment: Literal["argmin", "sinkhorn"] = Field(
        default="argmin",
        description="how the codes table is assigned: argmin (each item its nearest codeword, so an item's "
        "codes do not depend on the other items) or sinkhorn (balanced as in training, over batches of "
        "batch_size items of the catalog, so codes can change when the catalog does)",
    )
    compare_with_argmin: bool = Field(default=True, description="also train with argmin assignment and report it")
    seed: int = 0

    def architecture(self, input_dim: int) -> RQVAEConfig:
        shape, _ = PRESETS[self.preset]
        chosen = {"num_levels": self.num_levels, "codebook_size": self.codebook_size, "latent_dim": self.code_dim}
        return RQVAEConfig(input_dim=input_dim, **{**shape, **{k: v for k, v in chosen.items() if v is not None}})

    def training(self, assignment: str = "sinkhorn") -> RQVAETrainConfig:
        _, defaults = PRESETS[self.preset]
        chosen = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        return dataclasses.replace(
            defaults, lambda_reconstruct=self.lambda_reconstruct, lambda_commit=self.lambda_commit,
            temperature=self.temperature, assignment=assignment, seed=self.seed,
            **{k: v for k, v in chosen.items() if v is not None},
        )


def embedding_matrix(item_embeddings: pl.DataFrame) -> np.ndarray:
    """item_embeddings' vectors as one (items, d) float32 array, in row order. A writable copy:
    Polars hands out a read-only view, which torch warns about."""
    return np.array(item_embeddings["embedding"].to_numpy(), dtype=np.float32, order="C")


def _fit(
    context: dg.AssetExecutionContext, storage: ParquetStorage, architecture: RQVAEConfig, training: RQVAETrainConfig,
    z: torch.Tensor, pairs: np.ndarray, on_epoch=None,
) -> tuple[RQVAE, list[dict], str]:
    """The trained model, its history, and where training started (see `resume_point`)."""
    name = f"{training.assignment}-{fingerprint(architecture.to_dict(), training, z, pairs)}"
    checkpoints = storage.checkpoint("semantic_ids", context.partition_key, name)
    resumed = resume_point(context, checkpoints)
    torch.manual_seed(training.seed)
    model = RQVAE(architecture)
    history = train_rqvae(model, z, pairs, training, device_for_training(), on_epoch, checkpoints)
    return model, history, resumed


def faiss_rq_collision_rate(z: np.ndarray, num_levels: int, codebook_size: int) -> float:
    """Collision rate of faiss' ResidualQuantizer with the same L and K on the same embeddings."""
    nbits = int(np.log2(codebook_size))
    rq = faiss.ResidualQuantizer(z.shape[1], num_levels, nbits)
    rq.train(z)
    packed = rq.compute_codes(z)  # identical packed codes <=> identical code tuples
    _, inverse, counts = np.unique(packed, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean())


def _quality_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | level | utilisation | perplexity |", "|---|---|---|---|"]
    for name, quality in rows:
        lines += [f"| {name} | {l['level']} | {100 * l['utilisation']:.1f}% | {l['perplexity']:.1f} |" for l in quality["levels"]]
    return "\n".join(lines)


@dg.asset(
    group_name="saviorenc",
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"item_embeddings": dg.AssetIn(), "coclick_pairs": dg.AssetIn()},
    pool=TRAINING_POOL,
    description="RQ-VAE semantic IDs (L codes per item) of the item embeddings, with reconstruction error.",
)
def semantic_ids(
    context: dg.AssetExecutionContext, config: SemanticIdsConfig, item_embeddings: pl.DataFrame,
    coclick_pairs: pl.DataFrame, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    where = f"item_embeddings for {context.partition_key}"
    if item_embeddings.is_empty():
        raise ValueError(f"{where} has no rows")
    z_np = embedding_matrix(item_embeddings)
    architecture = config.architecture(z_np.shape[1] if z_np.ndim == 2 else -1)
    check_embeddings(z_np, architecture.input_dim, architecture.codebook_size, where)
    z = torch.from_numpy(z_np)
    pairs = pair_rows(coclick_pairs, item_embeddings["item_id"].to_numpy())
    training = config.training("sinkhorn")
    with tracking.start_run(context, "semantic_ids") as run:
        run.log_params(
            {
                "preset": config.preset, "num_levels": architecture.num_levels, "codebook_size": architecture.codebook_size,
                "code_dim": architecture.latent_dim, "hidden_dims": json.dumps(architecture.hidden_dims),
                "inference_assignment": config.inference_assignment, "items": len(z), "pairs": len(pairs),
                **dataclasses.asdict(training),
            }
        )

        def on_epoch(epoch: int, figures: dict) -> None:
            run.log_metrics(figures, step=epoch)
            if epoch % 10 == 0 or epoch == training.epochs - 1:
                context.log.info(f"epoch {epoch + 1}/{training.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

        with track_usage() as usage:
            model, history, resumed = _fit(context, storage, architecture, training, z, pairs, on_epoch)
            codes, errors = assign_codes(model, z, config.inference_assignment, device_for_training(), training.batch_size)
        quality = codebook_quality(codes, architecture.codebook_size)
        compared = [("rq-vae (sinkhorn)", quality)]
        if config.compare_with_argmin:
            argmin_model, _, _ = _fit(context, storage, architecture, config.training("argmin"), z, pairs)
            argmin_codes, _ = assign_codes(argmin_model, z, "argmin", device_for_training(), training.batch_size)
            compared.append(("rq-vae (argmin)", codebook_quality(argmin_codes, architecture.codebook_size)))
        faiss_collisions = faiss_rq_collision_rate(z_np, architecture.num_levels, architecture.codebook_size)
        figures = {
            "reconstruction_mse": float(errors.mean()),
            "collision_rate": quality["collision_rate"],
            "faiss_rq_collision_rate": faiss_collisions,
            "train_seconds": usage.seconds,
            **{f"level_{l['level']}_utilisation": l["utilisation"] for l in quality["levels"]},
            **{f"level_{l['level']}_perplexity": l["perplexity"] for l in quality["levels"]},
        }
        if config.compare_with_argmin:
            figures["argmin_collision_rate"] = compared[1][1]["collision_rate"]
            figures["argmin_level_1_utilisation"] = compared[1][1]["levels"][0]["utilisation"]
        run.log_metrics(figures)
        run.log_model(model.state_dict(), {"architecture": architecture.to_dict(), "inference_assignment": config.inference_assignment}, CONFIG)
        version = run.register(RQVAE_MODEL, "model", tracking.origin_tags(context))
    table = pl.DataFrame(
        {
            "item_id": item_embeddings["item_id"],
            "codes": pl.Series(codes.astype(np.int32), dtype=pl.Array(pl.Int32, architecture.num_levels)),
            "reconstruction_error": errors.astype(np.float32),
            "rqvae_run_id": run.run_id,
            "rqvae_model_uri": f"models:/{RQVAE_MODEL}/{version}",
        }
    )
    return dg.Output(
        table,
        metadata={
            "items": table.height,
            "model": f"{RQVAE_MODEL} v{version}",
            "mlflow_run_id": run.run_id,
            "resumed_from": resumed,
            "shape": f"L={architecture.num_levels}, K={architecture.codebook_size}, d={architecture.latent_dim}",
            "collision_rate": round(quality["collision_rate"], 4),
            "faiss_rq_collision_rate": round(faiss_collisions, 4),
            "reconstruction_mse": round(float(errors.mean()), 6),
            "loss_last_epoch": round(history[-1]["loss"], 5),
            "codebook_quality": dg.MetadataValue.md(_quality_table(compared)),
            **usage.metadata(len(z) * training.epochs, unit="item_epochs"),
        },
    )


def load_rqvae(model_uri: str, tracking: MlflowTracking) -> tuple[RQVAE, dict]:
    """Rebuild the RQ-VAE from code and its safetensors weights (the codebooks included)."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = RQVAE(RQVAEConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval(), saved

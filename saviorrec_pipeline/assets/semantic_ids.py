"""SaviorEnc stage 2 as an asset: train the RQ-VAE on the item embeddings, write semantic IDs."""

import dataclasses
import json
from typing import Literal

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.common import SAVIORENC_GROUP, TRAINING_POOL, StageCheckpoints, epoch_reporter
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.item_rows import embedding_matrix, pair_rows
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, RQVAETrainConfig, train_semantic_ids
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.storage import ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking

RQVAE_MODEL = "saviorrec-rqvae"
CONFIG = "rqvae_config.json"


class SemanticIdsConfig(dg.Config):
    """A preset (architecture and training together); a field set here overrides the preset's."""

    preset: Literal[presets.names("rqvae")] = "tiny"
    num_levels: int | None = Field(default=None, ge=1, description="L codebooks")
    codebook_size: int | None = Field(default=None, ge=2, description="K codes per level")
    code_dim: int | None = Field(default=None, ge=1, description="d, the latent and codeword dimension")
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=2)
    lr: float | None = Field(default=None, gt=0)
    lambda_reconstruct: float | None = Field(default=None, ge=0, description="lambda0 of eq. 5 (paper: 1000)")
    lambda_commit: float | None = Field(default=None, ge=0, description="lambda1 of eq. 5 (paper: 0.5)")
    temperature: float | None = Field(default=None, gt=0, description="InfoNCE temperature on reconstructions (0.07)")
    inference_assignment: Literal["argmin", "sinkhorn"] = Field(
        default="argmin",
        description="how the codes table is assigned: argmin (each item its nearest codeword, so an item's "
        "codes do not depend on the other items) or sinkhorn (balanced as in training, over batches of "
        "batch_size items of the catalog, so codes can change when the catalog does)",
    )
    compare_with_argmin: bool = Field(default=True, description="also train with argmin assignment and report it")
    seed: int | None = None

    def setup(self, input_dim: int) -> tuple[RQVAEConfig, RQVAETrainConfig]:
        architecture, training = presets.rqvae(self.preset, input_dim)
        shape = presets.overridden(architecture, num_levels=self.num_levels, codebook_size=self.codebook_size, latent_dim=self.code_dim)
        return shape, presets.overridden(training, **{f.name: getattr(self, f.name, None) for f in dataclasses.fields(RQVAETrainConfig)})


@dg.asset(
    group_name=SAVIORENC_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"item_embeddings": dg.AssetIn(), "coclick_pairs": dg.AssetIn()},
    pool=TRAINING_POOL,
    description="RQ-VAE semantic IDs (L codes per item) of the item embeddings, with reconstruction error and the model (`model_uri`).",
)
def semantic_ids(
    context: dg.AssetExecutionContext, config: SemanticIdsConfig, item_embeddings: pl.DataFrame,
    coclick_pairs: pl.DataFrame, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    where = f"item_embeddings for {context.partition_key}"
    if item_embeddings.is_empty():
        raise ValueError(f"{where} has no rows")
    z = embedding_matrix(item_embeddings)
    architecture, training = config.setup(z.shape[1] if z.ndim == 2 else -1)
    checkpoints = StageCheckpoints(context, storage)
    pairs = pair_rows(coclick_pairs, item_embeddings["item_id"].to_numpy())
    with tracking.start_run(context, "semantic_ids") as run:
        run.log_params({"preset": config.preset, "num_levels": architecture.num_levels, "codebook_size": architecture.codebook_size,
                        "code_dim": architecture.latent_dim, "hidden_dims": json.dumps(architecture.hidden_dims),
                        "inference_assignment": config.inference_assignment, "items": len(z), "pairs": len(pairs), **dataclasses.asdict(training)})
        with track_usage() as usage:
            result = train_semantic_ids(
                z, pairs, architecture, training, inference_assignment=config.inference_assignment,
                compare_with_argmin=config.compare_with_argmin, checkpoints=checkpoints, on_epoch=epoch_reporter(context, run), where=where,
            )
        figures = quality_figures(result.quality) | {"reconstruction_mse": float(result.errors.mean()), "faiss_rq_collision_rate": result.faiss_collision_rate}
        run.log_metrics(figures | {"train_seconds": usage.seconds})
        saved = {"architecture": architecture.to_dict(), "inference_assignment": config.inference_assignment}
        model_uri = run.log_registered_model(RQVAE_MODEL, result.model.state_dict(), saved, CONFIG, tracking.origin_tags(context))
    codes = pl.DataFrame({
        "item_id": item_embeddings["item_id"],
        "codes": pl.Series(result.codes.astype(np.int32), dtype=pl.Array(pl.Int32, architecture.num_levels)),
        "reconstruction_error": result.errors.astype(np.float32),
        "model_uri": model_uri,
    })
    return dg.Output(codes, metadata={
        "items": codes.height, "model_uri": model_uri, "mlflow_run_id": run.run_id, "resumed_from": checkpoints.summary(),
        "shape": f"L={architecture.num_levels}, K={architecture.codebook_size}, d={architecture.latent_dim}",
        **{key: round(figures[key], 6) for key in ("collision_rate", "faiss_rq_collision_rate", "reconstruction_mse")},
        "loss_last_epoch": round(result.history[-1]["loss"], 5),
        "codebook_quality": dg.MetadataValue.md(quality_markdown(result.quality)),
        **usage.metadata(len(z) * training.epochs, unit="item_epochs"),
    })


def quality_figures(quality: list[tuple[str, dict]]) -> dict[str, float]:
    """The trained model's collision rate and per-level utilisation and perplexity, and the
    argmin-trained one's collision rate and first-level utilisation when it was compared."""
    (_, ours), *compared = quality
    figures = {"collision_rate": ours["collision_rate"]}
    figures |= {f"level_{l['level']}_{key}": l[key] for l in ours["levels"] for key in ("utilisation", "perplexity")}
    for _, argmin in compared:
        figures |= {"argmin_collision_rate": argmin["collision_rate"], "argmin_level_1_utilisation": argmin["levels"][0]["utilisation"]}
    return figures


def quality_markdown(quality: list[tuple[str, dict]]) -> str:
    rows = [(name, l["level"], f"{100 * l['utilisation']:.1f}%", f"{l['perplexity']:.1f}") for name, q in quality for l in q["levels"]]
    return table(["model", "level", "utilisation", "perplexity"], rows)


def load_rqvae(model_uri: str, tracking: MlflowTracking) -> tuple[RQVAE, dict]:
    """The registered RQ-VAE `models:/NAME/VERSION`, rebuilt from code and its safetensors weights
    (the codebooks included), and its saved config."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = RQVAE(RQVAEConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval(), saved

"""SaviorEnc stage 2 as an asset: train the RQ-VAE on the item embeddings, write semantic IDs."""

import dataclasses
import json
from typing import Literal

import dagster as dg
import numpy as np
import polars as pl
import torch
from pydantic import Field

from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.common import (
    PAPER_GROUP, SAVIORENC_GROUP, Refresh, RefreshConfig, StageCheckpoints, epoch_reporter, refresh_due, refresh_start, training_asset,
)
from saviorrec_pipeline.assets.encoder import encoder_lineage
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.item_rows import embedding_matrix, pair_rows
from saviorrec_pipeline.method.code_churn import keep_code_numbers
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.rqvae import (
    RQVAE, RQVAEConfig, RQVAETrainConfig, SemanticIds, assign_codes, codebook_quality, compare_quantisers, train_semantic_ids,
)
from saviorrec_pipeline.method.training import check_same_shapes
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.storage import ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.serving.pyfunc import rqvae_served

RQVAE_MODEL = "saviorrec-rqvae"
CONFIG = "rqvae_config.json"


class QuantiserConfig(dg.Config):
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
    seed: int | None = None

    def setup(self, input_dim: int) -> tuple[RQVAEConfig, RQVAETrainConfig]:
        architecture, training = presets.rqvae(self.preset, input_dim)
        shape = presets.overridden(architecture, num_levels=self.num_levels, codebook_size=self.codebook_size, latent_dim=self.code_dim)
        return shape, presets.overridden(training, **{f.name: getattr(self, f.name, None) for f in dataclasses.fields(RQVAETrainConfig)})


class SemanticIdsConfig(QuantiserConfig, RefreshConfig):
    """The RQ-VAE trains when it is due (`refresh_days`, `refresh`) or when the encoder changed;
    otherwise the champion's codes today's catalog."""


@training_asset(
    SAVIORENC_GROUP, ["item_embeddings", "coclick_pairs", "item_encoder"],
    "RQ-VAE semantic IDs (L codes per item) of the item embeddings, with reconstruction error and the model (`model_uri`): "
    "the champion's, or one trained today whose code numbers follow the champion's.",
)
def semantic_ids(
    context: dg.AssetExecutionContext, config: SemanticIdsConfig, item_embeddings: pl.DataFrame, coclick_pairs: pl.DataFrame,
    item_encoder: pl.DataFrame, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    partition = context.partition_key
    where = f"item_embeddings for {partition}"
    if item_embeddings.is_empty():
        raise ValueError(f"{where} has no rows")
    z = embedding_matrix(item_embeddings)
    architecture, training = config.setup(z.shape[1] if z.ndim == 2 else -1)
    encoder_uri = item_encoder["model_uri"][0]
    due, same_space = rqvae_due(tracking, partition, config, encoder_uri)
    context.log.info(f"semantic_ids for {partition}: {'training' if due.train else 'reusing the champion'}: {due.reason}")
    if not due.train:
        return reused_rqvae(due, item_embeddings, z, architecture, training.batch_size, tracking)
    start = refresh_start(due, same_space, architecture.to_dict(), CONFIG, tracking)
    checkpoints = StageCheckpoints(context, storage)
    pairs = pair_rows(coclick_pairs, item_embeddings["item_id"].to_numpy())
    with tracking.start_run(context, "semantic_ids") as run:
        run.log_params({"preset": config.preset, "num_levels": architecture.num_levels, "codebook_size": architecture.codebook_size,
                        "code_dim": architecture.latent_dim, "hidden_dims": json.dumps(architecture.hidden_dims), "refresh_reason": due.reason,
                        "trained_from": start.source, "inference_assignment": config.inference_assignment, "items": len(z), "pairs": len(pairs),
                        **dataclasses.asdict(training)})
        with track_usage() as usage:
            result = train_semantic_ids(
                z, pairs, architecture, training, inference_assignment=config.inference_assignment, continue_from=start.weights,
                checkpoints=checkpoints, on_epoch=epoch_reporter(context, run), where=where,
            )
        churn = _keep_code_numbers(context, result, item_embeddings, due, storage, tracking)
        figures = _figures(result.quality, result.errors) | {
            f"{name}_churn_level_{l + 1}": share for name, key in (("code", "level"), ("prefix", "prefix")) for l, share in enumerate(churn.get(key, []))
        }
        run.log_metrics(quality_figures(result.quality) | figures | {"train_seconds": usage.seconds})
        saved = {"architecture": architecture.to_dict(), "inference_assignment": config.inference_assignment, "encoder_uri": encoder_uri,
                 "continued_from": start.lineage}
        model_uri = run.log_registered_model(RQVAE_MODEL, rqvae_served(item_embeddings), result.model.state_dict(), saved, CONFIG, tracking.origin_tags(context))
    codes = codes_table(item_embeddings, result.codes, result.errors, model_uri)
    return dg.Output(codes, metadata={
        "training": "trained", "model_uri": model_uri, "model_version": model_uri.rsplit("/", 1)[1], "refresh_reason": due.reason,
        "trained_from": start.source, "items": codes.height, "mlflow_run_id": run.run_id, "resumed_from": checkpoints.summary(),
        "shape": f"L={architecture.num_levels}, K={architecture.codebook_size}, d={architecture.latent_dim}", **figures,
        "loss_last_epoch": round(result.history[-1]["loss"], 5),
        **{f"{key}_last_epoch": round(value, 4) for key, value in result.history[-1].items() if key.startswith("share_")},
        "codebook_quality": dg.MetadataValue.md(quality_markdown([("rq-vae (sinkhorn)", result.quality)])),
        **({"code_churn": dg.MetadataValue.md(churn_markdown(churn))} if churn else {}),
        **usage.metadata(len(z) * training.epochs, unit="item_epochs"),
    })


def rqvae_due(tracking: MlflowTracking, partition: str, config: SemanticIdsConfig, encoder_uri: str) -> tuple[Refresh, bool]:
    """The cadence's answer (`refresh_due`), and a refresh too when the day's encoder is not the
    one the champion RQ-VAE coded; and whether a refresh may go on from the champion's weights:
    only when asked to and the day's encoder is the one it coded or went on from it."""
    due = refresh_due(tracking, RQVAE_MODEL, "semantic_ids", partition, config.refresh_days, config.refresh)
    if due.champion is None:
        return due, False
    coded = tracking.load_model_config(due.champion.uri, CONFIG).get("encoder_uri")
    same_space = config.refresh_from_champion and coded in encoder_lineage(encoder_uri, tracking)
    if due.train or coded == encoder_uri:
        return due, same_space
    return dataclasses.replace(due, train=True, reason=f"the encoder changed: {encoder_uri}, not the {coded} {due.champion.uri} codes"), same_space


def reused_rqvae(
    due: Refresh, item_embeddings: pl.DataFrame, z: np.ndarray, architecture: RQVAEConfig, batch_size: int, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    """Today's catalog coded by the champion RQ-VAE, as it assigns codes."""
    champion, saved = load_rqvae(due.champion.uri, tracking)
    check_same_shapes("semantic_ids", due.champion.uri, saved["architecture"], architecture.to_dict(), "set `refresh: true` in semantic_ids' config to train one")
    codes, errors = assign_codes(champion, torch.from_numpy(z), saved["inference_assignment"], device_for_training(), batch_size)
    quality = codebook_quality(codes, architecture.codebook_size)
    return dg.Output(codes_table(item_embeddings, codes, errors, due.champion.uri), metadata={
        "training": "reused", "model_uri": due.champion.uri, "model_version": due.champion.version, "refresh_reason": due.reason,
        "items": len(z), **_figures(quality, errors), "codebook_quality": dg.MetadataValue.md(quality_markdown([("rq-vae (sinkhorn)", quality)])),
    })


def _keep_code_numbers(
    context: dg.AssetExecutionContext, result: SemanticIds, item_embeddings: pl.DataFrame, due: Refresh, storage: ParquetStorage, tracking: MlflowTracking,
) -> dict:
    """Renumber a refreshed model's codes (and reorder its codebooks) to match the champion's codes
    of the same items, read from the semantic_ids of the day the champion trained; its churn."""
    if due.champion is None:
        return {}
    try:
        previous = storage.read("semantic_ids", due.champion.partition)
    except FileNotFoundError as missing:
        context.log.warning(f"semantic_ids: codes are not matched to {due.champion.uri}'s: {missing}")
        return {}
    shape = result.model.config
    champion_shape = tracking.load_model_config(due.champion.uri, CONFIG)["architecture"]
    if (champion_shape["num_levels"], champion_shape["codebook_size"]) != (shape.num_levels, shape.codebook_size):
        context.log.warning(f"semantic_ids: codes are not matched to {due.champion.uri}'s, whose shape (L, K) differs")
        return {}
    codebooks, result.codes, churn = keep_code_numbers(
        result.model.codebooks, item_embeddings["item_id"].to_numpy(), result.codes, previous["item_id"].to_numpy(), np.stack(previous["codes"].to_numpy())
    )
    with torch.no_grad():
        result.model.codebooks.copy_(codebooks)
    return churn


def churn_markdown(churn: dict) -> str:
    rows = [(l + 1, f"{100 * churn['unmatched_level'][l]:.1f}%", f"{100 * churn['level'][l]:.1f}%", f"{100 * churn['prefix'][l]:.1f}%")
            for l in range(len(churn["level"]))]
    return f"{churn['items_in_both'][0]} items in both models\n\n" + table(["level", "changed before matching", "changed", "prefix changed"], rows, numeric_columns=3)


def _figures(quality: dict, errors: np.ndarray) -> dict[str, float]:
    return {"collision_rate": round(quality["collision_rate"], 6), "reconstruction_mse": round(float(errors.mean()), 6)}


def codes_table(item_embeddings: pl.DataFrame, codes: np.ndarray, errors: np.ndarray, model_uri: str) -> pl.DataFrame:
    return pl.DataFrame({
        "item_id": item_embeddings["item_id"],
        "codes": pl.Series(codes.astype(np.int32), dtype=pl.Array(pl.Int32, codes.shape[1])),
        "reconstruction_error": errors.astype(np.float32),
        "model_uri": model_uri,
    })


def quality_figures(quality: dict) -> dict[str, float]:
    """A codebook's collision rate and per-level utilisation and perplexity, as flat metrics."""
    figures = {"collision_rate": quality["collision_rate"]}
    return figures | {f"level_{l['level']}_{key}": l[key] for l in quality["levels"] for key in ("utilisation", "perplexity")}


def quality_markdown(quality: list[tuple[str, dict]]) -> str:
    rows = []
    for name, q in quality:
        levels = [(l["level"], f"{100 * l['utilisation']:.1f}%", f"{l['perplexity']:.1f}") for l in q["levels"]] or [("", "", "")]
        rows += [(name, *level, f"{100 * q['collision_rate']:.2f}%") for level in levels]
    return table(["model", "level", "utilisation", "perplexity", "collision rate"], rows)


@training_asset(
    PAPER_GROUP, ["item_embeddings", "coclick_pairs", "semantic_ids"],
    "The semantic IDs' codebook quality beside an RQ-VAE trained with argmin assignment and faiss' ResidualQuantizer "
    "of the same shape (collision rate, per-level utilisation and perplexity).",
)
def rq_comparison(
    context: dg.AssetExecutionContext, config: QuantiserConfig, item_embeddings: pl.DataFrame, coclick_pairs: pl.DataFrame,
    semantic_ids: pl.DataFrame, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    z = embedding_matrix(item_embeddings)
    architecture, training = config.setup(z.shape[1] if z.ndim == 2 else -1)
    codes = item_embeddings.select("item_id").join(semantic_ids.select("item_id", "codes"), on="item_id", how="left", maintain_order="left")
    checkpoints = StageCheckpoints(context, storage)
    with tracking.start_run(context, "rq_comparison") as run:
        run.log_params({"preset": config.preset, "num_levels": architecture.num_levels, "codebook_size": architecture.codebook_size,
                        "code_dim": architecture.latent_dim, "items": len(z), **dataclasses.asdict(training)})
        with track_usage() as usage:
            compared = compare_quantisers(z, pair_rows(coclick_pairs, item_embeddings["item_id"].to_numpy()), architecture, training,
                                          np.stack(codes["codes"].to_numpy()), checkpoints=checkpoints, where=f"item_embeddings for {context.partition_key}")
        run.log_metrics({f"{_metric_name(name)}_{key}": value for name, quality in compared for key, value in quality_figures(quality).items()})
    rows = pl.DataFrame(
        [{"quantiser": name, "collision_rate": q["collision_rate"], "level": l["level"], "utilisation": l["utilisation"], "perplexity": l["perplexity"]}
         for name, q in compared for l in q["levels"] or [{"level": None, "utilisation": None, "perplexity": None}]],
        schema={"quantiser": pl.String, "collision_rate": pl.Float64, "level": pl.Int32, "utilisation": pl.Float64, "perplexity": pl.Float64},
    )
    return dg.Output(rows, metadata={
        "mlflow_run_id": run.run_id, "resumed_from": checkpoints.summary(),
        **{f"{_metric_name(name)}_collision_rate": round(q["collision_rate"], 6) for name, q in compared},
        "codebook_quality": dg.MetadataValue.md(quality_markdown(compared)), **usage.metadata(len(z) * training.epochs, unit="item_epochs"),
    })


def _metric_name(quantiser: str) -> str:
    return {"rq-vae (sinkhorn)": "sinkhorn", "rq-vae (argmin)": "argmin", "faiss ResidualQuantizer": "faiss_rq"}[quantiser]


def load_rqvae(model_uri: str, tracking: MlflowTracking) -> tuple[RQVAE, dict]:
    """The registered RQ-VAE `models:/NAME/VERSION`, rebuilt from code and its safetensors weights
    (the codebooks included), and its saved config."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = RQVAE(RQVAEConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval(), saved

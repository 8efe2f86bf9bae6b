"""ctr_model: train the SaviorRec ranking model and its baselines, predict the evaluation window."""

import dataclasses
from typing import Iterator, Literal

import dagster as dg
import numpy as np
import polars as pl
import torch
from pydantic import Field

from saviorrec_pipeline.assets.semantic_ids import embedding_matrix, load_rqvae
from saviorrec_pipeline.jobs import TRAINING_POOL
from saviorrec_pipeline.method.ctr_model import VARIANTS, CTRConfig, CTRModel
from saviorrec_pipeline.method.ctr_training import (
    CTRTrainConfig,
    ItemIndex,
    encode_rows,
    predict,
    profile_vocabularies,
    train_ctr,
)
from saviorrec_pipeline.method.encoder_training import device_for_training
from saviorrec_pipeline.method.ranking_features import EVAL, TRAIN
from saviorrec_pipeline.method.training_loop import fingerprint
from saviorrec_pipeline.partitions import daily_partitions
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.storage import ParquetStorage, resume_point
from saviorrec_pipeline.resources.tracking import MlflowTracking

CTR_MODEL = "saviorrec-ctr"
CONFIG = "ctr_config.json"
PRESETS = {"main": ["base", "saviorrec"], "ablation": ["base", "no_mba", "no_mm_embedding", "no_bidir", "saviorrec"]}
COVERAGE_CHECK = "predictions_cover_evaluation_rows"
NOT_PROFILE = {
    "user_id", "item_id", "ts", "clicked", "base_pctr", "split", "item_impressions", "item_clicks", "item_ctr",
    "seq_items", "seq_impressions", "seq_clicks", "seq_ctr", "seq_length", "pv",
}


class CTRModelConfig(dg.Config):
    """Paper 4.1.4 defaults (Adagrad, batch 1024, 8 attention heads) except the rate: 0.03, with
    the weights averaged; epochs by early stopping."""

    preset: Literal["main", "ablation"] = Field(default="main", description="main: base + saviorrec; ablation: all five (Table 3)")
    variants: list[str] | None = Field(default=None, description=f"overrides the preset; any of {list(VARIANTS)}")
    epochs: int | None = Field(
        default=None, ge=1,
        description="passes over the training window; unset: chosen by early stopping on its latest rows (validation_fraction)",
    )
    max_epochs: int = Field(default=10, ge=1, description="early stopping's budget of epochs")
    validation_fraction: float = Field(default=0.1, gt=0, lt=1, description="latest share of training rows held out to choose the epochs")
    batch_size: int = Field(default=1024, ge=1)
    lr_start: float = Field(default=0.03, gt=0, description="Adagrad's rate (the paper's is 0.01; 0.03 measured better with the weights averaged)")
    lr_end: float = Field(
        default=0.03, gt=0,
        description="Adagrad's rate goes geometrically from lr_start to this over the epoch budget (the paper decays it to 0.001; constant measured better per day)",
    )
    average_decay: float = Field(
        default=0.99, ge=0, lt=1,
        description="the model scored and kept is a moving average of the weights over about 1 / (1 - decay) steps; 0: the last step's",
    )
    mba_dim: int | None = Field(default=None, ge=1, description="MBA codebook dimension (Table 5); default: the RQ codebook's d")
    id_dim: int = Field(default=64, ge=1, description="item ID embedding width")
    attention_dim: int = Field(default=64, ge=1)
    heads: int = Field(default=8, ge=1)
    user_buckets: int = Field(default=100_003, ge=1, description="user ids are hashed into this many embedding rows")
    use_base_pctr: bool = Field(default=True, description="feed base_pctr to the DNN when the raw data has it")
    seed: int = 0

    def chosen_variants(self) -> list[str]:
        chosen = self.variants if self.variants is not None else PRESETS[self.preset]
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown or not chosen:
            raise ValueError(f"ctr_model config: unknown variant(s) {unknown or chosen}; choose from {list(VARIANTS)}")
        return chosen


@dg.asset(
    group_name="ranking",
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"ranking_dataset": dg.AssetIn(), "item_embeddings": dg.AssetIn(), "semantic_ids": dg.AssetIn()},
    pool=TRAINING_POOL,
    check_specs=[dg.AssetCheckSpec(COVERAGE_CHECK, asset="ctr_model", description="one prediction per variant and kept evaluation impression")],
    description="Evaluation-window predictions of every CTR variant (impression key, variant, pctr, label, item pv).",
)
def ctr_model(
    context: dg.AssetExecutionContext, config: CTRModelConfig, ranking_dataset: pl.DataFrame,
    item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame, storage: ParquetStorage, tracking: MlflowTracking,
) -> Iterator:
    variants = config.chosen_variants()
    where = f"ranking_dataset {context.partition_key}"
    train_rows = ranking_dataset.filter(pl.col("split") == TRAIN)
    eval_rows = ranking_dataset.filter(pl.col("split") == EVAL)
    if train_rows.is_empty() or eval_rows.is_empty():
        raise ValueError(f"{where}: needs training and evaluation rows, has {train_rows.height} and {eval_rows.height}")
    if train_rows["clicked"].n_unique() < 2:
        raise ValueError(f"{where}: training rows hold a single label value; nothing to learn")

    items = ItemIndex(item_embeddings["item_id"].to_numpy())
    z = torch.from_numpy(embedding_matrix(item_embeddings))
    codes_table = item_embeddings.select("item_id").join(semantic_ids.select("item_id", "codes"), on="item_id", how="left", maintain_order="left")
    if codes_table["codes"].null_count():
        raise ValueError(f"semantic_ids {context.partition_key}: {codes_table['codes'].null_count()} embedded item(s) have no codes")
    codes = torch.from_numpy(codes_table["codes"].to_numpy().astype(np.int64))
    rqvae, _ = load_rqvae(semantic_ids["rqvae_model_uri"][0], tracking)
    rq_codebooks = rqvae.codebooks.detach().clone()
    num_levels, codebook_size, code_dim = rq_codebooks.shape
    mba_dim = config.mba_dim or code_dim
    if "no_mm_embedding" in variants and mba_dim != code_dim:
        raise ValueError(f"ctr_model config: no_mm_embedding starts MBA from the RQ codebooks, so mba_dim must be {code_dim}, not {mba_dim}")

    profile_columns = [c for c in ranking_dataset.columns if c not in NOT_PROFILE]
    vocabularies = profile_vocabularies(train_rows, profile_columns)
    use_base_pctr = config.use_base_pctr and "base_pctr" in ranking_dataset.columns
    train_inputs = encode_rows(train_rows, items, vocabularies, config.user_buckets, f"{where} (train)")
    eval_inputs = encode_rows(eval_rows, items, vocabularies, config.user_buckets, f"{where} (eval)")
    sequence_length = int(ranking_dataset["seq_length"].max() or 1)
    settings = CTRTrainConfig(
        epochs=config.epochs, max_epochs=config.max_epochs, validation_fraction=config.validation_fraction,
        batch_size=config.batch_size, lr_start=config.lr_start, lr_end=config.lr_end,
        average_decay=config.average_decay, sequence_length=sequence_length, seed=config.seed,
    )
    device = device_for_training()

    predictions, summary, metadata = [], [], {}
    with tracking.start_run(context, "ctr_model") as parent:
        parent.log_params({"variants": ",".join(variants), "train_rows": train_rows.height, "eval_rows": eval_rows.height, **dataclasses.asdict(settings)})
        for variant in variants:
            architecture = CTRConfig(
                variant=variant, num_items=len(items), embedding_dim=z.shape[1], num_levels=num_levels,
                codebook_size=codebook_size, mba_dim=mba_dim, id_dim=config.id_dim, user_buckets=config.user_buckets,
                profile_vocab_sizes=tuple(len(v) + 1 for v in vocabularies.values()), attention_dim=config.attention_dim,
                heads=config.heads, use_base_pctr=use_base_pctr,
            )
            torch.manual_seed(config.seed)
            model = CTRModel(architecture)
            model.load_item_tables(torch.from_numpy(items.item_ids), z, codes)
            if VARIANTS[variant].mba_from_rq:
                with torch.no_grad():
                    model.mba.codebook.copy_(rq_codebooks)
            run_key = fingerprint(
                architecture.to_dict(), settings, z, codes, rq_codebooks, *vars(train_inputs).values(), *vars(eval_inputs).values()
            )
            checkpoints = storage.checkpoint("ctr_model", context.partition_key, f"{variant}-{run_key}")
            resumed = resume_point(context, checkpoints)
            with tracking.start_run(context, f"ctr_model/{variant}", parent=parent) as run:
                run.log_params({"variant": variant, **architecture.to_dict(), **dataclasses.asdict(settings)})

                def on_epoch(phase: str, epoch: int, figures: dict, variant=variant, run=run) -> None:
                    run.log_metrics({f"{phase}.{k}": v for k, v in figures.items()}, step=epoch)
                    budget = settings.epochs or settings.max_epochs
                    context.log.info(f"{variant} {phase} epoch {epoch + 1}/{budget}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

                with track_usage() as usage:
                    training = train_ctr(model, train_inputs, eval_inputs, settings, device, on_epoch, checkpoints)
                scores = predict(model, eval_inputs, sequence_length, device)
                throughput = training.samples_per_s
                final = {"eval_auc": training.history[-1].get("eval_auc", float("nan")), "eval_logloss": training.history[-1]["eval_logloss"]}
                run.log_params({"epochs_chosen": training.epochs})
                run.log_metrics({**final, "train_samples_per_s": throughput, "peak_rss_mib": usage.peak_rss_bytes / 2**20})
                run.log_model(
                    model.state_dict(),
                    {"architecture": architecture.to_dict(), "vocabularies": vocabularies, "sequence_length": sequence_length},
                    CONFIG,
                )
                if variant == "saviorrec":
                    version = run.register(CTR_MODEL, "model", tracking.origin_tags(context))
                    metadata["model"] = f"{CTR_MODEL} v{version}"
                    metadata["model_uri"] = f"models:/{CTR_MODEL}/{version}"
            summary.append((variant, final, training, usage.peak_rss_bytes / 2**20, resumed, run.run_id))
            metadata[f"{variant}_epochs"] = training.epochs
            metadata[f"{variant}_train_samples_per_s"] = round(throughput)
            predictions.append(
                eval_rows.select("user_id", "item_id", "ts", pl.lit(variant).alias("variant"), pl.Series("pctr", scores, dtype=pl.Float32),
                                 pl.col("clicked").cast(pl.Int8).alias("label"), "pv")
            )
        parent.log_metrics({f"{name}_eval_auc": final["eval_auc"] for name, final, *_ in summary})
    table = pl.concat(predictions)
    counts = dict(table.group_by("variant").len().iter_rows())
    covered = all(counts.get(v, 0) == eval_rows.height for v in variants)
    yield dg.Output(
        table,
        metadata={
            "variants": ", ".join(variants),
            "eval_rows": eval_rows.height,
            "train_rows": train_rows.height,
            "mlflow_parent_run_id": parent.run_id,
            "results": dg.MetadataValue.md(_summary_table(summary)),
            **metadata,
        },
    )
    yield dg.AssetCheckResult(
        check_name=COVERAGE_CHECK, passed=covered,
        metadata={"eval_rows": eval_rows.height, **{f"{v}_predictions": counts.get(v, 0) for v in variants}},
    )


def _summary_table(summary: list) -> str:
    lines = [
        "| variant | eval AUC | eval log loss | epochs (held-out AUC per epoch) | train samples/s | peak RSS MiB | resumed from | MLflow run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, final, training, peak, resumed, run_id in summary:
        curve = " ".join(f"{f['validation_auc']:.4f}" if "validation_auc" in f else "n/a" for f in training.selection)
        chosen = f"{training.epochs} ({curve})" if training.selection else f"{training.epochs} (set)"
        lines.append(
            f"| {name} | {final['eval_auc']:.4f} | {final['eval_logloss']:.4f} | {chosen} | {training.samples_per_s:.0f} | {peak:.0f} | {resumed} | {run_id} |"
        )
    return "\n".join(lines)


def load_ctr_model(model_uri: str, tracking: MlflowTracking) -> tuple[CTRModel, dict]:
    """Rebuild a CTR model from code and its safetensors weights (item tables included)."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = CTRModel(CTRConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval(), saved

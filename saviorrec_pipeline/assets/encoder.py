"""SaviorEnc stage 1 as assets: train the encoder, embed the catalog, report i2i retrieval (Table 4)
and draw the embedding spaces (Fig. 5)."""

import dataclasses
import json
from typing import Literal

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.common import (
    PAPER_GROUP, SAVIORENC_GROUP, Refresh, RefreshConfig, StageCheckpoints, engine_metadata, epoch_reporter, refresh_due, refresh_start,
    step_reporter, training_asset,
)
from saviorrec_pipeline.charts import figure, markdown_image
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.embedding_map import EmbeddingMap, untuned_and_aligned_map
from saviorrec_pipeline.method.encoder import EncoderConfig, SaviorEnc, with_text_tower
from saviorrec_pipeline.method.encoder_training import (
    TrainConfig, embedding_table, initial_encoder, initial_weights_note, train_item_encoder,
)
from saviorrec_pipeline.method.retrieval import consecutive_click_pairs, table_4
from saviorrec_pipeline.method.training import check_same_shapes
from saviorrec_pipeline.partitions import TrainEvalWindow, daily_partitions
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline.serving.pyfunc import item_encoder_served

ENCODER_MODEL = "saviorrec-item-encoder"
CONFIG = "encoder_config.json"


class ItemEncoderConfig(RefreshConfig):
    """A preset (architecture and training together); a field set here overrides the preset's.
    The encoder trains when it is due (`refresh_days`, `refresh`); otherwise the champion's is used."""

    preset: Literal[presets.names("encoder")] = Field(default="tiny", description="architecture and training defaults")
    epochs: int | None = Field(default=None, ge=1, description="i2i alignment epochs (paper: 10)")
    batch_size: int | None = Field(default=None, ge=2, description="co-click pairs per batch (paper: 4096)")
    lr: float | None = Field(default=None, gt=0, description="AdamW peak learning rate (paper: 1e-4)")
    warmup_epochs: float | None = Field(default=None, ge=0, description="linear warmup, then cosine decay (paper: 1)")
    temperature: float | None = Field(default=None, gt=0, description="InfoNCE temperature tau (eq. 3; paper: 0.07)")
    domain_adaptation_epochs: int | None = Field(default=None, ge=0, description="CLIP image-title phase first; 0 skips it")
    text_tower_path: str | None = Field(default=None, description="local Hugging Face folder to use as the text tower")
    checkpoint_path: str | None = Field(default=None, description="safetensors weights of this architecture to start from")
    seed: int | None = None

    def setup(self) -> tuple[EncoderConfig, TrainConfig]:
        architecture, training = presets.encoder(self.preset)
        overrides = {field.name: getattr(self, field.name, None) for field in dataclasses.fields(TrainConfig)}
        architecture = with_text_tower(architecture, self.text_tower_path) if self.text_tower_path else architecture
        return architecture, presets.overridden(training, **overrides)


def read_catalog(raw: RawStore) -> pl.DataFrame:
    catalog = raw.inspect_items().checked()
    if catalog.is_empty():
        raise ValueError(f"the item catalog under {raw.root}/items has no rows: nothing to embed")
    return catalog


@training_asset(
    SAVIORENC_GROUP, ["coclick_pairs"],
    "SaviorEnc stage 1 trained on the partition's co-click pairs when due, else the champion encoder; its registered model (`model_uri`).",
    deps=["item_catalog"],
)
def item_encoder(
    context: dg.AssetExecutionContext, config: ItemEncoderConfig, coclick_pairs: pl.DataFrame,
    raw: RawStore, storage: ParquetStorage, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    architecture, training = config.setup()
    due = refresh_due(tracking, ENCODER_MODEL, "item_encoder", context.partition_key, config.refresh_days, config.refresh)
    context.log.info(f"item_encoder for {context.partition_key}: {'training' if due.train else 'reusing the champion'}: {due.reason}")
    if not due.train:
        return reused_encoder(due, architecture.to_dict(), tracking)
    # A checkpoint the user names is an explicit new start.
    start = refresh_start(due, config.refresh_from_champion and not config.checkpoint_path, architecture.to_dict(), CONFIG, tracking)
    checkpoints = StageCheckpoints(context, storage)
    catalog = read_catalog(raw)
    with tracking.start_run(context, "item_encoder") as run:
        with track_usage() as usage:
            trained = train_item_encoder(
                catalog, coclick_pairs, architecture, training, initial_weights=config.checkpoint_path, continue_from=start.weights,
                checkpoints=checkpoints, on_step=step_reporter(context), on_epoch=epoch_reporter(context, run),
                where=f" for {context.partition_key}", catalog_source=f"{raw.root}/items",
            )
        if trained.domain_adaptation.startswith("skipped") and start.weights is None:
            context.log.warning(f"domain adaptation {trained.domain_adaptation}; training by i2i alignment alone")
        run.log_params({"preset": config.preset, **dataclasses.asdict(trained.training), "domain_adaptation": trained.domain_adaptation,
                        "pairs": trained.pairs, "items": trained.items, "refresh_reason": due.reason, "trained_from": start.source,
                        **{f"arch.{k}": json.dumps(v) for k, v in architecture.to_dict().items()}})
        run.log_metrics({"final_loss": trained.history[-1], "train_seconds": usage.seconds, "pairs_per_s": trained.pairs_trained / usage.seconds})
        saved = {"architecture": architecture.to_dict(), "training": dataclasses.asdict(trained.training), "initial_weights": config.checkpoint_path,
                 "continued_from": start.lineage}
        model_uri = run.log_registered_model(ENCODER_MODEL, item_encoder_served(catalog), trained.model.state_dict(), saved, CONFIG, tracking.origin_tags(context))
    reference = model_reference(model_uri, run.run_id, context.partition_key, final_loss=trained.history[-1], pairs=trained.pairs, items=trained.items)
    return dg.Output(reference, metadata={
        "training": "trained", "model_uri": model_uri, "model_version": model_uri.rsplit("/", 1)[1], "refresh_reason": due.reason,
        "trained_from": start.source, "mlflow_run_id": run.run_id, "device": str(device_for_training()), "pairs": trained.pairs,
        "epochs": trained.training.epochs, "domain_adaptation": trained.domain_adaptation, "resumed_from": checkpoints.summary(),
        "loss_first_epoch": round(trained.history[0], 4), "loss_last_epoch": round(trained.history[-1], 4),
        "loss_per_epoch": dg.MetadataValue.md(" | ".join(f"{x:.3f}" for x in trained.history)),
        **usage.metadata(trained.pairs_trained, unit="pairs"),
    })


REFERENCE_SCHEMA = {"model_uri": pl.String, "run_id": pl.String, "trained_for": pl.String, "final_loss": pl.Float64, "pairs": pl.Int64, "items": pl.Int64}


def model_reference(model_uri: str, run_id: str, trained_for: str, final_loss: float | None = None, pairs: int | None = None, items: int | None = None) -> pl.DataFrame:
    """item_encoder's one-row output: the encoder the day uses, the MLflow run and the day that
    trained it, and figures of that training (null when the champion's was reused)."""
    return pl.DataFrame([{"model_uri": model_uri, "run_id": run_id, "trained_for": trained_for, "final_loss": final_loss, "pairs": pairs, "items": items}],
                        schema=REFERENCE_SCHEMA)


def reused_encoder(due: Refresh, architecture: dict, tracking: MlflowTracking) -> dg.Output[pl.DataFrame]:
    champion = due.champion
    check_same_shapes("item_encoder", champion.uri, tracking.load_model_config(champion.uri, CONFIG)["architecture"], architecture,
                      "set `refresh: true` in item_encoder's config to train one")
    return dg.Output(model_reference(champion.uri, champion.run_id, champion.partition or ""), metadata={
        "training": "reused", "model_uri": champion.uri, "model_version": champion.version, "refresh_reason": due.reason,
        "mlflow_run_id": champion.run_id,
    })


def load_encoder(model_uri: str, tracking: MlflowTracking) -> SaviorEnc:
    """The registered encoder `models:/NAME/VERSION`, rebuilt from code and its safetensors weights;
    nothing is unpickled."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = SaviorEnc(EncoderConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval()


def saved_training(model_uri: str, tracking: MlflowTracking) -> tuple[EncoderConfig, TrainConfig, str | None]:
    """The architecture, training and initial weights (a safetensors path, or None for the seed's
    init) of the registered encoder (its config file only)."""
    saved = tracking.load_model_config(model_uri, CONFIG)
    return EncoderConfig.from_dict(saved["architecture"]), TrainConfig(**saved["training"]), saved.get("initial_weights")


def encoder_lineage(model_uri: str, tracking: MlflowTracking) -> list[str]:
    """The encoder and those it went on from, nearest first: an RQ-VAE that coded any of them may go on."""
    return [model_uri, *tracking.load_model_config(model_uri, CONFIG).get("continued_from", [])]


@dg.asset(
    group_name=SAVIORENC_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    deps=["item_catalog"],
    description="z for every catalog item (cold ones included), from the partition's item_encoder.",
)
def item_embeddings(
    context: dg.AssetExecutionContext, item_encoder: pl.DataFrame, raw: RawStore, tracking: MlflowTracking, compute: Compute
) -> dg.Output[pl.DataFrame]:
    model_uri = item_encoder["model_uri"][0]
    model = load_encoder(model_uri, tracking)
    with track_usage() as usage:
        embedded = compute.item_embeddings(model, read_catalog(raw))
    return dg.Output(embedded.select("item_id", "embedding"), metadata={
        "items": embedded.height,
        "dimension": model.config.embedding_dim,
        "items_without_image": int((~embedded["has_image"]).sum()),
        "items_without_title": int((~embedded["has_title"]).sum()),
        "encoder": model_uri,
        **usage.metadata(embedded.height, unit="items"),
        **engine_metadata(compute.engine, []),
    })


class RetrievalConfig(dg.Config):
    k: int = Field(default=30, ge=1, description="Hit@K (paper Table 4: 30)")


@training_asset(
    PAPER_GROUP, ["coclick_pairs", "item_encoder"],
    "Paper Table 4: Hit@K of i2i retrieval on the evaluation window, per encoder training variant.",
)
def i2i_retrieval(
    context: dg.AssetExecutionContext, config: RetrievalConfig, coclick_pairs: pl.DataFrame, item_encoder: pl.DataFrame,
    raw: RawStore, window: TrainEvalWindow, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    model_uri = item_encoder["model_uri"][0]
    queries = consecutive_click_pairs(raw.read_clicks(window.evaluation_days(context.partition_key)))
    _, training, initial_weights = saved_training(model_uri, tracking)
    registered = load_encoder(model_uri, tracking)
    untuned_start = initial_weights_note(registered.config, training.seed, initial_weights)
    with tracking.start_run(context, "i2i_retrieval") as run:
        run.log_params({"k": config.k, "encoder": model_uri, "queries": queries.height, "untuned_start": untuned_start})
        report = table_4(read_catalog(raw), coclick_pairs, queries, registered, training, initial_weights, config.k, context.log.info)
        run.log_params({f"{r['variant']}.domain_adaptation": r["note"].replace("n/a:", "skipped:") for r in report.iter_rows(named=True) if r["note"]})
        run.log_metrics({f"hit_at_{config.k}.{r['variant']}": r["hit_rate"] for r in report.iter_rows(named=True) if r["hit_rate"] is not None})
    return dg.Output(report, metadata={"table_4": dg.MetadataValue.md(table_4_markdown(report)), "untuned_start": untuned_start,
                                       "queries": queries.height, "mlflow_run_id": run.run_id})


def table_4_markdown(report: pl.DataFrame) -> str:
    """The report as a markdown table; a variant that does not apply says why instead of a rate."""
    rows = []
    for row in report.iter_rows(named=True):
        if row["note"]:
            rows.append((row["variant"], row["note"], "-"))
        else:
            rate = "n/a" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.2f}%"
            rows.append((row["variant"], rate, f"{row['hits']} / {row['queries']}"))
    return table(["variant", f"Hit@{report['k'][0]}", "hits / queries"], rows)


class EmbeddingMapConfig(dg.Config):
    max_items: int = Field(default=3000, ge=3, description="items drawn (a seeded sample when the catalog is larger; the same in both spaces)")
    neighbours: int = Field(default=10, ge=1, description="k of the neighbour agreement: the share of an item's k nearest items in its group")
    seed: int = 0


@dg.asset(
    group_name=PAPER_GROUP,
    partitions_def=daily_partitions,
    io_manager_key="parquet_io_manager",
    ins={"item_encoder": dg.AssetIn(), "item_embeddings": dg.AssetIn()},
    deps=["item_catalog"],
    description="Paper Fig. 5: t-SNE maps of the item embeddings of the untuned encoder (its initial weights: a pretrained tower or "
    "checkpoint where configured) and of the day's aligned encoder, coloured by the demo's planted topic group when the raw data has one.",
)
def embedding_map(
    context: dg.AssetExecutionContext, config: EmbeddingMapConfig, item_encoder: pl.DataFrame, item_embeddings: pl.DataFrame,
    raw: RawStore, tracking: MlflowTracking,
) -> dg.Output[pl.DataFrame]:
    model_uri = item_encoder["model_uri"][0]
    architecture, training, initial_weights = saved_training(model_uri, tracking)
    untuned_start = initial_weights_note(architecture, training.seed, initial_weights)
    groups = raw.read_item_groups()
    with track_usage() as usage:
        result = untuned_and_aligned_map(read_catalog(raw), item_embeddings, initial_encoder(architecture, training.seed, initial_weights), groups,
                                         config.max_items, config.seed, config.neighbours, where=f"item_embeddings {context.partition_key}")
    chart = embedding_map_png(result, untuned_start, model_uri)
    agreement = {f"neighbour_group_agreement_{space}": round(value, 4) for space, value in result.neighbour_agreement.items()}
    with tracking.start_run(context, "embedding_map") as run:
        run.log_params({"encoder": model_uri, "untuned_start": untuned_start, "max_items": config.max_items, "neighbours": config.neighbours})
        run.log_metrics(agreement)
        run.log_files({"embedding_map.png": chart}, "fig5")
    items = result.points.filter(pl.col("space") == "aligned").height
    return dg.Output(result.points, metadata={
        "fig_5": dg.MetadataValue.md(markdown_image("item embeddings, untuned and aligned (t-SNE)", chart)),
        "encoder": model_uri, "untuned_start": untuned_start, "items_drawn": items,
        "coloured_by": "the demo's planted topic group (ground_truth/items.parquet)" if groups is not None else "nothing: the raw data has no ground_truth/",
        **agreement, "mlflow_run_id": run.run_id, **usage.metadata(2 * items, unit="items"),
    })


def embedding_map_png(result: EmbeddingMap, untuned_start: str, model_uri: str) -> bytes:
    with figure(11, 5, panels=2) as (axes, out):
        for axis, space in zip(axes, ("untuned", "aligned")):
            points = result.points.filter(pl.col("space") == space)
            colours = points["group"].fill_null(-1).to_numpy() if points["group"].null_count() < points.height else None
            axis.scatter(points["x"].to_numpy(), points["y"].to_numpy(), c=colours, cmap="tab10" if colours is not None else None, s=4)
            agreement = result.neighbour_agreement.get(space)
            title = f"{space}: {untuned_start.split(' (')[0]}" if space == "untuned" else f"aligned: {model_uri}"
            axis.set_title(title + (f"\nneighbours in the item's group: {agreement:.1%}" if agreement is not None else ""), fontsize="small")
            axis.set_xticks([])
            axis.set_yticks([])
    return out["png"]

"""ctr_model: train the SaviorRec ranking model and its baselines, predict the evaluation window."""

import dataclasses
import datetime as dt
import json
from typing import Iterator, Literal

import dagster as dg
import polars as pl
from pydantic import Field

from saviorrec_pipeline import presets
from saviorrec_pipeline.assets.common import PAPER_GROUP, RANKING_GROUP, StageCheckpoints, epoch_reporter, training_asset
from saviorrec_pipeline.assets.semantic_ids import load_rqvae
from saviorrec_pipeline.charts import figure, markdown_image
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.ctr_model import VARIANTS, CTRConfig, CTRModel
from saviorrec_pipeline.checkpoints import Checkpoint
from saviorrec_pipeline.method.ctr_training import Champion, CTRInputs, CTRTrainConfig, ctr_inputs, train_variant
from saviorrec_pipeline.partitions import TrainEvalWindow
from saviorrec_pipeline.profiling import track_usage
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.storage import ParquetStorage
from saviorrec_pipeline.resources.tracking import MlflowTracking, TrackedRun
from saviorrec_pipeline.serving.pyfunc import ranker_served

CTR_MODEL = "saviorrec-ctr"  # the saviorrec variant, the one served; the baselines are logged in their runs, not registered
CHAMPION_VARIANT = "saviorrec"
CONFIG = "ctr_config.json"
TRAINING_STATE = "training_state.safetensors"  # beside each CTR model: what a warm start goes on from
VARIANT_MODELS_TAG = "variant_models"  # on a registered version: every variant trained with it, by model URI
COVERAGE_CHECK = "predictions_cover_evaluation_rows"
ARCHITECTURE_FIELDS = ("mba_dim", "id_dim", "attention_dim", "heads", "user_buckets")


class CTRModelConfig(dg.Config):
    """A preset (the variants, their architecture and training); a field set here overrides the
    preset's. `main`: paper 4.1.4 (Adagrad, batch 1024, 8 attention heads) except the rate, 0.03
    with the weights averaged; epochs by early stopping."""

    preset: Literal[presets.names("ctr")] = Field(default="main", description="main: base + saviorrec; ablation: Table 3's five and Fig. 4's two (the ctr_ablations asset)")
    variants: list[str] | None = Field(default=None, description=f"overrides the preset's; any of {list(VARIANTS)}")
    epochs: int | None = Field(default=None, ge=1, description="passes over the training window; unset: chosen by early stopping on its latest rows")
    max_epochs: int | None = Field(default=None, ge=1, description="early stopping's budget of epochs (10)")
    validation_fraction: float | None = Field(default=None, gt=0, lt=1, description="latest share of training rows held out to choose the epochs (0.1)")
    batch_size: int | None = Field(default=None, ge=1, description="1024")
    lr_start: float | None = Field(default=None, gt=0, description="Adagrad's rate, 0.03 (the paper's is 0.01; 0.03 measured better with the weights averaged)")
    lr_end: float | None = Field(
        default=None, gt=0,
        description="Adagrad's rate goes geometrically from lr_start to this over the epoch budget, 0.03 (the paper decays it to 0.001; constant measured better per day)",
    )
    average_decay: float | None = Field(
        default=None, ge=0, lt=1,
        description="the model scored and kept is a moving average of the weights over about 1 / (1 - decay) steps, 0.99; 0: the last step's",
    )
    mba_dim: int | None = Field(default=None, ge=1, description="MBA codebook dimension (Table 5); default: the RQ codebook's d")
    id_dim: int | None = Field(default=None, ge=1, description="item ID embedding width (64)")
    attention_dim: int | None = Field(default=None, ge=1, description="64")
    heads: int | None = Field(default=None, ge=1, description="8")
    user_buckets: int | None = Field(default=None, ge=1, description="user ids are hashed into this many embedding rows (100,003)")
    use_base_pctr: bool = Field(default=True, description="feed base_pctr to the DNN when the raw data has it")
    from_scratch: bool = Field(
        default=False,
        description="train fresh weights on the whole training window; unset, each variant goes on from the champion's training state "
        "on the days the champion has not trained on (`epochs` passes over them, default 1)",
    )
    seed: int | None = None

    def setup(self, code_dim: int) -> tuple[list["VariantRun"], CTRTrainConfig]:
        """The models to train (`code_dim`, the RQ codebooks' d, sizes what is relative to it) and how."""
        variants, architecture, training = presets.ctr(self.preset)
        variants = self.variants if self.variants is not None else variants
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"ctr_model config: unknown variant(s) {unknown or variants}; choose from {list(VARIANTS)}")
        architecture |= {key: getattr(self, key) for key in ARCHITECTURE_FIELDS if getattr(self, key) is not None}
        training = presets.overridden(training, **{f.name: getattr(self, f.name, None) for f in dataclasses.fields(CTRTrainConfig)})
        return self.runs(variants, architecture, code_dim), training

    def runs(self, variants: list[str], architecture: dict, code_dim: int) -> list["VariantRun"]:
        return [VariantRun(variant, variant, architecture) for variant in variants]


@dataclasses.dataclass(frozen=True)
class VariantRun:
    """One model a stage trains: `label` names it in the predictions and MLflow, `variant` is its
    kind (a key of VARIANTS), `architecture` the CTRConfig fields the data does not fix."""

    label: str
    variant: str
    architecture: dict


class CTRAblationsConfig(CTRModelConfig):
    """ctr_model's settings, with the preset of Table 3's ablations and Fig. 4's feature removals."""

    preset: Literal[presets.names("ctr")] = Field(default="ablation", description="ablation: Table 3's five variants and Fig. 4's two")


class MbaDimensionsConfig(CTRModelConfig):
    """Variants with MBA at narrower codebooks (Table 5: saviorrec): one model per variant and divisor of the RQ d."""

    preset: Literal[presets.names("ctr")] = Field(default="main", description="the architecture and training of every model")
    variants: list[str] | None = Field(default=[CHAMPION_VARIANT], description="trained at each MBA dimension; variants whose MBA starts from zero")
    divisors: list[int] = Field(default=[1, 2, 4, 8], description="MBA dimension = d / divisor (paper Table 5: 64, 32, 16, 8)")

    def runs(self, variants: list[str], architecture: dict, code_dim: int) -> list[VariantRun]:
        uneven = [d for d in self.divisors if d < 1 or code_dim % d]
        if uneven or not self.divisors:
            raise ValueError(f"mba_dimensions config: divisors {uneven or self.divisors} do not divide the RQ code dimension {code_dim}")
        fixed = [v for v in variants if not VARIANTS[v].mba or VARIANTS[v].mba_from_rq]
        if fixed:
            raise ValueError(f"mba_dimensions config: {fixed} have no MBA codebook of their own size (none, or the RQ codebooks')")
        return [VariantRun(mba_dimension_label(v, code_dim // d), v, {**architecture, "mba_dim": code_dim // d}) for v in variants for d in self.divisors]


def mba_dimension_label(variant: str, dim: int) -> str:
    return f"{variant}_mba_dim_{dim}"


@training_asset(
    RANKING_GROUP, ["ranking_dataset", "item_embeddings", "semantic_ids"],
    "Evaluation-window predictions of every CTR variant (impression key, variant, pctr, label, item pv, the variant's `model_uri`: models:/NAME/VERSION for the registered saviorrec, runs:/RUN_ID/model for a baseline).",
    check_specs=[dg.AssetCheckSpec(COVERAGE_CHECK, asset="ctr_model", description="one prediction per variant and kept evaluation impression")],
)
def ctr_model(
    context: dg.AssetExecutionContext, config: CTRModelConfig, ranking_dataset: pl.DataFrame,
    item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame, window: TrainEvalWindow, storage: ParquetStorage, tracking: MlflowTracking,
    compute: Compute,
) -> Iterator:
    stage = train_variants(context, config, ranking_dataset, item_embeddings, semantic_ids, window, storage, tracking, compute)
    yield dg.Output(stage.predictions, metadata=stage.metadata)
    counts = dict(stage.predictions.group_by("variant").len().iter_rows())
    yield dg.AssetCheckResult(
        check_name=COVERAGE_CHECK, passed=all(counts.get(v, 0) == stage.eval_rows for v in stage.variants),
        metadata={"eval_rows": stage.eval_rows, **{f"{v}_predictions": counts.get(v, 0) for v in stage.variants}},
    )


@training_asset(
    PAPER_GROUP, ["ranking_dataset", "item_embeddings", "semantic_ids"],
    "Paper Table 3: evaluation-window predictions of the ablation variants (each without one of MBA, the "
    "multimodal embedding, the bi-directional attention) beside base and saviorrec, trained as ctr_model trains; none registered.",
)
def ctr_ablations(
    context: dg.AssetExecutionContext, config: CTRAblationsConfig, ranking_dataset: pl.DataFrame,
    item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame, window: TrainEvalWindow, storage: ParquetStorage, tracking: MlflowTracking,
    compute: Compute,
) -> dg.Output[pl.DataFrame]:
    stage = train_variants(context, config, ranking_dataset, item_embeddings, semantic_ids, window, storage, tracking, compute, register=False)
    return dg.Output(stage.predictions, metadata=stage.metadata)


@training_asset(
    PAPER_GROUP, ["ranking_dataset", "item_embeddings", "semantic_ids"],
    "Paper Table 5: evaluation-window predictions of saviorrec with its MBA codebook at d, d/2, d/4, d/8 of the RQ d "
    "(`variant` saviorrec_mba_dim_<dim>), trained as ctr_model trains; none registered.",
)
def mba_dimensions(
    context: dg.AssetExecutionContext, config: MbaDimensionsConfig, ranking_dataset: pl.DataFrame,
    item_embeddings: pl.DataFrame, semantic_ids: pl.DataFrame, window: TrainEvalWindow, storage: ParquetStorage, tracking: MlflowTracking,
    compute: Compute,
) -> dg.Output[pl.DataFrame]:
    stage = train_variants(context, config, ranking_dataset, item_embeddings, semantic_ids, window, storage, tracking, compute, register=False)
    return dg.Output(stage.predictions, metadata=stage.metadata)


@dataclasses.dataclass
class TrainedVariants:
    predictions: pl.DataFrame  # every variant's, on the evaluation window
    metadata: dict  # the stage's Dagster metadata
    variants: list[str]  # the runs' labels
    eval_rows: int


def train_variants(
    context: dg.AssetExecutionContext, config: CTRModelConfig, ranking_dataset: pl.DataFrame, item_embeddings: pl.DataFrame,
    semantic_ids: pl.DataFrame, window: TrainEvalWindow, storage: ParquetStorage, tracking: MlflowTracking, compute: Compute, register: bool = True,
) -> TrainedVariants:
    """Every variant of `config` trained on the day's rows, each in an MLflow run nested under the
    stage's. With `register`, saviorrec is registered as the served model, and the variants go on
    from the champion's training states (`warm_start`); unregistered ablations start from scratch."""
    rqvae_uri = semantic_ids["model_uri"][0]
    rqvae, rqvae_saved = load_rqvae(rqvae_uri, tracking)
    runs, settings = config.setup(code_dim=rqvae.codebooks.shape[-1])
    variants = [run.label for run in runs]
    partition = context.partition_key
    start = warm_start(tracking, variants, partition, window, rqvae_saved.get("encoder_uri"), from_scratch=config.from_scratch or not register)
    context.log.info(f"{context.asset_key.to_user_string()} for {partition}: {start.reason}")
    inputs = ctr_inputs(ranking_dataset, item_embeddings, semantic_ids, rqvae.codebooks.detach().clone(), runs[0].architecture["user_buckets"],
                        config.use_base_pctr, f"ranking_dataset {partition}", vocabularies=start.vocabularies, train_after=start.train_after)
    settings = dataclasses.replace(settings, sequence_length=inputs.sequence_length)
    trained_days = sorted({str(day) for day in inputs.train_days})
    lineage = {"trained_through": str(window.training_days(partition)[-1]), "trained_days": trained_days,
               "encoder_uri": rqvae_saved.get("encoder_uri"), "rqvae_uri": rqvae_uri}
    checkpoints = StageCheckpoints(context, storage)
    stage = context.asset_key.to_user_string()
    with tracking.start_run(context, stage) as parent:
        parent.log_params({"variants": ",".join(variants), "train_rows": len(inputs.train), "eval_rows": len(inputs.evaluation),
                           "warm_start_from": start.source, "trained_days": ",".join(trained_days), **dataclasses.asdict(settings)})
        summary = [
            _train_and_register(context, tracking, parent, inputs, run, settings, checkpoints, register, start.models.get(run.label), lineage, compute)
            for run in runs
        ]
        parent.log_metrics({f"{row['variant']}_eval_auc": row["eval_auc"] for row in summary})
    uris = {row["variant"]: row["model_uri"] for row in summary}
    if register and CHAMPION_VARIANT in uris:
        # The gate promotes the registered variant; a warm start finds the others' states through it.
        tracking.tag_version(uris[CHAMPION_VARIANT], {VARIANT_MODELS_TAG: json.dumps(uris)})
    predictions = pl.concat(row.pop("predictions") for row in summary)
    return TrainedVariants(predictions, {
        "variants": ", ".join(variants), "eval_rows": len(inputs.evaluation), "train_rows": len(inputs.train),
        "warm_start_from": start.source, "warm_start_reason": start.reason, "trained_days": len(trained_days),
        "trained_day_list": ", ".join(trained_days) or "none",
        "mlflow_parent_run_id": parent.run_id, "results": dg.MetadataValue.md(_summary_markdown(summary)),
        **{f"{row['variant']}_{key}": row[key] for row in summary for key in ("epochs", "train_samples_per_s", "model_uri")},
        **{f"{row['variant']}_level_norms": dg.MetadataValue.md(markdown_image(f"{row['variant']}: norms per residual level", row["level_chart"]))
           for row in summary if row["level_chart"] is not None},
    }, variants, len(inputs.evaluation))


@dataclasses.dataclass
class StartingPoint:
    """Where the day's variants start: the champion's states (by variant) or scratch, and why."""

    source: str  # the champion's model URI, or "scratch"
    reason: str
    models: dict[str, Champion]  # empty from scratch
    vocabularies: dict[str, list[str]] | None = None  # the champion's profile vocabularies
    train_after: dt.date | None = None  # the last day the champion trained on


def warm_start(
    tracking: MlflowTracking, variants: list[str], partition: str, window: TrainEvalWindow, encoder_uri: str, from_scratch: bool,
) -> StartingPoint:
    """Go on from the champion's training states when there is a champion that has not trained
    through the partition's training window, on the embeddings of the day's encoder, unless
    `from_scratch`. Decided from config files; the states are downloaded only to go on.

    Any other encoder, even one refreshed from the champion's weights, has moved the embeddings
    under the champion's attention and DNN weights and most items' semantic IDs: measured on the
    default demo, a ranker warm-started across an encoder refresh scored 0.742 total AUC (0.745
    across one from initial weights) where one trained from scratch on the new embeddings scored
    0.787 (0.765), so the gate would hold every refresh back."""
    if from_scratch:
        return StartingPoint("scratch", "from_scratch: training fresh weights on the whole window", {})
    champion = tracking.champion(CTR_MODEL, "ctr_model")
    if champion is None:
        return StartingPoint("scratch", f"no {CTR_MODEL}@champion yet: training fresh weights on the whole window", {})
    companions = json.loads(champion.tags.get(VARIANT_MODELS_TAG, "{}"))
    missing = [v for v in variants if v not in companions]
    if missing:
        return StartingPoint("scratch", f"{champion.uri} has no trained state for {', '.join(missing)}: training fresh weights on the whole window", {})
    saved = tracking.load_model_config(champion.uri, CONFIG)  # every variant of a day shares its lineage
    if saved.get("encoder_uri") != encoder_uri:
        return StartingPoint("scratch", f"{champion.uri} was trained on the embeddings of {saved.get('encoder_uri')}, today's are of "
                             f"{encoder_uri}: training fresh weights on the whole window", {})
    through, last = dt.date.fromisoformat(saved["trained_through"]), window.training_days(partition)[-1]
    if through >= last:
        return StartingPoint("scratch", f"{champion.uri} trained through {through}, not before this window's last training day {last}: "
                             "training fresh weights on the whole window", {})
    models = {variant: load_champion(uri, tracking) for variant, uri in companions.items() if variant in variants}
    return StartingPoint(champion.uri, f"going on from {champion.uri} (trained through {through}) on the days after it",
                         models, saved["vocabularies"], through)


def _train_and_register(
    context: dg.AssetExecutionContext, tracking: MlflowTracking, parent: TrackedRun, inputs: CTRInputs, variant_run: VariantRun,
    settings: CTRTrainConfig, checkpoints: StageCheckpoints, register: bool, warm_from: Champion | None, lineage: dict, compute: Compute,
) -> dict:
    """One model in its own MLflow run, nested under the stage's: trained (from `warm_from`'s
    state when given), logged with its final training state (registered when `register` and the
    run is saviorrec itself), its evaluation-window predictions and its summary row."""
    variant = variant_run.label
    with tracking.start_run(context, f"{context.asset_key.to_user_string()}/{variant}", parent=parent) as run:
        with track_usage() as usage:
            trained = train_variant(inputs, variant_run.variant, variant_run.architecture, settings, warm_from=warm_from, checkpoints=checkpoints,
                                    on_epoch=epoch_reporter(context, run, f"{variant} "), trainer=compute.ctr_trainer())
        final = {"eval_auc": trained.training.history[-1].get("eval_auc", float("nan")), "eval_logloss": trained.training.history[-1]["eval_logloss"]}
        run.log_params({**trained.model.config.to_dict(), "label": variant, **dataclasses.asdict(settings), "epochs_chosen": trained.training.epochs})
        run.log_metrics(final | {"train_samples_per_s": trained.training.samples_per_s, "peak_rss_mib": usage.peak_rss_bytes / 2**20})
        level_chart = _log_level_norms(run, trained.model) if trained.model.variant.mba else None
        saved = {"architecture": trained.model.config.to_dict(), "vocabularies": inputs.vocabularies, "sequence_length": inputs.sequence_length,
                 "schedule": {"steps_done": trained.training.steps_done, "total_steps": trained.training.total_steps}, **lineage}
        files = {TRAINING_STATE: trained.training.final_state.to_bytes()}
        served = ranker_served(inputs.eval_rows, inputs.vocabularies, trained.model.config.use_base_pctr)
        if register and variant == CHAMPION_VARIANT:
            model_uri = run.log_registered_model(CTR_MODEL, served, trained.model.state_dict(), saved, CONFIG, tracking.origin_tags(context), files)
        else:
            run.log_model(served, trained.model.state_dict(), saved, CONFIG, files=files)
            model_uri = f"runs:/{run.run_id}/model"
    predictions = inputs.eval_rows.select(
        "user_id", "item_id", "ts", pl.lit(variant).alias("variant"), pl.Series("pctr", trained.scores, dtype=pl.Float32),
        pl.col("clicked").cast(pl.Int8).alias("label"), "pv", pl.lit(model_uri).alias("model_uri"),
    )
    return final | {
        "variant": variant, "training": trained.training, "epochs": trained.training.epochs, "train_samples_per_s": round(trained.training.samples_per_s),
        "peak_rss_mib": usage.peak_rss_bytes / 2**20, "resumed_from": checkpoints.latest, "run_id": run.run_id, "model_uri": model_uri,
        "predictions": predictions, "level_chart": level_chart,
    }


def _log_level_norms(run: TrackedRun, model: CTRModel) -> bytes:
    """Fig. 3 of a model with MBA: per level, its codebook rows' and fusion weights' norms, as
    MLflow metrics and a chart (logged, and returned for the asset's metadata)."""
    rows, weights = (values.tolist() for values in model.mba.level_norms())
    run.log_metrics({f"fig3_{name}_level_{l + 1}": value for name, curve in (("codebook_norm", rows), ("fusion_weight_norm", weights))
                     for l, value in enumerate(curve)})
    levels = range(1, len(rows) + 1)
    with figure(4.5, 3) as (axis, out):
        axis.plot(levels, rows, marker="o", label="MBA codebook rows")
        axis.plot(levels, weights, marker="s", label="fusion MLP input weights")
        axis.set_xticks(list(levels))
        axis.set_ylim(0, 1.05)  # from zero, so the levels' ratios read as drawn
        axis.set_xlabel("residual level")
        axis.set_ylabel("mean L2 norm / largest level's")
        axis.legend(fontsize="small")
    run.log_files({"level_norms.png": out["png"]}, "fig3")
    return out["png"]


def _summary_markdown(summary: list[dict]) -> str:
    rows = []
    for row in summary:
        training = row["training"]
        curve = " ".join(f"{f['validation_auc']:.4f}" if "validation_auc" in f else "n/a" for f in training.selection)
        chosen = f"{training.epochs} ({curve})" if training.selection else f"{training.epochs} (set)"
        rows.append((row["variant"], f"{row['eval_auc']:.4f}", f"{row['eval_logloss']:.4f}", chosen, row["train_samples_per_s"],
                     f"{row['peak_rss_mib']:.0f}", row["resumed_from"], row["model_uri"], row["run_id"]))
    header = ["variant", "eval AUC", "eval log loss", "epochs (held-out AUC per epoch)", "train samples/s", "peak RSS MiB", "resumed from", "model", "MLflow run"]
    return table(header, rows)


def load_champion(model_uri: str, tracking: MlflowTracking) -> Champion:
    """A CTR model with its final training state, to go on from."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    state = Checkpoint.from_bytes(tracking.load_model_file(model_uri, TRAINING_STATE))
    schedule = saved["schedule"]
    return Champion(CTRConfig.from_dict(saved["architecture"]), weights, state, schedule["steps_done"], schedule["total_steps"], model_uri)


def load_ctr_model(model_uri: str, tracking: MlflowTracking) -> tuple[CTRModel, dict]:
    """A CTR model, `models:/NAME/VERSION` (registered) or `runs:/RUN_ID/model` (a baseline), rebuilt
    from code and its safetensors weights (item tables included), and its saved config."""
    saved, weights = tracking.load_model_files(model_uri, CONFIG)
    model = CTRModel(CTRConfig.from_dict(saved["architecture"]))
    model.load_state_dict(weights)
    return model.eval(), saved

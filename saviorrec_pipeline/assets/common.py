"""What the stage assets share: their groups and the training pool, progress reports to the Dagster
log and MLflow, the checkpoints of a stage's training runs, and when a model is due to retrain."""

import datetime as dt
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from saviorrec_pipeline.checkpoints import CheckpointFile
from saviorrec_pipeline.markdown import table
from saviorrec_pipeline.method.training import EpochReport, StepReport, shapes_differing
from saviorrec_pipeline.partitions import SETTINGS, daily_partitions
from saviorrec_pipeline.resources.storage import ParquetStorage
from saviorrec_pipeline.resources.tracking import ChampionVersion, MlflowTracking, TrackedRun

RAW_GROUP, SAVIORENC_GROUP, RANKING_GROUP = "raw", "saviorenc", "ranking"
PAPER_GROUP = "paper_tables"  # the paper's comparisons, built on demand by the paper_tables job, not daily
# Stages that train a model carry this pool; dagster.yaml limits it to one step at a time, so two
# trainings never share the machine, whether in one run or in several.
TRAINING_POOL = "training"


def engine_metadata(engine: str, shard_reports: list[dict]) -> dict:
    """Which engine ran a stage and, on Ray, a table of what each shard's task did."""
    out: dict = {"engine": engine}
    if shard_reports:
        out["shards"] = dg.MetadataValue.md(table(["step", "shard", "rows", "seconds", "peak RSS MiB", "added MiB"], [list(r.values()) for r in shard_reports], 4))
        out["max_shard_peak_rss_mib"] = max(r["peak_rss_mib"] for r in shard_reports)
    return out


def training_asset(group: str, inputs: list[str], description: str, **asset_arguments):
    """A stage that trains: one Parquet file per day, upstream assets by name, the training pool."""
    return dg.asset(
        group_name=group, partitions_def=daily_partitions, io_manager_key="parquet_io_manager",
        ins={name: dg.AssetIn() for name in inputs}, pool=TRAINING_POOL, description=description, **asset_arguments,
    )


def epoch_reporter(context: dg.AssetExecutionContext, run: TrackedRun | None, label: str = ""):
    """Each epoch's figures to MLflow as `{phase}_{figure}` (with `{phase}_examples_per_s`), and to
    the Dagster log for about ten epochs of each phase and its last."""

    def report(epoch: EpochReport) -> None:
        if run is not None:
            throughput = epoch.examples / max(epoch.seconds, 1e-9)
            run.log_metrics({f"{epoch.phase}_{k}": v for k, v in epoch.figures.items()} | {f"{epoch.phase}_examples_per_s": throughput}, step=epoch.epoch)
        if epoch.epoch % max(1, epoch.epochs // 10) == 0 or epoch.epoch == epoch.epochs - 1:
            figures = ", ".join(f"{k} {v:.4g}" for k, v in epoch.figures.items())
            context.log.info(f"{label}{epoch.phase} epoch {epoch.epoch + 1}/{epoch.epochs}: {figures}")

    return report


def step_reporter(context: dg.AssetExecutionContext):
    """Four lines an epoch to the Dagster log, for stages whose epochs are long."""

    def report(step: StepReport) -> None:
        if step.step % max(1, step.steps // 4) == 0 or step.step == step.steps - 1:
            context.log.info(f"{step.phase} epoch {step.epoch + 1} step {step.step + 1}/{step.steps} loss {step.loss:.4f}")

    return report


class StageCheckpoints:
    """The checkpoint of each of a stage's training runs for this partition, by name (a run's
    fingerprint), remembering where each resumed: `start`, or the phase and epoch it went on from."""

    def __init__(self, context: dg.AssetExecutionContext, storage: ParquetStorage):
        self.context, self.storage = context, storage
        self.resumed_from: dict[str, str] = {}
        self.latest = "start"  # where the latest run asked for resumed

    def __call__(self, name: str) -> CheckpointFile:
        file = self.storage.checkpoint(self.context.asset_key.path[-1], self.context.partition_key, name)
        saved = file.saved_position()
        self.resumed_from[name] = "start" if saved is None else f"{saved[0]} epoch {saved[1]}"
        self.latest = self.resumed_from[name]
        if saved is not None:
            self.context.log.info(f"resuming from the checkpoint after {self.resumed_from[name]}: {file.uri}")
        return file

    def summary(self) -> str:
        """Where the stage's runs started, in one metadata value."""
        return ", ".join(dict.fromkeys(self.resumed_from.values())) or "start"


@dataclass(frozen=True)
class Refresh:
    """Whether a stage trains its model today or reuses the champion's, and why."""

    train: bool
    champion: ChampionVersion | None
    reason: str


def refresh_due(tracking: MlflowTracking, name: str, stage: str, partition: str, every_days: int, requested: bool) -> Refresh:
    """Train on the first partition, when asked, or when the last version trained (promoted or
    not) was trained for a day at least `every_days` before `partition`; otherwise reuse the
    champion. Counting from the last version trained, not the champion's, means a refresh the gate
    held back waits for the next one instead of retraining every day."""
    champion = tracking.champion(name, stage)
    if champion is None:
        return Refresh(True, None, f"no {name}@champion yet")
    if requested:
        return Refresh(True, champion, "refresh requested")
    last = tracking.last_trained_for(name, stage, until=partition) or champion.partition or partition
    age = (dt.date.fromisoformat(partition) - dt.date.fromisoformat(last)).days
    return Refresh(age >= every_days, champion, f"{name}@champion is version {champion.version} (trained for {champion.partition}); "
                   f"the last {name} was trained for {last}, {age} days back; refresh every {every_days}")


class RefreshConfig(dg.Config):
    """When the stage's model retrains (the rest of the time the champion's is reused), and from what."""

    refresh: bool = Field(default=False, description="train a new model today, whatever the champion's age")
    refresh_days: int = Field(
        default=SETTINGS.refresh_days, ge=1,
        description="retrain when the last model was trained for a day this many days back (SAVIORREC_REFRESH_DAYS, 7)",
    )
    refresh_from_champion: bool = Field(
        default=True,
        description="a refresh goes on from the champion's weights when its architecture is today's (the encoder skips domain "
        "adaptation, the RQ-VAE its warm-up and k-means); false: from initial weights",
    )


@dataclass(frozen=True)
class TrainingStart:
    """The weights a refresh trains from: the champion's, or none (initial weights), and why."""

    weights: dict | None
    source: str  # the champion's model URI, or "initial weights"
    lineage: list[str]  # the models the new one goes on from, nearest first: [] from initial weights


def refresh_start(due: Refresh, from_champion: bool, architecture: dict, config_file: str, tracking: MlflowTracking) -> TrainingStart:
    """Go on from the champion's weights when asked to and its architecture is today's."""
    if due.champion is None or not from_champion:
        return TrainingStart(None, "initial weights", [])
    saved, weights = tracking.load_model_files(due.champion.uri, config_file)
    if shapes_differing(saved["architecture"], architecture):
        return TrainingStart(None, f"initial weights ({due.champion.uri} has another architecture)", [])
    return TrainingStart(weights, due.champion.uri, [due.champion.uri, *saved.get("continued_from", [])])

"""MLflow tracking for every trained model: runs tagged with their Dagster origin, registered models.

The embedded default is a SQLite store with local artifacts under SAVIORREC_HOME;
MLFLOW_TRACKING_URI points at a server instead. Models are logged as MLflow pyfunc models built
from code (`serving.pyfunc`): their artifacts are safetensors weights plus a JSON config, and
loading one rebuilds the module from this package's code, never unpickling anything.
"""

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import dagster as dg
import requests
from mlflow.entities import Metric, Param, RunStatus, ViewType
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from saviorrec_pipeline.serving.pyfunc import ServedModel

# On a tracking server, MLflow prints "View run ... at: <tracking URI>" to stdout as each run ends;
# the URI may hold credentials, and Dagster keeps a step's stdout in its compute logs.
os.environ.setdefault(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name, "true")
# MLflow retries a failed request 7 times with a backoff factor of 2: about 4 minutes per request
# before a stage learns that its tracking server is down. 4 retries with factor 1 (waits of 0, 2, 4
# and 8 s, each plus up to 1 s of jitter) ride out a restart of the server and fail in about 15 s.
os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "4")
os.environ.setdefault(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name, "1")

# What MLflow calls raise when the tracking server fails or cannot be reached.
TRACKING_ERRORS = (MlflowException, requests.RequestException)

EXPERIMENT = "saviorrec"
CHAMPION = "champion"  # the registered-model alias of the version in use
_PARAMS_PER_REQUEST = 100  # MLflow's limit for one log_batch call
MODEL_WEIGHTS = "model.safetensors"
MODEL_FILES = "artifacts"  # in a logged model's directory: its weights, JSON config and further files


class TrackingError(RuntimeError):
    """An MLflow call failed; the message names the stage and the tracking URI, without credentials."""


def without_credentials(uri: str) -> str:
    """`uri` without the user and password a server URI may hold (`https://user:token@host/`)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def step_tags(dagster_run_id: str, asset: str, partition: str | None) -> dict[str, str]:
    """The tags that tie an MLflow run (and the model versions it registers) to one Dagster step."""
    tags = {"dagster.run_id": dagster_run_id, "dagster.asset": asset}
    if partition is not None:
        tags["dagster.partition"] = partition
    return tags


class TrackedRun:
    """One MLflow run, written through an explicit client (no global MLflow state)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        entries = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(entries), _PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=entries[start : start + _PARAMS_PER_REQUEST])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def artifact_uri(self, artifact_path: str) -> str:
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"

    def log_files(self, files: dict[str, bytes], artifact_path: str) -> str:
        """`files` (name: bytes) as artifacts under `artifact_path`; their artifact URI."""
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
            self.client.log_artifacts(self.run_id, folder, artifact_path)
        return self.artifact_uri(artifact_path)

    def log_model(
        self, served: "ServedModel", state_dict: dict, config: dict, config_file: str, artifact_path: str = "model",
        files: dict[str, bytes] | None = None,
    ) -> str:
        """An MLflow model under `artifact_path` (`served`: its class file, signature and input
        example), its artifacts the weights as safetensors, the JSON config and any further `files`
        (name: bytes); its artifact URI."""
        with tempfile.TemporaryDirectory() as folder:
            sources = Path(folder, "files")
            sources.mkdir()
            save_file(state_dict, sources / MODEL_WEIGHTS)
            for name, data in {config_file: json.dumps(config).encode(), **(files or {})}.items():
                (sources / name).write_bytes(data)
            served.save(Path(folder, "model"), sources / MODEL_WEIGHTS, sources / config_file, {name: sources / name for name in files or {}})
            self.client.log_artifacts(self.run_id, str(Path(folder, "model")), artifact_path)
        return self.artifact_uri(artifact_path)

    def register(self, name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """Register the run's `artifact_path` as a new version of model `name`; its version."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source=self.artifact_uri(artifact_path), run_id=self.run_id, tags=tags)
        return version.version

    def log_registered_model(
        self, name: str, served: "ServedModel", state_dict: dict, config: dict, config_file: str, tags: dict[str, str],
        files: dict[str, bytes] | None = None,
    ) -> str:
        """Log the model (`log_model`) and register it as a new version of `name`: its URI,
        `models:/NAME/VERSION`, the one way an asset's output refers to a trained model."""
        self.log_model(served, state_dict, config, config_file, files=files)
        return f"models:/{name}/{self.register(name, 'model', tags)}"


@dataclass(frozen=True)
class ChampionVersion:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def partition(self) -> str | None:
        """The day whose chain trained it."""
        return self.tags.get("dagster.partition")


class MlflowTracking(dg.ConfigurableResource):
    """Where runs and models go: MLFLOW_TRACKING_URI, or SQLite under SAVIORREC_HOME."""

    tracking_uri: str
    artifact_root: str

    def client(self) -> MlflowClient:
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _experiment_id(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        # A server chooses its own artifact store; a local store gets one under the project home.
        local = not self.tracking_uri.startswith(("http://", "https://", "databricks"))
        return client.create_experiment(EXPERIMENT, artifact_location=self.artifact_root if local else None)

    def origin_tags(self, context: dg.AssetExecutionContext) -> dict[str, str]:
        return step_tags(context.run.run_id, context.asset_key.to_user_string(), context.partition_key if context.has_partition_key else None)

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, parent: TrackedRun | None = None) -> Iterator[TrackedRun]:
        """A run tagged with the Dagster run id, asset and partition (nested under `parent` when
        given); FAILED if the block raises, and when the step's outermost run fails, whatever the
        step registered is withdrawn. A failing MLflow call raises TrackingError."""
        stage = context.asset_key.to_user_string()
        client = self.client()
        tags = self.origin_tags(context) | ({"mlflow.parentRunId": parent.run_id} if parent else {})
        with self._reporting(f"{stage} could not start its MLflow run"):
            run = client.create_run(self._experiment_id(client), run_name=run_name, tags=tags)
        try:
            yield TrackedRun(client, run.info.run_id)
        except BaseException as exc:
            if parent is None:
                partition = context.partition_key if context.has_partition_key else None
                self.withdraw_failed_step(context.log, context.run.run_id, stage, partition)
            else:
                with _logged(context.log), self._reporting(stage):
                    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            if isinstance(exc, TRACKING_ERRORS):
                raise self._error(stage, exc) from None
            raise
        with self._reporting(f"{stage} could not end its MLflow run"):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def withdraw_failed_step(self, log: dg.DagsterLogManager, dagster_run_id: str, asset: str, partition: str | None) -> None:
        """Undo what a failed step left in MLflow: delete the model versions its runs registered and
        end those runs FAILED, so that no registered model comes from a failed stage. Logged; if
        MLflow cannot be reached this only logs why: the step is failing already, for its own reason."""
        with _logged(log), self._reporting(f"{asset}: could not withdraw what this failed step registered"):
            client = self.client()
            experiment = client.get_experiment_by_name(EXPERIMENT)
            query = " AND ".join(f"tags.`{key}` = '{value}'" for key, value in step_tags(dagster_run_id, asset, partition).items())
            runs = client.search_runs([experiment.experiment_id], query, run_view_type=ViewType.ALL) if experiment else []
            for run in runs:
                for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
                    client.delete_model_version(version.name, version.version)
                    log.warning(f"{asset} failed: withdrew model {version.name} version {version.version} (MLflow run {run.info.run_id})")
                if run.info.status != RunStatus.to_string(RunStatus.FAILED):
                    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))

    @contextmanager
    def _reporting(self, what: str) -> Iterator[None]:
        """An MLflow failure in the block raised as a TrackingError that names `what`."""
        try:
            yield
        except TRACKING_ERRORS as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: BaseException) -> TrackingError:
        """`exc` as a TrackingError naming `what` and the tracking URI; MLflow's own message names the
        URI with whatever credentials it holds, so those are cut out of it, and it is not chained."""
        message = str(exc)
        netloc = urlsplit(self.tracking_uri).netloc
        if "@" in netloc:
            userinfo = netloc.rsplit("@", 1)[0]
            message = message.replace(f"{userinfo}@", "")
            password = userinfo.partition(":")[2]
            for secret in {password, unquote(password)} - {""}:
                message = message.replace(secret, "***")
        return TrackingError(f"{what}: MLflow tracking at {without_credentials(self.tracking_uri)} failed: {message}")

    def champion(self, name: str, stage: str) -> "ChampionVersion | None":
        """The version of registered model `name` that the alias `champion` points at, or None; a
        failing MLflow call raises TrackingError naming `stage`."""
        with self._reporting(f"{stage} could not look up {name}@{CHAMPION}"):
            client = self.client()
            try:
                version = client.get_model_version_by_alias(name, CHAMPION)
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower():
                    return None
                raise
        return ChampionVersion(name, str(version.version), version.run_id, version.tags)

    def last_trained_for(self, name: str, stage: str, until: str) -> str | None:
        """The latest day, not after `until`, for which a version of `name` was trained (promoted or
        not), or None."""
        with self._reporting(f"{stage} could not list the versions of {name}"):
            days = [v.tags.get("dagster.partition") for v in self.client().search_model_versions(f"name = '{name}'")]
        return max((day for day in days if day and day <= until), default=None)

    def promote(self, name: str, version: str) -> None:
        """Point the alias `champion` of `name` at `version` (the model that serves from now on)."""
        with self._reporting(f"promoting {name} version {version}"):
            self.client().set_registered_model_alias(name, CHAMPION, version)

    def tag_version(self, model_uri: str, tags: dict[str, str]) -> None:
        """Set tags on the registered version `models:/NAME/VERSION`."""
        name, version = model_uri.removeprefix("models:/").split("/")
        with self._reporting(f"tagging {model_uri}"):
            client = self.client()
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, str(value))

    def load_model_files(self, model_uri: str, config_file: str) -> tuple[dict, dict]:
        """(config, state dict) of a model logged by `TrackedRun.log_model`, without the files
        beside them; nothing is unpickled."""
        with tempfile.TemporaryDirectory() as folder:
            weights = self.download(f"{model_uri}/{MODEL_FILES}/{MODEL_WEIGHTS}", Path(folder))
            return self.load_model_config(model_uri, config_file), load_file(weights)

    def load_model_config(self, model_uri: str, config_file: str) -> dict:
        """A logged model's JSON config alone."""
        return json.loads(self.load_model_file(model_uri, config_file))

    def load_model_file(self, model_uri: str, name: str) -> bytes:
        """One of a logged model's artifacts (its config, `log_model`'s `files`)."""
        with tempfile.TemporaryDirectory() as folder:
            return self.download(f"{model_uri}/{MODEL_FILES}/{name}", Path(folder)).read_bytes()

    def download(self, artifact_uri: str, into: Path) -> Path:
        """Artifacts of a logged model as local files; `models:/NAME/VERSION` or `models:/NAME@ALIAS`
        (and a path inside it) resolves through this resource's registry, not MLflow's process-wide default."""
        from mlflow.artifacts import download_artifacts

        with self._reporting(f"loading {artifact_uri}"):
            if artifact_uri.startswith("models:/"):
                client = self.client()
                name, *rest = artifact_uri.removeprefix("models:/").split("/")
                if "@" in name:
                    name, alias = name.split("@", 1)
                    version = client.get_model_version_by_alias(name, alias).version
                else:
                    version, *rest = rest
                artifact_uri = "/".join([client.get_model_version_download_uri(name, version), *rest])
            os.makedirs(into, exist_ok=True)
            return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(into), tracking_uri=self.tracking_uri))


@contextmanager
def _logged(log: dg.DagsterLogManager) -> Iterator[None]:
    """A TrackingError in the block logged as a warning instead of raised (cleanup of a failing step)."""
    try:
        yield
    except TrackingError as exc:
        log.warning(str(exc))

"""MLflow tracking for every trained model: runs tagged with their Dagster origin, registered models.

The embedded default is a SQLite store with local artifacts under SAVIORREC_HOME;
MLFLOW_TRACKING_URI points at a server instead. Models are logged as plain files (safetensors
weights plus a JSON config) and rebuilt from code, so loading one never unpickles anything.
"""

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
from mlflow.entities import Metric, Param, RunStatus
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

# On a tracking server, MLflow prints "View run ... at: <tracking URI>" to stdout as each run ends;
# the URI may hold credentials, and Dagster keeps a step's stdout in its compute logs.
os.environ.setdefault(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name, "true")

EXPERIMENT = "saviorrec"
_PARAMS_PER_REQUEST = 100  # MLflow's limit for one log_batch call
MODEL_WEIGHTS = "model.safetensors"


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

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> str:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        return self.artifact_uri(artifact_path)

    def log_model(self, state_dict: dict, config: dict, config_file: str, artifact_path: str = "model") -> str:
        """Weights as safetensors plus a JSON config under `artifact_path`; its artifact URI."""
        with tempfile.TemporaryDirectory() as folder:
            save_file(state_dict, f"{folder}/{MODEL_WEIGHTS}")
            Path(folder, config_file).write_text(json.dumps(config))
            return self.log_artifacts(Path(folder), artifact_path)

    def register(self, name: str, artifact_path: str, tags: dict[str, str]) -> str:
        """Register the run's `artifact_path` as a new version of model `name`; its version."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source=self.artifact_uri(artifact_path), run_id=self.run_id, tags=tags)
        return version.version


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
        tags = {"dagster.run_id": context.run.run_id, "dagster.asset": context.asset_key.to_user_string()}
        if context.has_partition_key:
            tags["dagster.partition"] = context.partition_key
        return tags

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str, parent: TrackedRun | None = None) -> Iterator[TrackedRun]:
        """A run tagged with the Dagster run id, asset and partition (nested under `parent` when
        given); FAILED if the block raises."""
        client = self.client()
        tags = self.origin_tags(context) | ({"mlflow.parentRunId": parent.run_id} if parent else {})
        run = client.create_run(self._experiment_id(client), run_name=run_name, tags=tags)
        tracked = TrackedRun(client, run.info.run_id)
        try:
            yield tracked
        except BaseException:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def load_model_files(self, model_uri: str, config_file: str) -> tuple[dict, dict]:
        """(config, state dict) of a model logged by `TrackedRun.log_model`; nothing is unpickled."""
        with tempfile.TemporaryDirectory() as folder:
            local = self.download(model_uri, Path(folder))
            return json.loads((local / config_file).read_text()), load_file(local / MODEL_WEIGHTS)

    def download(self, artifact_uri: str, into: Path) -> Path:
        """Artifacts of a logged model as local files; `models:/NAME/VERSION` resolves through this
        resource's registry, not MLflow's process-wide default."""
        from mlflow.artifacts import download_artifacts

        if artifact_uri.startswith("models:/"):
            name, version = artifact_uri.removeprefix("models:/").rsplit("/", 1)
            artifact_uri = self.client().get_model_version_download_uri(name, version)
        os.makedirs(into, exist_ok=True)
        return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(into), tracking_uri=self.tracking_uri))

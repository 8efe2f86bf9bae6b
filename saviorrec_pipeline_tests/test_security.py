"""Security basics: planted credentials appear in no log, Dagster record or MLflow entry; no model is
unpickled; no partition key or name leaves the storage root; the compose file publishes nothing
beyond loopback and ships no usable password (test_deployment.py checks the rest of it)."""

import ast
import dataclasses
import datetime as dt
import io
import json
import pickle
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import _pickle
import dagster as dg
import mlflow
import polars as pl
import pytest
import s3fs
import torch
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import serialize_value
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.ctr_model import CONFIG as CTR_CONFIG
from saviorrec_pipeline.assets.ctr_model import CTR_MODEL, load_ctr_model
from saviorrec_pipeline.assets.encoder import CONFIG as ENCODER_CONFIG
from saviorrec_pipeline.assets.encoder import item_embeddings, load_encoder
from saviorrec_pipeline.assets.semantic_ids import CONFIG as RQVAE_CONFIG
from saviorrec_pipeline.assets.semantic_ids import RQVAE_MODEL, load_rqvae
from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline.method.ctr_model import CTRConfig, CTRModel
from saviorrec_pipeline import presets
from saviorrec_pipeline.method.encoder_training import build_model
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig
from saviorrec_pipeline.partitions import TrainEvalWindow, daily_partitions
from saviorrec_pipeline.resources.compute import Compute
from saviorrec_pipeline.resources.raw import RawStore
from saviorrec_pipeline.resources.storage import ParquetIOManager, ParquetStorage, safe_name
from saviorrec_pipeline.resources.tracking import MlflowTracking, TrackedRun
from saviorrec_pipeline.serving.pyfunc import ServedModel, item_encoder_served, ranker_served, rqvae_served
from saviorrec_pipeline_tests.deployment_files import REPO, compose_config, env_example
from saviorrec_pipeline_tests.services import (
    isolated_environ, project_env, start_mlflow_server, start_seaweedfs, stop, wait_until,
)

TINY, TINY_TRAINING = presets.encoder("tiny")
SPEC = DemoSpec(start_date=dt.date(2025, 7, 1), days=4, users=150, items=120, seed=13)
EVAL_DAY = (SPEC.start_date + dt.timedelta(days=SPEC.days - 1)).isoformat()
FAST_ENCODER = {"epochs": 1, "batch_size": 64, "domain_adaptation_epochs": 0}


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security-demo") / "raw"
    generate_demo(root, SPEC)
    return root


# --- 1. Credentials ------------------------------------------------------------------------------

# `dagster` run with every Python logger at DEBUG on stderr (botocore, s3fs, urllib3, MLflow,
# Dagster): whatever any library would log at any level is in the captured output. Once the
# definitions are loaded it writes what Dagster's UI serves about the code location (resources and
# their configured values), then waits for the file `go` (the services start meanwhile).
_DAGSTER_AT_DEBUG = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from saviorrec_pipeline.definitions import defs
snapshot, go, *args = sys.argv[1:]
Path(snapshot).write_text(serialize_value(RepositorySnap.from_def(defs.get_repository_def())))
deadline = time.monotonic() + 120
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("no go file after 120 s")
    time.sleep(0.1)
from dagster._cli import main
sys.argv = ["dagster", *args]
sys.exit(main())
"""


def _files_text(root: Path, skip: tuple[Path, ...] = ()) -> list[tuple[str, str]]:
    """Every file under `root` as text (bytes decoded leniently: SQLite keeps strings as UTF-8)."""
    return [
        (str(path), path.read_bytes().decode("utf-8", "replace"))
        for path in sorted(root.rglob("*"))
        if path.is_file() and not any(path.is_relative_to(s) for s in skip)
    ]


def _dagster_records(dagster_home: Path) -> list[tuple[str, str]]:
    """Runs, their job and execution-plan snapshots (kept compressed, so not seen by a byte scan)
    and every event-log entry (messages, metadata, errors) of the instance."""
    found = []
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        runs = instance.get_runs()
        assert runs, f"no run recorded in {dagster_home}"
        for run in runs:
            found.append((f"run {run.run_id}", serialize_value(run)))
            found.append((f"job snapshot of {run.run_id}", serialize_value(instance.get_job_snapshot(run.job_snapshot_id))))
            plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
            found.append((f"execution plan of {run.run_id}", serialize_value(plan)))
            for entry in instance.all_logs(run.run_id):
                found.append((f"event {entry.dagster_event_type or 'log'} of {run.run_id}", serialize_value(entry)))
    return found


def _mlflow_records(client: MlflowClient) -> list[tuple[str, str]]:
    """Every run's params, tags, metric names and info, every registered model and version."""
    found = []
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        found.append((f"experiment {experiment.name}", json.dumps([experiment.name, experiment.artifact_location, experiment.tags])))
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
            data = [run.data.params, run.data.tags, sorted(run.data.metrics), str(run.info.to_proto())]
            found.append((f"mlflow run {run.info.run_name}", json.dumps(data)))
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            entry = [version.source, version.tags, version.description, version.run_link]
            found.append((f"model {model.name} v{version.version}", json.dumps(entry)))
    return found


def _stored_objects(fs: s3fs.S3FileSystem, prefix: str) -> list[tuple[str, str]]:
    """Every object the run wrote under `prefix`: its bytes and its string columns."""
    found = []
    for key in fs.find(prefix):
        data = fs.cat(key)
        text = data.decode("utf-8", "replace")
        if key.endswith(".parquet"):
            frame = pl.read_parquet(io.BytesIO(data))
            text += json.dumps(frame.select(pl.col(pl.String)).rows())
        found.append((f"s3://{key}", text))
    return found


@pytest.mark.integration
def test_planted_credentials_appear_in_no_log_record_or_tracking_entry(demo_raw, tmp_path):
    """The S3 secret key and a password in MLFLOW_TRACKING_URI are real and work (a SeaweedFS that
    takes only that key; an MLflow server reached through a URI with user and password), the chain up
    to item_embeddings runs through `dagster` on the real definitions, and neither string appears in
    its output, Python's logs at DEBUG, anything in the Dagster instance or the MLflow store, the
    UI's view of the resources, or the stored outputs."""
    s3_secret = f"planted-s3-{secrets.token_hex(12)}"
    mlflow_password = f"planted-pw-{secrets.token_hex(12)}"
    weed, s3 = start_seaweedfs(tmp_path / "seaweedfs", secret_key=s3_secret)
    mlflow_dir = tmp_path / "mlflow-server"
    mlflow, mlflow_url = start_mlflow_server(
        mlflow_dir, f"sqlite:///{mlflow_dir}/mlflow.db", str(mlflow_dir / "artifacts"), isolated_environ()
    )
    home = tmp_path / "home"
    (home / "dagster").mkdir(parents=True)
    env = {
        **project_env(home, SPEC.start_date, train_days=SPEC.days - 1),
        **s3.env(),
        "SAVIORREC_RAW_ROOT": "s3://security/raw",
        "SAVIORREC_STORAGE_ROOT": "s3://security/storage",
        "MLFLOW_TRACKING_URI": mlflow_url.replace("http://", f"http://saviorrec:{mlflow_password}@"),
    }
    repository_file, go = tmp_path / "repository-snapshot.json", tmp_path / "go"
    output, errors = tmp_path / "dagster.stdout", tmp_path / "dagster.stderr"
    selection = "impressions,item_catalog,user_profiles,coclick_pairs,item_encoder,item_embeddings"
    with output.open("w") as out, errors.open("w") as err:
        dagster = subprocess.Popen(
            [sys.executable, "-c", _DAGSTER_AT_DEBUG, str(repository_file), str(go), "asset", "materialize",
             "-m", "saviorrec_pipeline.definitions", "--select", selection, "--partition", EVAL_DAY,
             "--config-json", json.dumps({"ops": {"item_encoder": {"config": FAST_ENCODER}}})],
            env=env, cwd=tmp_path, stdout=out, stderr=err, start_new_session=True,
        )
    try:
        fs = s3fs.S3FileSystem(key=s3.access_key, secret=s3.secret_key, endpoint_url=s3.endpoint_url)
        wait_until(lambda: fs.exists("security") or fs.mkdir("security") or True, "SeaweedFS S3 gateway", weed, tmp_path / "seaweedfs" / "weed.log")
        wait_until(lambda: urllib.request.urlopen(f"{mlflow_url}/health", timeout=2).status == 200, "MLflow server", mlflow, mlflow_dir / "mlflow.log")
        fs.put(str(demo_raw), "security/raw", recursive=True)
        go.touch()
        dagster.wait(timeout=300)
        stdout, stderr = output.read_text(), errors.read_text()
        assert dagster.returncode == 0, f"materialization failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"

        # The run really used both: outputs on S3, an encoder run with params in the MLflow server.
        assert fs.exists(f"security/storage/item_embeddings/{EVAL_DAY}.parquet")
        client = MlflowClient(tracking_uri=mlflow_url)
        [encoder_run] = client.search_runs([client.get_experiment_by_name("saviorrec").experiment_id], "tags.`mlflow.runName` = 'item_encoder'")
        assert encoder_run.data.params["preset"] == "tiny"

        places = [("stdout", stdout), ("stderr (Python logging at DEBUG)", stderr)]
        places += [("the UI's view of the code location", repository_file.read_text())]
        places += _dagster_records(home / "dagster")
        places += _files_text(tmp_path, skip=(tmp_path / "seaweedfs",))  # the S3 server's own config holds the key
        places += _mlflow_records(client)
        places += _stored_objects(fs, "security")
    finally:
        # Everything was read above: the servers (seconds to stop on SIGTERM) need no clean exit.
        for process in (dagster, mlflow, weed):
            stop(process, timeout_s=5, sig=signal.SIGKILL)

    # The places searched are the ones that would show them: library logs at DEBUG, the resources'
    # configuration (the storage root is there), the assets' metadata.
    everything = "\n".join(text for _, text in places)
    assert "botocore" in stderr and "s3://security/storage" in dict(places)["the UI's view of the code location"]
    assert "pairs_kept" in everything and "loss_last_epoch" in everything
    for name, secret in (("AWS_SECRET_ACCESS_KEY", s3_secret), ("the MLFLOW_TRACKING_URI password", mlflow_password)):
        leaks = [place for place, text in places if secret in text]
        assert not leaks, f"{name} appears in: {leaks}"


# --- 2. No unpickling ----------------------------------------------------------------------------


@contextmanager
def _unpickling_refused():
    """pickle's and torch's loaders raise (and are recorded) while the block runs."""
    calls = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: a model was unpickled")

        return refused

    with pytest.MonkeyPatch.context() as patch:
        for module, attribute in [
            (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (_pickle, "load"), (_pickle, "loads"),
            (_pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load"),
        ]:
            patch.setattr(module, attribute, refuse(f"{module.__name__}.{attribute}"))
        yield calls


def _log_model(tracking: MlflowTracking, name: str, served: ServedModel, state_dict: dict, config: dict, config_file: str) -> tuple[str, str]:
    client = tracking.client()
    run = TrackedRun(client, client.create_run(tracking._experiment_id(client), run_name=name).info.run_id)
    artifact_uri = run.log_model(served, state_dict, config, config_file)
    return artifact_uri, f"models:/{name}/{run.register(name, 'model', {})}"


@pytest.mark.unit
def test_every_model_the_pipeline_loads_loads_without_unpickling(demo_raw, tmp_path):
    """The encoder (in the item_embeddings asset and directly), the RQ-VAE and the CTR model, saved as
    the stages save them, load and match their weights while every unpickling entry point raises,
    through the pipeline's loaders and through MLflow's pyfunc loader alike."""
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    catalog = pl.read_parquet(demo_raw / "items" / "*.parquet")
    encoder = build_model(TINY, seed=0)
    encoder_config = {"architecture": TINY.to_dict(), "training": dataclasses.asdict(TINY_TRAINING)}
    _, encoder_uri = _log_model(tracking, "saviorrec-item-encoder", item_encoder_served(catalog), encoder.state_dict(), encoder_config, ENCODER_CONFIG)
    rq_config = RQVAEConfig(input_dim=TINY.embedding_dim, latent_dim=8, num_levels=2, codebook_size=16, hidden_dims=(32,))
    rqvae = RQVAE(rq_config)
    rq_saved = {"architecture": rq_config.to_dict(), "inference_assignment": "argmin"}
    embeddings = pl.DataFrame({"embedding": torch.randn(2, TINY.embedding_dim).tolist()})
    _, rqvae_uri = _log_model(tracking, RQVAE_MODEL, rqvae_served(embeddings), rqvae.state_dict(), rq_saved, RQVAE_CONFIG)
    ctr_config = CTRConfig(variant="saviorrec", num_items=5, embedding_dim=8, num_levels=2, codebook_size=4, mba_dim=4, id_dim=4,
                           user_buckets=10, profile_vocab_sizes=(3,), attention_dim=8, heads=2, dnn_dims=(8, 4))
    ctr = CTRModel(ctr_config)
    ctr.load_item_tables(torch.arange(5), torch.randn(5, 8), torch.randint(0, 4, (5, 2)))
    ctr_saved = {"architecture": ctr_config.to_dict(), "vocabularies": {"region": ["north", "south"]}, "sequence_length": 3}
    requests = pl.DataFrame({"user_id": [1, 2], "region": ["north", "east"], "item_id": [0, 4], "item_impressions": [3, 0], "item_clicks": [1, 0],
                             "item_ctr": [0.1, 0.05], "seq_items": [[1, 2], []], "seq_impressions": [[4, 5], []], "seq_clicks": [[1, 0], []],
                             "seq_ctr": [[0.1, 0.05], []]})
    _, ctr_uri = _log_model(tracking, CTR_MODEL, ranker_served(requests, ctr_saved["vocabularies"], False), ctr.state_dict(), ctr_saved, CTR_CONFIG)
    storage = ParquetStorage(root=str(tmp_path / "storage"))
    reference = pl.DataFrame({"model_uri": [encoder_uri]})
    storage.write(reference, "item_encoder", EVAL_DAY)

    with _unpickling_refused() as calls:
        with pytest.raises(AssertionError, match="torch.load called"):
            torch.load(io.BytesIO(b"any"))  # the guard is in place
        calls.clear()
        result = dg.materialize(
            # item_encoder as an external asset: its reference is read from storage, as in a run of
            # item_embeddings alone.
            [dg.AssetSpec("item_encoder", partitions_def=daily_partitions).with_io_manager_key("parquet_io_manager"), item_embeddings],
            partition_key=EVAL_DAY,
            resources={"raw": RawStore(root=str(demo_raw)), "tracking": tracking, "compute": Compute(), "parquet_io_manager": ParquetIOManager(storage=storage)},
        )
        loaded = [
            (load_encoder(encoder_uri, tracking), encoder),
            (load_rqvae(rqvae_uri, tracking)[0], rqvae),
            (load_ctr_model(ctr_uri, tracking)[0], ctr),
        ]
        mlflow.set_tracking_uri(tracking.tracking_uri)
        served = {uri: mlflow.pyfunc.load_model(uri) for uri in (encoder_uri, rqvae_uri, ctr_uri)}
        loaded += [
            (served[encoder_uri].unwrap_python_model().model, encoder),
            (served[rqvae_uri].unwrap_python_model().model, rqvae),
            (served[ctr_uri].unwrap_python_model().ranker.model, ctr),
        ]
        pctr = served[ctr_uri].predict(requests.to_pandas())["pctr"]
    assert result.success and not calls, f"unpickling attempted: {calls}"
    assert len(pctr) == 2 and pctr.between(0, 1).all()
    assert storage.read("item_embeddings", EVAL_DAY).height == pl.read_parquet(demo_raw / "items" / "*.parquet").height
    for model, saved in loaded:
        reloaded, original = model.state_dict(), saved.state_dict()
        assert reloaded.keys() == original.keys()
        for key in original:
            torch.testing.assert_close(reloaded[key], original[key], rtol=0, atol=0, msg=f"{type(saved).__name__}.{key}")


# Modules and calls that unpickle, or load models through pickle (MLflow's flavours, torch.load).
# mlflow.pyfunc itself may be imported, to define and save models from code, but not its loader:
# a pyfunc URI a user names may hold a cloudpickled model.
_UNPICKLING_MODULES = {
    "pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve",
    "mlflow.pytorch", "mlflow.sklearn", "mlflow.transformers",
}
_UNPICKLING_CALLS = re.compile(r"(^|\.)(torch\.load|torch\.serialization\.load|read_pickle)$|^mlflow\..*\.load_model$")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _unpickling_in(text: str, where: str) -> list[str]:
    """Imports of unpickling modules, calls of unpickling loaders, `allow_pickle=True`, `weights_only=False`."""
    found = []
    for node in ast.walk(ast.parse(text, where)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module in ("torch", "torch.serialization") and any(alias.name == "load" for alias in node.names):
                found.append(f"{where}:{node.lineno}: from {node.module} import load")
            if (node.module or "").startswith("mlflow") and any(alias.name == "load_model" for alias in node.names):
                found.append(f"{where}:{node.lineno}: from {node.module} import load_model")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if _UNPICKLING_CALLS.search(name):
                found.append(f"{where}:{node.lineno}: {name}()")
            unsafe = {"allow_pickle": True, "weights_only": False}
            for keyword in node.keywords:
                if keyword.arg in unsafe and isinstance(keyword.value, ast.Constant) and keyword.value.value is unsafe[keyword.arg]:
                    found.append(f"{where}:{node.lineno}: {name}({keyword.arg}={keyword.value.value})")
        found += [f"{where}:{node.lineno}: import {m}" for m in modules if m in _UNPICKLING_MODULES or m.split(".")[0] in _UNPICKLING_MODULES]
    return found


@pytest.mark.unit
def test_the_package_source_never_unpickles():
    planted = ("import joblib\nfrom mlflow import pytorch\nimport torch\ntorch.load(f)\nnp.load(f, allow_pickle=True)\nmlflow.pyfunc.load_model(u)\n"
               "from mlflow.pyfunc import load_model\nimport mlflow.pyfunc\n")
    flagged = {int(line.split(":")[1]) for line in _unpickling_in(planted, "planted")}
    assert flagged == {1, 2, 4, 5, 6, 7}, f"the check flags lines {flagged} of the planted source"
    sources = sorted((REPO / "saviorrec_pipeline").rglob("*.py"))
    assert len(sources) > 20, "package source not found"
    found = [line for source in sources for line in _unpickling_in(source.read_text(), str(source.relative_to(REPO)))]
    assert not found, "unpickling in the package (models are safetensors + JSON, rebuilt from code):\n" + "\n".join(found)


# --- 3. Paths stay under the storage root ------------------------------------------------------

HOSTILE_NAMES = [
    "", ".", "..", "../x", "../../etc/passwd", "a/../../b", "a/b", "/etc/passwd", "a\\b", "..\\x", "x\x00y",
    "2025-07-22\n", "2025-07-22\r", " 2025-07-22", "2025-07-22/", "a..b", "~root", "$HOME", "s3://other/x",
    "a" * 129, "..\u2215x", "\uff0e\uff0e\uff0fx", "a\u2044b", "x\u202egnp.exe", "\u0430bc",  # lookalike slashes and dots
]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
@pytest.mark.unit
def test_hostile_names_are_refused_before_anything_is_written(tmp_path, name):
    root = tmp_path / "root" / "storage"
    storage = ParquetStorage(root=str(root))
    for asset, partition, what in ((name, "2025-07-22", "asset name"), ("coclick_pairs", name, "partition key")):
        for attempt in (lambda: storage.uri(asset, partition), lambda: storage.write(pl.DataFrame({"x": [1]}), asset, partition),
                        lambda: storage.read(asset, partition)):
            with pytest.raises(ValueError, match=f"unsafe {what}"):
                attempt()
    assert _files_under(tmp_path) == set(), "something was written"


@pytest.mark.unit
def test_names_of_the_pipeline_are_accepted():
    for name in ("coclick_pairs", "item_embeddings", "2025-07-22", "date=2025-07-22", "a" * 128):
        assert safe_name(name, "name") == name


@pytest.mark.parametrize("key", ["../../etc", "2025-07-22/../../x", "/tmp/x", "2025-07-22\n", "..", "2099-01-01"], ids=repr)
@pytest.mark.unit
def test_dagster_refuses_partition_keys_outside_the_daily_partitions(demo_raw, tmp_path, key):
    """A run for a key that is not a day of the partitions never starts: nothing is written anywhere."""
    root = tmp_path / "root"
    before = _files_under(tmp_path)
    with pytest.raises(dg.DagsterUnknownPartitionError, match="Could not find a partition with key"):
        dg.materialize(
            [coclick_pairs], partition_key=key,
            resources={"raw": RawStore(root=str(demo_raw)), "window": TrainEvalWindow(train_days=SPEC.days - 1, eval_days=1), "compute": Compute(),
                       "parquet_io_manager": ParquetIOManager(storage=ParquetStorage(root=str(root / "storage")))},
        )
    assert _files_under(tmp_path) == before, "files appeared"


# --- 4. The compose file -------------------------------------------------------------------------

SECRET_VARIABLE = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL")


@pytest.mark.integration
def test_compose_publishes_only_the_three_uis_and_only_on_loopback(tmp_path):
    published = {}
    for name, service in compose_config(tmp_path)["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, target = port.removesuffix("/tcp").split(":")  # as docker-compose writes it
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[name] = (host_port, target)
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        for risky in ("privileged", "cap_add", "pid", "ipc", "devices", "security_opt"):
            assert not service.get(risky), f"{name} sets {risky}: {service[risky]}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert "docker.sock" not in source and source not in ("/", "/etc", "/root"), f"{name} mounts {source}"
    # S3 for uploading raw data, MLflow's and Dagster's UIs; Postgres, the code server and
    # SeaweedFS' master, volume and filer (which have no authentication) stay inside the network.
    assert published == {"s3": ("8333", "8333"), "mlflow": ("5000", "5000"), "webserver": ("3000", "3000")}


@pytest.mark.integration
def test_no_secret_has_a_default_or_a_usable_example_value(tmp_path):
    text = (REPO / "docker-compose.yml").read_text()
    fallbacks = re.findall(r"\$\{(\w+):?-([^}]*)\}", text)  # ${VAR:-default}, ${VAR-default}
    with_default = [f"${{{name}:-{value}}}" for name, value in fallbacks if SECRET_VARIABLE.search(name)]
    assert not with_default, f"secrets with a fallback in docker-compose.yml: {with_default}"
    for name, service in compose_config(tmp_path)["services"].items():
        environment = service.get("environment") or {}
        assert str(environment.get("POSTGRES_HOST_AUTH_METHOD", "")).lower() != "trust", f"{name}: Postgres without passwords"
    # .env.example's secrets are visibly placeholders (README: "change every secret"), not passwords
    # that look chosen; the compose file has none of its own (above, and test_deployment.py).
    example = {k: v for k, v in env_example().items() if SECRET_VARIABLE.search(k)}
    assert {"POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= example.keys()
    placeholders = [k for k, v in example.items() if "change-me" not in v]
    assert not placeholders, f".env.example gives usable-looking secrets for {placeholders}"


@pytest.mark.integration
def test_the_env_file_is_not_committed():
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    assert ignored & {".env", "/.env", ".env*", "*.env"}, ".gitignore does not ignore .env, the copy of .env.example that holds the real secrets"


@pytest.mark.integration
def test_the_env_file_is_not_copied_into_the_image():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    sources = [s for line in dockerfile.splitlines() if line.startswith(("COPY", "ADD")) for s in line.split()[1:-1]]
    assert sources and not set(sources) & {".", "./", ".env", "*"}, f"the image copies the whole build context (.env included): {sources}"

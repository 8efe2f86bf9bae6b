"""Long training survives interruption: every trainer, stopped after an epoch's checkpoint and
started again from it, ends with exactly the model and history of an uninterrupted run (CPU, one
seed); a loss that stops being finite stops training with an error naming where."""

import datetime as dt
import json
import shutil
import signal
import subprocess
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from saviorrec_pipeline.assets.coclick import coclick_pairs
from saviorrec_pipeline.assets.encoder import CONFIG, ENCODER_MODEL, item_encoder
from saviorrec_pipeline.assets.raw import impressions
from saviorrec_pipeline.checkpoints import Checkpoint, TrainingState, fingerprint
from saviorrec_pipeline.demo import generate_demo
from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, EncodedRows, train_ctr
from saviorrec_pipeline.method.encoder_training import TrainConfig, build_model, catalog_tensors, train_alignment, train_domain_adaptation
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, RQVAETrainConfig, train_rqvae
from saviorrec_pipeline.method.training import NonFiniteLoss, Steps, train_epochs
from saviorrec_pipeline.resources.tracking import MlflowTracking
from saviorrec_pipeline_tests.services import executable, project_env, stop, wait_until
from saviorrec_pipeline_tests.test_ctr_model import _model as ctr_model
from saviorrec_pipeline_tests.test_encoder import EVAL_DAY, SPEC, TINY, _planted_catalog, _resources
from saviorrec_pipeline_tests.test_rqvae import _embeddings

CPU = torch.device("cpu")


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class MemoryStore:
    """A checkpoint place in memory that can 'kill' the run after its n-th save."""

    def __init__(self, kill_after: int | None = None):
        self.data: bytes | None = None
        self.saves = 0
        self.kill_after = kill_after

    def read(self) -> bytes | None:
        return self.data

    def write(self, data: bytes) -> None:
        self.data = data
        self.saves += 1
        if self.saves == self.kill_after:
            raise Killed


def _assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _interrupted_then_resumed(train, kill_after: int):
    """`train(store)` killed after `kill_after` saves, then run again on the same store."""
    store = MemoryStore(kill_after)
    with pytest.raises(Killed):
        train(store)
    store.kill_after = None
    resumed_from = Checkpoint.from_bytes(store.data)
    return train(store), resumed_from, store


def _encoder_pairs(items: int) -> np.ndarray:
    group = np.arange(items) // 12
    rng = np.random.default_rng(0)
    return np.array([(a, b) for a in range(items) for b in rng.choice(np.flatnonzero(group == group[a]), 3) if a != b])


ENCODER_TRAINING = TrainConfig(epochs=3, batch_size=32, lr=1e-3, domain_adaptation_epochs=2)


def _train_encoder(store):
    catalog = catalog_tensors(_planted_catalog(), TINY)
    model = build_model(TINY, seed=0)
    train_domain_adaptation(model, catalog, ENCODER_TRAINING, CPU, checkpoints=store)
    return model, train_alignment(model, catalog, _encoder_pairs(len(catalog)), ENCODER_TRAINING, CPU, checkpoints=store)


@pytest.fixture(scope="module")
def uninterrupted_encoder():
    return _train_encoder(None)


@pytest.mark.parametrize("kill_after", [1, 3], ids=["in-domain-adaptation", "in-alignment"])
@pytest.mark.unit
def test_encoder_resumes_to_the_same_model(uninterrupted_encoder, kill_after):
    reference, reference_history = uninterrupted_encoder
    (model, history), resumed_from, store = _interrupted_then_resumed(_train_encoder, kill_after)
    assert (resumed_from.phase, resumed_from.epochs_done) == (("domain_adaptation", 1) if kill_after == 1 else ("alignment", 1))
    _assert_same_weights(reference, model)
    assert history == reference_history and len(history) == 3
    assert store.saves == 2 + 3  # one save per epoch: no epoch was trained twice


@pytest.mark.unit
def test_rqvae_resumes_to_the_same_model():
    z = _embeddings(items=512)
    pairs = np.array([[i, i + 1] for i in range(0, 500, 2)])
    settings = RQVAETrainConfig(epochs=6, batch_size=128, lr=0.002, lambda_reconstruct=100.0, warmup_epochs=2)

    def train(store):
        torch.manual_seed(0)
        model = RQVAE(RQVAEConfig(input_dim=16, latent_dim=8, num_levels=2, codebook_size=16, hidden_dims=(32,)))
        return model, train_rqvae(model, z, pairs, settings, CPU, checkpoints=store)

    reference, reference_history = train(None)
    (model, history), resumed_from, store = _interrupted_then_resumed(train, kill_after=4)
    assert resumed_from.epochs_done == 4
    _assert_same_weights(reference, model)  # codebooks and input scaling are buffers: included
    assert history == reference_history and len(history) == 6
    assert store.saves == 6


def _ctr_rows(n: int = 2000) -> EncodedRows:
    g = torch.Generator().manual_seed(3)
    items = torch.randint(0, 20, (n,), generator=g)
    lengths = torch.randint(0, 5, (n,), generator=g)
    return EncodedRows(
        user=torch.randint(0, 50, (n,), generator=g), profile=torch.randint(0, 4, (n, 1), generator=g), item=items,
        stats=torch.rand(n, 3, generator=g), seq_items=torch.randint(0, 20, (int(lengths.sum()),), generator=g),
        seq_stats=torch.rand(int(lengths.sum()), 3, generator=g),
        seq_start=torch.cumsum(lengths, 0) - lengths, seq_length=lengths, base_pctr=torch.zeros(n, 1),
        label=((items % 2 == 0) & (torch.rand(n, generator=g) < 0.6)).float(),
    )


@pytest.mark.parametrize("variant", ["base", "saviorrec"])
@pytest.mark.unit
def test_ctr_training_resumes_to_the_same_model(variant):
    rows = _ctr_rows()
    settings = CTRTrainConfig(epochs=3, batch_size=256, sequence_length=5)

    def train(store):
        model = ctr_model(variant)
        return model, train_ctr(model, rows, rows, settings, CPU, checkpoints=store)

    reference, reference_training = train(None)
    (model, training), resumed_from, store = _interrupted_then_resumed(train, kill_after=2)
    assert resumed_from.epochs_done == 2
    _assert_same_weights(reference, model)
    assert training.history == reference_training.history and len(training.history) == 3
    assert store.saves == 3


@pytest.mark.parametrize("phase", ["selection", "ctr"], ids=["while-choosing-epochs", "in-final-training"])
@pytest.mark.unit
def test_ctr_training_with_chosen_epochs_resumes_to_the_same_model(phase):
    rows = _ctr_rows()
    # At 0.01 these rows take more than one epoch, so both phases have epochs left after the kill.
    settings = CTRTrainConfig(max_epochs=4, batch_size=256, sequence_length=5, lr_start=0.01, lr_end=0.01)

    def train(store):
        model = ctr_model("base")
        return model, train_ctr(model, rows, rows, settings, CPU, checkpoints=store)

    reference, reference_training = train(None)
    selection_epochs = len(reference_training.selection)
    assert 2 <= reference_training.epochs <= selection_epochs <= 4  # an epoch of each phase is left after the kill
    # Killed after the first selection epoch, or after the first epoch of the final training.
    kill_after = 1 if phase == "selection" else selection_epochs + 1
    (model, training), resumed_from, store = _interrupted_then_resumed(train, kill_after=kill_after)
    assert resumed_from.phase == phase
    _assert_same_weights(reference, model)
    assert (training.epochs, training.selection, training.history) == (
        reference_training.epochs, reference_training.selection, reference_training.history
    )
    assert store.saves == selection_epochs + reference_training.epochs  # no epoch was trained twice


@pytest.mark.unit
def test_a_finished_run_resumed_trains_nothing_more():
    rows = _ctr_rows(500)
    settings = CTRTrainConfig(epochs=2, batch_size=128, sequence_length=5)
    store = MemoryStore()
    finished = ctr_model("base")
    history = train_ctr(finished, rows, None, settings, CPU, checkpoints=store).history
    again = ctr_model("base")
    assert train_ctr(again, rows, None, settings, CPU, checkpoints=store).history == history
    assert store.saves == 2
    _assert_same_weights(finished, again)


@pytest.mark.unit
def test_a_loss_that_becomes_nan_stops_training_with_its_place():
    rows = _ctr_rows(1000)
    rows.stats[617] = float("nan")
    settings = CTRTrainConfig(epochs=2, batch_size=100, sequence_length=5, seed=4)
    poisoned_step = int((torch.randperm(1000, generator=torch.Generator().manual_seed(4)) == 617).nonzero()) // 100
    store = MemoryStore()
    with pytest.raises(NonFiniteLoss, match=rf"ctr training: the loss became nan at epoch 1, step {poisoned_step + 1},"):
        train_ctr(ctr_model("base"), rows, None, settings, CPU, checkpoints=store)
    assert store.data is None  # no checkpoint of a poisoned epoch


@pytest.mark.unit
def test_fingerprint_tells_runs_apart():
    pairs = np.array([[0, 1], [2, 3]])
    settings = CTRTrainConfig()
    assert fingerprint(settings, pairs) == fingerprint(CTRTrainConfig(), pairs.copy())
    assert fingerprint(settings, pairs) != fingerprint(CTRTrainConfig(seed=1), pairs)
    assert fingerprint(settings, pairs) != fingerprint(settings, pairs[::-1])
    assert fingerprint(settings, pairs) != fingerprint(settings, pairs.astype(np.int32))


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-demo") / "raw"
    generate_demo(root, SPEC)
    return root


def _materialize_encoder(home: Path, config: dict) -> list[str]:
    return [
        executable("dagster"), "asset", "materialize", "-m", "saviorrec_pipeline.definitions",
        "--select", "coclick_pairs,item_encoder", "--partition", EVAL_DAY,
        "--config-json", json.dumps({"ops": {"item_encoder": {"config": config}}}),
    ]


def _saved_epoch(folder: Path) -> tuple[str, int] | None:
    # Names starting with "." are temporaries of the atomic write, one possibly cut short by the kill.
    for path in folder.glob("[!.]*.safetensors") if folder.exists() else []:
        saved = Checkpoint.from_bytes(path.read_bytes())
        return saved.phase, saved.epochs_done
    return None


def _encoder_weights(home: Path) -> dict[str, torch.Tensor]:
    reference = pl.read_parquet(home / "storage" / "item_encoder" / f"{EVAL_DAY}.parquet")
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db", artifact_root=str(home / "mlflow" / "artifacts"))
    return tracking.load_model_files(reference["model_uri"][0], CONFIG)[1]


@pytest.mark.integration
def test_a_killed_materialization_resumes_from_its_last_checkpoint(demo_raw, tmp_path):
    """The encoder stage as users run it (the Dagster CLI), its process killed mid-training; the
    retried run resumes and registers weights identical to those of an uninterrupted run."""
    config = {"epochs": 4, "batch_size": 64, "domain_adaptation_epochs": 1}
    start = dt.date.fromisoformat(EVAL_DAY) - dt.timedelta(days=SPEC.days - 1)
    homes = {name: tmp_path / name for name in ("uninterrupted", "killed")}
    envs = {}
    for name, home in homes.items():
        shutil.copytree(demo_raw, home / "raw")
        (home / "dagster").mkdir()
        envs[name] = project_env(home, start, train_days=SPEC.days - 1)

    done = subprocess.run(_materialize_encoder(homes["uninterrupted"], config), env=envs["uninterrupted"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoints = homes["killed"] / "storage" / "checkpoints" / "item_encoder" / EVAL_DAY
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        run = subprocess.Popen(_materialize_encoder(homes["killed"], config), env=envs["killed"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: (_saved_epoch(checkpoints) or ("", 0))[0] == "alignment", "a saved alignment epoch", run, log, timeout_s=300)
    stop(run, sig=signal.SIGKILL)
    phase, killed_after = _saved_epoch(checkpoints)
    assert phase == "alignment" and 1 <= killed_after < config["epochs"], "the run was not killed mid-training"
    assert not (homes["killed"] / "storage" / "item_encoder").exists()

    retried = subprocess.run(_materialize_encoder(homes["killed"], config), env=envs["killed"], capture_output=True, text=True, timeout=600)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert f"resuming from the checkpoint after alignment epoch {killed_after}" in retried.stderr
    assert not checkpoints.exists()  # cleared once the model is stored

    expected, resumed = _encoder_weights(homes["uninterrupted"]), _encoder_weights(homes["killed"])
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


@pytest.mark.integration
def test_a_diverging_encoder_fails_its_stage_and_registers_nothing(demo_raw, tmp_path):
    resources = _resources(demo_raw, tmp_path)
    fast = {"epochs": 2, "batch_size": 64, "domain_adaptation_epochs": 0, "warmup_epochs": 0}
    diverging = dg.materialize(
        [impressions, coclick_pairs, item_encoder], partition_key=EVAL_DAY, resources=resources,
        run_config={"ops": {"item_encoder": {"config": {**fast, "lr": 1e6}}}}, raise_on_error=False,
    )
    assert not diverging.success
    [failure] = diverging.get_step_failure_events()
    assert failure.step_key == "item_encoder"
    assert "NonFiniteLoss: alignment: the loss became nan at epoch " in failure.step_failure_data.error.to_string()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("saviorrec").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"name='{ENCODER_MODEL}'") == []
    storage = resources["storage"]
    assert not Path(storage.uri("item_encoder", EVAL_DAY)).exists()
    checkpoints = Path(storage.root, "checkpoints", "item_encoder", EVAL_DAY)
    kept = [Checkpoint.from_bytes(path.read_bytes()) for path in checkpoints.glob("*.safetensors")]
    assert kept and all(np.isfinite([list(figures.values()) for figures in saved.history]).all() for saved in kept)  # the finished epochs only

    recovered = dg.materialize(
        [impressions, coclick_pairs, item_encoder], partition_key=EVAL_DAY, resources=resources,
        run_config={"ops": {"item_encoder": {"config": fast}}},
    )
    assert recovered.success
    metadata = recovered.asset_materializations_for_node("item_encoder")[0].metadata
    assert metadata["resumed_from"].value == "start"  # other settings: the diverged run's checkpoint is not used
    assert not checkpoints.exists()
    [version] = client.search_model_versions(f"name='{ENCODER_MODEL}'")
    assert version.run_id == storage.read("item_encoder", EVAL_DAY)["run_id"][0]


@pytest.mark.unit
def test_a_warm_start_continues_from_the_weights_and_optimizer_state_it_is_given():
    """A warm start (the ranker's daily continuation) takes another run's weights and optimizer
    state, Adagrad's accumulators included, and trains with its own shuffling: the same as loading
    both by hand and stepping through the epoch, and not the same as the weights alone."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.rand(64, generator=g)

    def fresh(seed: int) -> TrainingState:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 1)
        return TrainingState(model, torch.optim.Adagrad(model.parameters(), lr=0.1), torch.Generator().manual_seed(seed))

    def loss_of(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(x[rows]).squeeze(-1), y[rows])

    def steps(state: TrainingState) -> Steps:
        return Steps(lambda generator: torch.randperm(64, generator=generator).split(16), lambda rows: loss_of(state.model, rows))

    earlier = fresh(0)
    train_epochs("earlier", earlier, steps(earlier), 2)
    given = Checkpoint.capture("earlier", 2, [], earlier)

    warm = fresh(1)
    train_epochs("warm", warm, steps(warm), 1, warm_start=given)

    by_hand, weights_only = fresh(1), fresh(1)
    for state, optimizer_state in ((by_hand, earlier.optimizer.state_dict()), (weights_only, None)):
        state.model.load_state_dict(earlier.model.state_dict())
        if optimizer_state is not None:
            state.optimizer.load_state_dict(optimizer_state)
        for rows in torch.randperm(64, generator=state.generator).split(16):
            state.optimizer.zero_grad()
            loss_of(state.model, rows).backward()
            state.optimizer.step()
    _assert_same_weights(warm.model, by_hand.model)
    assert not torch.equal(warm.model.weight, weights_only.model.weight)

"""Continuous training's recipes: the ranker's warm start, new items' ID rows, and semantic IDs that
keep their numbers across an RQ-VAE refresh."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saviorrec_pipeline.assets.common import refresh_due
from saviorrec_pipeline.method.code_churn import code_churn, keep_code_numbers, match_codes
from saviorrec_pipeline.method.ctr_model import CTRModel
from saviorrec_pipeline.method.ctr_training import (
    Champion, CTRTrainConfig, WarmStart, carry_training_state, carried_state_dict, check_fits, train_ctr,
)
from saviorrec_pipeline.method.device import deterministic_on_cpu
from saviorrec_pipeline.method.rqvae import RQVAE, RQVAEConfig, assign_codes
from saviorrec_pipeline.resources.tracking import ChampionVersion
from saviorrec_pipeline_tests.test_ctr_model import ITEMS, _model, _parity_rows

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def _champion(rows, settings: CTRTrainConfig) -> Champion:
    model = _model("saviorrec")
    trained = train_ctr(model, rows, None, settings, CPU)
    return Champion(model.config, model.state_dict(), trained.final_state, trained.steps_done, trained.total_steps)


def test_a_warm_start_equals_training_by_hand_from_the_champions_saved_state():
    rows = _parity_rows(1200)
    yesterday, today_rows = rows.take(torch.arange(800)), rows.take(torch.arange(800, 1200))
    champion = _champion(yesterday, CTRTrainConfig(epochs=2, batch_size=128, sequence_length=5, seed=3))
    assert champion.steps_done == champion.total_steps == 2 * 7

    settings = CTRTrainConfig(epochs=1, batch_size=128, sequence_length=5, seed=3)
    warm_model = _model("saviorrec")
    warm = WarmStart(carry_training_state(champion, warm_model), champion.steps_done, champion.total_steps)
    result = train_ctr(warm_model, today_rows, None, settings, CPU, warm=warm)
    assert result.steps_done == champion.steps_done + 4 and result.total_steps == champion.total_steps

    # By hand: the raw weights, Adagrad's accumulators and the moving average as saved, then plain
    # steps over the new rows in the run's own shuffle, the average updated after each with its
    # ramp started again: the first update copies the weights, as in a first run.
    saved = champion.state.tensors
    model = _model("saviorrec")
    model.load_state_dict({name.removeprefix("model.model."): value for name, value in saved.items() if name.startswith("model.model.")})
    parameters = dict(model.named_parameters())
    average = {name: saved[f"model.average.module.{name}"].clone() for name in parameters}
    assert int(saved["model.average.n_averaged"]) == 2 * 7
    updates = 0
    optimizer = torch.optim.Adagrad(model.parameters(), lr=settings.lr_start)
    for index, parameter in enumerate(parameters.values()):
        optimizer.state[parameter] = {"sum": saved[f"optimizer.{index}.sum"].clone(), "step": saved[f"optimizer.{index}.step"].clone()}
    generator = torch.Generator().manual_seed(settings.seed)
    with deterministic_on_cpu(CPU), torch.sparse.check_sparse_tensor_invariants(enable=False):
        for batch_rows in torch.randperm(len(today_rows), generator=generator).split(settings.batch_size):
            batch = today_rows.batch(batch_rows, settings.sequence_length, ITEMS)
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            weight = 1.0 if updates == 0 else 1.0 - min(settings.average_decay, (1.0 + updates) / (10.0 + updates))
            with torch.no_grad():
                for name, parameter in parameters.items():
                    average[name].lerp_(parameter, weight)
            updates += 1
    differ = {name: (parameter - average[name]).abs().max().item() for name, parameter in warm_model.named_parameters() if not torch.equal(parameter, average[name])}
    assert not differ, differ
    # And the warm start did move the weights: it is not the champion unchanged.
    assert not torch.equal(dict(warm_model.named_parameters())["dnn.0.weight"], champion.weights["dnn.0.weight"])


def test_items_the_champion_knew_keep_their_id_rows_and_new_items_start_fresh():
    champion = _champion(_parity_rows(400), CTRTrainConfig(epochs=1, batch_size=128, sequence_length=5))
    old_ids = champion.weights["item_ids"].numpy()  # 100 .. 119
    today = _model("saviorrec")
    new_ids = np.concatenate([old_ids[5:], [900, 901, 902, 903, 904]])  # five items gone, five new
    with torch.no_grad():
        today.item_ids.copy_(torch.from_numpy(new_ids))
    fresh = {name: value.clone() for name, value in today.state_dict().items()}
    carried = carried_state_dict(champion.weights, fresh)
    rows, old_rows = carried["item_id_embedding.weight"], champion.weights["item_id_embedding.weight"]
    for number, item in enumerate(new_ids):
        expected = old_rows[int(np.flatnonzero(old_ids == item)[0])] if item in old_ids else fresh["item_id_embedding.weight"][number]
        assert torch.equal(rows[number], expected), item
    assert torch.equal(rows[-1], torch.zeros_like(rows[-1]))  # the padding row
    assert torch.equal(carried["item_ids"], torch.from_numpy(new_ids))  # today's tables
    assert torch.equal(carried["dnn.0.weight"], champion.weights["dnn.0.weight"])

    state = carry_training_state(champion, today).tensors
    item_rows = [name for name, _ in today.named_parameters()].index("item_id_embedding.weight")
    accumulator, old_accumulator = state[f"optimizer.{item_rows}.sum"], champion.state.tensors[f"optimizer.{item_rows}.sum"]
    assert torch.equal(accumulator[:15], old_accumulator[5:20]) and old_accumulator[5:20].abs().sum() > 0
    assert torch.equal(accumulator[15:], torch.zeros_like(accumulator[15:]))


def test_new_items_rows_learnt_in_a_short_warm_run_reach_the_kept_averaged_model():
    rows = _parity_rows(400)
    champion = _champion(rows, CTRTrainConfig(epochs=1, batch_size=128, sequence_length=5))
    # A champion that trained long: its moving average is at its full horizon of 100 steps.
    champion.state.tensors["model.average.n_averaged"] = torch.tensor(1000)
    today = _model("saviorrec")
    new_ids = np.concatenate([champion.weights["item_ids"].numpy()[5:], [900, 901, 902, 903, 904]])
    with torch.no_grad():
        today.item_ids.copy_(torch.from_numpy(new_ids))
    fresh = today.state_dict()["item_id_embedding.weight"][15:20].clone()
    warm = WarmStart(carry_training_state(champion, today), champion.steps_done, champion.total_steps)
    result = train_ctr(today, rows, None, CTRTrainConfig(epochs=1, batch_size=128, sequence_length=5), CPU, warm=warm)
    assert result.steps_done - champion.steps_done == 4
    trained = result.final_state.tensors["model.model.item_id_embedding.weight"][15:20]
    kept = today.state_dict()["item_id_embedding.weight"][15:20]
    # Four steps into an average carried at its full horizon would keep 4% of what the rows learnt.
    learnt, reached = (trained - fresh).norm(dim=1), (kept - fresh).norm(dim=1)
    assert (learnt > 0).all() and (reached >= 0.5 * learnt).all(), (learnt, reached)


def test_a_champion_of_another_shape_is_refused_naming_both_shapes_and_the_way_out():
    champion = _model("saviorrec").config
    other = dataclasses.replace(champion, num_levels=2, codebook_size=16)
    with pytest.raises(ValueError, match=r"num_levels=3, codebook_size=8.*num_levels=2, codebook_size=16.*from_scratch: true.*refresh: true"):
        check_fits(champion, other, "saviorrec")
    check_fits(champion, _model("saviorrec").config, "saviorrec")


def test_churn_counts_changed_codes_per_level_and_per_prefix():
    generator = np.random.default_rng(0)
    old, new = generator.integers(0, 4, (500, 3)), generator.integers(0, 4, (500, 3))
    new[:200] = old[:200]
    churn = code_churn(old, new)
    for level in range(3):
        assert churn["level"][level] == sum(old[i, level] != new[i, level] for i in range(500)) / 500
        assert churn["prefix"][level] == sum(any(old[i, l] != new[i, l] for l in range(level + 1)) for i in range(500)) / 500


def test_the_matching_keeps_the_most_items_codes_of_any_renumbering():
    generator = np.random.default_rng(1)
    old = generator.integers(0, 4, (300, 2))
    new = np.where(generator.random((300, 2)) < 0.7, (old + 1) % 4, generator.integers(0, 4, (300, 2)))
    renaming = match_codes(old, new, 4)
    for level in range(2):
        kept = (renaming[level, new[:, level]] == old[:, level]).sum()
        best = max((np.array(p)[new[:, level]] == old[:, level]).sum() for p in itertools.permutations(range(4)))
        assert kept == best and sorted(renaming[level]) == [0, 1, 2, 3]


def test_a_refresh_that_only_permutes_the_codewords_changes_no_code_and_no_codebook_row():
    torch.manual_seed(0)
    previous = RQVAE(RQVAEConfig(input_dim=8, hidden_dims=(16,), latent_dim=4, num_levels=2, codebook_size=8))
    z = torch.randn(200, 8)
    old_codes, _ = assign_codes(previous, z, "argmin", CPU)
    refreshed = RQVAE(previous.config)
    refreshed.load_state_dict(previous.state_dict())
    permutations = [torch.randperm(8, generator=torch.Generator().manual_seed(level)) for level in range(2)]
    with torch.no_grad():
        refreshed.codebooks.copy_(torch.stack([previous.codebooks[level, permutations[level]] for level in range(2)]))
    new_codes, _ = assign_codes(refreshed, z, "argmin", CPU)
    ids = np.arange(200)
    assert (new_codes != old_codes).any()  # before the matching, the permutation shows

    codebooks, renumbered, churn = keep_code_numbers(refreshed.codebooks, ids, new_codes, ids, old_codes)
    assert churn["level"] == [0.0, 0.0] and churn["prefix"] == [0.0, 0.0] and churn["unmatched_level"][0] > 0
    assert np.array_equal(renumbered, old_codes)
    # Each codebook row means the codeword it meant before, so MBA rows carried by number still fit.
    assert torch.equal(codebooks, previous.codebooks)
    with torch.no_grad():
        refreshed.codebooks.copy_(codebooks)
    assert np.array_equal(assign_codes(refreshed, z, "argmin", CPU)[0], old_codes)


def test_a_warm_model_on_the_same_items_scores_as_the_champion_before_any_step():
    champion = _champion(_parity_rows(400), CTRTrainConfig(epochs=1, batch_size=128, sequence_length=5))
    carried = CTRModel(champion.config)
    carried.load_state_dict(carried_state_dict(champion.weights, _model("saviorrec").state_dict()))
    original = CTRModel(champion.config)
    original.load_state_dict(champion.weights)
    rows = _parity_rows(64)
    batch = rows.batch(torch.arange(64), 5, ITEMS)
    # The item tables are the test model's, which the champion was built with too.
    assert torch.equal(carried.eval()(batch), original.eval()(batch))


class _Registry:
    """What refresh_due asks of MLflow: the champion, and the days versions were trained for."""

    def __init__(self, champion_day: str, trained_days: list[str]):
        self.champion_day, self.trained_days = champion_day, trained_days

    def champion(self, name: str, stage: str) -> ChampionVersion:
        return ChampionVersion(name, "1", "run", {"dagster.partition": self.champion_day})

    def last_trained_for(self, name: str, stage: str, until: str) -> str | None:
        return max((day for day in self.trained_days if day <= until), default=None)


def test_a_refresh_is_due_a_cadence_after_the_last_version_trained_even_one_the_gate_held_back():
    def due(trained_days: list[str], day: str, requested: bool = False) -> bool:
        return refresh_due(_Registry("2025-07-01", trained_days), "encoder", "item_encoder", day, 7, requested).train

    assert not due(["2025-07-01"], "2025-07-07") and due(["2025-07-01"], "2025-07-08")
    # A version trained on 07-08 and held back by the gate: the champion stays 07-01's, and the
    # next refresh comes a week after 07-08, not every day from 07-09.
    assert not due(["2025-07-01", "2025-07-08"], "2025-07-09") and due(["2025-07-01", "2025-07-08"], "2025-07-15")
    assert due(["2025-07-01"], "2025-07-02", requested=True)

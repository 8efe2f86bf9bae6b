"""The ranking model: MBA at initialisation, the blocks of each variant, masking, learning."""

import pytest
import torch

from saviorrec_pipeline.method.ctr_model import MBA, VARIANTS, Batch, CTRConfig, CTRModel

pytestmark = pytest.mark.unit

ITEMS, DIM, LEVELS, K = 20, 16, 3, 8


def _model(variant: str, **overrides) -> CTRModel:
    torch.manual_seed(0)
    config = CTRConfig(
        variant=variant, num_items=ITEMS, embedding_dim=DIM, num_levels=LEVELS, codebook_size=K, mba_dim=4,
        id_dim=8, user_buckets=50, profile_vocab_sizes=(4,), attention_dim=16, heads=8, dnn_dims=(32, 16), **overrides,
    )
    model = CTRModel(config)
    generator = torch.Generator().manual_seed(1)
    model.load_item_tables(torch.arange(100, 100 + ITEMS), torch.randn(ITEMS, DIM, generator=generator), torch.randint(0, K, (ITEMS, LEVELS), generator=generator))
    return model


def _batch(size: int = 32, length: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (size,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return Batch(
        user=torch.randint(0, 50, (size,), generator=g), profile=torch.randint(0, 4, (size, 1), generator=g),
        item=torch.randint(0, ITEMS, (size,), generator=g), stats=torch.rand(size, 3, generator=g),
        seq_items=torch.where(mask, torch.randint(0, ITEMS, (size, length), generator=g), ITEMS),
        seq_stats=torch.rand(size, length, 3, generator=g) * mask[..., None], seq_mask=mask,
        base_pctr=torch.rand(size, 1, generator=g), label=(torch.rand(size, generator=g) < 0.3).float(),
    )


def test_mba_returns_z_unchanged_at_initialisation_and_learns_from_there():
    mba = MBA(num_levels=LEVELS, codebook_size=K, dim=4, out_dim=DIM)
    z = torch.randn(10, DIM)
    codes = torch.randint(0, K, (10, LEVELS))
    torch.testing.assert_close(mba(z, codes), z)
    (mba(z, codes) ** 2).sum().backward()
    assert torch.isfinite(mba.codebook.grad).all() and mba.codebook.grad.abs().sum() > 0
    # Rows of codes the batch used get gradient; the rest do not.
    unused = torch.ones(LEVELS, K, dtype=torch.bool)
    unused[torch.arange(LEVELS)[None, :].expand(10, -1), codes] = False
    assert mba.codebook.grad[unused].abs().sum() == 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_has_exactly_its_blocks(variant):
    model = _model(variant)
    definition = VARIANTS[variant]
    assert tuple(model.attention.blocks.keys()) == definition.blocks
    assert hasattr(model, "mba") == definition.mba
    if definition.mba:
        assert model.mba.skip == (not definition.mba_from_rq)
    logits = model(_batch())
    assert logits.shape == (32,) and torch.isfinite(logits).all()


def test_expected_block_sets():
    assert VARIANTS["base"].blocks == ("b",) and not VARIANTS["base"].multimodal
    assert VARIANTS["saviorrec"].blocks == ("b", "m", "m2b", "b2m") and VARIANTS["saviorrec"].mba
    assert VARIANTS["no_mba"].blocks == ("b", "m", "m2b", "b2m") and not VARIANTS["no_mba"].mba
    assert VARIANTS["no_bidir"].blocks == ("b", "m")
    assert VARIANTS["no_mm_embedding"].mba_from_rq


def test_padding_and_empty_sequences_do_not_change_scores():
    model = _model("saviorrec").eval()
    batch = _batch(length=5)
    padded = Batch(**{**batch.__dict__})
    # Three more padded positions filled with garbage must not matter.
    extra = 3
    padded.seq_items = torch.cat([batch.seq_items, torch.randint(0, ITEMS, (32, extra))], dim=1)
    padded.seq_stats = torch.cat([batch.seq_stats, torch.rand(32, extra, 3)], dim=1)
    padded.seq_mask = torch.cat([batch.seq_mask, torch.zeros(32, extra, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(padded))
    assert (batch.seq_mask.sum(1) == 0).any()  # some users have no clicks, and still get a finite score


def test_training_fits_a_planted_signal():
    from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, EncodedRows, train_ctr

    g = torch.Generator().manual_seed(3)
    n = 4000
    items = torch.randint(0, ITEMS, (n,), generator=g)
    label = ((items % 2 == 0) & (torch.rand(n, generator=g) < 0.6)).float()  # even items get clicked
    rows = EncodedRows(
        user=torch.randint(0, 50, (n,), generator=g), profile=torch.zeros(n, 1, dtype=torch.long), item=items,
        stats=torch.zeros(n, 3), seq_items=torch.zeros(0, dtype=torch.long), seq_stats=torch.zeros(0, 3),
        seq_start=torch.zeros(n, dtype=torch.long), seq_length=torch.zeros(n, dtype=torch.long),
        base_pctr=torch.zeros(n, 1), label=label,
    )
    history = train_ctr(_model("base"), rows, rows, CTRTrainConfig(epochs=3, batch_size=256, sequence_length=5), torch.device("cpu")).history
    assert history[-1]["eval_auc"] > 0.7  # the best possible here is 0.857, chance 0.5
    assert history[-1]["train_logloss"] < history[0]["train_logloss"]


def _textbook_attention(attention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of one query over a sequence, written out position by position with
    `attention`'s weights: per head, softmax(k_n . q / sqrt(head dim)) over kept positions weighs v_n."""
    batch, dim, heads = query.shape[0], attention.w_q.weight.shape[0], attention.heads
    head_dim = dim // heads
    expected = torch.zeros(batch, dim)
    for b in range(batch):
        for h in range(heads):
            rows = slice(head_dim * h, head_dim * (h + 1))
            q = query[b] @ attention.w_q.weight[rows].T + attention.w_q.bias[rows]
            k = keys[b] @ attention.w_k.weight[rows].T
            v = values[b] @ attention.w_v.weight[rows].T + attention.w_v.bias[rows]
            kept = mask[b].nonzero().flatten()
            if len(kept):
                weights = torch.softmax((k[kept] @ q) / head_dim ** 0.5, dim=0)
                expected[b, rows] = weights @ v[kept]
    return expected


def _randomised(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def test_target_attention_is_textbook_multi_head_attention():
    """The reordered computation against multi-head attention written out position by position."""
    from saviorrec_pipeline.method.ctr_model import TargetAttention

    g = torch.Generator().manual_seed(5)
    attention = _randomised(TargetAttention(query_dim=7, key_dim=5, value_dim=6, dim=16, heads=4), g)
    query, keys, values = torch.randn(3, 7, generator=g), torch.randn(3, 9, 5, generator=g), torch.randn(3, 9, 6, generator=g)
    mask = torch.rand(3, 9, generator=g) < 0.6
    mask[2] = False  # a user without clicks
    with torch.no_grad():
        torch.testing.assert_close(attention(query, keys, values, mask), _textbook_attention(attention, query, keys, values, mask), rtol=1e-4, atol=1e-4)


def test_each_bidirectional_block_reads_the_query_key_and_value_of_its_equation():
    """Eqs. 11-14 with distinct behavior (h) and multimodal (z) inputs of one width, so that a block
    reading the wrong side gives other numbers rather than a shape error."""
    from saviorrec_pipeline.method.ctr_model import BLOCKS, BiDirectionalTargetAttention

    g = torch.Generator().manual_seed(8)
    attention = _randomised(BiDirectionalTargetAttention(BLOCKS, h_dim=6, z_dim=6, dim=8, heads=2), g)
    h_cand, h_seq, z_cand, z_seq = torch.randn(4, 6, generator=g), torch.randn(4, 7, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 7, 6, generator=g)
    mask = torch.rand(4, 7, generator=g) < 0.7
    mask[:, 0] = True
    equations = {  # TA(query, key, value)
        "b": (h_cand, h_seq, h_seq),  # eq. 11
        "m": (z_cand, z_seq, z_seq),  # eq. 12
        "m2b": (z_cand, z_seq, h_seq),  # eq. 13: similarity in the semantic space pools behavior
        "b2m": (h_cand, h_seq, z_seq),  # eq. 14: similarity in the behavior space pools the multimodal side
    }
    with torch.no_grad():
        outputs = attention(h_cand, h_seq, z_cand, z_seq, mask).split(8, dim=-1)
        for name, output in zip(attention.blocks.keys(), outputs):
            torch.testing.assert_close(output, _textbook_attention(attention.blocks[name], *equations[name], mask), rtol=1e-4, atol=1e-4, msg=name)
            query, keys, values = equations[name]
            swapped = _textbook_attention(attention.blocks[name], query, values, keys, mask)
            if keys is not values:  # reading keys and values the other way round must show
                assert (output - swapped).abs().max() > 1e-2, name


def test_bidirectional_attention_equals_each_block_computed_on_its_own():
    """Blocks sharing keys or values are computed together; each block's output must be what its own
    TA(query side, key side, value side) gives, gradients included."""
    from saviorrec_pipeline.method.ctr_model import BLOCKS, BiDirectionalTargetAttention

    g = torch.Generator().manual_seed(6)
    attention = BiDirectionalTargetAttention(BLOCKS, h_dim=7, z_dim=5, dim=16, heads=4)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    h_cand, h_seq = torch.randn(3, 7, generator=g), torch.randn(3, 9, 7, generator=g, requires_grad=True)
    z_cand, z_seq = torch.randn(3, 5, generator=g), torch.randn(3, 9, 5, generator=g, requires_grad=True)
    mask = torch.rand(3, 9, generator=g) < 0.6
    mask[1] = False  # a user without clicks
    together = attention(h_cand, h_seq, z_cand, z_seq, mask)
    (together ** 2).sum().backward()
    grads = h_seq.grad.clone(), z_seq.grad.clone()
    h_seq.grad = z_seq.grad = None
    side = {"h": (h_cand, h_seq), "z": (z_cand, z_seq)}
    alone = torch.cat([
        block(side[q][0], side[k][1], side[v][1], mask)
        for block, (q, k, v) in ((attention.blocks[name], attention.SIDES[name]) for name in BLOCKS)
    ], dim=-1)
    (alone ** 2).sum().backward()
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(grads, (h_seq.grad, z_seq.grad))
    assert together[1].abs().sum() == 0 and together[0].abs().sum() > 0


def _parity_rows(n: int, flipped_tail: float = 0.0):
    """Rows whose label follows the item's parity; in the latest `flipped_tail` share it is reversed."""
    from saviorrec_pipeline.method.ctr_training import EncodedRows

    g = torch.Generator().manual_seed(7)
    items = torch.randint(0, ITEMS, (n,), generator=g)
    clicked = (items % 2 == 0) & (torch.rand(n, generator=g) < 0.6)
    tail = torch.arange(n) >= n - round(n * flipped_tail)
    flipped = (items % 2 == 1) & (torch.rand(n, generator=g) < 0.6)
    return EncodedRows(
        user=torch.randint(0, 50, (n,), generator=g), profile=torch.zeros(n, 1, dtype=torch.long), item=items,
        stats=torch.rand(n, 3, generator=g), seq_items=torch.zeros(0, dtype=torch.long), seq_stats=torch.zeros(0, 3),
        seq_start=torch.zeros(n, dtype=torch.long), seq_length=torch.zeros(n, dtype=torch.long),
        base_pctr=torch.zeros(n, 1), label=torch.where(tail, flipped, clicked).float(),
    )


def test_early_stopping_holds_out_the_latest_rows_and_stops_when_they_stop_improving():
    from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, train_ctr

    # At the paper's rate of 0.01 the parity is learnt over a few epochs (at the default 0.03, in
    # one), so both curves below have a shape to read.
    settings = CTRTrainConfig(max_epochs=6, batch_size=256, sequence_length=5, lr_start=0.01, lr_end=0.01)
    # The latest tenth contradicts the rest: every epoch on the rest makes the held-out AUC worse,
    # so one epoch is chosen after a second one confirmed the fall.
    contradicted = train_ctr(_model("base"), _parity_rows(4000, flipped_tail=0.1), None, settings, torch.device("cpu"))
    assert contradicted.epochs == 1 and len(contradicted.selection) == 2
    assert contradicted.selection[1]["validation_auc"] < contradicted.selection[0]["validation_auc"] < 0.5
    assert len(contradicted.history) == 1
    # Consistent rows: the held-out slice agrees, and training goes on past one epoch.
    consistent = train_ctr(_model("base"), _parity_rows(4000), None, settings, torch.device("cpu"))
    assert consistent.selection[0]["validation_auc"] > 0.7 and consistent.epochs >= 2
    assert len(consistent.history) == consistent.epochs
    assert consistent.samples_trained == round(4000 * 0.9) * len(consistent.selection) + 4000 * consistent.epochs


def test_the_model_kept_is_the_moving_average_of_the_steps_weights():
    from saviorrec_pipeline.method.ctr_training import CTRTrainConfig, train_ctr

    rows = _parity_rows(600)

    def trained(epochs: int, decay: float) -> dict[str, torch.Tensor]:
        # One batch per epoch, so `epochs` is the number of steps; the rate is constant, so the first
        # steps of a longer run are those of a shorter one.
        settings = CTRTrainConfig(epochs=epochs, batch_size=600, sequence_length=5, average_decay=decay)
        model = _model("base")
        train_ctr(model, rows, None, settings, torch.device("cpu"))
        return {name: p.detach() for name, p in model.named_parameters()}

    w1, w2, w3 = (trained(steps, 0.0) for steps in (1, 2, 3))
    # The first update copies w1; the decay then ramps as (1 + n) / (10 + n): 2/11, then 3/12 (below
    # 0.5), so the average is 2/11 * 1/4 of w1, 9/11 * 1/4 of w2 and 3/4 of w3.
    averaged = trained(3, 0.5)
    assert not torch.allclose(w2["dnn.0.weight"], w3["dnn.0.weight"])  # the steps moved the weights
    for name, value in averaged.items():
        torch.testing.assert_close(value, w1[name] / 22 + w2[name] * 9 / 44 + w3[name] * 3 / 4, rtol=1e-5, atol=1e-6)


def test_statistics_are_standardised_so_their_units_do_not_matter():
    batch = _batch()
    model = _model("base")
    model.load_stats_scale(torch.rand(500, 3, generator=torch.Generator().manual_seed(2)))
    rescaled = _model("base")
    rescaled.load_stats_scale(torch.rand(500, 3, generator=torch.Generator().manual_seed(2)) * 1000 + 50)
    scaled_batch = Batch(**{**batch.__dict__, "stats": batch.stats * 1000 + 50, "seq_stats": (batch.seq_stats * 1000 + 50) * batch.seq_mask[..., None]})
    with torch.no_grad():
        torch.testing.assert_close(model(batch), rescaled(scaled_batch), rtol=1e-4, atol=1e-4)


def test_no_mm_embedding_starts_mba_at_the_rq_codebooks_and_has_no_skip_to_z():
    """Table 3's no_mm_embedding feeds the multimodal side from the semantic IDs alone: its MBA
    codebook starts as the RQ-VAE's codewords and z does not pass through; saviorrec's starts at
    zero with z passing through unchanged."""
    import numpy as np

    from saviorrec_pipeline.method.ctr_training import CTRInputs, ItemIndex, build_ctr_model

    g = torch.Generator().manual_seed(9)
    rows = _parity_rows(8)
    rq_codebooks = torch.randn(LEVELS, K, 4, generator=g)
    inputs = CTRInputs(
        train=rows, evaluation=rows, eval_rows=None, items=ItemIndex(np.arange(100, 100 + ITEMS)), z=torch.randn(ITEMS, DIM, generator=g),
        codes=torch.randint(0, K, (ITEMS, LEVELS), generator=g), rq_codebooks=rq_codebooks, vocabularies={"segment": ["a", "b", "c"]},
        sequence_length=5, use_base_pctr=False, train_days=[],
    )
    architecture = {"id_dim": 8, "user_buckets": 50, "attention_dim": 16, "heads": 8, "dnn_dims": (32, 16)}
    codes, z, other_z = inputs.codes[:6], inputs.z[:6], torch.randn(6, DIM, generator=g)
    no_mm = build_ctr_model(inputs, "no_mm_embedding", architecture, seed=0)
    assert torch.equal(no_mm.mba.codebook.detach(), rq_codebooks)
    with torch.no_grad():
        torch.testing.assert_close(no_mm.mba(z, codes), no_mm.mba(other_z, codes))  # nothing of z gets through
        assert no_mm.mba(z, codes).abs().sum() > 0
    saviorrec = build_ctr_model(inputs, "saviorrec", architecture, seed=0)
    assert torch.equal(saviorrec.mba.codebook.detach(), torch.zeros_like(rq_codebooks))
    with torch.no_grad():
        torch.testing.assert_close(saviorrec.mba(z, codes), z)


def test_mba_level_norms_read_each_levels_codebook_rows_and_its_block_of_fusion_weights():
    """Fig. 3 by hand: level 2's rows are twice level 1's, and only level 1's weight block is set."""
    mba = MBA(num_levels=2, codebook_size=3, dim=2, out_dim=4)
    with torch.no_grad():
        mba.codebook[0] = torch.tensor([[3.0, 4.0], [0.0, 5.0], [5.0, 0.0]])  # norms 5
        mba.codebook[1] = 2 * mba.codebook[0]  # norms 10
        mba.fuse[0].weight.zero_()
        mba.fuse[0].weight[:, :2] = 1.0  # v_1's two coordinates are read by weights of norm 2 each
        mba.fuse[0].weight[0, 2] = 0.5  # v_2's: norms 0.5 and 0, mean 0.25
    rows, weights = mba.level_norms()
    torch.testing.assert_close(rows, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.125]))


def test_no_statistics_ignores_the_statistics_and_saviorrec_does_not():
    """Fig. 4's 'without statistics': S of the candidate and of the sequence no longer reach the score."""
    batch = _batch()
    shuffled = Batch(**{**batch.__dict__, "stats": torch.rand(32, 3) * 5, "seq_stats": torch.rand(32, 5, 3) * 5 * batch.seq_mask[..., None]})
    with torch.no_grad():
        without = _model("no_statistics").eval()
        torch.testing.assert_close(without(batch), without(shuffled))
        savior = _model("saviorrec").eval()
        assert (savior(batch) - savior(shuffled)).abs().max() > 1e-4


def test_no_item_id_scores_items_by_their_content_and_statistics_alone():
    """Fig. 4's 'without item ID': two items with the same z, codes and statistics score alike,
    where saviorrec tells them apart by their ID rows."""
    batch = _batch()
    twin = Batch(**{**batch.__dict__, "item": (batch.item + 1) % ITEMS})
    without, savior = _model("no_item_id").eval(), _model("saviorrec").eval()
    assert not hasattr(without, "item_id_embedding")
    with torch.no_grad():
        for model in (without, savior):
            model.item_embeddings[1:ITEMS] = model.item_embeddings[0]
            model.item_codes[1:ITEMS] = model.item_codes[0]
        savior.item_id_embedding.weight.normal_()  # distinct ID rows
        torch.testing.assert_close(without(batch), without(twin))
        assert (savior(batch) - savior(twin)).abs().max() > 1e-4

"""The ranking model: MBA at initialisation, the blocks of each variant, masking, learning."""

import pytest
import torch

from saviorrec_pipeline.method.ctr_model import MBA, VARIANTS, Batch, CTRConfig, CTRModel

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
    history = train_ctr(_model("base"), rows, rows, CTRTrainConfig(epochs=3, batch_size=256, sequence_length=5), torch.device("cpu"))
    assert history[-1]["eval_auc"] > 0.7  # the best possible here is 0.857, chance 0.5
    assert history[-1]["train_logloss"] < history[0]["train_logloss"]

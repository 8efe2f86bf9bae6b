"""RQ-VAE: residual arithmetic, Sinkhorn against argmin, training, quality figures, bad input."""

import numpy as np
import pytest
import torch

from saviorrec_pipeline.method.rqvae import (
    RQVAE,
    RQVAEConfig,
    RQVAETrainConfig,
    PairBatch,
    Quantized,
    assign_codes,
    check_embeddings,
    codebook_quality,
    rqvae_loss,
    sinkhorn_assign,
    train_rqvae,
)

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def _embeddings(items: int = 512, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, dim, generator=generator)
    z = centers[torch.randint(0, 8, (items,), generator=generator)] + 0.3 * torch.randn(items, dim, generator=generator)
    return torch.nn.functional.normalize(z, dim=-1)


def test_codewords_sum_to_the_quantised_latent_and_levels_refine_it():
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(input_dim=16, latent_dim=8, num_levels=3, codebook_size=16, hidden_dims=(32,)))
    z = _embeddings()
    model.init_codebooks(z)
    with torch.no_grad():
        latent = model.encode(z)
        q = model.quantize(latent)
        chosen = [model.codebooks[l][q.codes[:, l]] for l in range(3)]
        torch.testing.assert_close(q.quantized, sum(chosen))
        torch.testing.assert_close(q.residuals[1], latent - chosen[0])
        errors = [((latent - sum(chosen[: l + 1])) ** 2).sum(dim=1).mean().item() for l in range(3)]
    assert errors[0] > errors[1] > errors[2]


def test_sinkhorn_spreads_a_skewed_batch_that_argmin_collapses():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 4, generator=generator)
    # Points crowd around codeword 0: argmin gives nearly all of them that one code.
    points = codebook[0] + 0.3 * torch.randn(256, 4, generator=generator)
    distances = torch.cdist(points, codebook) ** 2
    assert (distances.argmin(dim=1) == 0).float().mean() > 0.8
    counts = torch.bincount(sinkhorn_assign(distances), minlength=16)
    assert (counts > 0).all()
    assert counts.max() <= 2 * 256 / 16


def test_training_reduces_reconstruction_and_sinkhorn_balances_codes():
    z = _embeddings(items=1024)
    pairs = np.array([[i, i + 1] for i in range(0, 1000, 2)])
    quality = {}
    for assignment in ("argmin", "sinkhorn"):
        torch.manual_seed(0)
        model = RQVAE(RQVAEConfig(input_dim=16, latent_dim=8, num_levels=2, codebook_size=32, hidden_dims=(32,)))
        train = RQVAETrainConfig(epochs=15, batch_size=256, lr=0.002, lambda_reconstruct=100.0, assignment=assignment)
        history = train_rqvae(model, z, pairs, train, CPU)
        assert history[-1]["reconstruction"] < history[0]["reconstruction"]
        codes, errors = assign_codes(model, z, assignment, CPU)
        assert codes.shape == (1024, 2) and errors.shape == (1024,) and np.isfinite(errors).all()
        quality[assignment] = codebook_quality(codes, 32)["levels"][0]
    # On 8 clusters and 32 codes Sinkhorn spreads usage near uniform, and more evenly than argmin
    # (which k-means initialisation and dead-code re-seeding already keep from collapsing).
    assert quality["sinkhorn"]["perplexity"] > 0.9 * 32
    assert quality["sinkhorn"]["perplexity"] > quality["argmin"]["perplexity"]


def test_codewords_move_to_the_mean_of_their_residuals():
    model = RQVAE(RQVAEConfig(input_dim=4, latent_dim=2, num_levels=2, codebook_size=3, hidden_dims=()))
    before = model.codebooks.clone()
    residuals = torch.tensor([[[1.0, 1.0], [3.0, 1.0], [5.0, 5.0]], [[0.0, 2.0], [0.0, 4.0], [1.0, 1.0]]])
    q = Quantized(codes=torch.tensor([[0, 2], [0, 2], [1, 2]]), quantized=torch.zeros(3, 2), residuals=residuals)
    model.update_codebooks(q, decay=0.5)
    torch.testing.assert_close(model.codebooks[0, 0], 0.5 * before[0, 0] + 0.5 * torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(model.codebooks[0, 1], 0.5 * before[0, 1] + 0.5 * torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(model.codebooks[0, 2], before[0, 2])  # unused: left for re-seeding
    torch.testing.assert_close(model.codebooks[1, 2], 0.5 * before[1, 2] + 0.5 * torch.tensor([1 / 3, 7 / 3]))


def test_quality_figures_on_a_known_assignment():
    codes = np.array([[0, 1], [0, 1], [1, 0], [2, 3]])
    quality = codebook_quality(codes, codebook_size=4)
    assert quality["collision_rate"] == 0.5  # the first two items share (0, 1)
    assert quality["levels"][0]["utilisation"] == 0.75
    p = np.array([2, 1, 1]) / 4
    assert quality["levels"][0]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize(
    "z, problem",
    [
        (np.full((64, 8), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((64, 5), dtype=np.float32), "expected (items, 8)"),
        (np.zeros((10, 8), dtype=np.float32), "fewer than the codebook size K=32"),
    ],
)
def test_bad_embeddings_are_refused_by_name(z, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        check_embeddings(z, expected_dim=8, codebook_size=32, where="item_embeddings/2025-07-22")


def test_straight_through_passes_the_decoders_gradient_unchanged_to_the_encoder():
    """The codeword choice has no gradient; the straight-through estimator hands the gradient at
    the decoder's input (the quantised latent) to the encoder's output as it is."""
    g = torch.Generator().manual_seed(4)
    model = RQVAE(RQVAEConfig(input_dim=12, latent_dim=6, num_levels=2, codebook_size=8, hidden_dims=(10,)))
    z = torch.randn(20, 12, generator=g)
    target = torch.randn(20, 12, generator=g)
    z_hat, _, q = model(z)
    ((z_hat - target) ** 2).sum().backward()
    through_model = [p.grad.clone() for p in model.encoder.parameters()]
    assert all(torch.isfinite(grad).all() for grad in through_model) and sum(grad.abs().sum() for grad in through_model) > 0

    # By hand: the gradient at the decoder's input, then back through the encoder alone.
    model.zero_grad()
    decoder_input = q.quantized.detach().requires_grad_()
    ((model.decode(decoder_input) - target) ** 2).sum().backward()
    latent = model.encode(z)
    by_hand = torch.autograd.grad(latent, list(model.encoder.parameters()), grad_outputs=decoder_input.grad)
    for grad, expected in zip(through_model, by_hand):
        torch.testing.assert_close(grad, expected)


def test_eq5_weighs_the_raw_reconstruction_the_commitment_and_the_pairs_contrast_as_given():
    """Eq. 5 by hand on a model whose input scaling is far from 1 (as the aligned embeddings'
    is): reconstruction and commitment as squared norms per item (on z as given, and on each
    level's latent residual), InfoNCE on the standardised reconstructions of the pairs without
    the same item as a negative; lambda0 and lambda1 as set."""
    g = torch.Generator().manual_seed(7)
    model = RQVAE(RQVAEConfig(input_dim=6, latent_dim=4, num_levels=2, codebook_size=5, hidden_dims=(8,)))
    with torch.no_grad():
        model.input_mean.copy_(torch.randn(6, generator=g))
        model.input_scale.copy_(0.01 + 0.05 * torch.rand(6, generator=g))
        model.codebooks.copy_(torch.randn(2, 5, 4, generator=g))
    rows = torch.randn(9, 6, generator=g)
    z = rows[:5]
    item_a, item_b = torch.tensor([5, 6, 7]), torch.tensor([8, 8, 5])  # item 8 twice, item 5 on both sides
    pairs = PairBatch(rows[item_a], rows[item_b], item_a, item_b)
    loss, parts, _ = rqvae_loss(model, z, pairs, lambda_reconstruct=1000.0, lambda_commit=0.5, temperature=0.07, assignment="argmin")

    with torch.no_grad():
        batch = torch.cat([z, pairs.z_a, pairs.z_b])
        latent = model.encoder((batch - model.input_mean) / model.input_scale)
        residual, quantized, commitment = latent, torch.zeros_like(latent), 0.0
        for codebook in model.codebooks:
            chosen = codebook[torch.cdist(residual, codebook).argmin(dim=1)]
            commitment += ((residual - chosen) ** 2).sum(dim=1).mean()
            quantized, residual = quantized + chosen, residual - chosen
        z_hat = model.decoder(quantized) * model.input_scale + model.input_mean
        reconstruction = ((z_hat[:5] - z) ** 2).sum(dim=1).mean()
        h = torch.nn.functional.normalize((z_hat[5:] - model.input_mean) / model.input_scale, dim=-1)
        items = torch.cat([item_a, item_b]).tolist()
        contrast = 0.0
        for anchor in range(6):
            partner = (anchor + 3) % 6
            negatives = [k for k in range(6) if k not in (anchor, partner) and items[k] not in (items[anchor], items[partner])]
            scores = torch.stack([h[anchor] @ h[k] / 0.07 for k in [partner, *negatives]])
            contrast += -(scores[0] - torch.logsumexp(scores, dim=0)) / 6
    terms = {"reconstruction": 1000 * reconstruction, "commitment": 0.5 * commitment, "contrast": contrast}
    total = sum(terms.values())
    torch.testing.assert_close(loss.detach(), total)
    assert parts["reconstruction"] == pytest.approx(reconstruction.item(), rel=1e-5)
    assert parts["commitment"] == pytest.approx(commitment.item(), rel=1e-5)
    assert parts["contrast"] == pytest.approx(contrast.item(), rel=1e-5)
    for name, term in terms.items():
        assert parts[f"share_{name}"] == pytest.approx((term / total).item(), rel=1e-5)

"""SaviorEnc stage 2 (paper 3.2, eqs. 4-5): an RQ-VAE that turns z into L semantic codes.

    r^1 = Enc(z);  c^l = assign(r^l, C_l);  r^{l+1} = r^l - C_l[c^l];  z_hat = Dec(sum_l C_l[c^l])

During training `assign` is a Sinkhorn optimal-transport assignment (POT, torch backend) that
spreads each batch over the K codes of a level, instead of argmin, which lets a few codes take
everything; gradients pass the quantiser straight through.

    L = lambda0 * reconstruction + lambda1 * commitment + InfoNCE(z_hat_i, z_hat_j) over co-click pairs   (eq. 5)

Reconstruction and commitment are squared norms on z as given, so lambda0 = 1000 and lambda1 = 0.5
weigh what the paper's do; `rqvae_loss` says where the contrast is computed and why.

Choices the paper leaves open, each measured on the demo catalog:
- the model standardises its input per dimension: aligned embeddings are unit vectors packed in a
  narrow cone (variance per dimension about 1e-3), which left the encoder's latents tiny and the
  k-means codebooks stale once training spread them;
- a short autoencoder warm-up precedes the k-means (faiss) initialisation of the codebooks, so
  they start from the residuals of a trained encoder, not a random one;
- codewords follow the mean of the residuals assigned to them (exponential moving average) rather
  than a gradient step, and codes left unused in an epoch are re-seeded from residuals.
Together these took the demo's collision rate from 0.9 to below faiss' ResidualQuantizer.
"""

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Literal, NamedTuple

import faiss
import numpy as np
import ot
import torch
import torch.nn.functional as F
from torch import nn

from saviorrec_pipeline.checkpoints import CheckpointStore, TrainingState, fingerprint, latest_checkpoint
from saviorrec_pipeline.method.device import device_for_training
from saviorrec_pipeline.method.encoder import info_nce
from saviorrec_pipeline.method.training import EpochReport, Figures, Steps, train_epochs

Assignment = Literal["argmin", "sinkhorn"]


@dataclass(frozen=True)
class RQVAEConfig:
    """Architecture: enough to rebuild the module from code and a weights file."""

    input_dim: int
    latent_dim: int = 64  # d
    num_levels: int = 8  # L
    codebook_size: int = 2048  # K
    hidden_dims: tuple[int, ...] = (256, 128)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RQVAEConfig":
        return cls(**{**values, "hidden_dims": tuple(values["hidden_dims"])})


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


@dataclass
class Quantized:
    codes: torch.Tensor  # (items, L) int64
    quantized: torch.Tensor  # (items, d): sum of the chosen codewords
    residuals: torch.Tensor  # (L, items, d): r^l, the input of each level


class RQVAE(nn.Module):
    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = _mlp([config.input_dim, *config.hidden_dims, config.latent_dim])
        self.decoder = _mlp([config.latent_dim, *reversed(config.hidden_dims), config.input_dim])
        # Buffers, not parameters: codewords move by moving average, the scaling is fitted once.
        self.register_buffer("codebooks", torch.randn(config.num_levels, config.codebook_size, config.latent_dim) * 0.01)
        self.register_buffer("input_mean", torch.zeros(config.input_dim))
        self.register_buffer("input_scale", torch.ones(config.input_dim))

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.input_mean) / self.input_scale

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.standardise(z))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized) * self.input_scale + self.input_mean

    def quantize(self, latent: torch.Tensor, assignment: Assignment = "argmin") -> Quantized:
        """Eq. 4: each level picks a codeword for what the levels before it left over."""
        residual, codes, residuals = latent, [], []
        quantized = torch.zeros_like(latent)
        for codebook in self.codebooks:
            residuals.append(residual)
            distances = torch.cdist(residual.detach().float(), codebook.float()) ** 2
            code = sinkhorn_assign(distances) if assignment == "sinkhorn" else distances.argmin(dim=1)
            chosen = codebook[code]
            codes.append(code)
            quantized = quantized + chosen
            residual = residual - chosen
        return Quantized(torch.stack(codes, dim=1), quantized, torch.stack(residuals))

    def forward(self, z: torch.Tensor, assignment: Assignment = "argmin") -> tuple[torch.Tensor, torch.Tensor, Quantized]:
        """(z_hat, commitment loss, quantisation) for a batch of embeddings."""
        latent = self.encode(z)
        q = self.quantize(latent, assignment)
        chosen = torch.stack([self.codebooks[l][q.codes[:, l]] for l in range(self.config.num_levels)])
        commitment = ((q.residuals - chosen) ** 2).sum(dim=(0, 2)).mean()  # keeps the encoder near its codewords
        straight_through = latent + (q.quantized - latent).detach()
        return self.decode(straight_through), commitment, q

    @torch.no_grad()
    def fit_input_scaling(self, z: torch.Tensor) -> None:
        self.input_mean.copy_(z.mean(dim=0))
        self.input_scale.copy_(z.std(dim=0).clamp_min(1e-6))

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, seed: int = 0) -> None:
        """k-means (faiss) on each level's residuals of the encoder's latents."""
        residual = self.encode(z).float()
        for level in range(self.config.num_levels):
            kmeans = faiss.Kmeans(self.config.latent_dim, self.config.codebook_size, niter=20, seed=seed + level, verbose=False)
            kmeans.train(np.ascontiguousarray(residual.cpu().numpy(), dtype=np.float32))
            centroids = torch.from_numpy(kmeans.centroids).to(self.codebooks)
            self.codebooks[level] = centroids
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]

    @torch.no_grad()
    def update_codebooks(self, q: Quantized, decay: float) -> None:
        """Each chosen codeword moves towards the mean of the residuals assigned to it."""
        for level in range(self.config.num_levels):
            counts = torch.bincount(q.codes[:, level], minlength=self.config.codebook_size).to(self.codebooks)
            sums = torch.zeros_like(self.codebooks[level]).index_add_(0, q.codes[:, level], q.residuals[level].detach())
            used = counts > 0
            means = sums[used] / counts[used, None]
            self.codebooks[level, used] = decay * self.codebooks[level, used] + (1 - decay) * means

    @torch.no_grad()
    def reseed_dead_codes(self, usage: torch.Tensor, residuals: torch.Tensor, generator: torch.Generator) -> int:
        """Codes no item chose (usage (L, K) == 0) move to random residuals of their level."""
        dead_total = 0
        for level in range(self.config.num_levels):
            dead = torch.nonzero(usage[level] == 0).flatten()
            if len(dead):
                picks = torch.randint(0, residuals.shape[1], (len(dead),), generator=generator)
                self.codebooks[level, dead] = residuals[level, picks].to(self.codebooks)
                dead_total += len(dead)
        return dead_total


def sinkhorn_assign(distances: torch.Tensor, eps: float = 0.01, iterations: int = 50) -> torch.Tensor:
    """Codes for a batch by entropic optimal transport, items and codes uniform (POT).

    The cost is each item's distance above its nearest code, scaled to mean 1, so `eps` is relative
    to the typical gap between codes and not to the farthest outlier (which blurred the plan into
    near-random codes). 50 iterations leave the plan partly balanced: enough to keep every code in
    use, while most items keep a near code.

    In float64: most entries of -cost/eps lie below -87, where float32 `exp` (POT's logsumexp)
    underflows into subnormals and takes a slow path on CPU; float64 made `tiny` training 3x faster."""
    items, codes = distances.shape
    distances = distances.double()
    gaps = distances - distances.min(dim=1, keepdim=True).values
    cost = gaps / gaps.mean().clamp_min(1e-12)
    a = torch.full((items,), 1.0 / items, dtype=cost.dtype, device=cost.device)
    b = torch.full((codes,), 1.0 / codes, dtype=cost.dtype, device=cost.device)
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=iterations, warn=False)
    return plan.argmax(dim=1)


class PairBatch(NamedTuple):
    """A batch of co-click pairs: their embeddings and their rows of z (so that an item is never
    its own negative)."""

    z_a: torch.Tensor  # (pairs, D)
    z_b: torch.Tensor  # (pairs, D)
    item_a: torch.Tensor  # (pairs,) int64
    item_b: torch.Tensor  # (pairs,) int64


def rqvae_loss(
    model: RQVAE, z: torch.Tensor, pairs: PairBatch | None,
    lambda_reconstruct: float, lambda_commit: float, temperature: float, assignment: Assignment,
) -> tuple[torch.Tensor, dict[str, float], Quantized]:
    """Eq. 5 on a batch of items, with the contrastive term on a batch of co-click pairs; one pass
    quantises items and pairs together. Figures: each term unweighted, and each weighted term's
    share of the loss (`share_*`).

    Reconstruction is ||z - z_hat||^2 and commitment sum_l ||r^l - C_l[c^l]||^2, squared norms of
    each item averaged over items, on z as given: so lambda0 and lambda1 weigh what the paper's
    weigh. (Per-dimension means in standardised units, as before, multiplied lambda0 by about
    1e3 / D and left the contrast under 1% of the loss; means in raw units left reconstruction
    under 3%.) The contrast compares the reconstructions in the model's standardised units (the
    decoder's own output): raw aligned embeddings share one narrow cone, where their cosines at
    temperature 0.07 hardly tell items apart."""
    n_pairs = 0 if pairs is None else len(pairs.z_a)
    batch = z if pairs is None else torch.cat([z, pairs.z_a, pairs.z_b])
    z_hat, commitment, q = model(batch, assignment)
    items = len(z)
    reconstruction = ((z_hat[:items] - z) ** 2).sum(dim=1).mean()
    terms = {"reconstruction": lambda_reconstruct * reconstruction, "commitment": lambda_commit * commitment}
    parts = {"reconstruction": reconstruction.item(), "commitment": commitment.item()}
    if n_pairs:
        hat_a, hat_b = F.normalize(model.standardise(z_hat[items:]), dim=-1).split(n_pairs)
        terms["contrast"] = info_nce(hat_a, hat_b, temperature, pairs.item_a, pairs.item_b)
        parts["contrast"] = terms["contrast"].item()
    loss = sum(terms.values())
    parts |= {f"share_{name}": (term / loss).item() for name, term in terms.items()}
    return loss, parts, Quantized(q.codes[:items], q.quantized[:items], q.residuals[:, :items])


def code_usage(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(L, K) counts of items per code at each level."""
    return torch.stack([torch.bincount(codes[:, l], minlength=codebook_size) for l in range(codes.shape[1])])


def codebook_quality(codes: np.ndarray, codebook_size: int) -> dict:
    """Per-level utilisation (share of codes used) and perplexity, and the collision rate
    (share of items whose whole code tuple another item shares)."""
    levels = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / len(codes)
        levels.append({"level": level + 1, "utilisation": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))})
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    collision_rate = float((counts[inverse.ravel()] > 1).mean())
    return {"levels": levels, "collision_rate": collision_rate}


@dataclass(frozen=True)
class RQVAETrainConfig:
    epochs: int = 150
    batch_size: int = 16384
    lr: float = 0.002
    lambda_reconstruct: float = 1000.0  # lambda0
    lambda_commit: float = 0.5  # lambda1
    temperature: float = 0.07
    assignment: Assignment = "sinkhorn"
    warmup_epochs: int = 10  # autoencoder only, before the k-means initialisation
    codebook_decay: float = 0.8  # moving average of the codewords; nearer 1 when an epoch has many steps
    seed: int = 0


def train_rqvae(
    model: RQVAE, z: torch.Tensor, pairs: np.ndarray, train: RQVAETrainConfig, device: torch.device,
    on_epoch: Callable[[EpochReport], None] | None = None, checkpoints: CheckpointStore | None = None, continued: bool = False,
) -> list[Figures]:
    """The whole recipe: fit the input scaling, warm the autoencoder up, initialise the codebooks by
    k-means, then train eq. 5 with Adam over shuffled item batches; each step also takes a batch of
    co-click pairs (rows of z). Returns one dict of figures per RQ epoch. Given a `CheckpointStore`,
    saves after every RQ epoch and resumes from the latest save (scaling, warmup and k-means are
    in the saved weights). A `continued` model (a trained one's weights) keeps its scaling and
    codebooks and goes straight to eq. 5."""
    z = z.to(device)
    state = TrainingState(model.to(device), torch.optim.Adam(model.parameters(), lr=train.lr), torch.Generator().manual_seed(train.seed))
    batch = min(train.batch_size, len(z))
    steps = max(1, len(z) // batch)

    def batches(generator: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(z), generator=generator)
        return [order[step * batch : (step + 1) * batch] for step in range(steps)]

    saved = latest_checkpoint(checkpoints)
    if saved is None and not continued:
        model.fit_input_scaling(z)
        # One term, so its units weigh nothing; standardised, its gradients stay far above Adam's epsilon.
        autoencoder = Steps(batches, lambda rows: F.mse_loss(model.decoder(model.encode(z[rows])), model.standardise(z[rows])))
        train_epochs("warmup", state, autoencoder, train.warmup_epochs, label="rq-vae warmup", device=device)
        model.init_codebooks(z, seed=train.seed)

    pair_rows = torch.from_numpy(np.array(pairs, dtype=np.int64).reshape(-1, 2))  # a copy: pairs may be read-only
    epoch_state: dict = {}  # the last step's quantisation and the epoch's code usage

    def loss_of(rows: torch.Tensor) -> tuple[torch.Tensor, Figures]:
        pair_batch = None
        if len(pair_rows) >= 2:
            picked = pair_rows[torch.randint(0, len(pair_rows), (min(batch, len(pair_rows)),), generator=state.generator)].to(device)
            pair_batch = PairBatch(z[picked[:, 0]], z[picked[:, 1]], picked[:, 0], picked[:, 1])
        loss, parts, epoch_state["q"] = rqvae_loss(
            model, z[rows], pair_batch, train.lambda_reconstruct, train.lambda_commit, train.temperature, train.assignment
        )
        return loss, parts

    def after_step() -> None:
        q = epoch_state["q"]
        model.update_codebooks(q, train.codebook_decay)
        usage = code_usage(q.codes.cpu(), model.config.codebook_size)
        epoch_state["usage"] = epoch_state["usage"] + usage if "usage" in epoch_state else usage

    def end_epoch(figures: Figures) -> None:
        figures["dead_codes_reseeded"] = model.reseed_dead_codes(epoch_state.pop("usage"), epoch_state["q"].residuals.detach().cpu(), state.generator)

    return train_epochs(
        "rq", state, Steps(batches, loss_of, after_step, end_epoch), train.epochs, label="rq-vae", device=device,
        checkpoints=checkpoints, resume=saved, on_epoch=on_epoch,
    )


@torch.no_grad()
def assign_codes(model: RQVAE, z: torch.Tensor, assignment: Assignment, device: torch.device, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Codes (items, L) and per-item reconstruction MSE, in batches. Sinkhorn balances within a batch."""
    model.to(device).eval()
    codes, errors = [], []
    for start in range(0, len(z), batch_size):
        chunk = z[start : start + batch_size].to(device)
        q = model.quantize(model.encode(chunk), assignment)
        codes.append(q.codes.cpu().numpy())
        errors.append(((model.decode(q.quantized) - chunk) ** 2).mean(dim=1).cpu().numpy())
    return np.concatenate(codes), np.concatenate(errors)


def check_embeddings(z: np.ndarray, expected_dim: int | None, codebook_size: int, where: str) -> None:
    """Refuse input the RQ-VAE cannot learn from, naming the problem."""
    if z.ndim != 2 or (expected_dim is not None and z.shape[1] != expected_dim):
        raise ValueError(f"{where}: embeddings have shape {z.shape}, expected (items, {expected_dim})")
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} embedding(s) contain NaN or infinite values, e.g. row {int(np.flatnonzero(bad)[0])}")
    if len(z) < codebook_size:
        raise ValueError(f"{where}: {len(z)} items are fewer than the codebook size K={codebook_size}: lower K")


def faiss_rq_collision_rate(z: np.ndarray, num_levels: int, codebook_size: int) -> float:
    """Collision rate of faiss' ResidualQuantizer with the same L and K on the same embeddings."""
    rq = faiss.ResidualQuantizer(z.shape[1], num_levels, int(np.log2(codebook_size)))
    rq.train(z)
    packed = rq.compute_codes(z)  # identical packed codes <=> identical code tuples
    _, inverse, counts = np.unique(packed, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.ravel()] > 1).mean())


@dataclass
class SemanticIds:
    model: RQVAE  # trained with Sinkhorn assignment
    history: list[Figures]
    codes: np.ndarray  # (items, L)
    errors: np.ndarray  # per-item reconstruction MSE
    quality: dict  # codebook_quality of `codes`


def _fit(
    z: np.ndarray, pairs: np.ndarray, architecture: RQVAEConfig, training: RQVAETrainConfig, assignment: Assignment,
    checkpoints: Callable[[str], CheckpointStore | None], on_epoch: Callable[[EpochReport], None] | None,
    continue_from: dict[str, torch.Tensor] | None = None,
) -> tuple[RQVAE, list[Figures]]:
    settings = dataclasses.replace(training, assignment=assignment)
    torch.manual_seed(settings.seed)
    model = RQVAE(architecture)
    if continue_from is not None:
        model.load_state_dict(continue_from)
    store = checkpoints(f"{assignment}-{fingerprint(architecture.to_dict(), settings, torch.from_numpy(z), pairs, *(continue_from or {}).values())}")
    return model, train_rqvae(model, torch.from_numpy(z), pairs, settings, device_for_training(), on_epoch, store, continued=continue_from is not None)


def train_semantic_ids(
    z: np.ndarray, pairs: np.ndarray, architecture: RQVAEConfig, training: RQVAETrainConfig, *,
    inference_assignment: Assignment = "argmin", checkpoints: Callable[[str], CheckpointStore | None] = lambda run_key: None,
    on_epoch: Callable[[EpochReport], None] | None = None, where: str = "embeddings", continue_from: dict[str, torch.Tensor] | None = None,
) -> SemanticIds:
    """SaviorEnc stage 2 on item embeddings z (items, D) and co-click pairs (rows of z): the RQ-VAE
    trained with Sinkhorn assignment (going on from `continue_from`, a trained RQ-VAE's weights,
    when given), every item's codes assigned by `inference_assignment`, and their codebook quality.
    `checkpoints(run_key)` gives the training run's place."""
    check_embeddings(z, architecture.input_dim, architecture.codebook_size, where)
    model, history = _fit(z, pairs, architecture, training, "sinkhorn", checkpoints, on_epoch, continue_from)
    codes, errors = assign_codes(model, torch.from_numpy(z), inference_assignment, device_for_training(), training.batch_size)
    return SemanticIds(model, history, codes, errors, codebook_quality(codes, architecture.codebook_size))


def compare_quantisers(
    z: np.ndarray, pairs: np.ndarray, architecture: RQVAEConfig, training: RQVAETrainConfig, codes: np.ndarray, *,
    checkpoints: Callable[[str], CheckpointStore | None] = lambda run_key: None, where: str = "embeddings",
) -> list[tuple[str, dict]]:
    """The stage's codes beside two quantisers of the same shape on the same embeddings: an RQ-VAE
    trained with argmin assignment instead of Sinkhorn's, and faiss' ResidualQuantizer (whose
    quality is its collision rate alone). Each: (name, codebook_quality)."""
    check_embeddings(z, architecture.input_dim, architecture.codebook_size, where)
    argmin_model, _ = _fit(z, pairs, architecture, training, "argmin", checkpoints, None)
    argmin_codes, _ = assign_codes(argmin_model, torch.from_numpy(z), "argmin", device_for_training(), training.batch_size)
    return [
        ("rq-vae (sinkhorn)", codebook_quality(codes, architecture.codebook_size)),
        ("rq-vae (argmin)", codebook_quality(argmin_codes, architecture.codebook_size)),
        ("faiss ResidualQuantizer", {"collision_rate": faiss_rq_collision_rate(z, architecture.num_levels, architecture.codebook_size), "levels": []}),
    ]

"""The SaviorRec ranking model (paper 3.3-3.4) and its baselines, top-down.

    pCTR = DNN(h_BiD-TA, other features)                                       (16)
    h_BiD-TA = Concat(h_b, h_m, h_b2m, h_m2b)                                  (15)
    h_b = TA(h_cand, h_seq, h_seq)     h_m = TA(z_cand, z_seq, z_seq)          (11, 12)
    h_m2b = TA(z_cand, z_seq, h_seq)   h_b2m = TA(h_cand, h_seq, z_seq)        (13, 14)
    h = Concat(ID, S)                  z = z_align = z + MLP(L2(Concat(v_1..v_L)))   (6-9, MBA)

Variants (Tables 2-3): `base` has only the behaviour block b; `saviorrec` all four blocks with MBA;
`no_mba` feeds the frozen z; `no_mm_embedding` starts the MBA codebook from the RQ codebooks and
drops the skip connection to z; `no_bidir` keeps b and m only. Fig. 4 removes one kind of feature
from saviorrec: `no_item_id` (h = S), `no_statistics` (h = ID); without the multimodal features
and their modules saviorrec is `base`. Item-side inputs (z, codes) live in
the model as buffers indexed by a dense item number, so a saved model scores from item ids alone;
a batch may also bring items the tables lack (`Batch.new_embeddings`), scored without an ID row.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

BLOCKS = ("b", "m", "m2b", "b2m")
EMBEDDING_INIT_STD = 1e-4
MASKED_SCORE = -1e9  # exp of it, beside any real score, is exactly 0 in float32


@dataclass(frozen=True)
class Variant:
    blocks: tuple[str, ...]
    multimodal: bool = True  # z_cand and the m-side blocks' inputs exist
    mba: bool = True  # z passes through MBA
    mba_from_rq: bool = False  # MBA codebook starts from the RQ codebooks, no skip to z
    item_id: bool = True  # h holds the item ID embedding
    statistics: bool = True  # h holds the statistics S


VARIANTS: dict[str, Variant] = {
    "base": Variant(blocks=("b",), multimodal=False, mba=False),
    "saviorrec": Variant(blocks=BLOCKS),
    "no_mba": Variant(blocks=BLOCKS, mba=False),
    "no_mm_embedding": Variant(blocks=BLOCKS, mba_from_rq=True),
    "no_bidir": Variant(blocks=("b", "m")),
    "no_item_id": Variant(blocks=BLOCKS, item_id=False),
    "no_statistics": Variant(blocks=BLOCKS, statistics=False),
}


@dataclass(frozen=True)
class CTRConfig:
    """Architecture; with the item tables' shapes, enough to rebuild the module from code."""

    variant: str
    num_items: int  # dense item numbers 0..num_items-1; num_items is the padding row
    embedding_dim: int  # D of z
    num_levels: int  # L of the RQ codes
    codebook_size: int  # K
    mba_dim: int = 64  # Table 5
    id_dim: int = 64  # 32 scored 0.01 lower AUC for base on the demo
    stats_dim: int = 3  # log1p(impressions), log1p(clicks), smoothed CTR
    user_buckets: int = 100_003
    user_dim: int = 16
    profile_vocab_sizes: tuple[int, ...] = ()  # per profile column, index 0 = unknown
    profile_dim: int = 8
    attention_dim: int = 64
    heads: int = 8
    dnn_dims: tuple[int, ...] = (256, 128)  # + the output layer: 3 layers
    use_base_pctr: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CTRConfig":
        return cls(**{**values, "profile_vocab_sizes": tuple(values["profile_vocab_sizes"]), "dnn_dims": tuple(values["dnn_dims"])})


@dataclass
class Batch:
    user: torch.Tensor  # (B,) hashed user id
    profile: torch.Tensor  # (B, P) vocabulary indices
    item: torch.Tensor  # (B,) dense item number
    stats: torch.Tensor  # (B, 3)
    seq_items: torch.Tensor  # (B, N) dense item numbers, padding = num_items
    seq_stats: torch.Tensor  # (B, N, 3)
    seq_mask: torch.Tensor  # (B, N) True where a real click
    base_pctr: torch.Tensor  # (B, 1)
    label: torch.Tensor | None = field(default=None)  # (B,)
    # Items not in the model's tables (a cold start the ranker never trained on): item number
    # num_items + 1 + j is row j of these, raw z as the encoder gives it and its RQ codes.
    new_embeddings: torch.Tensor | None = field(default=None)  # (M, D)
    new_codes: torch.Tensor | None = field(default=None)  # (M, L)

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{k: (v.to(device) if v is not None else None) for k, v in dataclasses.asdict(self).items()})


class CTRModel(nn.Module):
    def __init__(self, config: CTRConfig):
        super().__init__()
        self.config = config
        self.variant = VARIANTS[config.variant]
        pad = config.num_items
        # Item-side tables, filled by load_item_tables: frozen z (paper 3.2) and RQ codes.
        self.register_buffer("item_ids", torch.zeros(pad, dtype=torch.long))
        self.register_buffer("item_embeddings", torch.zeros(pad + 1, config.embedding_dim))
        self.register_buffer("item_codes", torch.zeros(pad + 1, config.num_levels, dtype=torch.long))
        self.register_buffer("embedding_mean", torch.zeros(config.embedding_dim))  # of the catalog's z, to standardise a new item's
        self.register_buffer("embedding_std", torch.ones(config.embedding_dim))
        # Standardisation of the statistics S_i, fitted on the training rows (load_stats_scale):
        # raw log-counts reach 10 and more, and would swamp the ID embeddings beside them.
        self.register_buffer("stats_mean", torch.zeros(config.stats_dim))
        self.register_buffer("stats_std", torch.ones(config.stats_dim))
        # Sparse gradients: Adagrad then updates only the rows a batch touched, not every row of
        # a table that (with hashed users) is mostly rows the batch never saw.
        if self.variant.item_id:
            self.item_id_embedding = nn.Embedding(pad + 1, config.id_dim, padding_idx=pad, sparse=True)
        self.user_embedding = nn.Embedding(config.user_buckets, config.user_dim, sparse=True)
        self.profile_embeddings = nn.ModuleList(nn.Embedding(size, config.profile_dim, sparse=True) for size in config.profile_vocab_sizes)
        item_tables = [self.item_id_embedding] if self.variant.item_id else []
        for table in [*item_tables, self.user_embedding, *self.profile_embeddings]:
            # Near zero, as DIN starts its tables: Adagrad moves each coordinate by about lr per
            # update whatever the gradient's scale, so a unit-variance start would stay noise for
            # hundreds of updates, and a rare id never gets them.
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
        for table in item_tables:
            with torch.no_grad():
                table.weight[pad].zero_()
        if self.variant.mba:
            self.mba = MBA(config.num_levels, config.codebook_size, config.mba_dim, config.embedding_dim, skip=not self.variant.mba_from_rq)
        h_dim = config.id_dim * self.variant.item_id + config.stats_dim * self.variant.statistics
        z_dim = config.embedding_dim
        self.attention = BiDirectionalTargetAttention(self.variant.blocks, h_dim, z_dim, config.attention_dim, config.heads)
        other = config.user_dim + config.profile_dim * len(config.profile_vocab_sizes) + h_dim + int(config.use_base_pctr)
        other += z_dim if self.variant.multimodal else 0
        dims = [config.attention_dim * len(self.variant.blocks) + other, *config.dnn_dims, 1]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
            layers += [nn.Linear(n_in, n_out)] + ([nn.LeakyReLU()] if i < len(dims) - 2 else [])
        self.dnn = nn.Sequential(*layers)

    def load_item_tables(self, item_ids: torch.Tensor, embeddings: torch.Tensor, codes: torch.Tensor) -> None:
        """Ids, z and codes of items 0..num_items-1; the padding row stays zero.

        z is standardised per dimension over the catalog: aligned embeddings are unit vectors in a
        narrow cone (variance per dimension about 1e-3), too flat for the attention and the DNN."""
        with torch.no_grad():
            self.item_ids.copy_(item_ids)
            self.embedding_mean.copy_(embeddings.mean(dim=0))
            self.embedding_std.copy_(embeddings.std(dim=0).clamp_min(1e-6))
            self.item_embeddings[:-1] = self.standardised(embeddings)
            self.item_codes[:-1] = codes

    def standardised(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.embedding_mean) / self.embedding_std

    def load_stats_scale(self, stats: torch.Tensor) -> None:
        """Standardise S_i by the mean and deviation of the training rows' statistics (rows, 3),
        over their finite values: one bad row must not spoil every row's features."""
        finite = stats.isfinite()
        count = finite.sum(dim=0).clamp_min(1)
        values = stats.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        mean = values.sum(dim=0) / count
        variance = (((values - mean) * finite) ** 2).sum(dim=0) / count
        with torch.no_grad():
            self.stats_mean.copy_(mean)
            self.stats_std.copy_(variance.sqrt().clamp_min(1e-6))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,)."""
        stats = (batch.stats - self.stats_mean) / self.stats_std  # (B, 3)
        seq_stats = (batch.seq_stats - self.stats_mean) / self.stats_std * batch.seq_mask[..., None]  # (B, N, 3), padding 0
        h_cand, h_seq = self._behaviour(batch.item, stats), self._behaviour(batch.seq_items, seq_stats)  # (B, h_dim), (B, N, h_dim)
        z_cand = z_seq = None
        if self.variant.multimodal:
            z_cand, z_seq = self._multimodal(batch)  # (B, D), (B, N, D)
        interest = self.attention(h_cand, h_seq, z_cand, z_seq, batch.seq_mask)
        other = [self.user_embedding(batch.user), h_cand]
        other += [table(batch.profile[:, i]) for i, table in enumerate(self.profile_embeddings)]
        if z_cand is not None:
            other.append(z_cand)
        if self.config.use_base_pctr:
            other.append(batch.base_pctr)
        return self.dnn(torch.cat([interest, *other], dim=-1)).squeeze(-1)

    def _behaviour(self, items: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """h = Concat(ID, S), or the one of them the variant keeps; an item past the tables (a new
        one) reads the padding row, zero, as an item without an ID row."""
        ids = [self.item_id_embedding(items.clamp(max=self.config.num_items))] if self.variant.item_id else []
        return torch.cat(ids + ([stats] if self.variant.statistics else []), dim=-1)

    def _multimodal(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # Each distinct item once: a batch's sequences repeat items many times over. Read back with
        # index_select, not z[inverse]: its backward (index_add) is several times cheaper on a CPU
        # than advanced indexing's (index_put with accumulation).
        item, seq_items = batch.item, batch.seq_items
        unique, inverse = torch.unique(torch.cat([item, seq_items.flatten()]), return_inverse=True)
        z, codes = self._item_side(unique, batch)
        if self.variant.mba:
            z = self.mba(z, codes)
        batch_size = item.shape[0]  # not len(item): an int would fix the batch size of an exported graph
        z_cand, z_seq = z.index_select(0, inverse[:batch_size]), z.index_select(0, inverse[batch_size:])
        return z_cand, z_seq.view(*seq_items.shape, -1)

    def _item_side(self, numbers: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised z and codes of item numbers; those past the padding row are the batch's new items."""
        pad = self.config.num_items
        z, codes = self.item_embeddings[numbers.clamp(max=pad)], self.item_codes[numbers.clamp(max=pad)]
        if batch.new_embeddings is not None:
            new = numbers > pad
            rows = numbers[new] - pad - 1
            z, codes = z.clone(), codes.clone()
            z[new] = self.standardised(batch.new_embeddings[rows])
            codes[new] = batch.new_codes[rows]
        return z, codes


class MBA(nn.Module):
    """Modal-Behavior Alignment (eqs. 6-9): a trainable codebook of the RQ shape, read at the item's
    codes, fused by an MLP and added to the frozen z.

    The codebook starts at zero and the MLP has no biases, so at initialisation z_align == z. The L2
    normalisation is softened near zero (v / sqrt(|v|^2 + 1)): a plain one has an unbounded gradient
    at the zero codebook, which would freeze Adagrad's step sizes after the first update. Measured
    against v / max(|v|, 1e-6) on the default demo (3 days x 2 seeds, 2 epochs, mean AUC %): saviorrec
    77.22 vs 77.12 total and 69.55 vs 69.35 at PV < 100 (soft ahead in 5 of 6 pairs on each);
    no_mm_embedding 76.49 vs 76.85 and 66.54 vs 66.65, its paired differences spread from -1.27 to +1.55."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int, out_dim: int, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.codebook = nn.Parameter(torch.zeros(num_levels, codebook_size, dim))
        self.fuse = nn.Sequential(nn.Linear(num_levels * dim, out_dim, bias=False), nn.LeakyReLU(), nn.Linear(out_dim, out_dim, bias=False))

    def forward(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        levels, size = torch.arange(codes.shape[-1], device=codes.device), self.codebook.shape[1]
        rows = (codes + levels * size).flatten()  # row (level, code) of the flattened codebook
        v = self.codebook.flatten(0, 1).index_select(0, rows).view(*codes.shape[:-1], -1)  # (..., L * dim): Concat(v_1..v_L), eqs. 6-7
        v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + 1.0)
        v_align = self.fuse(v)  # eq. 8
        return z + v_align if self.skip else v_align  # eq. 9

    @torch.no_grad()
    def level_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fig. 3's two curves, each (L,) and divided by its largest level: the mean L2 norm of the
        codebook rows of level l, and the mean L2 norm of the fusion MLP's input weights that read
        one coordinate of v_l (how strongly the ranker draws on that level)."""
        levels = self.codebook.shape[0]
        rows = self.codebook.norm(dim=-1).mean(dim=1)
        first = self.fuse[0].weight  # (out_dim, L * dim): v = Concat(v_1..v_L)
        weights = first.norm(dim=0).view(levels, -1).mean(dim=1)  # per input coordinate, then per level
        return rows / rows.max().clamp_min(1e-12), weights / weights.max().clamp_min(1e-12)


class TargetAttention(nn.Module):
    """TA(Q, K, V) of eq. 10 as multi-head attention of the candidate over the sequence; padded
    positions are masked, and a user without clicks gets a zero vector.

    Per head h: softmax_n(q_h . W_k,h k_n / sqrt(d)) weighs W_v,h v_n + b_v,h. Computed in the
    order that is cheap when the candidate is one and the sequence long: the query is taken into
    the keys' input space (W_k,h^T q_h) and the values are pooled before W_v,h, so no position's
    key or value is ever projected. A key bias would add q_h . b_k,h to every position alike,
    which softmax ignores: the keys have none."""

    def __init__(self, query_dim: int, key_dim: int, value_dim: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.w_q, self.w_k, self.w_v = nn.Linear(query_dim, dim), nn.Linear(key_dim, dim, bias=False), nn.Linear(value_dim, dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = attention_weights(self.query_in_keys(query), keys, mask)
        return self.output(torch.bmm(weights, values), weights)

    def query_in_keys(self, query: torch.Tensor) -> torch.Tensor:
        """(B, query_dim) -> (B, H, key_dim): W_k,h^T q_h / sqrt(d), whose dot product with a raw key is its score."""
        batch, heads = query.shape[0], self.heads
        q = self.w_q(query).view(batch, heads, -1)  # (B, H, d)
        head_dim = q.shape[-1]
        return torch.einsum("bhd,hdk->bhk", q, self.w_k.weight.view(heads, head_dim, -1)) / math.sqrt(head_dim)

    def output(self, pooled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, H, value_dim) raw values pooled by (B, H, N) weights -> (B, dim): W_v,h and b_v,h applied after pooling."""
        batch, heads = pooled.shape[0], self.heads
        out = torch.einsum("bhv,hdv->bhd", pooled, self.w_v.weight.view(heads, -1, pooled.shape[-1]))  # (B, H, d)
        out = out + self.w_v.bias.view(heads, -1) * weights.sum(-1, keepdim=True)  # the weights sum to 1, or 0
        return out.reshape(batch, -1)


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the sequence of (B, Q, key_dim) queries against (B, N, key_dim) keys -> (B, Q, N);
    masked positions get 0, and a row with no position left all zeros.

    A finite mask bias, added inside the matmul, and a zero factor for empty rows: with -inf an
    empty row would be NaN, and cleaning it up costs more elementwise passes than the matmul."""
    bias = torch.where(mask, 0.0, MASKED_SCORE)[:, None, :]  # (B, 1, N)
    weights = torch.softmax(torch.baddbmm(bias, queries, keys.transpose(1, 2)), dim=-1)
    return weights * mask.any(dim=1).to(weights.dtype)[:, None, None]


class BiDirectionalTargetAttention(nn.Module):
    """Eqs. 11-15: the blocks a variant has, each TA(query side, key side, value side).

    Blocks that share their keys are scored in one matmul, and blocks that share their values pooled
    in one: on a CPU a (B, 2H, N) batched matmul costs about what one block's (B, H, N) does."""

    SIDES = {"b": ("h", "h", "h"), "m": ("z", "z", "z"), "m2b": ("z", "z", "h"), "b2m": ("h", "h", "z")}

    def __init__(self, blocks: tuple[str, ...], h_dim: int, z_dim: int, dim: int, heads: int):
        super().__init__()
        width = {"h": h_dim, "z": z_dim}
        self.heads = heads
        self.blocks = nn.ModuleDict(
            {name: TargetAttention(*(width[side] for side in self.SIDES[name]), dim, heads) for name in blocks}
        )
        # Per side, the blocks whose keys (values) come from it; sides no block reads are left out.
        self.sharing_keys = {side: names for side in ("h", "z") if (names := [n for n in blocks if self.SIDES[n][1] == side])}
        self.sharing_values = {side: names for side in ("h", "z") if (names := [n for n in blocks if self.SIDES[n][2] == side])}

    def forward(self, h_cand, h_seq, z_cand, z_seq, mask) -> torch.Tensor:
        cand, seq = {"h": h_cand, "z": z_cand}, {"h": h_seq, "z": z_seq}
        weights: dict[str, torch.Tensor] = {}  # per block, (B, H, N)
        for side, names in self.sharing_keys.items():
            queries = torch.cat([self.blocks[n].query_in_keys(cand[self.SIDES[n][0]]) for n in names], dim=1)  # (B, H * blocks, key_dim)
            weights.update(zip(names, attention_weights(queries, seq[side], mask).split(self.heads, dim=1)))
        pooled: dict[str, torch.Tensor] = {}  # per block, (B, H, value_dim)
        for side, names in self.sharing_values.items():
            together = torch.bmm(torch.cat([weights[n] for n in names], dim=1), seq[side])  # (B, H * blocks, value_dim)
            pooled.update(zip(names, together.split(self.heads, dim=1)))
        return torch.cat([block.output(pooled[name], weights[name]) for name, block in self.blocks.items()], dim=-1)

"""Fig. 5: item embedding spaces drawn in two dimensions (t-SNE), the untuned encoder's beside the
behavior-aligned one's, and a number for what the picture shows: how often an item's nearest
neighbours belong to its own group (on the demo, the planted topic group whose items the same users
click though their content differs, as the paper's Harry Potter books, robes and wands).
"""

from dataclasses import dataclass

import faiss
import numpy as np
import polars as pl

from saviorrec_pipeline.method.encoder import SaviorEnc
from saviorrec_pipeline.method.encoder_training import embedding_table


@dataclass(frozen=True)
class EmbeddingMap:
    points: pl.DataFrame  # item_id, space, x, y, group (null without ground truth)
    neighbour_agreement: dict[str, float]  # per space; empty without ground truth


def sample_items(item_ids: np.ndarray, max_items: int, seed: int) -> np.ndarray:
    """Row numbers of at most `max_items` catalog items, sorted; the same in every space."""
    if len(item_ids) <= max_items:
        return np.arange(len(item_ids))
    return np.sort(np.random.default_rng(seed).choice(len(item_ids), max_items, replace=False))


def tsne_2d(vectors: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """(n, D) L2-normalised vectors -> (n, 2): Euclidean t-SNE, which ranks neighbours as cosine does
    on unit vectors; PCA-initialised, so the layout is stable under the seed."""
    from sklearn.manifold import TSNE

    if len(vectors) < 3:
        raise ValueError(f"t-SNE needs at least 3 items, got {len(vectors)}")
    perplexity = min(perplexity, (len(vectors) - 1) / 3)  # t-SNE needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors).astype(np.float32)


def neighbour_agreement(vectors: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean share of each item's k nearest other items (cosine, exact) in the item's own group."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    k = min(k, len(vectors) - 1)
    _, neighbours = index.search(vectors, k + 1)
    own = np.arange(len(vectors))[:, None]
    # Drop the item itself wherever it sits among ties; keep the first k others.
    others = np.where(neighbours != own, neighbours, -1)
    kept = np.array([row[row >= 0][:k] for row in others])
    return float((groups[kept] == groups[:, None]).mean())


def embedding_map(
    item_ids: np.ndarray, spaces: dict[str, np.ndarray], groups: pl.DataFrame | None, max_items: int = 3000, seed: int = 0, k: int = 10,
) -> EmbeddingMap:
    """Each space's (catalog rows x D) embeddings of `item_ids` mapped to 2-D on one sample of
    items; with `groups` (item_id, group), the neighbour agreement of each space on that sample."""
    rows = sample_items(item_ids, max_items, seed)
    sampled = pl.DataFrame({"item_id": item_ids[rows]})
    group = sampled.join(groups, on="item_id", how="left", maintain_order="left")["group"] if groups is not None else None
    frames, agreement = [], {}
    for space, vectors in spaces.items():
        xy = tsne_2d(vectors[rows], seed)
        frames.append(sampled.with_columns(pl.lit(space).alias("space"), pl.Series("x", xy[:, 0]), pl.Series("y", xy[:, 1]),
                                           pl.Series("group", group, dtype=pl.Int32) if group is not None else pl.lit(None, pl.Int32).alias("group")))
        if group is not None and group.null_count() < len(group):
            known = group.is_not_null().to_numpy()
            agreement[space] = neighbour_agreement(vectors[rows][known], group.to_numpy()[known], k)
    return EmbeddingMap(pl.concat(frames), agreement)


def untuned_and_aligned_map(
    catalog: pl.DataFrame, item_embeddings: pl.DataFrame, untuned: SaviorEnc, groups: pl.DataFrame | None,
    max_items: int = 3000, seed: int = 0, k: int = 10, where: str = "item_embeddings",
) -> EmbeddingMap:
    """Fig. 5: the catalog embedded by the `untuned` encoder beside its aligned `item_embeddings`
    (item_id, embedding), mapped as `embedding_map` maps them."""
    untuned_table, _ = embedding_table(untuned, catalog)
    aligned = untuned_table.select("item_id").join(item_embeddings, on="item_id", how="left", maintain_order="left")
    if aligned["embedding"].null_count():
        raise ValueError(f"{where}: {aligned['embedding'].null_count()} catalog item(s) have no embedding; materialize item_embeddings again")
    spaces = {"untuned": untuned_table["embedding"].to_numpy(), "aligned": aligned["embedding"].to_numpy()}
    return embedding_map(untuned_table["item_id"].to_numpy(), spaces, groups, max_items, seed, k)

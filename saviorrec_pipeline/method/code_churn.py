"""Semantic IDs that stay put when the RQ-VAE is retrained.

A refreshed RQ-VAE numbers its codewords arbitrarily, so without care every item's semantic ID
changes and a warm-started ranker's MBA rows (one per level and code) would mean nothing. Per level,
the new codes are matched one-to-one to the previous model's: the minimum-cost assignment where
pairing new code j with old code i costs minus the number of items (present in both) that held i
before and hold j now. That maximises the items whose code keeps its number, which is the churn
reported. Codeword distances would not do: two separately trained RQ-VAEs encode into unrelated
latent spaces. The new model's codebook rows are then reordered by the matching, so it assigns the
renumbered codes itself and the MBA rows carry over unchanged.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def match_codes(old: np.ndarray, new: np.ndarray, codebook_size: int) -> np.ndarray:
    """(L, K) int64: per level, the number new code j is renamed to. `old` and `new` are the codes
    (items, L) of the same items under the previous and the refreshed model."""
    levels = new.shape[1]
    renaming = np.zeros((levels, codebook_size), dtype=np.int64)
    for level in range(levels):
        shared = np.zeros((codebook_size, codebook_size), dtype=np.int64)  # [new code, old code] -> items
        np.add.at(shared, (new[:, level], old[:, level]), 1)
        new_codes, old_codes = linear_sum_assignment(-shared)
        renaming[level, new_codes] = old_codes
    return renaming


def renumber(codes: np.ndarray, renaming: np.ndarray) -> np.ndarray:
    """Codes (items, L) under the renaming of `match_codes`."""
    return np.stack([renaming[level, codes[:, level]] for level in range(codes.shape[1])], axis=1)


def reorder_codebooks(codebooks: torch.Tensor, renaming: np.ndarray) -> torch.Tensor:
    """Codebooks (L, K, d) with codeword j of each level moved to row renaming[level, j], so the
    model assigns renumbered codes (argmin, and Sinkhorn too, do not depend on the rows' order)."""
    reordered = torch.empty_like(codebooks)
    for level in range(codebooks.shape[0]):
        reordered[level, torch.from_numpy(renaming[level])] = codebooks[level]
    return reordered


def code_churn(old: np.ndarray, new: np.ndarray) -> dict[str, list[float]]:
    """Shares of the items (rows of both, the same items) whose code changed: `level`[l] at level
    l + 1, `prefix`[l] in any of the first l + 1 levels."""
    changed = old != new  # (items, L)
    if not len(changed):
        return {"level": [0.0] * old.shape[1], "prefix": [0.0] * old.shape[1]}
    return {
        "level": changed.mean(axis=0).tolist(),
        "prefix": np.logical_or.accumulate(changed, axis=1).mean(axis=0).tolist(),
    }


def keep_code_numbers(
    codebooks: torch.Tensor, item_ids: np.ndarray, codes: np.ndarray, previous_ids: np.ndarray, previous_codes: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, dict[str, list[float]]]:
    """A refreshed RQ-VAE's codebooks (L, K, d) and its codes (items, L) renumbered to match the
    previous model's codes of the same items, with the churn of the items in both, before
    (`unmatched_*`) and after the matching."""
    _, now, before = np.intersect1d(item_ids, previous_ids, return_indices=True)
    renaming = match_codes(previous_codes[before], codes[now], codebooks.shape[1])
    renumbered = renumber(codes, renaming)
    unmatched = code_churn(previous_codes[before], codes[now])
    churn = code_churn(previous_codes[before], renumbered[now])
    return reorder_codebooks(codebooks, renaming), renumbered, churn | {f"unmatched_{key}": value for key, value in unmatched.items()} | {"items_in_both": [len(now)]}

"""How much client masks agree: pairwise Jaccard index and the histogram of votes.

Pure functions over masks (``dict[str, torch.BoolTensor]``, ``True`` = kept), for
FedSparsify-Local, where every client prunes its own model and the server merges by majority vote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["jaccard_matrix", "vote_histogram"]


def _flat(mask: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All coordinates of a mask as one flat numpy bool array (tensor order)."""
    return np.concatenate([m.reshape(-1).numpy().astype(bool, copy=False) for m in mask.values()])


def jaccard_matrix(masks: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Pairwise Jaccard index ``|A & B| / |A | B|`` of the kept sets of ``K`` masks.

    Parameters
    ----------
    masks : sequence of dict of str to torch.BoolTensor, length K
        Same names and shapes.

    Returns
    -------
    numpy.ndarray of float64, shape (K, K)
        Symmetric, 1 on the diagonal; 1 for two empty masks.
    """
    flat = [_flat(m) for m in masks]
    if len({f.size for f in flat}) > 1:
        raise ValueError("masks have different numbers of coordinates")
    packed = [np.packbits(f) for f in flat]  # 8 coordinates per byte; popcounts give exact set sizes
    sizes = [int(np.bitwise_count(p).sum()) for p in packed]
    k = len(flat)
    out = np.ones((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            inter = int(np.bitwise_count(packed[i] & packed[j]).sum())
            union = sizes[i] + sizes[j] - inter
            out[i, j] = out[j, i] = inter / union if union else 1.0
    return out


def vote_histogram(masks: Sequence[Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """How many coordinates received ``v`` votes, for ``v = 0..K``.

    Parameters
    ----------
    masks : sequence of dict of str to torch.BoolTensor, length K

    Returns
    -------
    pandas.DataFrame
        Columns ``votes`` (0..K) and ``count`` (coordinates kept by exactly that many clients).
    """
    if not masks:
        raise ValueError("no masks")
    if len(masks) > 255:
        raise ValueError(f"at most 255 masks can be counted, got {len(masks)}")
    votes = np.zeros(_flat(masks[0]).size, dtype=np.uint8)
    for m in masks:
        votes += _flat(m)
    counts = np.bincount(votes, minlength=len(masks) + 1)
    return pd.DataFrame({"votes": np.arange(len(masks) + 1), "count": counts})

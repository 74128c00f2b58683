"""Mask agreement: Jaccard index and vote histogram on hand-worked 2x2 masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse_lib.federated.agreement import jaccard_matrix, vote_histogram

A = {"w": torch.tensor([[True, True], [False, False]])}
B = {"w": torch.tensor([[True, False], [True, False]])}
C = {"w": torch.tensor([[False, False], [False, False]])}


def test_jaccard_by_hand():
    # A & B = {(0,0)}, A | B = {(0,0), (0,1), (1,0)} -> 1/3; A and the empty mask share nothing -> 0
    expected = np.array([[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])
    assert np.allclose(jaccard_matrix([A, B, C]), expected)
    assert jaccard_matrix([C, C])[0, 1] == 1.0


def test_vote_histogram_by_hand():
    # votes per coordinate: (0,0): 2, (0,1): 1, (1,0): 1, (1,1): 0
    hist = vote_histogram([A, B, C])
    assert hist["votes"].tolist() == [0, 1, 2, 3] and hist["count"].tolist() == [1, 2, 1, 0]


def test_masks_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="different numbers"):
        jaccard_matrix([A, {"w": torch.ones(3, dtype=torch.bool)}])

"""Tiny federations for the engine and strategy tests: random volumes whose intensity follows age."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedsparse_lib.federated.simulation import DatasetClient
from fedsparse_lib.models import BrainAgeCNN

SHAPE = (12, 14, 12)


def tiny_data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ages = torch.rand(n, generator=g) * 30 + 50
    x = torch.randn(n, 1, *SHAPE, generator=g) + (ages.view(-1, 1, 1, 1, 1) - 65) / 10
    return TensorDataset(x, ages)


def tiny_model() -> BrainAgeCNN:
    return BrainAgeCNN(SHAPE, width=0.125, mean_age=65.0, output_scale=10.0)


@pytest.fixture
def federation() -> tuple[list[DatasetClient], TensorDataset, Callable[[], BrainAgeCNN]]:
    """Four clients of 9 examples (batch 4) and a 12-example test set, plus the model builder."""
    data = tiny_data()
    test = TensorDataset(data.tensors[0][:12], data.tensors[1][:12])
    clients = [DatasetClient(k, data, np.arange(12 + 9 * k, 21 + 9 * k), batch_size=4) for k in range(4)]
    return clients, test, tiny_model

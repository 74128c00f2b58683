"""A tiny dataset shared by the privacy tests: random volumes that remember which positions were read."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

SHAPE = (12, 12, 12)


class RecordingDataset(Dataset):
    """Random volumes with ages 40 + index; remembers which positions were read."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, *SHAPE, generator=g)
        self.ages = (40.0 + torch.arange(n, dtype=torch.float32)).numpy()
        self.read: set[int] = set()

    def __len__(self) -> int:
        return len(self.ages)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read.add(int(i))
        return self.x[i], torch.tensor(self.ages[i])

"""What a brain-age model looks at: gradient x input saliency maps."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["saliency_map"]


def saliency_map(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                 device: str | torch.device = "cpu", absolute: bool = True) -> np.ndarray:
    """Mean gradient x input of the predicted age over all volumes of ``batches``.

    For each volume ``x`` the map is ``x * d age_hat / d x`` (Simonyan et al. 2014; Shrikumar et al.
    2016), in years per unit of the normalised input; ``absolute`` averages its magnitude (where the
    model looks), otherwise the signed value (which direction pushes the age up).

    Parameters
    ----------
    model : nn.Module
        Maps (batch, 1, X, Y, Z) to (batch,) ages.
    batches : iterable of (volumes, ages)
    device : str or torch.device
    absolute : bool, default True

    Returns
    -------
    numpy.ndarray of shape (X, Y, Z), float32
    """
    model.eval()
    total, count = None, 0
    for x, _ in batches:
        x = x.to(device).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).sum(), x)
        contrib = (grad * x).detach()[:, 0]
        contrib = contrib.abs() if absolute else contrib
        part = contrib.sum(dim=0).cpu().double()
        total = part if total is None else total + part
        count += x.shape[0]
    if total is None:
        raise ValueError("no batches to explain")
    return (total / count).numpy().astype(np.float32)

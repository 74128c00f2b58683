"""Masked training, evaluation and centralised progressive pruning.

Masks are data (DESIGN.md decision 1): a ``dict[str, torch.BoolTensor]`` keyed by the model's own
``state_dict`` names, applied to the weights after loading and after every optimizer step, and to
the gradients when the optimizer has momentum or weight decay (otherwise a pruned weight would be
pushed away from zero by its optimizer state). A pruned weight therefore stays exactly 0.

The loop is deliberately plain PyTorch, so that its throughput stays that of a bare loop
(``benchmarks/bench_training.py`` measures the ratio).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "TrainConfig",
    "make_optimizer",
    "apply_mask_",
    "train_epoch",
    "predict",
    "regression_metrics",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

Mask = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes
    ----------
    lr : float
        Learning rate (the paper: plain SGD, 5e-5, batch 1).
    optimizer : {"sgd", "adam"}
    momentum : float
        SGD momentum in [0, 1).
    weight_decay : float
        L2 penalty, >= 0.
    """

    lr: float = 5e-5
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def has_state(self) -> bool:
        """Whether the optimizer can move a zero weight with a zero gradient (so gradients need masking)."""
        return self.optimizer == "adam" or self.momentum > 0 or self.weight_decay > 0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer for ``model`` (the federated code resets it every round)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _masked_params(model: nn.Module, mask: Mask) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = dict(model.named_parameters())
    unknown = set(mask) - set(params)
    if unknown:
        raise KeyError(f"mask names {sorted(unknown)[:5]} are not parameters of the model")
    names = [n for n in params if n in mask]
    tensors = [params[n] for n in names]
    masks = [mask[n].to(device=params[n].device, dtype=params[n].dtype) for n in names]
    for n, t, m in zip(names, tensors, masks):
        if t.shape != m.shape:
            raise ValueError(f"mask {n} has shape {tuple(m.shape)}, parameter has {tuple(t.shape)}")
    return tensors, masks


@torch.no_grad()
def apply_mask_(model: nn.Module, mask: Mask) -> None:
    """``w <- w * M`` in place for every masked parameter."""
    tensors, masks = _masked_params(model, mask)
    if tensors:
        torch._foreach_mul_(tensors, masks)


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, *, mask: Mask | None = None, mask_gradients: bool = True,
                device: str | torch.device = "cpu", loss_fn: Callable[..., torch.Tensor] | None = None,
                on_backward: Callable[[nn.Module], None] | None = None) -> float:
    """One pass over ``batches`` with MSE loss, keeping pruned weights at exactly 0.

    Parameters
    ----------
    model : nn.Module
    batches : iterable of (inputs, ages)
        Inputs of shape (batch, 1, X, Y, Z), ages of shape (batch,) in years.
    optimizer : torch.optim.Optimizer
    mask : dict of str to bool tensor, optional
        Kept coordinates; applied before the first step and after every step.
    mask_gradients : bool, default True
        Also zero the gradients of pruned weights before each step (needed with momentum, weight
        decay or Adam; harmless otherwise).
    device : str or torch.device
    loss_fn : callable, optional
        Default ``nn.functional.mse_loss``.
    on_backward : callable, optional
        Called with the model after every backward pass, before the gradients are masked (e.g. to
        accumulate squared gradients of pruned coordinates, as PruneFL does).

    Returns
    -------
    float
        Mean loss over the examples.
    """
    loss_fn = loss_fn or nn.functional.mse_loss
    model.train()
    tensors, masks = _masked_params(model, mask) if mask else ([], [])
    if tensors:
        with torch.no_grad():
            torch._foreach_mul_(tensors, masks)
    total, count = 0.0, 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, dtype=torch.float32, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (diverged); lower the learning rate")
        loss.backward()
        if on_backward is not None:
            on_backward(model)
        if tensors and mask_gradients:
            grads = [t.grad for t in tensors if t.grad is not None]
            if grads:
                torch._foreach_mul_(grads, [m for t, m in zip(tensors, masks) if t.grad is not None])
        optimizer.step()
        if tensors:
            with torch.no_grad():
                torch._foreach_mul_(tensors, masks)
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true ages (years) over ``batches``, in order."""
    model.eval()
    preds, ages = [], []
    for x, y in batches:
        preds.append(model(x.to(device)).float().cpu().numpy())
        ages.append(np.asarray(y, dtype=np.float64).reshape(-1))
    if not preds:
        raise ValueError("no batches to predict")
    return np.concatenate(preds).astype(np.float64), np.concatenate(ages)


def regression_metrics(predicted: np.ndarray, age: np.ndarray) -> dict[str, float]:
    """MAE, RMSE (years), Pearson correlation and mean brain-age gap (prediction - age)."""
    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(age, dtype=np.float64)
    if p.shape != a.shape or p.size == 0:
        raise ValueError(f"predicted and age must be non-empty and of equal shape, got {p.shape} and {a.shape}")
    err = p - a
    r = float(np.corrcoef(p, a)[0, 1]) if p.size > 1 and p.std() > 0 and a.std() > 0 else float("nan")
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "r": r,
            "mean_gap": float(err.mean())}


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             participant_ids: Iterable[str] | None = None,
             device: str | torch.device = "cpu") -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics and a per-subject table (participant_id, age, predicted, gap)."""
    predicted, age = predict(model, batches, device=device)
    ids = list(participant_ids) if participant_ids is not None else [str(i) for i in range(len(age))]
    if len(ids) != len(age):
        raise ValueError(f"{len(ids)} participant ids for {len(age)} predictions")
    frame = pd.DataFrame({"participant_id": ids, "age": age, "predicted": predicted, "gap": predicted - age})
    return regression_metrics(predicted, age), frame


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, mask: Mask | None = None,
                    meta: Mapping[str, Any] | None = None) -> None:
    """Weights (and mask) as safetensors plus a JSON sidecar, both written atomically.

    ``path`` is the ``.safetensors`` file; the sidecar is ``path`` with ``.json``. Mask tensors
    are stored as uint8 under ``mask/<name>``.
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m in (mask or {}).items():
        tensors[f"mask/{name}"] = m.detach().cpu().to(torch.uint8).contiguous()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = target.with_suffix(".json")
    from .data.synthetic import write_atomic

    write_atomic(sidecar, json.dumps({"saved_at": time.time(), **(meta or {})}, indent=2, default=_jsonable))


def load_checkpoint(path: str | os.PathLike, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights into ``model``; return (mask, meta). Raises with the file name on any mismatch."""
    from safetensors.torch import load_file

    target = Path(path)
    try:
        tensors = load_file(str(target))
    except Exception as exc:
        raise ValueError(f"{target}: not a readable safetensors checkpoint ({exc})") from exc
    mask = {k[len("mask/"):]: v.bool() for k, v in tensors.items() if k.startswith("mask/")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("mask/")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{target}: checkpoint does not match the model ({str(exc).splitlines()[0]})") from exc
    meta_path = target.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return mask, meta


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)

"""Centralised progressive pruning: train while sparsity rises along a schedule.

This is FedSparsify with one client (spec section 5): every epoch trains under the current mask,
then, on the schedule's update steps, the global mask is recomputed from the chosen score at the
schedule's (cumulative) sparsity and applied. Step 0 is initialisation: a schedule that updates at
step 0 (one-shot at initialisation) prunes before any training, which is how SNIP, GraSP and
SynFlow are meant to be used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .pruning import (
    emptied_layers,
    global_mask,
    grasp_scores,
    magnitude_scores,
    mask_sparsity,
    ones_mask,
    prunable_names,
    random_scores,
    snip_scores,
    sparsity_summary,
    synflow_scores,
)
from .pruning.schedules import Schedule
from .training import TrainConfig, apply_mask_, evaluate, make_optimizer, save_checkpoint, train_epoch

__all__ = ["SCORES", "ProgressiveResult", "compute_scores", "train_progressive"]

logger = logging.getLogger(__name__)

SCORES: tuple[str, ...] = ("magnitude", "random", "snip", "grasp", "synflow")


@dataclass
class ProgressiveResult:
    """Outcome of :func:`train_progressive`.

    Attributes
    ----------
    model : nn.Module
        The trained (pruned) model.
    mask : dict of str to bool tensor
    history : pandas.DataFrame
        Tidy: epoch, split (train / test), metric (loss, mae, rmse, r, mean_gap), value, sparsity.
    layer_sparsity : pandas.DataFrame
        Tidy: epoch, name, numel, kept, sparsity (per prunable tensor, for heatmaps).
    predictions : pandas.DataFrame
        Final test predictions: participant_id, age, predicted, gap.
    seconds : float
    emptied : list of str
        Weight tensors the final mask empties completely (layer collapse; biases are not counted).
    """

    model: nn.Module
    mask: dict[str, torch.Tensor]
    history: pd.DataFrame
    layer_sparsity: pd.DataFrame
    predictions: pd.DataFrame
    seconds: float
    emptied: list[str] = field(default_factory=list)


def compute_scores(score: str, model: nn.Module, *, names: Sequence[str], batch: tuple[torch.Tensor, torch.Tensor] | None,
                   generator: torch.Generator, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Scores of one of :data:`SCORES` for the prunable tensors ``names`` (larger = keep)."""
    if score == "magnitude":
        return magnitude_scores(model, names=names)
    if score == "random":
        return random_scores(model, generator=generator, names=names)
    if score == "synflow":
        return synflow_scores(model, (1, *model.input_shape), names=names)  # type: ignore[attr-defined]
    if score in ("snip", "grasp"):
        if batch is None:
            raise ValueError(f"score {score!r} needs a batch of training data")
        x, y = batch[0].to(device), batch[1].to(device, dtype=torch.float32)
        fn = snip_scores if score == "snip" else grasp_scores
        return fn(model, x, y, nn.functional.mse_loss, names=names)
    raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")


def train_progressive(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, *, epochs: int,
                      schedule: Schedule, score: str = "magnitude", config: TrainConfig = TrainConfig(),
                      exclude: Sequence[str] = (), min_density: float | None = None,
                      test_ids: Sequence[str] | None = None, checkpoint_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", seed: int = 0, progress: bool = True,
                      label: str = "") -> ProgressiveResult:
    """Train ``model`` for ``epochs`` epochs, pruning on ``schedule``'s update steps.

    Parameters
    ----------
    model : nn.Module
    train_loader, test_loader : DataLoader
        Batches of (volumes (batch, 1, X, Y, Z), ages (batch,)). The test loader must not shuffle.
    epochs : int
        Number of epochs (schedule steps 1..epochs).
    schedule : Schedule
        From :mod:`fedsparse_lib.pruning.schedules`; its ``sparsity_at`` is the cumulative
        fraction of zeroed prunable weights in [0, 1).
    score : {"magnitude", "random", "snip", "grasp", "synflow"}
    config : TrainConfig
        Optimizer settings (one optimizer for the whole run).
    exclude : sequence of str
        Passed to :func:`~fedsparse_lib.pruning.prunable_names` (default: prune everything, as the paper).
    min_density : float, optional
        Per-tensor minimum kept fraction against layer collapse (a departure from the paper).
    test_ids : sequence of str, optional
        Participant ids of the test loader, for the predictions table.
    checkpoint_dir : path, optional
        Save ``epoch-XXX.safetensors`` (+ JSON) after every epoch.
    device : str or torch.device
    seed : int
        Seed of the random score.
    progress : bool
    label : str
        Shown on the progress bar.

    Returns
    -------
    ProgressiveResult
    """
    from tqdm.auto import tqdm

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    start = time.perf_counter()
    model.to(device)
    names = prunable_names(model, exclude=tuple(exclude))
    mask = {k: v.to(device) for k, v in ones_mask(model, names).items()}
    generator = torch.Generator().manual_seed(seed)
    first_batch = next(iter(train_loader)) if score in ("snip", "grasp") else None
    optimizer = make_optimizer(model, config)
    rows: list[dict[str, Any]] = []
    layers: list[pd.DataFrame] = []

    def prune(step: int) -> None:
        nonlocal mask
        target = schedule.sparsity_at(step)
        scores = compute_scores(score, model, names=names, batch=first_batch, generator=generator, device=device)
        mask = global_mask(scores, target, previous=mask, min_density=min_density)
        apply_mask_(model, mask)
        logger.debug("step %d: pruned to sparsity %.4f (target %.4f)", step, mask_sparsity(mask), target)

    def record(step: int, train_loss: float | None) -> None:
        sparsity = mask_sparsity(mask)
        if train_loss is not None:
            rows.append({"epoch": step, "split": "train", "metric": "loss", "value": train_loss, "sparsity": sparsity})
        metrics, _ = evaluate(model, test_loader, device=device)
        rows.extend({"epoch": step, "split": "test", "metric": k, "value": v, "sparsity": sparsity}
                    for k, v in metrics.items())
        layers.append(sparsity_summary(mask).query("name != 'overall'").assign(epoch=step))

    if schedule.is_update_step(0):
        prune(0)
    record(0, None)
    for epoch in tqdm(range(1, epochs + 1), desc=label or "epochs", disable=not progress, leave=False):
        loss = train_epoch(model, train_loader, optimizer, mask=mask, device=device)
        if schedule.is_update_step(epoch):
            prune(epoch)
        record(epoch, loss)
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir) / f"epoch-{epoch:03d}.safetensors", model, mask=mask,
                            meta={"epoch": epoch, "sparsity": mask_sparsity(mask), "score": score,
                                  "schedule": repr(schedule), "config": config})
    _, predictions = evaluate(model, test_loader, participant_ids=test_ids, device=device)
    # weight tensors only: the conv biases before an instance norm are dead (always 0, no gradient),
    # so pruning them all first is expected and harmless
    emptied = [name for name in emptied_layers(mask) if mask[name].ndim > 1]
    if emptied:
        logger.warning("%s: the mask empties %s completely (layer collapse)", label or "model", emptied)
    layer_frame = pd.concat(layers, ignore_index=True)[["epoch", "name", "numel", "kept", "sparsity"]]
    return ProgressiveResult(model=model, mask=mask, history=pd.DataFrame(rows), layer_sparsity=layer_frame,
                             predictions=predictions, seconds=time.perf_counter() - start, emptied=emptied)

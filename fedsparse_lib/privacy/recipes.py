"""Training recipes: how a target (and each of its shadows) is trained, with the package's own code.

A recipe ``recipe(train_index, seed) -> TrainedModel`` trains a fresh model on the dataset
positions ``train_index``. :func:`centralized_recipe` runs centralized progressive pruning
(:func:`~fedsparse_lib.centralized.train_progressive`, notebook 02); :func:`federated_recipe` runs
a federation in the in-process engine (:func:`~fedsparse_lib.federated.run_federated`, notebook 03)
and keeps one client's uploads for the honest-but-curious server. There is no training loop here:
the same recipe trains a target and its LiRA shadows
(:func:`~fedsparse_lib.privacy.experiment.train_shadows`), so a federated target is shadowed by
federations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..pruning import ConstantSchedule, make_schedule, mask_sparsity
from ..training import TrainConfig

__all__ = ["Recipe", "TrainedModel", "centralized_recipe", "federated_recipe"]

Mask = dict[str, torch.Tensor]


def _positions(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(values)
    if out.ndim != 1 or (out.size and not np.issubdtype(out.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of dataset positions (int), got shape {out.shape} "
                         f"and dtype {out.dtype}")
    if out.size and out.min() < 0:
        raise ValueError(f"{what} must be >= 0, got {out.min()}")
    if np.unique(out).size != out.size:
        raise ValueError(f"{what} holds repeated positions")
    return out.astype(np.int64)


@dataclass
class TrainedModel:
    """A model trained by a recipe.

    Attributes
    ----------
    model : nn.Module
        The final model, pruned coordinates exactly 0, in ``eval()`` mode.
    mask : dict of str to bool tensor
        Its mask (all True for a dense model).
    sparsity : float
        Fraction of zeroed prunable weights, in [0, 1].
    train_index : numpy.ndarray of int
        Dataset positions it was trained on (the members).
    seconds : float
        Training wall time.
    uploads : dict of int to (state_dict, mask)
        Federated recipes only: ``{server_round: (weights, mask)}`` uploaded by the watched client.
    client_index : numpy.ndarray of int or None
        Federated recipes only: dataset positions of the watched client's training subjects.
    """

    model: nn.Module
    mask: Mask
    sparsity: float
    train_index: np.ndarray
    seconds: float
    uploads: dict[int, tuple[Mask, Mask]] = field(default_factory=dict)
    client_index: np.ndarray | None = None


Recipe = Callable[[np.ndarray, int], TrainedModel]


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction of zeroed weights in [0, 1), got {sparsity!r}")


def centralized_recipe(dataset: Dataset, model_fn: Callable[[], nn.Module], *, epochs: int, sparsity: float = 0.0,
                       config: TrainConfig = TrainConfig(), batch_size: int = 8,
                       device: str | torch.device = "cpu") -> Recipe:
    """Centralized training with progressive magnitude pruning, as a recipe.

    ``recipe(train_index, seed)`` seeds torch with ``seed``, builds ``model_fn()`` and trains it
    with :func:`~fedsparse_lib.centralized.train_progressive` for ``epochs`` epochs on the dataset
    positions ``train_index`` (shuffled batches from a generator seeded with ``seed``), under the
    cubic schedule to ``sparsity`` (a constant 0 for a dense model).

    Parameters
    ----------
    dataset : torch Dataset of (volume (1, X, Y, Z), age)
    model_fn : callable ``() -> nn.Module``
    epochs : int
        Training epochs (>= 1).
    sparsity : float, default 0
        Final fraction of zeroed weights, in [0, 1).
    config : TrainConfig
    batch_size : int
    device : str or torch.device

    Returns
    -------
    callable ``(train_index, seed) -> TrainedModel``
    """
    from ..centralized import train_progressive

    _check_count("epochs", epochs)
    _check_count("batch_size", batch_size)
    _check_sparsity(sparsity)
    schedule = ConstantSchedule(0.0) if sparsity == 0 else make_schedule("cubic", final_sparsity=float(sparsity),
                                                                         total_steps=int(epochs))

    def recipe(train_index: np.ndarray, seed: int) -> TrainedModel:
        index = _positions(train_index, "train_index")
        torch.manual_seed(seed)
        model = model_fn()
        loader = DataLoader(Subset(dataset, index.tolist()), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        # train_progressive evaluates a test loader after every epoch; one batch keeps that cheap
        probe = DataLoader(Subset(dataset, index[:batch_size].tolist()), batch_size=batch_size)
        result = train_progressive(model, loader, probe, epochs=int(epochs), schedule=schedule, config=config,
                                   device=device, seed=seed, progress=False)
        result.model.eval()
        return TrainedModel(model=result.model, mask=result.mask, sparsity=mask_sparsity(result.mask),
                            train_index=index, seconds=result.seconds)

    return recipe


def _dataset_ages(dataset: Dataset) -> np.ndarray:
    ages = getattr(dataset, "ages", None)
    if ages is None:
        ages = [float(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(ages, dtype=np.float64)


def federated_recipe(dataset: Dataset, model_fn: Callable[[], nn.Module], *, num_clients: int, num_rounds: int,
                     local_epochs: int = 1, sparsity: float = 0.0, method: str = "fedsparsify_global",
                     partition: str = "iid", partition_options: Mapping[str, Any] | None = None,
                     participants: pd.DataFrame | None = None, watch_client: int = 0,
                     config: TrainConfig = TrainConfig(), batch_size: int = 8,
                     device: str | torch.device = "cpu") -> Recipe:
    """Federated training in the in-process engine, as a recipe.

    ``recipe(train_index, seed)`` partitions the subjects at ``train_index`` among ``num_clients``
    clients (:func:`~fedsparse_lib.data.partition.make_partition` with ``seed``), builds the
    strategy ``method`` (pruning to ``sparsity`` on the cubic schedule over ``num_rounds``) and
    runs :func:`~fedsparse_lib.federated.run_federated` with ``seed``, keeping the uploads of
    client ``watch_client`` for the honest-but-curious server.

    Parameters
    ----------
    dataset : torch Dataset of (volume (1, X, Y, Z), age)
    model_fn : callable ``() -> nn.Module``
    num_clients : int
        Clients (>= 1); the partition checks that each receives subjects.
    num_rounds : int
        Federated rounds (>= 1), the pruning horizon.
    local_epochs : int, default 1
        Epochs of local training per round.
    sparsity : float, default 0
        Final fraction of zeroed weights, in [0, 1); 0 trains a dense model.
    method : str, default "fedsparsify_global"
        One of :data:`~fedsparse_lib.federated.METHODS`.
    partition : str, default "iid"
        One of :data:`~fedsparse_lib.data.partition.PARTITIONS`.
    partition_options : mapping, optional
        Further options of the partition (e.g. ``{"alpha": 0.5}`` for ``dirichlet``).
    participants : pandas.DataFrame, optional
        Participants table aligned with ``dataset`` (``age``; ``site`` for the site partition);
        default the dataset's ages.
    watch_client : int, default 0
        Client whose uploads are kept (``TrainedModel.uploads``).
    config : TrainConfig
        The clients' optimizer.
    batch_size : int
    device : str or torch.device

    Returns
    -------
    callable ``(train_index, seed) -> TrainedModel``
    """
    from ..data.partition import client_indices, make_partition
    from ..federated import DatasetClient, make_strategy, run_federated

    for name, value in (("num_clients", num_clients), ("num_rounds", num_rounds), ("local_epochs", local_epochs),
                        ("batch_size", batch_size)):
        _check_count(name, value)
    _check_sparsity(sparsity)
    if not 0 <= watch_client < num_clients:
        raise ValueError(f"watch_client must be a client id in [0, {num_clients}), got {watch_client!r}")
    table = (pd.DataFrame({"age": _dataset_ages(dataset)}) if participants is None
             else participants.reset_index(drop=True))
    if len(table) != len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"participants has {len(table)} rows but the dataset {len(dataset)} examples")  # type: ignore[arg-type]

    def recipe(train_index: np.ndarray, seed: int) -> TrainedModel:
        index = _positions(train_index, "train_index")
        start = time.perf_counter()
        assignment = make_partition(partition, table.iloc[index].reset_index(drop=True), num_clients=num_clients,
                                    seed=seed, **dict(partition_options or {}))
        parts = client_indices(assignment, num_clients=num_clients)
        clients = [DatasetClient(k, dataset, index[p], batch_size=int(batch_size)) for k, p in enumerate(parts)]
        strategy = make_strategy(method, num_rounds=int(num_rounds), final_sparsity=float(sparsity))
        probe = Subset(dataset, index[:batch_size].tolist())  # evaluated after every round: keep it cheap
        result = run_federated(strategy, model_fn, clients, probe, local_epochs=int(local_epochs), train_config=config,
                               seed=seed, device=device, keep_uploads=[watch_client], progress=False)
        result.model.eval()
        uploads = {r: (w, m) for (c, r), (w, m) in result.uploads.items() if c == watch_client}
        return TrainedModel(model=result.model, mask=dict(result.state.mask), sparsity=mask_sparsity(result.state.mask),
                            train_index=index, seconds=time.perf_counter() - start, uploads=uploads,
                            client_index=np.sort(index[parts[watch_client]]))

    return recipe

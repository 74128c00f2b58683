"""Federated strategies: what clients receive, what they do, how the server merges and prunes.

One engine-agnostic core (DESIGN.md decision 2). A :class:`Strategy` works on named tensors only:

- :meth:`Strategy.initialize` builds the first :class:`ServerState` (weights, mask, extras); the
  pruning-at-initialisation baselines (SNIP, GraSP) score one client's first samples here.
- :meth:`Strategy.configure` says what the selected clients of a round receive besides the global
  weights and mask: a small :class:`ClientTask` (prune locally to ``prune_to``? proximal ``mu``?
  collect squared gradients?).
- :meth:`Strategy.fit` is the client's work: load the weights, train ``local_epochs`` epochs under
  the mask with a fresh optimizer (spec section 3), optionally prune locally; returns a
  :class:`ClientUpdate`.
- :meth:`Strategy.aggregate` merges the round's updates with the pure functions of
  :mod:`~fedsparse_lib.federated.aggregation` and prunes on the schedule.

The in-process engine (:mod:`~fedsparse_lib.federated.simulation`) and the Flower apps
(:mod:`fedsparse_lib.flower`) call exactly these methods; neither has algorithm code of its own.

Methods (:func:`make_strategy`)
-------------------------------
``fedavg``               dense FedAvg.
``fedprox``              FedAvg whose clients add ``mu/2 ||w - w_global||^2`` (toward the round's
                         starting weights, not toward 0 as in the authors' Keras code).
``fedsparsify_global``   the server prunes the aggregate by global magnitude on the schedule.
``fedsparsify_local``    clients prune their own model on the schedule; the server merges by
                         majority vote (threshold ``max(1, floor(K/2))``, ties kept) or masked
                         average, then by default re-prunes to the schedule (see below).
``omp``                  one-shot magnitude pruning to the final sparsity at round ``t0``.
``random``               progressive random pruning: nested prefixes of one fixed random ranking.
``snip`` / ``grasp``     mask fixed at initialisation from one client's first samples.
``prunefl``              simplified PruneFL: initial mask from one client's locally trained model,
                         then every ``readjust_every`` rounds the server keeps the top-k
                         coordinates by the clients' accumulated squared gradients (regrown
                         weights restart at 0).

Decisions ([decide] in the spec)
--------------------------------
Re-prune after majority vote
    The vote does not land on ``s_t`` (ties are kept, and clients disagree). ``reprune=True`` (the
    default here) prunes the merged model to ``s_t`` by magnitude, so the reported sparsity
    follows the schedule; ``reprune=False`` is the paper's literal algorithm. Both are recorded.
Pruning horizon and tuning
    Pruning follows the schedule over rounds ``1..num_rounds`` only; the ``tune_rounds`` extra
    rounds train under the final mask (the cubic schedule otherwise ends on a prune).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..pruning import (
    global_magnitude_mask,
    global_mask,
    grasp_scores,
    magnitude_scores,
    mask_sparsity,
    ones_mask,
    prunable_names,
    random_scores,
    snip_scores,
)
from ..pruning.schedules import ConstantSchedule, CubicSchedule, OneShotSchedule, Schedule, make_schedule
from ..training import TrainConfig, apply_mask_, make_optimizer, train_epoch
from .aggregation import fedavg, fedavg_majority_vote, masked_average, proximal_term

__all__ = [
    "METHODS",
    "ClientData",
    "ClientTask",
    "ClientUpdate",
    "FedAvg",
    "FedSparsifyGlobal",
    "FedSparsifyLocal",
    "PruneFL",
    "ServerState",
    "Strategy",
    "derive_seed",
    "make_strategy",
]

State = dict[str, torch.Tensor]
Mask = dict[str, torch.Tensor]

METHODS: tuple[str, ...] = ("fedavg", "fedprox", "fedsparsify_global", "fedsparsify_local", "omp", "random",
                            "snip", "grasp", "prunefl")

SQGRAD_PREFIX = "sqgrad/"


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integers (round, client id): order-independent streams."""
    words = np.random.SeedSequence([int(seed), *[int(p) for p in parts]]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


class ClientData(Protocol):
    """A client's local training data, as the strategies see it."""

    client_id: int
    num_examples: int

    def batches(self, *, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled (volumes, ages) batches; the order depends only on ``seed``."""

    def first_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's first ``n`` examples (in its own order), stacked: for scores at initialisation."""


@dataclass
class ServerState:
    """What the server holds between rounds.

    Attributes
    ----------
    weights : dict of str to torch.Tensor
        The global model's ``state_dict`` (on the CPU).
    mask : dict of str to torch.BoolTensor
        Kept coordinates of the prunable tensors (``True`` = kept).
    extras : dict of str to torch.Tensor
        Strategy-specific server state that a checkpoint must keep (e.g. PruneFL's accumulated
        squared gradients).
    """

    weights: State
    mask: Mask
    extras: State = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned prunable coordinates."""
        return mask_sparsity(self.mask)


@dataclass(frozen=True)
class ClientTask:
    """Instructions of one round for the selected clients (sent beside the weights and mask).

    Attributes
    ----------
    server_round : int
    prune_to : float or None
        FedSparsify-Local: prune the trained model to this sparsity before uploading.
    prox_mu : float
        FedProx coefficient (0 = none).
    collect_sq_grads : bool
        PruneFL: upload the accumulated squared gradients of every prunable coordinate.
    """

    server_round: int
    prune_to: float | None = None
    prox_mu: float = 0.0
    collect_sq_grads: bool = False

    def to_config(self) -> dict[str, Any]:
        """As a flat dict of scalars (a Flower ``ConfigRecord``)."""
        return {"server_round": self.server_round, "prune_to": -1.0 if self.prune_to is None else self.prune_to,
                "prox_mu": self.prox_mu, "collect_sq_grads": self.collect_sq_grads}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientTask:
        prune_to = float(config["prune_to"])
        return cls(server_round=int(config["server_round"]), prune_to=None if prune_to < 0 else prune_to,
                   prox_mu=float(config["prox_mu"]), collect_sq_grads=bool(config["collect_sq_grads"]))


@dataclass
class ClientUpdate:
    """What a client sends back.

    Attributes
    ----------
    client_id : int
    weights : dict of str to torch.Tensor
        Trained (and, for FedSparsify-Local, locally pruned) weights, on the CPU.
    mask : dict of str to torch.BoolTensor
        The client's mask (the global one unless it pruned locally).
    num_examples : int
    train_loss : float
        Mean training loss (MSE, years^2) over the last local epoch.
    extras : dict of str to torch.Tensor
        E.g. ``sqgrad/<name>`` accumulated squared gradients (PruneFL).
    train_seconds : float
        Wall time of the local training alone.
    """

    client_id: int
    weights: State
    mask: Mask
    num_examples: int
    train_loss: float
    extras: State = field(default_factory=dict)
    train_seconds: float = 0.0


def _cpu(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class Strategy:
    """Base strategy: dense FedAvg (optionally with FedProx's proximal term).

    Parameters
    ----------
    exclude : sequence of str
        Tensors never pruned (see :func:`~fedsparse_lib.pruning.prunable_names`); default none,
        as in the paper.
    prox_mu : float, default 0
        FedProx coefficient ``mu`` >= 0.
    min_density : float, optional
        Per-tensor minimum kept fraction against layer collapse (a departure from the paper).
    num_rounds : int
        Rounds of the pruning horizon (schedule steps ``1..num_rounds``); rounds after it only tune.
    """

    name = "fedavg"

    def __init__(self, *, exclude: Sequence[str] = (), prox_mu: float = 0.0, min_density: float | None = None,
                 num_rounds: int) -> None:
        if not (isinstance(prox_mu, (int, float)) and math.isfinite(prox_mu) and prox_mu >= 0):
            raise ValueError(f"prox_mu must be a finite number >= 0, got {prox_mu!r}")
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds must be an integer >= 1, got {num_rounds!r}")
        self.exclude = tuple(exclude)
        self.prox_mu = float(prox_mu)
        self.min_density = min_density
        self.num_rounds = num_rounds

    # -- description -------------------------------------------------------------------------
    def target_sparsity(self, server_round: int) -> float:
        """Scheduled sparsity after ``server_round`` (0 for dense methods)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for checkpoints and result tables)."""
        return {"method": self.name, "exclude": list(self.exclude), "prox_mu": self.prox_mu,
                "min_density": self.min_density, "num_rounds": self.num_rounds}

    # -- server side -------------------------------------------------------------------------
    def initialize(self, model: nn.Module, *, data: ClientData | None = None, train_config: TrainConfig = TrainConfig(),
                   local_epochs: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> ServerState:
        """The first server state: the model's weights and an all-ones mask.

        ``data`` is the client whose samples score the mask at initialisation (SNIP, GraSP,
        PruneFL); other strategies ignore it.
        """
        names = prunable_names(model, exclude=self.exclude)
        return ServerState(weights=_cpu(model.state_dict()), mask=ones_mask(model, names))

    def configure(self, server_round: int, state: ServerState) -> ClientTask:
        """What the selected clients of ``server_round`` are asked to do."""
        return ClientTask(server_round=server_round, prox_mu=self.prox_mu)

    def aggregate(self, server_round: int, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        """FedAvg of the updates, then :meth:`prune`."""
        if not updates:
            raise ValueError(f"round {server_round}: no client updates to aggregate")
        weights = fedavg([u.weights for u in updates], [u.num_examples for u in updates])
        merged = ServerState(weights=weights, mask={k: v.clone() for k, v in state.mask.items()},
                             extras=dict(state.extras))
        _apply_mask_state(merged.weights, merged.mask)
        return self.prune(server_round, merged, updates)

    def prune(self, server_round: int, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        """Server-side pruning after aggregation (none for dense methods)."""
        return state

    # -- client side -------------------------------------------------------------------------
    def fit(self, model: nn.Module, weights: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor],
            task: ClientTask, data: ClientData, *, local_epochs: int, train_config: TrainConfig,
            device: str | torch.device = "cpu", seed: int = 0) -> ClientUpdate:
        """Local training of one client (spec section 3): train under ``mask`` with a fresh optimizer.

        Parameters
        ----------
        model : nn.Module
            A model of the federation's architecture; its weights are overwritten.
        weights, mask : dict of str to torch.Tensor
            The global model and mask received this round.
        task : ClientTask
        data : ClientData
        local_epochs : int
        train_config : TrainConfig
        device : str or torch.device
        seed : int
            The run's seed; the batch order of epoch ``e`` derives from (seed, round, client, e).

        Returns
        -------
        ClientUpdate
        """
        start = time.perf_counter()
        model.load_state_dict(weights, strict=True)
        model.to(device)
        dev_mask = {k: v.to(device) for k, v in mask.items()}
        apply_mask_(model, dev_mask)
        optimizer = make_optimizer(model, train_config)
        loss_fn = None
        if task.prox_mu > 0:
            anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
            params = dict(model.named_parameters())

            def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return nn.functional.mse_loss(pred, target) + proximal_term(params, anchor, task.prox_mu)
        sq_grads: dict[str, torch.Tensor] = {}
        on_backward = None
        if task.collect_sq_grads:
            named = {k: p for k, p in model.named_parameters() if k in mask}
            sq_grads = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in named.items()}

            def on_backward(_model: nn.Module) -> None:
                for k, p in named.items():
                    if p.grad is not None:
                        sq_grads[k].add_(p.grad.detach().float().square())
        loss = float("nan")
        for epoch in range(local_epochs):
            batches = data.batches(seed=derive_seed(seed, task.server_round, data.client_id, epoch))
            loss = train_epoch(model, batches, optimizer, mask=dev_mask, device=device, loss_fn=loss_fn,
                               on_backward=on_backward)
        new_mask = {k: v.clone() for k, v in mask.items()}
        if task.prune_to is not None:
            new_mask = {k: v.cpu() for k, v in global_magnitude_mask(model, task.prune_to, names=list(mask),
                                                                       previous=dev_mask,
                                                                       min_density=self.min_density).items()}
            apply_mask_(model, {k: v.to(device) for k, v in new_mask.items()})
        extras = {SQGRAD_PREFIX + k: v.cpu() for k, v in sq_grads.items()}
        return ClientUpdate(client_id=data.client_id, weights=_cpu(model.state_dict()), mask=new_mask,
                            num_examples=int(data.num_examples), train_loss=loss, extras=extras,
                            train_seconds=time.perf_counter() - start)


def _apply_mask_state(weights: State, mask: Mapping[str, torch.Tensor]) -> None:
    for k, m in mask.items():
        weights[k] = weights[k] * m.to(weights[k].dtype)


class FedAvg(Strategy):
    """Dense FedAvg; with ``prox_mu > 0`` it is FedProx."""

    def __init__(self, *, prox_mu: float = 0.0, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(prox_mu=prox_mu, num_rounds=num_rounds, **kwargs)
        self.name = "fedprox" if prox_mu > 0 else "fedavg"


class FedSparsifyGlobal(Strategy):
    """Server-side progressive pruning (FedSparsify-Global), and the baselines built on it.

    After FedAvg, on the schedule's update steps ``t <= num_rounds``, the server recomputes the
    global mask at the schedule's cumulative sparsity ``s_t`` from ``score`` and zeroes the pruned
    weights. ``score="magnitude"`` is FedSparsify-Global (cubic schedule) or OMP (one-shot
    schedule); ``"random"`` is random progressive pruning; ``"snip"`` / ``"grasp"`` with a
    one-shot schedule at step 0 fix the mask at initialisation from one client's first
    ``score_samples`` examples.

    Parameters
    ----------
    schedule : Schedule
    score : {"magnitude", "random", "snip", "grasp"}
    score_samples : int, default 8
        Examples of the chosen client used by SNIP / GraSP (the paper's code: its first batch,
        which is one scan with batch size 1; more samples give a less noisy mask).
    seed : int
        Seed of the random ranking.
    """

    SCORES = ("magnitude", "random", "snip", "grasp")

    def __init__(self, *, schedule: Schedule, score: str = "magnitude", score_samples: int = 8, seed: int = 0,
                 num_rounds: int, name: str = "fedsparsify_global", **kwargs: Any) -> None:
        super().__init__(num_rounds=num_rounds, **kwargs)
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        if score in ("snip", "grasp") and not schedule.is_update_step(0):
            raise ValueError(f"score {score!r} prunes at initialisation: use a one-shot schedule at step 0")
        if not isinstance(score_samples, int) or score_samples < 1:
            raise ValueError(f"score_samples must be an integer >= 1, got {score_samples!r}")
        self.schedule = schedule
        self.score = score
        self.score_samples = score_samples
        self.seed = seed
        self.name = name

    def target_sparsity(self, server_round: int) -> float:
        return self.schedule.sparsity_at(min(server_round, self.num_rounds))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "schedule": repr(self.schedule), "score": self.score,
                "score_samples": self.score_samples, "seed": self.seed}

    def _scores(self, model: nn.Module, names: Sequence[str], data: ClientData | None,
                device: str | torch.device) -> dict[str, torch.Tensor]:
        if self.score == "magnitude":
            return magnitude_scores(model, names=names)
        if self.score == "random":  # the same ranking every time: prunes take nested prefixes
            return random_scores(model, generator=torch.Generator().manual_seed(self.seed), names=names)
        if data is None:
            raise ValueError(f"score {self.score!r} needs a client's data at initialisation")
        x, y = data.first_samples(self.score_samples)
        fn = snip_scores if self.score == "snip" else grasp_scores
        model.to(device)
        return fn(model, x.to(device), y.to(device, dtype=torch.float32), nn.functional.mse_loss, names=names)

    def initialize(self, model: nn.Module, *, data: ClientData | None = None, train_config: TrainConfig = TrainConfig(),
                   local_epochs: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> ServerState:
        state = super().initialize(model, data=data, device=device, seed=seed)
        if self.schedule.is_update_step(0):
            scores = self._scores(model, list(state.mask), data, device)
            mask = global_mask({k: v.cpu() for k, v in scores.items()}, self.schedule.sparsity_at(0),
                               previous=state.mask, min_density=self.min_density)
            state.mask = mask
            _apply_mask_state(state.weights, mask)
        return state

    def prune(self, server_round: int, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        if server_round > self.num_rounds or not self.schedule.is_update_step(server_round):
            return state
        if self.score in ("snip", "grasp"):
            return state  # fixed at initialisation
        if self.score == "magnitude":
            scores = {k: state.weights[k].abs() for k in state.mask}
        else:
            scores = random_scores(state.weights, generator=torch.Generator().manual_seed(self.seed),
                                   names=list(state.mask))
        state.mask = global_mask(scores, self.schedule.sparsity_at(server_round), previous=state.mask,
                                 min_density=self.min_density)
        _apply_mask_state(state.weights, state.mask)
        return state


class FedSparsifyLocal(Strategy):
    """Client-side progressive pruning merged by majority vote (FedSparsify-Local).

    On the schedule's update steps each client prunes its trained model to ``s_t`` by global
    magnitude and uploads the sparse model with its mask; the server merges with
    :func:`~fedsparse_lib.federated.aggregation.fedavg_majority_vote` (or
    :func:`~fedsparse_lib.federated.aggregation.masked_average`).

    Parameters
    ----------
    schedule : Schedule
    merge : {"majority_vote", "masked_average"}
    threshold : int, optional
        Votes needed to keep a coordinate (default ``max(1, floor(K/2))``).
    reprune : bool, default True
        Prune the merged model to ``s_t`` by magnitude when the vote keeps more (see the module
        docstring); ``False`` is the paper's literal algorithm.
    """

    name = "fedsparsify_local"
    MERGES = ("majority_vote", "masked_average")

    def __init__(self, *, schedule: Schedule, merge: str = "majority_vote", threshold: int | None = None,
                 reprune: bool = True, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(num_rounds=num_rounds, **kwargs)
        if merge not in self.MERGES:
            raise ValueError(f"merge must be one of {self.MERGES}, got {merge!r}")
        self.schedule = schedule
        self.merge = merge
        self.threshold = threshold
        self.reprune = bool(reprune)

    def target_sparsity(self, server_round: int) -> float:
        return self.schedule.sparsity_at(min(server_round, self.num_rounds))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "schedule": repr(self.schedule), "merge": self.merge,
                "threshold": self.threshold, "reprune": self.reprune}

    def _prunes(self, server_round: int) -> bool:
        return server_round <= self.num_rounds and self.schedule.is_update_step(server_round)

    def configure(self, server_round: int, state: ServerState) -> ClientTask:
        prune_to = self.schedule.sparsity_at(server_round) if self._prunes(server_round) else None
        return ClientTask(server_round=server_round, prune_to=prune_to, prox_mu=self.prox_mu)

    def aggregate(self, server_round: int, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        if not updates:
            raise ValueError(f"round {server_round}: no client updates to aggregate")
        states = [u.weights for u in updates]
        masks = [u.mask for u in updates]
        n = [u.num_examples for u in updates]
        if self.merge == "majority_vote":
            weights, mask = fedavg_majority_vote(states, masks, n, threshold=self.threshold)
        else:
            weights, mask = masked_average(states, masks, n)
        mask = {k: m & state.mask[k] for k, m in mask.items()}  # masks only shrink
        merged = ServerState(weights=weights, mask=mask, extras=dict(state.extras))
        merged.extras["vote_sparsity"] = torch.tensor(mask_sparsity(mask), dtype=torch.float64)
        target = self.schedule.sparsity_at(server_round) if self._prunes(server_round) else None
        if self.reprune and target is not None and merged.sparsity < target:
            scores = {k: weights[k].abs() for k in mask}
            merged.mask = global_mask(scores, target, previous=mask, min_density=self.min_density)
        _apply_mask_state(merged.weights, merged.mask)
        return merged


class PruneFL(Strategy):
    """Simplified PruneFL (baselines.md): top-k by accumulated squared gradients, re-adjusted.

    Initialisation: the chosen client trains ``local_epochs`` epochs from the initial weights and
    the mask keeps its ``1 - final_sparsity`` largest weights by magnitude (PruneFL's initial
    pruning on one client; the trained weights are discarded, the initial ones kept). On rounds
    that are multiples of ``readjust_every`` (within the horizon), clients also upload the dense
    squared gradients of every prunable coordinate summed over their steps; the server keeps the
    top-k by their weighted sum (all cost coefficients equal), with k fixed by ``final_sparsity``.
    Coordinates that come back start at 0.

    Parameters
    ----------
    final_sparsity : float
    readjust_every : int, default 10
        PruneFL re-adjusts every 50 rounds; 10 makes it happen within the paper's 40 rounds.
    """

    name = "prunefl"

    def __init__(self, *, final_sparsity: float, readjust_every: int = 10, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(num_rounds=num_rounds, **kwargs)
        if not 0.0 <= final_sparsity < 1.0:
            raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity!r}")
        if not isinstance(readjust_every, int) or readjust_every < 1:
            raise ValueError(f"readjust_every must be an integer >= 1, got {readjust_every!r}")
        self.final_sparsity = float(final_sparsity)
        self.readjust_every = readjust_every

    def target_sparsity(self, server_round: int) -> float:
        return self.final_sparsity

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "final_sparsity": self.final_sparsity, "readjust_every": self.readjust_every}

    def _readjusts(self, server_round: int) -> bool:
        return server_round <= self.num_rounds and server_round % self.readjust_every == 0

    def initialize(self, model: nn.Module, *, data: ClientData | None = None, train_config: TrainConfig = TrainConfig(),
                   local_epochs: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> ServerState:
        state = super().initialize(model, device=device, seed=seed)
        if data is None:
            raise ValueError("prunefl needs a client's data for its initial pruning")
        trained = Strategy.fit(self, model, state.weights, state.mask, ClientTask(server_round=0), data,
                               local_epochs=local_epochs, train_config=train_config, device=device, seed=seed)
        scores = {k: trained.weights[k].abs() for k in state.mask}
        state.mask = global_mask(scores, self.final_sparsity, min_density=self.min_density)
        model.load_state_dict(state.weights)
        _apply_mask_state(state.weights, state.mask)
        return state

    def configure(self, server_round: int, state: ServerState) -> ClientTask:
        return ClientTask(server_round=server_round, prox_mu=self.prox_mu,
                          collect_sq_grads=self._readjusts(server_round))

    def prune(self, server_round: int, state: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
        if not self._readjusts(server_round):
            return state
        grads = fedavg([{k[len(SQGRAD_PREFIX):]: v for k, v in u.extras.items()} for u in updates],
                       [u.num_examples for u in updates])
        missing = set(state.mask) - set(grads)
        if missing:
            raise ValueError(f"round {server_round}: clients sent no squared gradients for {sorted(missing)[:3]}")
        state.mask = global_mask({k: grads[k] for k in state.mask}, self.final_sparsity,
                                 min_density=self.min_density)
        _apply_mask_state(state.weights, state.mask)
        return state


def make_strategy(method: str, *, num_rounds: int, final_sparsity: float = 0.95, schedule: str = "cubic",
                  start_round: int = 1, frequency: int = 1, prox_mu: float = 0.01, exclude: Sequence[str] = (),
                  min_density: float | None = None, seed: int = 0, **options: Any) -> Strategy:
    """Build a strategy by method name (one of :data:`METHODS`).

    Parameters
    ----------
    method : str
    num_rounds : int
        Rounds of the pruning horizon (the schedule's ``T``).
    final_sparsity : float, default 0.95
        Target sparsity ``s_f`` of the pruning methods, in [0, 1).
    schedule : {"cubic", "nnz"}, default "cubic"
        Schedule of ``fedsparsify_global``, ``fedsparsify_local`` and ``random``. ``"nnz"`` prunes
        the same fraction of the live weights every ``frequency`` rounds after ``start_round`` so
        that round ``num_rounds`` reaches ``final_sparsity``.
    start_round : int, default 1
        ``t0``: the first prune ends round ``t0 + 1`` (progressive schedules) or round ``t0`` (OMP).
    frequency : int, default 1
        Rounds between prunes (``f``).
    prox_mu : float, default 0.01
        FedProx ``mu`` (``fedprox`` only).
    exclude, min_density
        See :class:`Strategy`.
    seed : int
        Seed of the random ranking (``random``).
    **options
        Passed to the class (e.g. ``merge``, ``reprune``, ``threshold`` for ``fedsparsify_local``;
        ``score_samples`` for ``snip`` / ``grasp``; ``readjust_every`` for ``prunefl``).

    Returns
    -------
    Strategy
    """
    common = {"num_rounds": num_rounds, "exclude": exclude, "min_density": min_density}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity!r}")

    def progressive() -> Schedule:
        if final_sparsity == 0.0:
            return ConstantSchedule(0.0)
        if schedule == "cubic":
            return CubicSchedule(final_sparsity=final_sparsity, total_steps=num_rounds, start_step=start_round,
                                 frequency=frequency)
        if schedule == "nnz":
            events = max(1, (num_rounds - start_round) // frequency)
            return make_schedule("nnz", fraction=1.0 - (1.0 - final_sparsity) ** (1.0 / events),
                                 start_step=start_round, frequency=frequency, end_step=num_rounds)
        raise ValueError(f"schedule must be 'cubic' or 'nnz', got {schedule!r}")

    if method == "fedavg":
        return FedAvg(**common, **options)
    if method == "fedprox":
        return FedAvg(prox_mu=prox_mu, **common, **options)
    if method == "fedsparsify_global":
        return FedSparsifyGlobal(schedule=progressive(), **common, **options)
    if method == "fedsparsify_local":
        return FedSparsifyLocal(schedule=progressive(), **common, **options)
    if method == "omp":
        return FedSparsifyGlobal(schedule=OneShotSchedule(final_sparsity, step=start_round), name="omp",
                                 **common, **options)
    if method == "random":
        return FedSparsifyGlobal(schedule=progressive(), score="random", seed=seed, name="random", **common, **options)
    if method in ("snip", "grasp"):
        return FedSparsifyGlobal(schedule=OneShotSchedule(final_sparsity, step=0), score=method, name=method,
                                 **common, **options)
    return PruneFL(final_sparsity=final_sparsity, **common, **options)


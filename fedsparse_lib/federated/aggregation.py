"""Aggregation maths: pure functions over named tensors and client weights.

A *state* is a ``dict[str, torch.Tensor]`` keyed by ``state_dict`` names; a *mask* is a
``dict[str, torch.BoolTensor]`` over the prunable subset of those names (``True`` = kept), as in
:mod:`fedsparse_lib.pruning.masks`. Every function takes one state (and mask) per client of the
round plus the clients' ``num_examples``, returns new tensors and never modifies its inputs
(Flower's ``aggregate`` module, over named tensors).

With ``K`` clients, ``n_k`` examples each, the client weights are ``a_k = n_k / sum(n)``
(spec section 4):

- :func:`fedavg`: ``w = sum_k a_k w_k``.
- :func:`majority_vote`: votes ``V = sum_k M_k``; a coordinate is kept iff ``V >= threshold``.
- :func:`fedavg_majority_vote`: ``w = 1[V >= threshold] * sum_k a_k w_k`` (FedSparsify-Local).
- :func:`masked_average`: ``w = sum_k a_k M_k w_k / sum_k a_k M_k``, 0 where the denominator is 0.
- :func:`proximal_term`: FedProx's ``mu / 2 * ||w - w_global||^2``.

Decisions
---------
Majority threshold
    The spec keeps a coordinate iff ``V >= floor(K/2)`` (ties kept: with 8 clients 4 votes
    suffice, 3 do not). For ``K = 1`` that threshold is 0, which would keep coordinates that no
    client kept (and regrow everything the lone client pruned). The default threshold is therefore
    ``max(1, floor(K/2))``: identical to the spec for every ``K >= 2``, and for ``K = 1`` the
    global mask is the client's own mask. ``threshold=`` overrides it (an int in ``[1, K]``).
Accumulation
    Weighted sums accumulate in float64 with a loop over clients (the spec measured the loop faster
    than ``torch.stack`` + sum, and it needs one extra tensor of memory instead of ``K``); the
    result is cast back to each tensor's dtype. The average of identical float32 (or narrower)
    states is that state exactly (the float64 sum of ``a_k w`` rounds back to ``w``). Non-floating tensors
    (integer counters) are averaged the same way, then rounded to nearest (ties to even).
Names and order
    Every client must send the same names, shapes and dtypes; outputs follow the first client's
    name order. Mask names must be the same across clients and a subset of the state names, with
    the shapes of those tensors; tensors without a mask (biases, first/last layers) are averaged
    densely by :func:`fedavg_majority_vote` and :func:`masked_average`.
Validation
    Empty client lists, mismatched lengths/names/shapes/dtypes, non-boolean masks, weights that
    are not finite and positive, and non-finite floating-point tensors raise ``ValueError`` (or
    ``TypeError`` for wrong types) naming the client index and the tensor.
Determinism
    Clients are summed in the given order; the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "client_weights",
    "fedavg",
    "fedavg_majority_vote",
    "majority_threshold",
    "majority_vote",
    "masked_average",
    "proximal_term",
]

State = dict[str, torch.Tensor]
Mask = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating-point tensor is finite (no NaN, no inf).

    Fast path: a sum is finite whenever every term is (one pass, no boolean temporary); only a
    non-finite sum (a NaN or inf term, or an overflow of huge finite values) triggers the exact
    element-wise check, so the answer is always exact.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_states(states: Sequence[Mapping[str, torch.Tensor]], *, what: str = "states") -> list[str]:
    """Check that every client sends the same names, shapes and dtypes and finite floats.

    Returns the first client's names, in order.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise TypeError(
            f"{what} must be a sequence with one dict of tensors per client, got {type(states).__name__}"
        )
    if len(states) == 0:
        raise ValueError(f"{what} is empty: aggregation needs at least one client")
    for k, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise TypeError(f"{what}[{k}] must be a dict of tensors, got {type(state).__name__}")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{what}[{k}][{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
    names = list(states[0])
    if not names:
        raise ValueError(f"{what}[0] has no tensors")
    reference = states[0]
    for k, state in enumerate(states):
        if set(state) != set(names):
            missing = sorted(set(names) - set(state))
            extra = sorted(set(state) - set(names))
            raise ValueError(
                f"{what}[{k}] names differ from {what}[0]: missing {missing}, unexpected {extra}"
            )
        for name in names:
            tensor, ref = state[name], reference[name]
            if tensor.shape != ref.shape:
                raise ValueError(
                    f"{what}[{k}][{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} "
                    f"(as in {what}[0])"
                )
            if tensor.dtype != ref.dtype:
                raise ValueError(
                    f"{what}[{k}][{name!r}] has dtype {tensor.dtype}, expected {ref.dtype} (as in {what}[0])"
                )
            if tensor.is_floating_point() and not all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{what}[{k}][{name!r}] has {bad} non-finite value(s) (NaN or inf)")
    return names


def _check_masks(
    masks: Sequence[Mapping[str, torch.Tensor]],
    states: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> list[str]:
    """Check boolean masks with the same names and shapes across clients (and, if given, states).

    Returns the first client's mask names, in order.
    """
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence):
        raise TypeError(
            f"masks must be a sequence with one dict of bool tensors per client, got {type(masks).__name__}"
        )
    if len(masks) == 0:
        raise ValueError("masks is empty: majority voting needs at least one client")
    if states is not None and len(masks) != len(states):
        raise ValueError(f"got {len(masks)} masks for {len(states)} states: one mask per client is expected")
    for k, mask in enumerate(masks):
        if not isinstance(mask, Mapping):
            raise TypeError(f"masks[{k}] must be a dict of bool tensors, got {type(mask).__name__}")
        for name, tensor in mask.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.bool:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise TypeError(f"masks[{k}][{name!r}] must be a torch.bool tensor, got {got}")
    names = list(masks[0])
    for k, mask in enumerate(masks):
        if set(mask) != set(names):
            missing = sorted(set(names) - set(mask))
            extra = sorted(set(mask) - set(names))
            raise ValueError(f"masks[{k}] names differ from masks[0]: missing {missing}, unexpected {extra}")
        for name in names:
            if mask[name].shape != masks[0][name].shape:
                raise ValueError(
                    f"masks[{k}][{name!r}] has shape {tuple(mask[name].shape)}, "
                    f"expected {tuple(masks[0][name].shape)} (as in masks[0])"
                )
            if states is not None:
                if name not in states[k]:
                    raise ValueError(f"masks[{k}] has {name!r}, which is not a tensor of states[{k}]")
                if mask[name].shape != states[k][name].shape:
                    raise ValueError(
                        f"masks[{k}][{name!r}] has shape {tuple(mask[name].shape)}, "
                        f"but states[{k}][{name!r}] has shape {tuple(states[k][name].shape)}"
                    )
    return names


def _cast_back(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float64 accumulator to ``dtype`` (rounding to nearest for non-floating dtypes)."""
    if dtype.is_floating_point or dtype.is_complex:
        return acc.to(dtype)
    return torch.round(acc).to(dtype)


def _weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], name: str) -> torch.Tensor:
    """``sum_k weights[k] * states[k][name]`` accumulated in float64 with a loop over clients."""
    acc = states[0][name].to(torch.float64) * weights[0]
    for state, a in zip(states[1:], weights[1:]):
        acc.add_(state[name].to(torch.float64), alpha=a)
    return acc


def _weights_for(states: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[float]) -> list[float]:
    """Client weights, checked to be one per state."""
    weights = client_weights(num_examples)
    if len(weights) != len(states):
        raise ValueError(f"got {len(weights)} num_examples for {len(states)} states: one per client is expected")
    return weights


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def client_weights(num_examples: Sequence[float]) -> list[float]:
    """Client weights ``a_k = n_k / sum(n)``.

    Parameters
    ----------
    num_examples : sequence of float, length K
        Number of training examples of each client of the round; finite and > 0.

    Returns
    -------
    list of float, length K
        The weights, in the clients' order, in (0, 1] and summing to 1 (up to rounding).

    Raises
    ------
    ValueError
        If the sequence is empty or a count is non-positive or non-finite.
    """
    if isinstance(num_examples, (str, bytes)) or not isinstance(num_examples, Sequence):
        raise TypeError(f"num_examples must be a sequence of numbers, got {type(num_examples).__name__}")
    if len(num_examples) == 0:
        raise ValueError("num_examples is empty: aggregation needs at least one client")
    counts: list[float] = []
    for k, n in enumerate(num_examples):
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise TypeError(f"num_examples[{k}] must be a number, got {n!r}")
        if not math.isfinite(n) or n <= 0:
            raise ValueError(f"num_examples[{k}] = {n!r}: client weights must be finite and > 0")
        counts.append(float(n))
    total = math.fsum(counts)
    return [n / total for n in counts]


def majority_threshold(num_clients: int) -> int:
    """Default majority-vote threshold ``max(1, floor(K/2))``.

    Parameters
    ----------
    num_clients : int
        Number of clients ``K`` of the round, >= 1.

    Returns
    -------
    int
        Minimum number of votes for a coordinate to be kept: ``floor(K/2)`` (ties kept, as in the
        spec) but at least 1, so that a coordinate kept by nobody is never kept.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    return max(1, num_clients // 2)


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[float]) -> State:
    """Federated averaging: ``w = sum_k a_k w_k`` with ``a_k = n_k / sum(n)``.

    Pruned coordinates stay 0 when every client sends 0 there.

    Parameters
    ----------
    states : sequence of dict[str, Tensor], length K
        One state per client; the same names, shapes and dtypes, finite values.
    num_examples : sequence of float, length K
        Examples per client (finite, > 0).

    Returns
    -------
    dict[str, Tensor]
        The average, with the first client's names, shapes and dtypes (new tensors).

    Raises
    ------
    ValueError
        On empty or mismatched inputs, bad weights or non-finite tensors.
    """
    names = _check_states(states)
    weights = _weights_for(states, num_examples)
    return {name: _cast_back(_weighted_sum(states, weights, name), states[0][name].dtype) for name in names}


def majority_vote(
    masks: Sequence[Mapping[str, torch.Tensor]], *, threshold: int | None = None
) -> tuple[Mask, dict[str, torch.Tensor]]:
    """Majority vote of client masks: keep a coordinate iff ``V = sum_k M_k >= threshold``.

    Parameters
    ----------
    masks : sequence of dict[str, BoolTensor], length K
        One mask per client (``True`` = kept), the same names and shapes.
    threshold : int, optional
        Minimum number of votes in ``[1, K]``; default ``max(1, floor(K/2))``
        (:func:`majority_threshold`): with 8 clients 4 votes suffice, with 1 client its own mask.

    Returns
    -------
    kept : dict[str, BoolTensor]
        The global mask, ``V >= threshold``, shapes of the masks.
    votes : dict[str, Tensor]
        ``V``, int64 tensors in ``[0, K]`` of the same shapes.
    """
    names = _check_masks(masks)
    num_clients = len(masks)
    if threshold is None:
        threshold = majority_threshold(num_clients)
    elif isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= num_clients:
        raise ValueError(f"threshold must be an int in [1, {num_clients}] (number of clients), got {threshold!r}")
    votes: dict[str, torch.Tensor] = {}
    for name in names:
        count = masks[0][name].to(torch.int64)
        for mask in masks[1:]:
            count = count + mask[name]
        votes[name] = count
    kept = {name: votes[name] >= threshold for name in names}
    return kept, votes


def fedavg_majority_vote(
    states: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[float],
    *,
    threshold: int | None = None,
) -> tuple[State, Mask]:
    """FedSparsify-Local merge: ``w = 1[V >= threshold] * sum_k a_k w_k``.

    The clients' values are averaged as sent: a client that pruned a kept coordinate contributes
    its zero to the average (spec section 4). Tensors without a mask are averaged densely.

    Parameters
    ----------
    states : sequence of dict[str, Tensor], length K
        One state per client (pruned coordinates hold 0).
    masks : sequence of dict[str, BoolTensor], length K
        One mask per client over a subset of the state names, with those tensors' shapes.
    num_examples : sequence of float, length K
        Examples per client (finite, > 0).
    threshold : int, optional
        Minimum votes in ``[1, K]``; default ``max(1, floor(K/2))`` (see :func:`majority_vote`).

    Returns
    -------
    state : dict[str, Tensor]
        The merged state; 0 wherever the global mask is False.
    mask : dict[str, BoolTensor]
        The global mask ``V >= threshold`` over the mask names.
    """
    names = _check_states(states)
    _check_masks(masks, states)
    weights = _weights_for(states, num_examples)
    kept, _ = majority_vote(masks, threshold=threshold)
    merged: State = {}
    for name in names:
        average = _weighted_sum(states, weights, name)
        if name in kept:
            average = average * kept[name]
        merged[name] = _cast_back(average, states[0][name].dtype)
    return merged, kept


def masked_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    masks: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[float],
) -> tuple[State, Mask]:
    """Average each coordinate over the clients that keep it.

    ``w = sum_k a_k M_k w_k / sum_k a_k M_k``, and 0 where no client keeps the coordinate (the
    denominator is 0). A coordinate kept by one client only takes that client's value. Tensors
    without a mask are averaged densely (:func:`fedavg`).

    Parameters
    ----------
    states : sequence of dict[str, Tensor], length K
        One state per client.
    masks : sequence of dict[str, BoolTensor], length K
        One mask per client over a subset of the state names, with those tensors' shapes.
    num_examples : sequence of float, length K
        Examples per client (finite, > 0).

    Returns
    -------
    state : dict[str, Tensor]
        The merged state, with the first client's names, shapes and dtypes.
    mask : dict[str, BoolTensor]
        Coordinates kept by at least one client (``V >= 1``) over the mask names.
    """
    names = _check_states(states)
    mask_names = _check_masks(masks, states)
    weights = _weights_for(states, num_examples)
    merged: State = {}
    for name in names:
        dtype = states[0][name].dtype
        if name not in mask_names:
            merged[name] = _cast_back(_weighted_sum(states, weights, name), dtype)
            continue
        numerator = torch.zeros(states[0][name].shape, dtype=torch.float64, device=states[0][name].device)
        denominator = torch.zeros_like(numerator)
        for state, mask, a in zip(states, masks, weights):
            kept = mask[name].to(torch.float64) * a
            numerator.add_(kept * state[name].to(torch.float64))
            denominator.add_(kept)
        nobody = denominator == 0
        average = torch.where(nobody, torch.zeros_like(numerator), numerator / torch.where(nobody, 1.0, denominator))
        merged[name] = _cast_back(average, dtype)
    kept_by_any: Mask = {}
    for name in mask_names:
        union = masks[0][name].clone()
        for mask in masks[1:]:
            union |= mask[name]
        kept_by_any[name] = union
    return merged, kept_by_any


def proximal_term(
    state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum_name ||w - w_global||^2``.

    Differentiable with respect to ``state`` (pass the model's parameters to add it to the local
    loss); ``global_state`` is the round's starting weights and is detached.

    Parameters
    ----------
    state : dict[str, Tensor]
        The client's current tensors (e.g. ``dict(model.named_parameters())``); the sum runs over
        these names.
    global_state : dict[str, Tensor]
        The global weights the round started from; must hold every name of ``state`` with the same
        shape (extra names, such as buffers, are ignored).
    mu : float
        Proximal coefficient, finite and >= 0.

    Returns
    -------
    Tensor
        A 0-dim tensor in the dtype of the first tensor of ``state``.
    """
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    if not state:
        raise ValueError("state has no tensors")
    total: torch.Tensor | None = None
    for name, w in state.items():
        if name not in global_state:
            raise ValueError(f"global_state has no tensor {name!r} (state and global_state must share names)")
        w_global = global_state[name].detach()
        if w.shape != w_global.shape:
            raise ValueError(
                f"state[{name!r}] has shape {tuple(w.shape)}, "
                f"but global_state[{name!r}] has shape {tuple(w_global.shape)}"
            )
        squared = (w - w_global.to(device=w.device, dtype=w.dtype)).pow(2).sum()
        total = squared if total is None else total + squared
    assert total is not None
    return total * (mu / 2.0)

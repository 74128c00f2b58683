"""Masks as data: scores -> boolean masks, applied to named weights.

A *mask* is a ``dict[str, torch.BoolTensor]`` keyed by the model's own ``state_dict`` names
(``net.conv1.weight``...), one tensor per prunable tensor, ``True`` = kept. Masks live beside the
weights, never inside the module (no ``torch.nn.utils.prune`` surgery), and are never derived
from ``w != 0``: a weight that lands on 0.0 by chance is not pruned by accident.

The mask maker, :func:`global_mask`, takes *scores* (any ``dict[str, Tensor]`` with the shapes of
the prunable tensors; larger = more important) and keeps exactly ``N - floor(s * N)`` of the
``N`` coordinates; :func:`layerwise_mask` applies the same rule to each tensor. The magnitude
variants (:func:`global_magnitude_mask`, :func:`layerwise_magnitude_mask`) score ``|w|`` (the
FedSparsify spec's ``GMM(w, s)``); :mod:`fedsparse_lib.pruning.scores` provides SNIP, GraSP,
SynFlow and random scores for the same mask maker.

Decisions
---------
Ties
    Coordinates are ranked by score (descending), ties broken by a fixed order: tensor order (the
    scores' key order, i.e. state_dict order), then flat (row-major) index; the earlier coordinate
    is kept. So the kept count is always exact, and the mask is a pure function of its inputs.
Previous mask (``previous=``)
    ``sparsity`` is the cumulative (total) sparsity, not an increment. Coordinates already pruned
    by ``previous`` rank *below every live coordinate* (whatever their score, so that signed
    scores such as GraSP's behave like magnitudes, whose pruned zeros rank lowest): they are the
    first to be dropped and a live coordinate is removed only once all of them are. The result is
    then ANDed with ``previous``, so masks only shrink. Consequently, when ``previous`` already
    prunes ``P <= floor(s * N)`` coordinates the result keeps exactly ``N - floor(s * N)`` and
    contains no regrowth; when it prunes more (the requested sparsity is lower than the current
    one) the result equals ``previous`` (it keeps ``N - P`` < ``N - floor(s * N)``) and an INFO
    message is logged: sparsity never decreases.
Minimum density (``min_density=``, off by default)
    Global magnitude pruning of freshly initialised weights can empty whole layers (spec
    section 8). ``min_density=d`` first reserves, in every tensor, its ``n_l - floor((1 - d) *
    n_l)`` highest-scoring live coordinates (never more than the tensor has alive), then fills the
    rest of the global budget by the global ranking. The total stays exact unless the reserves
    alone exceed it. This departs from the paper, which has no such floor.
Counts
    ``floor(s * N)`` is computed with a 1e-9 tolerance against floating-point error
    (``0.29 * 100`` is 28.999999999999996 in binary floating point; 29 coordinates are pruned).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

__all__ = [
    "apply_mask",
    "emptied_layers",
    "global_magnitude_mask",
    "global_mask",
    "layerwise_magnitude_mask",
    "layerwise_mask",
    "mask_gradients",
    "mask_sparsity",
    "ones_mask",
    "prunable_names",
    "sparsity_summary",
]

logger = logging.getLogger(__name__)

Mask = dict[str, torch.Tensor]
_EXCLUDE_KEYWORDS = ("biases", "first", "last")
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _tensors(state_or_model: Mapping[str, torch.Tensor] | nn.Module, what: str = "state") -> dict[str, torch.Tensor]:
    """Named tensors of a state dict or a module (the module's own parameters and buffers)."""
    if isinstance(state_or_model, nn.Module):
        return dict(state_or_model.state_dict(keep_vars=True))
    if isinstance(state_or_model, Mapping):
        bad = [k for k, v in state_or_model.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{what} must map names to torch tensors; not tensors: {bad[:5]}")
        return dict(state_or_model)
    raise ValueError(f"{what} must be a torch.nn.Module or a mapping of names to tensors, "
                     f"got {type(state_or_model).__name__}")


def _num_pruned(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)`` with a tolerance against floating-point error, in [0, n - 1]."""
    return min(n - 1, max(0, math.floor(round(sparsity * n, 9)))) if n > 0 else 0


def _check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be a fraction of zeroed weights in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping) or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty mapping of names to tensors, got {scores!r:.80}")
    out = {}
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.is_complex():
            got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"scores[{name!r}] must be a real tensor, got {got}")
        s = s.detach()
        if s.numel() == 0:
            raise ValueError(f"scores[{name!r}] is empty (shape {tuple(s.shape)})")
        if s.is_floating_point() and bool(torch.isnan(s).any()):
            raise ValueError(f"scores[{name!r}] contains NaN ({int(torch.isnan(s).sum())} values)")
        out[name] = s
    return out


def _check_mask(mask: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Tensor] | None = None,
                *, what: str = "mask", exact_keys: bool = True) -> dict[str, torch.Tensor]:
    """Validate a mask (bool tensors) against reference tensors' names and shapes."""
    if not isinstance(mask, Mapping):
        raise ValueError(f"{what} must be a mapping of names to bool tensors, got {type(mask).__name__}")
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{what}[{name!r}] must be a torch.bool tensor, got {got}")
    if shapes is not None:
        missing = [k for k in mask if k not in shapes]
        if missing:
            raise ValueError(f"{what} has names that are not in the weights/scores: {missing[:5]}")
        if exact_keys:
            absent = [k for k in shapes if k not in mask]
            if absent:
                raise ValueError(f"{what} lacks names present in the scores: {absent[:5]}")
        for name, m in mask.items():
            if tuple(m.shape) != tuple(shapes[name].shape):
                raise ValueError(f"{what}[{name!r}] has shape {tuple(m.shape)}, expected "
                                 f"{tuple(shapes[name].shape)}")
    return dict(mask)


def _select_top(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool vector keeping exactly ``n_keep`` largest entries of ``flat``; ties: lower index first."""
    n = flat.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if n_keep >= n:
        keep[:] = True
        return keep
    if n_keep <= 0:
        return keep
    # The n_keep-th largest value is the (n - n_keep + 1)-th smallest.
    threshold = torch.kthvalue(flat, n - n_keep + 1).values
    keep = flat > threshold
    need = n_keep - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:need]
        keep[ties] = True
    return keep


def _ranked(scores: dict[str, torch.Tensor], previous: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Scores in a common float dtype (>= float32) with -0.0 folded to 0.0 and previously pruned
    coordinates at -inf."""
    dtype = torch.float32
    for s in scores.values():
        dtype = torch.promote_types(dtype, s.dtype if s.is_floating_point() else torch.float64)
    out = {}
    for name, s in scores.items():
        s = s.to(dtype) + 0.0
        if previous is not None:
            s = s.masked_fill(~previous[name].to(s.device), -math.inf)
        out[name] = s
    return out


def _unflatten(flat_keep: torch.Tensor, like: dict[str, torch.Tensor]) -> Mask:
    out, start = {}, 0
    for name, t in like.items():
        # clone: each mask owns its storage (a view would keep, and torch.save would write, all N)
        out[name] = flat_keep[start:start + t.numel()].reshape(t.shape).clone()
        start += t.numel()
    return out


def _and_previous(mask: Mask, previous: dict[str, torch.Tensor] | None, target_kept: int) -> Mask:
    if previous is None:
        return mask
    out = {k: m & previous[k].to(m.device) for k, m in mask.items()}
    kept = sum(int(m.sum()) for m in out.values())
    if kept < target_kept:
        logger.info("previous mask already prunes more than requested: keeping %d coordinates instead "
                    "of %d (masks never regrow)", kept, target_kept)
    return out


# --------------------------------------------------------------------------------------------
# Prunable set
# --------------------------------------------------------------------------------------------
def prunable_names(model_or_state: nn.Module | Mapping[str, torch.Tensor], *,
                   exclude: str | Iterable[str] = ()) -> list[str]:
    """Names of the prunable tensors, in state_dict order.

    Parameters
    ----------
    model_or_state : torch.nn.Module or mapping of str to torch.Tensor
        A module: its trainable parameters (``requires_grad``), under their state_dict names. A
        state dict: every floating-point tensor except normalisation running statistics
        (``running_mean``, ``running_var``); pass the module when frozen parameters exist.
    exclude : str or iterable of str, default ()
        Tensors to leave dense. Each item is ``"biases"`` (every tensor named ``*bias``),
        ``"first"`` / ``"last"`` (all tensors of the first / last layer, a layer being the
        name's prefix before the last ``.``, in state_dict order) or an explicit tensor name. The
        default, nothing excluded, is the paper's choice (every trainable tensor, biases and
        first/last layers included).

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        For an unknown exclusion or when nothing is left to prune.
    """
    if isinstance(model_or_state, nn.Module):
        keys = list(model_or_state.state_dict(keep_vars=True).keys())
        trainable = {n for n, p in model_or_state.named_parameters(remove_duplicate=False) if p.requires_grad}
        names = [k for k in keys if k in trainable]
    else:
        tensors = _tensors(model_or_state, "model_or_state")
        names = [k for k, t in tensors.items()
                 if t.is_floating_point() and k.rsplit(".", 1)[-1] not in _RUNNING_STATS]
    if not names:
        raise ValueError("model_or_state has no trainable floating-point tensors to prune")
    items = [exclude] if isinstance(exclude, str) else list(exclude)
    unknown = [e for e in items if e not in _EXCLUDE_KEYWORDS and e not in names]
    if unknown:
        raise ValueError(f"exclude items {unknown} are neither one of {list(_EXCLUDE_KEYWORDS)} nor "
                         f"prunable tensor names (e.g. {names[:3]})")
    layer = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
    dropped = set()
    for e in items:
        if e == "biases":
            dropped |= {n for n in names if n.rsplit(".", 1)[-1] == "bias"}
        elif e == "first":
            dropped |= {n for n, l in zip(names, layer) if l == layer[0]}
        elif e == "last":
            dropped |= {n for n, l in zip(names, layer) if l == layer[-1]}
        else:
            dropped.add(e)
    kept = [n for n in names if n not in dropped]
    if not kept:
        raise ValueError(f"exclude={items!r} leaves no tensor to prune")
    return kept


def ones_mask(state: nn.Module | Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> Mask:
    """An all-kept mask (sparsity 0) over ``names``.

    Parameters
    ----------
    state : torch.nn.Module or mapping of str to torch.Tensor
    names : sequence of str, optional
        The prunable tensors (default: :func:`prunable_names` of ``state``).

    Returns
    -------
    dict of str to torch.BoolTensor
        ``True`` everywhere, each of the shape and on the device of its tensor.
    """
    tensors = _tensors(state)
    names = prunable_names(state) if names is None else list(names)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"names not found in state: {missing[:5]}")
    return {n: torch.ones(tensors[n].shape, dtype=torch.bool, device=tensors[n].device) for n in names}


# --------------------------------------------------------------------------------------------
# Mask makers
# --------------------------------------------------------------------------------------------
def global_mask(scores: Mapping[str, torch.Tensor], sparsity: float, *,
                previous: Mapping[str, torch.Tensor] | None = None,
                min_density: float | None = None) -> Mask:
    """Keep the globally highest scores: exactly ``N - floor(sparsity * N)`` of ``N`` coordinates.

    Parameters
    ----------
    scores : mapping of str to torch.Tensor
        One real tensor per prunable tensor (any shapes), larger = more important; ``N`` is their
        total number of elements. No NaN.
    sparsity : float
        Target cumulative sparsity, the fraction of pruned coordinates, in [0, 1).
    previous : mapping of str to torch.BoolTensor, optional
        The current mask (same names and shapes). Its pruned coordinates are dropped first and
        the result never regrows them (see the module docstring for the exact semantics).
    min_density : float, optional
        Per-tensor minimum fraction of kept coordinates in [0, 1] (see the module docstring; a
        departure from the paper, off by default).

    Returns
    -------
    dict of str to torch.BoolTensor
        Same names, shapes and devices as ``scores``; ``True`` = kept.
    """
    scores = _check_scores(scores)
    sparsity = _check_sparsity(sparsity)
    prev = _check_mask(previous, scores, what="previous") if previous is not None else None
    ranked = _ranked(scores, prev)
    n = sum(s.numel() for s in ranked.values())
    n_keep = n - _num_pruned(sparsity, n)
    if min_density is not None:
        if isinstance(min_density, bool) or not isinstance(min_density, (int, float)) \
                or not 0.0 <= min_density <= 1.0:
            raise ValueError(f"min_density must be a fraction of kept weights in [0, 1], got {min_density!r}")
        reserved_total = 0
        for name, s in ranked.items():
            alive = int((s > -math.inf).sum())
            reserve = min(alive, s.numel() - math.floor(round((1.0 - min_density) * s.numel(), 9)))
            if reserve > 0:
                top = _select_top(s.flatten(), reserve).reshape(s.shape)
                ranked[name] = s.masked_fill(top, math.inf)
                reserved_total += reserve
        n_keep = max(n_keep, reserved_total)
    device = next(iter(ranked.values())).device
    flat = torch.cat([s.flatten().to(device) for s in ranked.values()])
    keep = _unflatten(_select_top(flat, n_keep), ranked)
    keep = {k: m.to(scores[k].device) for k, m in keep.items()}
    return _and_previous(keep, prev, n_keep)


def layerwise_mask(scores: Mapping[str, torch.Tensor], sparsity: float | Mapping[str, float], *,
                   previous: Mapping[str, torch.Tensor] | None = None) -> Mask:
    """Keep the highest scores of each tensor: ``n_l - floor(s_l * n_l)`` of its ``n_l`` coordinates.

    The same rule as :func:`global_mask` (ties, ``previous``) applied to every tensor separately.

    Parameters
    ----------
    scores : mapping of str to torch.Tensor
        One real tensor per prunable tensor, larger = more important.
    sparsity : float or mapping of str to float
        Sparsity in [0, 1) for every tensor, or one per tensor name (every name of ``scores``).
    previous : mapping of str to torch.BoolTensor, optional
        The current mask; masks only shrink.

    Returns
    -------
    dict of str to torch.BoolTensor
    """
    scores = _check_scores(scores)
    if isinstance(sparsity, Mapping):
        missing = [k for k in scores if k not in sparsity]
        if missing:
            raise ValueError(f"sparsity mapping lacks tensors {missing[:5]}")
        per = {k: _check_sparsity(sparsity[k], f"sparsity[{k!r}]") for k in scores}
    else:
        s = _check_sparsity(sparsity)
        per = {k: s for k in scores}
    prev = _check_mask(previous, scores, what="previous") if previous is not None else None
    ranked = _ranked(scores, prev)
    out, target = {}, 0
    for name, s in ranked.items():
        n_keep = s.numel() - _num_pruned(per[name], s.numel())
        out[name] = _select_top(s.flatten(), n_keep).reshape(s.shape)
        target += n_keep
    return _and_previous(out, prev, target)


def _abs_scores(weights: nn.Module | Mapping[str, torch.Tensor], names: Sequence[str] | None,
                previous: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    tensors = _tensors(weights, "weights")
    if names is None:
        names = list(previous) if previous is not None else prunable_names(weights)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"names not found in weights: {missing[:5]}")
    return {n: tensors[n].detach().abs() for n in names}


def global_magnitude_mask(weights: nn.Module | Mapping[str, torch.Tensor], sparsity: float, *,
                          names: Sequence[str] | None = None,
                          previous: Mapping[str, torch.Tensor] | None = None,
                          min_density: float | None = None) -> Mask:
    """Global magnitude mask ``GMM(w, s)``: keep the ``N - floor(s * N)`` largest ``|w|``.

    Parameters
    ----------
    weights : torch.nn.Module or mapping of str to torch.Tensor
        The model or its state dict.
    sparsity : float
        Target cumulative sparsity in [0, 1).
    names : sequence of str, optional
        Prunable tensors (default: the keys of ``previous`` if given, else
        :func:`prunable_names` of ``weights``).
    previous, min_density
        As in :func:`global_mask`.

    Returns
    -------
    dict of str to torch.BoolTensor
    """
    return global_mask(_abs_scores(weights, names, previous), sparsity, previous=previous,
                       min_density=min_density)


def layerwise_magnitude_mask(weights: nn.Module | Mapping[str, torch.Tensor],
                             sparsity: float | Mapping[str, float], *,
                             names: Sequence[str] | None = None,
                             previous: Mapping[str, torch.Tensor] | None = None) -> Mask:
    """Layer-wise magnitude mask: in each tensor keep the ``n_l - floor(s * n_l)`` largest ``|w|``.

    Parameters are as in :func:`global_magnitude_mask` and :func:`layerwise_mask`.
    """
    return layerwise_mask(_abs_scores(weights, names, previous), sparsity, previous=previous)


# --------------------------------------------------------------------------------------------
# Using masks
# --------------------------------------------------------------------------------------------
def apply_mask(state_or_model: nn.Module | Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned coordinates in place: ``w <- w * M`` for every tensor of ``mask``.

    Pruned coordinates are set to exactly 0.0 (even where the weight was inf or NaN).

    Parameters
    ----------
    state_or_model : torch.nn.Module or mapping of str to torch.Tensor
        Modified in place (a module's parameters, or the tensors of a state dict).
    mask : mapping of str to torch.BoolTensor
        Names must exist in ``state_or_model`` with the same shapes.
    """
    tensors = _tensors(state_or_model)
    mask = _check_mask(mask, tensors, exact_keys=False)
    with torch.no_grad():
        for name, m in mask.items():
            t = tensors[name]
            t.masked_fill_(~m.to(t.device), 0)


def mask_gradients(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned coordinates in place (parameters without ``.grad`` are skipped).

    Use it between ``loss.backward()`` and ``optimizer.step()`` when the optimizer has momentum
    or weight decay, so that pruned weights receive no update.

    Parameters
    ----------
    model : torch.nn.Module
    mask : mapping of str to torch.BoolTensor
        Keys must be parameter names of ``model`` with matching shapes.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    mask = _check_mask(mask, params, what="mask (of parameters)", exact_keys=False)
    with torch.no_grad():
        for name, m in mask.items():
            g = params[name].grad
            if g is not None:
                g.masked_fill_(~m.to(g.device), 0)


def mask_sparsity(mask: Mapping[str, torch.Tensor]) -> float:
    """Overall sparsity of a mask: pruned coordinates / all coordinates, in [0, 1]."""
    mask = _check_mask(mask)
    n = sum(m.numel() for m in mask.values())
    if n == 0:
        raise ValueError("mask is empty")
    return 1.0 - sum(int(m.sum()) for m in mask.values()) / n


def sparsity_summary(mask: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per-tensor and overall sparsity of a mask, as a tidy table.

    Parameters
    ----------
    mask : mapping of str to torch.BoolTensor

    Returns
    -------
    pandas.DataFrame
        Columns ``name`` (str; the last row is ``"overall"``), ``numel`` (int), ``kept`` (int,
        coordinates kept) and ``sparsity`` (float in [0, 1], ``1 - kept / numel``).
    """
    mask = _check_mask(mask)
    if not mask:
        raise ValueError("mask is empty")
    names = list(mask) + ["overall"]
    numel = [m.numel() for m in mask.values()]
    kept = [int(m.sum()) for m in mask.values()]
    numel.append(sum(numel))
    kept.append(sum(kept))
    frame = pd.DataFrame({"name": names, "numel": pd.Series(numel, dtype="int64"),
                          "kept": pd.Series(kept, dtype="int64")})
    frame["sparsity"] = 1.0 - frame["kept"] / frame["numel"].where(frame["numel"] > 0)
    return frame


def emptied_layers(mask: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors with nothing kept (layer collapse), in mask order.

    A layer whose weight tensor is empty outputs a constant (its bias), so everything after it
    sees no signal from the input: the network predicts the same value for every subject. Bias
    tensors initialised at zero are commonly emptied by magnitude pruning at initialisation;
    look at the ``*.weight`` names to detect collapse.

    Parameters
    ----------
    mask : mapping of str to torch.BoolTensor

    Returns
    -------
    list of str
    """
    mask = _check_mask(mask)
    return [name for name, m in mask.items() if m.numel() > 0 and not bool(m.any())]

"""Importance scores: *which* weights to keep.

Every function returns ``dict[str, torch.Tensor]``: one floating-point score tensor per prunable
tensor, with that tensor's state_dict name and shape. Larger = more important: the mask makers of
:mod:`fedsparse_lib.pruning.masks` (:func:`~fedsparse_lib.pruning.masks.global_mask`,
:func:`~fedsparse_lib.pruning.masks.layerwise_mask`) keep the largest scores, e.g.::

    mask = global_mask(snip_scores(model, x, y, nn.functional.mse_loss), 0.95)

- :func:`magnitude_scores`: ``|w|`` (magnitude pruning; FedSparsify, OMP).
- :func:`random_scores`: uniform noise from a generator (random pruning; fixed scores and a
  ``previous`` mask give nested masks for progressive random pruning).
- :func:`snip_scores`: ``|g * w|``, Lee et al. (2019), "SNIP".
- :func:`grasp_scores`: ``w * (H g)``, Wang et al. (2020), "GraSP" (see its sign convention).
- :func:`synflow_scores` / :func:`synflow_mask`: data-free synaptic flow, Tanaka et al. (2020).

The model is never modified: gradients are taken with ``torch.autograd.grad`` (``.grad`` fields
are left alone) and SynFlow works on a copy. The model's train/eval mode is the caller's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fedsparse_lib.pruning.masks import Mask, _tensors, global_mask, prunable_names

__all__ = [
    "grasp_scores",
    "magnitude_scores",
    "random_scores",
    "snip_scores",
    "synflow_mask",
    "synflow_scores",
]

Scores = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Normalisation layers: bypassed (replaced by identity) in the SynFlow scoring pass.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)


def _names(model_or_state: nn.Module | Mapping[str, torch.Tensor], names: Sequence[str] | None,
           available: Mapping[str, torch.Tensor], what: str) -> list[str]:
    names = prunable_names(model_or_state) if names is None else list(names)
    if not names:
        raise ValueError("names is empty: nothing to score")
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"names are not {what}: {missing[:5]}")
    return names


def _params(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))
    names = _names(model, names, params, "parameters of the model")
    frozen = [n for n in names if not params[n].requires_grad]
    if frozen:
        raise ValueError(f"cannot take gradients of frozen parameters {frozen[:5]}")
    return {n: params[n] for n in names}


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (outputs, targets) -> scalar, got {loss_fn!r}")
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


# --------------------------------------------------------------------------------------------
# Data-free, weight-only scores
# --------------------------------------------------------------------------------------------
def magnitude_scores(state: nn.Module | Mapping[str, torch.Tensor], *,
                     names: Sequence[str] | None = None) -> Scores:
    """Magnitude scores ``|w|``.

    Parameters
    ----------
    state : torch.nn.Module or mapping of str to torch.Tensor
        The model or its state dict.
    names : sequence of str, optional
        Tensors to score (default: :func:`~fedsparse_lib.pruning.masks.prunable_names`).

    Returns
    -------
    dict of str to torch.Tensor
        ``|w|`` (a copy, same shape, dtype and device as each weight), >= 0.
    """
    tensors = _tensors(state)
    names = _names(state, names, tensors, "in the state")
    return {n: tensors[n].detach().abs() for n in names}


def random_scores(state: nn.Module | Mapping[str, torch.Tensor], *, generator: torch.Generator,
                  names: Sequence[str] | None = None) -> Scores:
    """Random scores, i.i.d. uniform in [0, 1): random pruning.

    Parameters
    ----------
    state : torch.nn.Module or mapping of str to torch.Tensor
    generator : torch.Generator
        Source of randomness (required, for reproducibility); drawn on the CPU, tensor by tensor
        in ``names`` order, so the scores depend only on the generator's state and the shapes.
    names : sequence of str, optional
        Tensors to score (default: prunable_names).

    Returns
    -------
    dict of str to torch.Tensor
        float32 scores in [0, 1), on each weight's device.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    tensors = _tensors(state)
    names = _names(state, names, tensors, "in the state")
    return {n: torch.rand(tensors[n].shape, generator=generator, device=generator.device)
            .to(tensors[n].device) for n in names}


# --------------------------------------------------------------------------------------------
# Gradient-based scores at initialisation
# --------------------------------------------------------------------------------------------
def snip_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                names: Sequence[str] | None = None) -> Scores:
    """SNIP connection sensitivity ``|dL/dw * w|`` (Lee et al., 2019).

    Parameters
    ----------
    model : torch.nn.Module
        Not modified (its ``.grad`` fields are untouched).
    inputs : torch.Tensor
        One batch, e.g. ``(batch, 1, X, Y, Z)`` volumes; the number of samples is the caller's
        choice (the paper's code: one client's first batch).
    targets : torch.Tensor
        The matching targets, e.g. ``(batch,)`` ages.
    loss_fn : callable (outputs, targets) -> scalar tensor
        E.g. ``torch.nn.functional.mse_loss``.
    names : sequence of str, optional
        Parameters to score (default: prunable_names(model)).

    Returns
    -------
    dict of str to torch.Tensor
        ``|g * w|`` >= 0, detached, shaped like each parameter. (Lee et al. normalise by the sum,
        which does not change the ranking.)
    """
    params = _params(model, names)
    with torch.enable_grad():
        loss = _loss(model, inputs, targets, loss_fn)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else (g * p).abs()).detach()
            for (n, p), g in zip(params.items(), grads)}


def grasp_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                 names: Sequence[str] | None = None) -> Scores:
    """GraSP scores ``w * (H g)`` (Wang et al., 2020), signed; larger = keep.

    ``g`` is the loss gradient and ``H`` the Hessian of the loss with respect to the scored
    parameters, ``H g`` obtained by double back-propagation (the gradient of ``g . stop(g)``).

    Sign convention: the paper scores ``S(-w) = -w * (H g)`` and removes the weights with the
    *highest* ``S`` (those whose removal least reduces the gradient flow; the authors' code keeps
    ``S <= threshold``). This function returns the opposite, ``w * (H g) = -S(-w)``, so that, like
    every score here, the mask makers keep the largest and prune the lowest first. Scores can be
    negative. The classification temperature of the paper's code does not apply to regression and
    is left out.

    Parameters
    ----------
    model, inputs, targets, loss_fn, names
        As in :func:`snip_scores`. The loss must be twice differentiable (ReLU, max-pool and
        instance norm are fine: their second derivative is handled by autograd).

    Returns
    -------
    dict of str to torch.Tensor
        ``w * (H g)``, detached, shaped like each parameter.
    """
    params = _params(model, names)
    plist = list(params.values())
    hg: list[torch.Tensor | None] = [None] * len(plist)
    with torch.enable_grad():
        loss = _loss(model, inputs, targets, loss_fn)
        grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
        used = [g for g in grads if g is not None and g.requires_grad]
        if used:
            z = sum((g * g.detach()).sum() for g in used)
            hg = list(torch.autograd.grad(z, plist, allow_unused=True))
    return {n: (torch.zeros_like(p) if h is None else p * h).detach()
            for (n, p), h in zip(params.items(), hg)}


# --------------------------------------------------------------------------------------------
# SynFlow (data-free)
# --------------------------------------------------------------------------------------------
def _bypass_norms(module: nn.Module) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, _NORM_TYPES):
            setattr(module, child_name, nn.Identity())
        else:
            _bypass_norms(child)


def _synflow_twin(model: nn.Module, names: Sequence[str] | None) -> tuple[nn.Module, list[str]]:
    """A float64 copy of ``model`` with norm layers replaced by identity and ``|w|`` everywhere."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    norm_params = {f"{m_name}.{p_name}" if m_name else p_name
                   for m_name, m in model.named_modules(remove_duplicate=False) if isinstance(m, _NORM_TYPES)
                   for p_name, _ in m.named_parameters(recurse=False)}
    if names is None:
        names = [n for n in prunable_names(model) if n not in norm_params]
        if not names:
            raise ValueError("the model has no prunable parameters outside normalisation layers")
    else:
        names = list(names)
        bad = [n for n in names if n in norm_params]
        if bad:
            raise ValueError(f"SynFlow bypasses normalisation layers and cannot score their parameters "
                             f"{bad[:5]}; leave them out of names")
    twin = copy.deepcopy(model)
    _bypass_norms(twin)
    twin = twin.to(torch.float64).eval()
    params = dict(twin.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"names are not parameters of the model: {missing[:5]}")
    with torch.no_grad():
        for t in twin.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.abs_()
    for p in twin.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    return twin, names


def _synflow_pass(twin: nn.Module, names: Sequence[str], abs_weights: Mapping[str, torch.Tensor],
                  input_shape: tuple[int, ...], mask: Mask | None) -> Scores:
    params = dict(twin.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for n in names:
            w = abs_weights[n]
            params[n].copy_(w if mask is None or n not in mask else w * mask[n].to(w.device))
    device = params[names[0]].device
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    with torch.enable_grad():
        r = twin(ones).sum()
        grads = torch.autograd.grad(r, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else (g * params[n]).abs()).detach()
            for n, g in zip(names, grads)}


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    return shape


def synflow_scores(model: nn.Module, input_shape: Sequence[int], *, mask: Mask | None = None,
                   names: Sequence[str] | None = None) -> Scores:
    """SynFlow synaptic saliency ``|dR/dw * w|`` of one data-free pass (Tanaka et al., 2020).

    The pass runs on a float64 copy of the model whose every tensor is replaced by its absolute
    value and whose normalisation layers (batch/instance/group/layer norm) are replaced by
    identity: instance norm would zero the constant signal, and norms break SynFlow's
    conservation law. ``R`` is the sum of the output for an all-ones input of one example. Pruned
    coordinates (``mask``) are zero in the pass and score 0.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    input_shape : sequence of int
        Shape of one example, without the batch axis (``(1, X, Y, Z)`` for BrainAgeCNN).
    mask : mapping of str to torch.BoolTensor, optional
        Current mask, applied to the copy before the pass.
    names : sequence of str, optional
        Parameters to score (default: prunable_names(model) minus normalisation-layer
        parameters, which SynFlow cannot score).

    Returns
    -------
    dict of str to torch.Tensor
        float64 scores >= 0, shaped like each parameter, on the model's device. Zero-valued
        weights (e.g. zero-initialised biases) score 0.
    """
    shape = _check_input_shape(input_shape)
    twin, names = _synflow_twin(model, names)
    abs_weights = {n: p.detach().clone() for n, p in twin.named_parameters(remove_duplicate=False) if n in names}
    return _synflow_pass(twin, names, abs_weights, shape, mask)


def synflow_mask(model: nn.Module, input_shape: Sequence[int], sparsity: float, *,
                 iterations: int = 100, names: Sequence[str] | None = None,
                 previous: Mask | None = None, min_density: float | None = None) -> Mask:
    """Iterative SynFlow pruning to ``sparsity`` with the exponential schedule of Tanaka et al.

    Iteration ``k = 1 .. iterations`` rescores the masked network with :func:`synflow_scores` and
    prunes to the cumulative sparsity ``1 - (1 - sparsity) ** (k / iterations)`` with
    :func:`~fedsparse_lib.pruning.masks.global_mask` (previous pruned coordinates first, masks
    only shrink). With ``iterations=1`` it is the single-shot variant.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    input_shape : sequence of int
        Shape of one example without the batch axis.
    sparsity : float
        Final sparsity in [0, 1).
    iterations : int, default 100
        Number of score-and-prune rounds (the paper: 100), >= 1.
    names : sequence of str, optional
        As in :func:`synflow_scores`.
    previous : mapping of str to torch.BoolTensor, optional
        Starting mask (default: all kept).
    min_density : float, optional
        Passed to :func:`~fedsparse_lib.pruning.masks.global_mask` (off by default).

    Returns
    -------
    dict of str to torch.BoolTensor

    Notes
    -----
    On a freshly initialised BrainAgeCNN at 95% sparsity, single-shot SynFlow (like global
    magnitude pruning) can empty conv5, while the iterative variant keeps every weight tensor
    alive (Tanaka et al.'s point; tested with 10 iterations at width 0.25). Zero-initialised
    biases score 0 and go first; the output bias (the mean age) competes with weights whose
    scores grow with depth, so consider ``names=prunable_names(model, exclude=("biases",))``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction of zeroed weights in [0, 1), got {sparsity!r}")
    shape = _check_input_shape(input_shape)
    twin, names = _synflow_twin(model, names)
    abs_weights = {n: p.detach().clone() for n, p in twin.named_parameters(remove_duplicate=False) if n in names}
    mask = previous
    for k in range(1, iterations + 1):
        scores = _synflow_pass(twin, names, abs_weights, shape, mask)
        target = 1.0 - (1.0 - sparsity) ** (k / iterations)
        mask = global_mask(scores, sparsity if k == iterations else target, previous=mask,
                           min_density=min_density)
    return mask

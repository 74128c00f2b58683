"""Per-sample gradients of the squared error, and white-box attack features built from them.

The gradient of one subject's loss ``(f(x) - y)^2`` with respect to the last layers is the
strongest white-box membership signal of Gupta et al. (MIDL 2021): a training subject's gradient is
small because the model has already moved to fit it.

Per-sample gradients come from ``torch.func``: ``vmap(grad(loss))`` over a batch with
``functional_call``, differentiating only the chosen parameters (the others are constants). This is
valid for :class:`~fedsparse_lib.models.BrainAgeCNN` because nothing couples the samples of a
batch: it has no batch norm and no dropout, and ``InstanceNorm3d(affine=False,
track_running_stats=False)`` normalises every sample by its own statistics, identically in
``train()`` and ``eval()`` mode. The model is put in ``eval()`` mode for the computation (its mode
is restored afterwards), so a model with dropout would be treated deterministically.
``method="loop"`` is the plain reference (one backward pass per sample); the two agree to float
precision (tested) and ``benchmarks/bench_per_sample_grads.py`` measures the speed-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["gradient_features", "last_layer_names", "per_sample_gradients", "white_box_features"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def last_layer_names(model: nn.Module, *, n_layers: int = 2) -> list[str]:
    """Parameter names of the last ``n_layers`` modules that own parameters, in model order.

    For :class:`~fedsparse_lib.models.BrainAgeCNN` and ``n_layers=2``: ``net.conv6.weight``,
    ``net.conv6.bias``, ``net.output.weight``, ``net.output.bias``. (Every conv bias of that model
    but the output's is followed by an instance norm, which cancels it: its gradient is 0 up to
    rounding, about 1e-7, and its norm feature carries no signal.)
    """
    if int(n_layers) != n_layers or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    owners = [(name, module) for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters")
    names = []
    for prefix, module in owners[-int(n_layers):]:
        names += [f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters(recurse=False)]
    return names


def _check_names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    params = dict(model.named_parameters())
    chosen = last_layer_names(model) if names is None else list(names)
    unknown = [n for n in chosen if n not in params]
    if unknown:
        raise KeyError(f"{unknown[:5]} are not parameters of the model (it has e.g. {list(params)[-4:]})")
    if not chosen:
        raise ValueError("names is empty: choose at least one parameter")
    return chosen


def _vmap_fn(model: nn.Module, names: list[str]) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    from torch.func import functional_call, grad, vmap

    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})

    def loss(chosen: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = functional_call(model, {**fixed, **chosen}, (x.unsqueeze(0),))
        return ((pred.reshape(()) - y) ** 2)

    return vmap(grad(loss), in_dims=(None, 0, 0))


def per_sample_gradients(model: nn.Module, batches: Batches, *, names: Sequence[str] | None = None,
                         method: str = "vmap", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Gradient of every sample's squared error with respect to the chosen parameters.

    Parameters
    ----------
    model : nn.Module
        Maps inputs of shape (batch, 1, X, Y, Z) to ages of shape (batch,), in years.
    batches : iterable of (inputs, ages)
        Inputs of shape (batch, 1, X, Y, Z), ages of shape (batch,) in years (e.g. a DataLoader
        that does not shuffle). The batch size sets the memory of one ``vmap`` call.
    names : sequence of str, optional
        Parameter names to differentiate; default :func:`last_layer_names` (the last two layers).
    method : {"vmap", "loop"}
        ``torch.func.vmap(grad(...))`` (fast) or one backward pass per sample (reference).
    device : str or torch.device
        Where the computation runs; the model is used where it is, inputs are moved to ``device``.

    Returns
    -------
    dict of str to torch.Tensor
        For each name, a float32 CPU tensor of shape (n_samples, *parameter shape): the gradient of
        ``(f(x_i) - y_i)^2`` (years^2 per unit of the parameter), samples in the order of ``batches``.
    """
    if method not in ("vmap", "loop"):
        raise ValueError(f"method must be 'vmap' or 'loop', got {method!r}")
    chosen = _check_names(model, names)
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {n: [] for n in chosen}
    try:
        fn = _vmap_fn(model, chosen) if method == "vmap" else None
        for x, y in batches:
            x = x.to(device)
            y = torch.as_tensor(y).to(device, dtype=torch.float32).reshape(-1)
            if x.ndim != 5 or x.shape[0] != y.shape[0]:
                raise ValueError(f"expected inputs (batch, 1, X, Y, Z) and ages (batch,), got {tuple(x.shape)} "
                                 f"and {tuple(y.shape)}")
            if fn is not None:
                grads = fn({n: params[n].detach() for n in chosen}, x, y)
                for n in chosen:
                    out[n].append(grads[n].detach().float().cpu())
            else:
                for i in range(x.shape[0]):
                    loss = ((model(x[i:i + 1]).reshape(()) - y[i]) ** 2)
                    grads = torch.autograd.grad(loss, [params[n] for n in chosen])
                    for n, g in zip(chosen, grads):
                        out[n].append(g.detach().float().cpu().unsqueeze(0))
    finally:
        model.train(was_training)
    if not out[chosen[0]]:
        raise ValueError("no batches to compute gradients on")
    return {n: torch.cat(v) for n, v in out.items()}


def gradient_features(grads: Mapping[str, torch.Tensor], *, flatten: Sequence[str] | None = None,
                      mask: Mapping[str, torch.Tensor] | None = None,
                      kept_only: bool = False) -> tuple[np.ndarray, list[str]]:
    """White-box features from per-sample gradients: per-tensor L2 norms and flattened gradients.

    Parameters
    ----------
    grads : dict of str to torch.Tensor
        From :func:`per_sample_gradients`: shape (n_samples, *parameter shape) per name.
    flatten : sequence of str, optional
        Names whose gradient entries become features one by one; default the last two names of
        ``grads`` (for the default names: the output layer's weight and bias, ``64 * width + 1``
        entries).
    mask : dict of str to bool tensor, optional
        The model's mask (state_dict names, ``True`` = kept). Only used with ``kept_only``.
    kept_only : bool, default False
        Restrict every norm and flattened gradient to the kept coordinates of ``mask`` (names
        absent from the mask are dense). With ``False`` the full tensors are used: the gradient at
        a pruned (zero) weight is still defined and carries signal.

    Returns
    -------
    features : numpy.ndarray of shape (n_samples, n_features), float64
    feature_names : list of str
        ``grad_norm:<name>`` for every tensor, then ``grad:<name>[<flat index>]`` for every kept
        entry of the flattened tensors.
    """
    if not grads:
        raise ValueError("grads is empty")
    if kept_only and mask is None:
        raise ValueError("kept_only=True needs the model's mask")
    names = list(grads)
    n = {int(g.shape[0]) for g in grads.values()}
    if len(n) != 1:
        raise ValueError(f"gradients disagree on the number of samples: {sorted(n)}")
    flat_names = list(flatten) if flatten is not None else names[-2:]
    unknown = [f for f in flat_names if f not in grads]
    if unknown:
        raise KeyError(f"flatten names {unknown} are not in grads (it has {names})")
    columns, labels = [], []
    flat: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for name in names:
        g = grads[name].reshape(grads[name].shape[0], -1).double()
        index = np.arange(g.shape[1])
        if kept_only and name in mask:  # type: ignore[operator]
            keep = mask[name].reshape(-1).bool().cpu()  # type: ignore[index]
            if keep.numel() != g.shape[1]:
                raise ValueError(f"mask {name} has {keep.numel()} entries, the gradient has {g.shape[1]}")
            g, index = g[:, keep], index[keep.numpy()]
        columns.append(torch.linalg.vector_norm(g, dim=1, keepdim=True))
        labels.append(f"grad_norm:{name}")
        flat[name] = (g, index)
    for name in flat_names:
        g, index = flat[name]
        columns.append(g)
        labels += [f"grad:{name}[{i}]" for i in index]
    return torch.cat(columns, dim=1).numpy(), labels


def white_box_features(model: nn.Module, batches: Batches, *, names: Sequence[str] | None = None,
                       flatten: Sequence[str] | None = None, mask: Mapping[str, torch.Tensor] | None = None,
                       kept_only: bool = False, device: str | torch.device = "cpu") -> tuple[np.ndarray, list[str]]:
    """:func:`per_sample_gradients` then :func:`gradient_features` (see both for the parameters).

    Returns
    -------
    features : numpy.ndarray of shape (n_samples, n_features)
    feature_names : list of str
    """
    grads = per_sample_gradients(model, batches, names=names, device=device)
    return gradient_features(grads, flatten=flatten, mask=mask, kept_only=kept_only)

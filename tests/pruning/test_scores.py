"""Scores: magnitude, random, SNIP (hand-derived gradients), GraSP (torch.func Hessian), SynFlow
(closed form of a two-layer net), and the layer-collapse contrast on BrainAgeCNN."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.pruning.masks import emptied_layers, global_magnitude_mask, global_mask, prunable_names
from fedsparse_lib.pruning.scores import (
    grasp_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    synflow_mask,
    synflow_scores,
)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.flatten() - target) ** 2).mean()


def _two_layer(seed: int, activation: nn.Module, *, d_in: int = 3, hidden: int = 4, d_out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, hidden), activation, nn.Linear(hidden, d_out)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Magnitude and random
# --------------------------------------------------------------------------------------------
def test_magnitude_scores_are_detached_copies() -> None:
    net = _two_layer(0, nn.ReLU())
    scores = magnitude_scores(net)
    assert list(scores) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(scores["0.weight"], net[0].weight.detach().abs())
    scores["0.weight"].zero_()
    assert net[0].weight.abs().sum() > 0
    assert list(magnitude_scores(net.state_dict(), names=["2.bias"])) == ["2.bias"]


def test_random_scores_are_reproducible() -> None:
    net = _two_layer(0, nn.ReLU())

    a = random_scores(net, generator=torch.Generator().manual_seed(7))
    b = random_scores(net, generator=torch.Generator().manual_seed(7))
    c = random_scores(net, generator=torch.Generator().manual_seed(8))

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert all(s.shape == p.shape and bool(((s >= 0) & (s < 1)).all()) for s, p in zip(a.values(), net.parameters()))
    with pytest.raises(ValueError, match="torch.Generator"):
        random_scores(net, generator=7)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# SNIP against hand-derived gradients
# --------------------------------------------------------------------------------------------
def test_snip_scores_match_hand_derived_gradients(batch) -> None:
    # Prepare: f(x) = w2 . relu(W1 x + b1) + b2, L = mean((f - y)^2); gradients by hand in numpy.
    net = _two_layer(0, nn.ReLU())
    x, y = (t.numpy() for t in batch)
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    pre = x @ w1.T + b1                       # (n, 4)
    h = np.maximum(pre, 0.0)
    e = (h @ w2.T + b2).ravel() - y           # (n,)
    d_f = 2.0 * e / len(y)                    # dL/df
    d_pre = d_f[:, None] * w2 * (pre > 0)     # dL/d(pre-activation), (n, 4)
    grads = {"0.weight": d_pre.T @ x, "0.bias": d_pre.sum(0), "2.weight": d_f[None, :] @ h,
             "2.bias": np.array([d_f.sum()])}
    weights = {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}

    # Execute
    scores = snip_scores(net, *batch, _mse)

    # Assert
    for name in grads:
        np.testing.assert_allclose(scores[name].numpy(), np.abs(grads[name] * weights[name]), rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in net.parameters())  # .grad untouched


def test_snip_scores_work_under_no_grad_and_with_names(batch) -> None:
    net = _two_layer(0, nn.ReLU())
    with torch.no_grad():
        scores = snip_scores(net, *batch, _mse, names=["2.weight"])
    assert list(scores) == ["2.weight"] and scores["2.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="scalar"):
        snip_scores(net, *batch, lambda out, t: out.flatten() - t)
    with pytest.raises(ValueError, match="not parameters"):
        snip_scores(net, *batch, _mse, names=["3.weight"])


# --------------------------------------------------------------------------------------------
# GraSP against an independent Hessian (torch.func.hessian of the flattened loss)
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("activation", [nn.Tanh(), nn.ReLU()])
def test_grasp_scores_match_full_hessian(batch, activation: nn.Module) -> None:
    # Prepare
    net = _two_layer(2, activation)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return _mse(functional_call(net, params, (batch[0],)), batch[1])

    g = torch.func.grad(loss_of)(theta)
    expected = theta * (hessian(loss_of)(theta) @ g)   # w * (H g), larger = keep

    # Execute
    scores = grasp_scores(net, *batch, _mse)

    # Assert
    got = torch.cat([scores[n].flatten() for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got < 0).any() and (got > 0).any()  # signed scores
    assert all(p.grad is None for p in net.parameters())


def test_grasp_sign_convention_keeps_largest_w_hg(batch) -> None:
    # The paper removes the highest -w*Hg, i.e. keeps the highest w*Hg: global_mask keeps the largest.
    net = _two_layer(2, nn.Tanh())
    scores = grasp_scores(net, *batch, _mse)
    flat = torch.cat([s.flatten() for s in scores.values()])

    mask = global_mask(scores, 0.5)

    kept = torch.cat([m.flatten() for m in mask.values()])
    assert flat[kept].min() >= flat[~kept].max()


def test_grasp_on_brain_age_cnn_smoke() -> None:
    # double backward through conv, instance norm, max-pool and ReLU
    torch.manual_seed(0)
    model = BrainAgeCNN((8, 8, 8), width=0.125, mean_age=0.0)
    x, y = torch.randn(2, 1, 8, 8, 8), torch.tensor([1.0, -1.0])

    scores = grasp_scores(model, x, y, _mse)

    assert list(scores) == prunable_names(model)
    assert all(s.shape == p.shape and bool(torch.isfinite(s).all()) for s, p in zip(scores.values(), model.parameters()))
    assert scores["net.conv3.weight"].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SynFlow
# --------------------------------------------------------------------------------------------
def test_synflow_closed_form_two_layer_net() -> None:
    # R = sum_k [ sum_j |W2_kj| (sum_i |W1_ji| + |b1_j|) + |b2_k| ] for an all-ones input, so
    # score(W1_ji) = |W1_ji| sum_k |W2_kj|, score(b1_j) = |b1_j| sum_k |W2_kj|,
    # score(W2_kj) = |W2_kj| (sum_i |W1_ji| + |b1_j|), score(b2_k) = |b2_k|.
    net = _two_layer(3, nn.ReLU(), d_in=3, hidden=4, d_out=2).float()
    w1, b1 = net[0].weight.detach().double().abs(), net[0].bias.detach().double().abs()
    w2, b2 = net[2].weight.detach().double().abs(), net[2].bias.detach().double().abs()
    before = copy.deepcopy(net.state_dict())

    scores = synflow_scores(net, (3,))

    col = w2.sum(0)                              # sum_k |W2_kj|, (4,)
    torch.testing.assert_close(scores["0.weight"], w1 * col[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["0.bias"], b1 * col, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["2.weight"], w2 * (w1.sum(1) + b1)[None, :], rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["2.bias"], b2, rtol=1e-12, atol=0)
    assert all(s.dtype == torch.float64 for s in scores.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # model untouched


def test_synflow_bypasses_norm_layers() -> None:
    # Prepare: a 1-channel conv net with instance norm, and the same net without it.
    torch.manual_seed(0)
    with_norm = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2), nn.ReLU(), nn.Conv3d(2, 1, 1))
    without = nn.Sequential(copy.deepcopy(with_norm[0]), nn.Identity(), nn.ReLU(), copy.deepcopy(with_norm[3]))

    scores = synflow_scores(with_norm, (1, 4, 4, 4))
    reference = synflow_scores(without, (1, 4, 4, 4))

    assert all(torch.equal(scores[k], reference[k]) for k in reference)
    assert scores["0.weight"].sum() > 0  # instance norm would have zeroed the all-ones signal
    assert isinstance(with_norm[1], nn.InstanceNorm3d)


def test_synflow_refuses_norm_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    assert list(synflow_scores(net, (3,))) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(ValueError, match="normalisation"):
        synflow_scores(net, (3,), names=["1.weight"])


def test_synflow_scores_with_mask_zero_pruned() -> None:
    net = _two_layer(3, nn.ReLU()).float()
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    mask["2.weight"][0, 1] = False

    scores = synflow_scores(net, (3,), mask=mask)

    assert scores["2.weight"][0, 1] == 0
    assert scores["0.weight"][1].abs().sum() == 0  # hidden unit 1 no longer reaches the output


def test_synflow_mask_exact_count_and_validation() -> None:
    net = _two_layer(4, nn.ReLU(), hidden=16).float()
    n = sum(p.numel() for p in net.parameters())

    mask = synflow_mask(net, (3,), 0.7, iterations=5)

    assert sum(int(m.sum()) for m in mask.values()) == n - math.floor(0.7 * n)
    with pytest.raises(ValueError, match="iterations"):
        synflow_mask(net, (3,), 0.7, iterations=0)
    with pytest.raises(ValueError, match="sparsity"):
        synflow_mask(net, (3,), 1.0)
    with pytest.raises(ValueError, match="input_shape"):
        synflow_scores(net, (0,))


@pytest.mark.parametrize("seed", [0, 1])
def test_iterative_synflow_avoids_the_layer_collapse_of_magnitude_pruning(seed: int) -> None:
    # Spec section 8: at initialisation, global magnitude pruning to 95% empties conv5 (the largest
    # layer, with the smallest Glorot bound); iterative SynFlow keeps every weight tensor alive.
    torch.manual_seed(seed)
    model = BrainAgeCNN((16, 16, 16), width=0.25)

    magnitude = global_magnitude_mask(model, 0.95)
    synflow = synflow_mask(model, (1, 16, 16, 16), 0.95, iterations=10)

    assert "net.conv5.weight" in emptied_layers(magnitude)
    assert [k for k in emptied_layers(synflow) if k.endswith("weight")] == []
    assert sum(int(m.sum()) for m in synflow.values()) == sum(int(m.sum()) for m in magnitude.values())

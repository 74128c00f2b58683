"""Masks: prunable set, exact counts and ties, masks that only shrink, torch.nn.utils.prune check."""

from __future__ import annotations

import copy
import logging
import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.pruning.masks import (
    apply_mask,
    emptied_layers,
    global_magnitude_mask,
    global_mask,
    layerwise_magnitude_mask,
    layerwise_mask,
    mask_gradients,
    mask_sparsity,
    ones_mask,
    prunable_names,
    sparsity_summary,
)
from fedsparse_lib.pruning.schedules import CubicSchedule


def _random_net(seed: int) -> nn.Sequential:
    """A small conv + linear net with random (normal) weights and biases: no ties, almost surely."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 8, 3), nn.Linear(16, 8), nn.Linear(8, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, float(torch.rand(())) + 0.1)
    return net


def _kept(mask: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in mask.values())


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Prunable set
# --------------------------------------------------------------------------------------------
ALL_BRAIN_AGE = [f"net.{layer}.{kind}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "output")
                 for kind in ("weight", "bias")]


@pytest.fixture
def tiny_model() -> BrainAgeCNN:
    torch.manual_seed(0)
    return BrainAgeCNN((8, 8, 8), width=0.125)


def test_prunable_names_default_is_every_trainable_tensor(tiny_model: BrainAgeCNN) -> None:
    assert prunable_names(tiny_model) == ALL_BRAIN_AGE
    assert prunable_names(tiny_model.state_dict()) == ALL_BRAIN_AGE


@pytest.mark.parametrize(
    ("exclude", "removed"),
    [
        ("biases", [n for n in ALL_BRAIN_AGE if n.endswith("bias")]),
        (("first",), ["net.conv1.weight", "net.conv1.bias"]),
        (["last"], ["net.output.weight", "net.output.bias"]),
        (("first", "last", "net.conv3.weight"),
         ["net.conv1.weight", "net.conv1.bias", "net.output.weight", "net.output.bias", "net.conv3.weight"]),
        (("biases", "last"), [n for n in ALL_BRAIN_AGE if n.endswith("bias")] + ["net.output.weight"]),
    ],
)
def test_prunable_names_exclusions(tiny_model: BrainAgeCNN, exclude, removed: list[str]) -> None:
    names = prunable_names(tiny_model, exclude=exclude)
    assert names == [n for n in ALL_BRAIN_AGE if n not in removed]


def test_prunable_names_skips_frozen_parameters_and_running_stats() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    net[2].bias.requires_grad_(False)

    assert prunable_names(net) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    # a state dict has no requires_grad: every float tensor but the running statistics
    assert prunable_names(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize(
    ("exclude", "match"),
    [(("bias",), "neither one of"), (("net.conv9.weight",), "neither one of")],
)
def test_prunable_names_unknown_exclusion(tiny_model: BrainAgeCNN, exclude, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prunable_names(tiny_model, exclude=exclude)


def test_prunable_names_nothing_left() -> None:
    with pytest.raises(ValueError, match="leaves no tensor"):
        prunable_names(nn.Linear(2, 1), exclude=("first",))


def test_ones_mask(tiny_model: BrainAgeCNN) -> None:
    mask = ones_mask(tiny_model)
    assert list(mask) == ALL_BRAIN_AGE
    assert all(m.dtype == torch.bool and bool(m.all()) for m in mask.values())
    assert mask["net.conv2.weight"].shape == tiny_model.net.conv2.weight.shape
    assert list(ones_mask(tiny_model.state_dict(), ["net.conv1.weight"])) == ["net.conv1.weight"]
    with pytest.raises(ValueError, match="not found"):
        ones_mask(tiny_model, ["nope"])


# --------------------------------------------------------------------------------------------
# Global mask: exact counts, ties, hand-worked cases
# --------------------------------------------------------------------------------------------
def test_global_mask_by_hand() -> None:
    # N = 5, s = 0.4: prune floor(2.0) = 2, keep the 3 largest scores: 5, 3, 2.
    scores = {"a": _t(3, 1, 2), "b": _t(0.5, 5).reshape(1, 2)}

    mask = global_mask(scores, 0.4)

    assert mask["a"].tolist() == [True, False, True]
    assert mask["b"].tolist() == [[False, True]]


def test_global_mask_ties_keep_earlier_tensor_then_index() -> None:
    # All equal: N = 3, s = 0.34 -> prune floor(1.02) = 1; ties kept in (tensor, flat index) order.
    mask = global_mask({"a": _t(1, 1), "b": _t(1)}, 0.34)
    assert mask["a"].tolist() == [True, True]
    assert mask["b"].tolist() == [False]
    # -0.0 ties with 0.0
    mask = global_mask({"a": _t(-0.0, 0.0, 0.0, 7)}, 0.5)
    assert mask["a"].tolist() == [True, False, False, True]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.5, 0.9, 0.95, 0.999])
def test_global_mask_exact_count_with_all_equal_weights(sparsity: float) -> None:
    # Prepare: a model whose every weight is 1: everything ties.
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    n = sum(p.numel() for p in net.parameters())  # 143

    # Execute
    mask = global_magnitude_mask(net, sparsity)

    # Assert: exactly N - floor(s N) kept (0.29 * 143 = 41.47 -> 41), the first ones in order
    expected_kept = n - math.floor(sparsity * n + 1e-9)
    assert _kept(mask) == expected_kept
    flat = torch.cat([m.flatten() for m in mask.values()])
    assert flat[:expected_kept].all() and not flat[expected_kept:].any()


def test_float_rounding_of_the_count() -> None:
    # 0.29 * 100 = 28.999999999999996 in binary floating point: 29 coordinates are pruned.
    mask = global_mask({"w": torch.arange(100.0)}, 0.29)
    assert _kept(mask) == 71
    assert not mask["w"][:29].any() and mask["w"][29:].all()


def test_zero_weights_are_not_pruned_at_zero_sparsity() -> None:
    # A weight at exactly 0.0 is not pruned by accident (masks are never derived from w != 0).
    state = {"w": _t(0.0, 1.0, 0.0, -2.0)}
    assert global_magnitude_mask(state, 0.0)["w"].all()
    assert layerwise_magnitude_mask(state, 0.0)["w"].all()


# --------------------------------------------------------------------------------------------
# Independent implementation: torch.nn.utils.prune.global_unstructured with L1Unstructured
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8, 0.95, 0.99])
def test_global_magnitude_mask_matches_torch_prune(seed: int, sparsity: float) -> None:
    # Prepare
    net = _random_net(seed)
    names = prunable_names(net)
    flat = torch.cat([p.detach().abs().flatten() for p in net.parameters()])
    assert flat.unique().numel() == flat.numel()  # no ties: both implementations must agree
    n_pruned = math.floor(sparsity * flat.numel())
    reference = copy.deepcopy(net)
    targets = [(m, kind) for m in reference for kind in ("weight", "bias")]

    # Execute
    mask = global_magnitude_mask(net.state_dict(), sparsity)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=n_pruned)

    # Assert
    assert list(mask) == names
    for (module, kind), name in zip(targets, names):
        assert torch.equal(mask[name], getattr(module, f"{kind}_mask").bool()), name


@pytest.mark.parametrize("seed", [3, 4])
def test_progressive_global_mask_matches_iterative_torch_prune(seed: int) -> None:
    # torch's iterative pruning removes `amount` more among the still-unpruned coordinates; ours
    # is told the cumulative sparsity and drops the already-pruned coordinates first.
    net = _random_net(seed)
    reference = copy.deepcopy(net)
    targets = [(m, kind) for m in reference for kind in ("weight", "bias")]
    n = sum(p.numel() for p in net.parameters())
    mask, already = None, 0
    for sparsity in (0.3, 0.6, 0.9):
        mask = global_magnitude_mask(net, sparsity, previous=mask)
        apply_mask(net, mask)
        k = math.floor(sparsity * n)
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=k - already)
        already = k
        for (module, kind), name in zip(targets, mask):
            assert torch.equal(mask[name], getattr(module, f"{kind}_mask").bool()), (sparsity, name)


# --------------------------------------------------------------------------------------------
# Previous mask: masks only shrink
# --------------------------------------------------------------------------------------------
def test_masks_never_regrow_over_increasing_sparsities() -> None:
    # Prepare: simulate training between prunes: weights move, pruned ones stay 0.
    net = _random_net(5)
    n = sum(p.numel() for p in net.parameters())
    schedule = CubicSchedule(0.95, 12)
    gen = torch.Generator().manual_seed(0)
    mask = ones_mask(net)

    for step in range(1, 13):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        apply_mask(net, mask)
        if not schedule.is_update_step(step):
            continue
        sparsity = schedule.sparsity_at(step)

        # Execute
        new = global_magnitude_mask(net, sparsity, previous=mask)

        # Assert: subset of the previous mask, exact count
        assert all(bool((new[k] & ~mask[k]).sum() == 0) for k in mask), step
        assert _kept(new) == n - math.floor(sparsity * n + 1e-9)
        mask = new
    assert mask_sparsity(mask) == pytest.approx(0.95, abs=1 / n)


def test_previously_pruned_rank_below_live_zeros() -> None:
    # A live weight at exactly 0.0 survives while a previously pruned coordinate (even with a stale
    # large value) is dropped first.
    state = {"w": _t(0.0, 5.0, 1.0, 2.0)}
    previous = {"w": torch.tensor([True, False, True, True])}

    mask = global_magnitude_mask(state, 0.25, previous=previous)

    assert mask["w"].tolist() == [True, False, True, True]


def test_previous_with_signed_scores() -> None:
    # GraSP-like signed scores: the pruned coordinate goes first, then the lowest live score (-3).
    scores = {"w": _t(-3, -1, 2, 0.5)}
    previous = {"w": torch.tensor([True, True, False, True])}

    mask = global_mask(scores, 0.5, previous=previous)

    assert mask["w"].tolist() == [False, True, False, True]


def test_lower_sparsity_than_previous_keeps_previous(caplog: pytest.LogCaptureFixture) -> None:
    scores = {"w": torch.arange(10.0)}
    previous = global_mask(scores, 0.8)

    with caplog.at_level(logging.INFO, logger="fedsparse_lib.pruning.masks"):
        mask = global_mask(scores, 0.5, previous=previous)

    assert torch.equal(mask["w"], previous["w"])
    assert "never regrow" in caplog.text


@pytest.mark.parametrize(
    ("previous", "match"),
    [
        ({"w": torch.ones(3, dtype=torch.bool)}, "shape"),
        ({"w": torch.ones(4)}, "torch.bool"),
        ({}, "lacks names"),
        ({"w": torch.ones(4, dtype=torch.bool), "v": torch.ones(1, dtype=torch.bool)}, "not in the weights"),
    ],
)
def test_previous_validation(previous: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        global_mask({"w": torch.rand(4)}, 0.5, previous=previous)


@pytest.mark.parametrize(
    ("scores", "sparsity", "match"),
    [
        ({"w": torch.rand(4)}, 1.0, r"sparsity must be a fraction of zeroed weights in \[0, 1\), got 1.0"),
        ({"w": torch.rand(4)}, -0.1, "sparsity"),
        ({"w": torch.rand(4)}, True, "sparsity"),
        ({"w": _t(1, float("nan"))}, 0.5, "NaN"),
        ({}, 0.5, "non-empty"),
        ({"w": [1.0, 2.0]}, 0.5, "real tensor"),
    ],
)
def test_global_mask_validation(scores: dict, sparsity, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        global_mask(scores, sparsity)


# --------------------------------------------------------------------------------------------
# Layer-wise and minimum density
# --------------------------------------------------------------------------------------------
def test_layerwise_mask_per_tensor_counts() -> None:
    scores = {"a": _t(4, 3, 2, 1), "b": _t(1, 1, 1), "c": _t(9)}

    mask = layerwise_mask(scores, 0.5)

    # a: prune floor(2.0) = 2; b: prune floor(1.5) = 1, ties keep the first; c: floor(0.5) = 0
    assert mask["a"].tolist() == [True, True, False, False]
    assert mask["b"].tolist() == [True, True, False]
    assert mask["c"].tolist() == [True]


def test_layerwise_mask_per_tensor_sparsity_and_previous() -> None:
    scores = {"a": _t(4, 3, 2, 1), "b": _t(1, 2, 3)}
    previous = {"a": torch.tensor([False, True, True, True]), "b": torch.ones(3, dtype=torch.bool)}

    mask = layerwise_mask(scores, {"a": 0.5, "b": 0.0}, previous=previous)

    assert mask["a"].tolist() == [False, True, True, False]
    assert mask["b"].tolist() == [True, True, True]
    with pytest.raises(ValueError, match="lacks tensors"):
        layerwise_mask(scores, {"a": 0.5})


def test_layerwise_magnitude_mask_on_model(tiny_model: BrainAgeCNN) -> None:
    mask = layerwise_magnitude_mask(tiny_model, 0.9)
    table = sparsity_summary(mask).set_index("name")
    for name, p in tiny_model.named_parameters():
        assert table.loc[name, "kept"] == p.numel() - math.floor(0.9 * p.numel())


def test_min_density_by_hand() -> None:
    scores = {"a": _t(10, 9, 8, 7), "b": _t(1, 2)}
    # without a floor: keep the 3 largest (10, 9, 8), b empty
    assert global_mask(scores, 0.5)["b"].tolist() == [False, False]

    mask = global_mask(scores, 0.5, min_density=0.5)

    # b reserves 1 (its best, 2), a reserves 2 (10, 9): the budget of 3 is used by the reserves
    assert mask["a"].tolist() == [True, True, False, False]
    assert mask["b"].tolist() == [False, True]


def test_min_density_prevents_layer_collapse_at_initialisation() -> None:
    # Spec section 8: global magnitude pruning of a fresh BrainAgeCNN at 95% empties conv5.
    torch.manual_seed(0)
    model = BrainAgeCNN((16, 16, 16), width=0.25)
    n = sum(p.numel() for p in model.parameters())

    collapsed = global_magnitude_mask(model, 0.95)
    floored = global_magnitude_mask(model, 0.95, min_density=0.01)

    assert "net.conv5.weight" in emptied_layers(collapsed)
    assert not [k for k in emptied_layers(floored) if k.endswith("weight")]
    assert _kept(floored) == _kept(collapsed) == n - math.floor(0.95 * n)
    assert global_magnitude_mask(model, 0.95, min_density=0.01, previous=collapsed)["net.conv5.weight"].sum() == 0


def test_min_density_validation() -> None:
    with pytest.raises(ValueError, match="min_density"):
        global_mask({"w": torch.rand(3)}, 0.5, min_density=1.5)


# --------------------------------------------------------------------------------------------
# Applying masks, gradients, summaries
# --------------------------------------------------------------------------------------------
def test_apply_mask_in_place_on_model_and_state() -> None:
    net = nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, float("inf"), 3.0]]))
    mask = {"weight": torch.tensor([[True, False, False]])}

    apply_mask(net, mask)
    state = {"weight": torch.tensor([[1.0, float("nan"), 3.0]]), "bias": torch.tensor([2.0])}
    apply_mask(state, mask)

    assert net.weight.tolist() == [[1.0, 0.0, 0.0]]
    assert state["weight"].tolist() == [[1.0, 0.0, 0.0]]
    assert state["bias"].tolist() == [2.0]
    with pytest.raises(ValueError, match="shape"):
        apply_mask(net, {"weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in the weights"):
        apply_mask(net, {"nope": torch.ones(3, dtype=torch.bool)})


def test_mask_gradients() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    net(torch.ones(4, 3)).sum().backward()
    mask = {"0.weight": torch.tensor([[True, False, True], [False, False, True]]),
            "1.bias": torch.tensor([False])}
    before = net[0].weight.grad.clone()

    mask_gradients(net, mask)

    assert torch.equal(net[0].weight.grad, before * mask["0.weight"])
    assert net[1].bias.grad.tolist() == [0.0]
    assert net[1].weight.grad.abs().sum() > 0  # not in the mask: untouched
    with pytest.raises(ValueError, match="not in the weights"):
        mask_gradients(net, {"weight": torch.ones(1, dtype=torch.bool)})


def test_masks_own_their_storage_and_round_trip_through_safetensors(tiny_model: BrainAgeCNN) -> None:
    # A view into one flat vector would keep (and torch.save would write) all N coordinates.
    from safetensors.torch import load, save

    mask = global_magnitude_mask(tiny_model, 0.5)

    assert all(m.untyped_storage().nbytes() == m.numel() for m in mask.values())
    restored = load(save(mask))
    assert all(torch.equal(restored[k], mask[k]) for k in mask)


def test_sparsity_summary_and_emptied_layers() -> None:
    mask = {"a.weight": torch.tensor([[True, False], [False, False]]), "a.bias": torch.tensor([False, False])}

    table = sparsity_summary(mask)
    expected = pd.DataFrame({"name": ["a.weight", "a.bias", "overall"], "numel": [4, 2, 6],
                             "kept": [1, 0, 1], "sparsity": [0.75, 1.0, 5 / 6]})

    pd.testing.assert_frame_equal(table, expected)
    assert emptied_layers(mask) == ["a.bias"]
    assert mask_sparsity(mask) == pytest.approx(5 / 6)

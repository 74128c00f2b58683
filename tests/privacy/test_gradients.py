"""Per-sample gradients: vmap against a loop, against the batch gradient and the analytic output layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.privacy.gradients import (
    gradient_features,
    last_layer_names,
    per_sample_gradients,
    white_box_features,
)

SHAPE = (12, 12, 12)
LAST = ["net.conv6.weight", "net.conv6.bias", "net.output.weight", "net.output.bias"]


@pytest.fixture(scope="module")
def model() -> BrainAgeCNN:
    torch.manual_seed(0)
    return BrainAgeCNN(SHAPE, width=0.125, mean_age=60.0, output_scale=10.0)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 1, *SHAPE, generator=g), 60 + 10 * torch.randn(7, generator=g)


def as_batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def assert_close_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # conv biases before an instance norm have exactly-zero gradients in exact arithmetic (~1e-7 in
    # float32), so the tolerance is relative to the largest gradient of the model, not per entry
    scale = max(float(t.abs().max()) for t in b.values())
    assert a.keys() == b.keys()
    for name, got in a.items():
        torch.testing.assert_close(got, b[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_last_layer_names(model):
    assert last_layer_names(model) == LAST
    assert last_layer_names(model, n_layers=1) == LAST[2:]
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1, got 0"):
        last_layer_names(model, n_layers=0)


@pytest.mark.parametrize("names", [None, "all"], ids=["last-layers", "all-layers"])
def test_vmap_matches_python_loop(model, data, names):
    # Prepare: uneven batches check that the samples stay in order
    chosen = [n for n, _ in model.named_parameters()] if names == "all" else None
    # Execute
    fast = per_sample_gradients(model, as_batches(*data, 3), names=chosen)
    slow = per_sample_gradients(model, as_batches(*data, 7), names=chosen, method="loop")
    # Assert
    assert list(fast) == (LAST if names is None else [n for n, _ in model.named_parameters()])
    assert fast["net.output.weight"].shape == (7, *model.net.output.weight.shape)
    assert_close_grads(fast, slow)


def test_sum_of_per_sample_gradients_is_the_batch_gradient(model, data):
    # Prepare: the independent reference is one backward pass of the summed squared error
    x, y = data
    model.zero_grad()
    ((model(x) - y) ** 2).sum().backward()
    params = dict(model.named_parameters())
    expected = {n: params[n].grad.clone() for n in LAST}
    model.zero_grad()
    # Execute
    grads = per_sample_gradients(model, as_batches(x, y, 4))
    # Assert
    assert_close_grads({n: g.sum(0) for n, g in grads.items()}, expected)


def test_output_layer_gradient_is_analytic(model, data):
    # d/db (scale * (w.h + b) - y)^2 = 2 * scale * (prediction - y) for the output bias
    x, y = data
    with torch.no_grad():
        residual = model.eval()(x) - y
    grads = per_sample_gradients(model, [(x, y)])
    torch.testing.assert_close(grads["net.output.bias"].flatten(), 2 * 10.0 * residual, rtol=1e-5, atol=1e-4)


def test_model_mode_is_restored(model, data):
    model.train()
    per_sample_gradients(model, [data])
    assert model.training
    model.eval()
    per_sample_gradients(model, [data])
    assert not model.training


@pytest.mark.parametrize("kwargs, error, message", [
    ({"names": ["net.nope.weight"]}, KeyError, "net.nope.weight"),
    ({"names": []}, ValueError, "names is empty"),
    ({"method": "jacobian"}, ValueError, "method must be 'vmap' or 'loop', got 'jacobian'"),
])
def test_bad_options_are_rejected(model, data, kwargs, error, message):
    with pytest.raises(error, match=message):
        per_sample_gradients(model, [data], **kwargs)


def test_gradient_features_full_tensors():
    # Prepare: 2 samples, a 2x2 "weight" and a 1-entry "bias"
    grads = {"w": torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]),
             "b": torch.tensor([[2.0], [-1.0]])}
    # Execute
    features, names = gradient_features(grads)
    # Assert: norms first, then the flattened entries of both tensors (the default: the last two)
    assert names == ["grad_norm:w", "grad_norm:b", "grad:w[0]", "grad:w[1]", "grad:w[2]", "grad:w[3]", "grad:b[0]"]
    np.testing.assert_allclose(features, [[5, 2, 3, 4, 0, 0, 2], [1, 1, 1, 0, 0, 0, -1]])


def test_gradient_features_kept_coordinates_only():
    # Prepare: the mask keeps w[0, 1] and w[1, 0] only; b is not in the mask (dense)
    grads = {"w": torch.tensor([[[3.0, 4.0], [12.0, 0.0]]]), "b": torch.tensor([[2.0]])}
    mask = {"w": torch.tensor([[False, True], [True, False]])}
    # Execute
    full, _ = gradient_features(grads, flatten=["w"], mask=mask)
    kept, names = gradient_features(grads, flatten=["w"], mask=mask, kept_only=True)
    # Assert
    np.testing.assert_allclose(full, [[13, 2, 3, 4, 12, 0]])
    assert names == ["grad_norm:w", "grad_norm:b", "grad:w[1]", "grad:w[2]"]
    np.testing.assert_allclose(kept, [[np.hypot(4, 12), 2, 4, 12]])


def test_gradient_features_validation():
    grads = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="kept_only=True needs the model's mask"):
        gradient_features(grads, kept_only=True)
    with pytest.raises(KeyError, match="flatten names"):
        gradient_features(grads, flatten=["v"])
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        gradient_features({"w": torch.zeros(2, 3), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="mask w has 2 entries, the gradient has 3"):
        gradient_features(grads, mask={"w": torch.ones(2, dtype=torch.bool)}, kept_only=True)


def test_white_box_features_shape(model, data):
    features, names = white_box_features(model, [data])
    width = model.net.output.weight.numel()
    assert features.shape == (7, 4 + width + 1) and len(names) == features.shape[1]
    assert np.isfinite(features).all()

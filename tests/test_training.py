"""Masked training keeps pruned weights at 0; metrics against scikit-learn/scipy; checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import mean_absolute_error, mean_squared_error
from torch import nn

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.training import (
    TrainConfig,
    apply_mask_,
    evaluate,
    load_checkpoint,
    make_optimizer,
    regression_metrics,
    save_checkpoint,
    train_epoch,
)

SHAPE = (8, 8, 8)


def tiny_model(seed: int = 0) -> BrainAgeCNN:
    torch.manual_seed(seed)
    return BrainAgeCNN(SHAPE, width=1 / 16, mean_age=60.0)


def batches(n: int = 8, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *SHAPE, generator=g)
    y = 60 + 10 * torch.randn(n, generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def random_mask(model: nn.Module, keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < keep for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", [
    TrainConfig(lr=1e-3),
    TrainConfig(lr=1e-3, momentum=0.9),
    TrainConfig(lr=1e-3, momentum=0.9, weight_decay=1e-2),
    TrainConfig(lr=1e-3, optimizer="adam", weight_decay=1e-2),
], ids=["sgd", "momentum", "momentum+wd", "adam+wd"])
@pytest.mark.parametrize("mask_gradients", [True, False])
def test_pruned_weights_stay_exactly_zero(config, mask_gradients):
    # Prepare
    model = tiny_model()
    mask = random_mask(model, keep=0.3)
    opt = make_optimizer(model, config)
    # Execute: two epochs so that optimizer state from epoch 1 acts in epoch 2
    for _ in range(2):
        train_epoch(model, batches(), opt, mask=mask, mask_gradients=mask_gradients)
    # Assert
    params = dict(model.named_parameters())
    for name, m in mask.items():
        assert torch.count_nonzero(params[name][~m]) == 0, name
        if name.endswith("weight"):  # biases before an instance norm get no gradient and stay 0
            assert torch.count_nonzero(params[name][m]) > 0.9 * int(m.sum()), name  # kept ones are alive


def test_gradients_of_pruned_weights_are_zero_before_the_step_when_masking_gradients():
    model = tiny_model()
    mask = random_mask(model, keep=0.5)
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):  # noqa: D401 - records the gradients the optimizer sees
            for name, p in model.named_parameters():
                seen[name] = p.grad.clone()
            return super().step(closure)

    train_epoch(model, batches(n=4), Spy(model.parameters(), lr=1e-3, momentum=0.9), mask=mask)
    for name, m in mask.items():
        assert torch.count_nonzero(seen[name][~m]) == 0


def test_training_without_mask_changes_every_layer_and_lowers_the_loss():
    model = tiny_model()
    data = batches(n=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=1e-3, optimizer="adam"))
    losses = [train_epoch(model, data, opt) for _ in range(15)]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n


def test_apply_mask_zeroes_exactly_the_pruned_coordinates():
    model = tiny_model()
    mask = random_mask(model, keep=0.5, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_mask_(model, mask)
    for n, p in model.named_parameters():
        expected = torch.where(mask[n], before[n], torch.zeros_like(before[n]))
        assert torch.equal(p, expected)


def test_bad_masks_are_refused_with_the_name():
    model = tiny_model()
    with pytest.raises(KeyError, match="not parameters"):
        apply_mask_(model, {"net.nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="net.conv1.weight"):
        apply_mask_(model, {"net.conv1.weight": torch.ones(3, dtype=torch.bool)})


def test_divergence_is_reported():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(lr=1e30))
    with pytest.raises(FloatingPointError, match="diverged"):
        for _ in range(5):
            train_epoch(model, batches(), opt)


@pytest.mark.parametrize("kwargs", [{"lr": 0}, {"lr": float("nan")}, {"optimizer": "rmsprop"},
                                    {"momentum": 1.0}, {"weight_decay": -1}])
def test_bad_train_config_is_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


def test_regression_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    age = rng.uniform(45, 80, 50)
    pred = age + rng.normal(0, 4, 50) + 1.0
    m = regression_metrics(pred, age)
    assert m["mae"] == pytest.approx(mean_absolute_error(age, pred))
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(age, pred)))
    assert m["r"] == pytest.approx(stats.pearsonr(pred, age)[0])
    assert m["mean_gap"] == pytest.approx(np.mean(pred - age))


def test_evaluate_returns_a_per_subject_table():
    model = tiny_model()
    data = batches(n=8)
    metrics, frame = evaluate(model, data, participant_ids=[f"sub-{i}" for i in range(8)])
    assert list(frame.columns) == ["participant_id", "age", "predicted", "gap"]
    assert len(frame) == 8
    np.testing.assert_allclose(frame["gap"], frame["predicted"] - frame["age"])
    assert metrics["mae"] == pytest.approx(frame["gap"].abs().mean())


def test_checkpoint_round_trip_keeps_weights_mask_and_meta(tmp_path):
    model = tiny_model(seed=1)
    mask = random_mask(model, keep=0.4)
    apply_mask_(model, mask)
    save_checkpoint(tmp_path / "ck.safetensors", model, mask=mask, meta={"epoch": 3, "sparsity": 0.6})
    other = tiny_model(seed=2)
    loaded_mask, meta = load_checkpoint(tmp_path / "ck.safetensors", other)
    for (n, p), q in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(p, q), n
    assert set(loaded_mask) == set(mask) and all(torch.equal(loaded_mask[n], mask[n]) for n in mask)
    assert meta["epoch"] == 3 and meta["sparsity"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]  # no temp files


def test_checkpoint_of_another_model_or_a_corrupt_file_is_refused(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", tiny_model())
    with pytest.raises(ValueError, match="a.safetensors.*does not match"):
        load_checkpoint(tmp_path / "a.safetensors", BrainAgeCNN(SHAPE, width=1 / 8))
    (tmp_path / "b.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="b.safetensors"):
        load_checkpoint(tmp_path / "b.safetensors", tiny_model())

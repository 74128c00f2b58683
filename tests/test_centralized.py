"""Centralised progressive pruning: scheduled sparsity reached exactly, zeros kept, tidy history."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedsparse_lib.centralized import SCORES, train_progressive
from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.pruning import CubicSchedule, OneShotSchedule
from fedsparse_lib.training import TrainConfig

SHAPE = (8, 8, 8)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 1, *SHAPE, generator=g)
    y = 60 + 10 * torch.randn(24, generator=g)
    train = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return train, DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8)


def model(seed: int = 0) -> BrainAgeCNN:
    torch.manual_seed(seed)
    return BrainAgeCNN(SHAPE, width=1 / 16, mean_age=60.0)


def test_cubic_schedule_reaches_each_scheduled_sparsity_exactly_and_keeps_zeros():
    # Prepare
    train, test = loaders()
    schedule = CubicSchedule(final_sparsity=0.9, total_steps=4)
    net = model()
    n = sum(p.numel() for p in net.parameters())
    # Execute
    result = train_progressive(net, train, test, epochs=4, schedule=schedule, config=TrainConfig(lr=1e-3),
                               progress=False)
    # Assert: sparsity after each epoch is floor(s_t * N) / N (exact counts), monotone, final = 0.9
    per_epoch = result.history.query("split == 'test' and metric == 'mae'").set_index("epoch")["sparsity"]
    for epoch in range(1, 5):
        expected = int(schedule.sparsity_at(epoch) * n + 1e-9) / n
        assert per_epoch[epoch] == pytest.approx(expected, abs=1e-12)
    assert per_epoch.is_monotonic_increasing
    params = dict(result.model.named_parameters())
    assert sum(int((~m).sum()) for m in result.mask.values()) == int(0.9 * n)
    for name, m in result.mask.items():
        assert torch.count_nonzero(params[name][~m]) == 0
    # tidy tables
    assert set(result.history.columns) == {"epoch", "split", "metric", "value", "sparsity"}
    assert set(result.history["metric"]) == {"loss", "mae", "rmse", "r", "mean_gap"}
    assert set(result.layer_sparsity["epoch"]) == {0, 1, 2, 3, 4}
    assert len(result.predictions) == 8


@pytest.mark.parametrize("score", ["snip", "grasp", "synflow", "random"])
def test_one_shot_at_initialisation_prunes_before_training(score):
    train, test = loaders()
    result = train_progressive(model(), train, test, epochs=1, schedule=OneShotSchedule(final_sparsity=0.5, step=0),
                               score=score, config=TrainConfig(lr=1e-3), progress=False)
    at_init = result.history.query("epoch == 0")["sparsity"].iloc[0]
    assert at_init == pytest.approx(0.5, abs=1e-3)


def test_same_seed_same_result_bit_for_bit():
    outs = []
    for _ in range(2):
        train, test = loaders()
        res = train_progressive(model(), train, test, epochs=2, schedule=CubicSchedule(0.5, 2),
                                config=TrainConfig(lr=1e-3, momentum=0.9), progress=False)
        outs.append(res.model.state_dict())
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_checkpoints_are_written_every_epoch(tmp_path):
    train, test = loaders()
    train_progressive(model(), train, test, epochs=2, schedule=CubicSchedule(0.5, 2), progress=False,
                      checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.json", "epoch-001.safetensors",
                                                          "epoch-002.json", "epoch-002.safetensors"]


@pytest.mark.parametrize(("kwargs", "match"), [({"epochs": 0}, "epochs"), ({"score": "taylor"}, "score")])
def test_bad_parameters_are_refused(kwargs, match):
    train, test = loaders()
    options = {"epochs": 1, "schedule": CubicSchedule(0.5, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        train_progressive(model(), train, test, progress=False, **options)


def test_scores_list_is_documented():
    assert SCORES == ("magnitude", "random", "snip", "grasp", "synflow")

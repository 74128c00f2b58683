"""Training recipes over the package's own training code: what they train on, sparsity, uploads, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.privacy.recipes import TrainedModel, centralized_recipe, federated_recipe
from fedsparse_lib.training import TrainConfig
from recording import SHAPE, RecordingDataset  # tests/privacy/recording.py



def tiny_cnn() -> BrainAgeCNN:
    return BrainAgeCNN(SHAPE, width=0.125, mean_age=50.0, output_scale=10.0)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_centralized_recipe_trains_on_its_subjects_only_to_the_target_sparsity_reproducibly():
    # Prepare
    data = RecordingDataset(24)
    train_index = np.array([1, 4, 6, 10, 13, 15, 19, 22])
    recipe = centralized_recipe(data, tiny_cnn, epochs=3, sparsity=0.9, config=TrainConfig(lr=1e-3, optimizer="adam"),
                                batch_size=4)
    # Execute
    first = recipe(train_index, 5)
    read = set(data.read)
    second, other = recipe(train_index, 5), recipe(train_index, 6)
    # Assert
    assert read == set(train_index.tolist())
    assert isinstance(first, TrainedModel) and not first.model.training
    np.testing.assert_array_equal(first.train_index, train_index)
    assert first.sparsity == pytest.approx(0.9, abs=2e-3)
    for name, keep in first.mask.items():
        assert torch.all(first.model.state_dict()[name][~keep] == 0), name
    for k, v in state(first.model).items():
        torch.testing.assert_close(v, state(second.model)[k], rtol=0, atol=0)
    assert any(not torch.equal(v, state(other.model)[k]) for k, v in state(first.model).items())
    assert first.uploads == {} and first.client_index is None


def test_centralized_recipe_dense_keeps_every_weight():
    data = RecordingDataset(8)
    trained = centralized_recipe(data, tiny_cnn, epochs=1, batch_size=4)(np.arange(4), 0)
    assert trained.sparsity == 0.0 and all(bool(m.all()) for m in trained.mask.values())


def test_federated_recipe_keeps_the_watched_clients_uploads_and_trains_on_its_subjects_only():
    # Prepare
    data = RecordingDataset(30)
    train_index = np.arange(0, 30, 2)  # 15 subjects, 3 clients
    recipe = federated_recipe(data, tiny_cnn, num_clients=3, num_rounds=3, local_epochs=1, sparsity=0.8,
                              watch_client=1, config=TrainConfig(lr=1e-3, optimizer="adam"), batch_size=4)
    # Execute
    trained = recipe(train_index, 0)
    # Assert
    assert data.read <= set(train_index.tolist())
    assert sorted(trained.uploads) == [1, 2, 3]
    assert trained.client_index is not None and trained.client_index.size == 5
    assert set(trained.client_index) <= set(train_index)
    assert trained.sparsity == pytest.approx(0.8, abs=2e-3)
    weights, mask = trained.uploads[3]
    for name, keep in mask.items():
        assert torch.all(weights[name][~keep] == 0), name
    sparsities = [1 - sum(int(m.sum()) for m in trained.uploads[r][1].values()) /
                  sum(m.numel() for m in trained.uploads[r][1].values()) for r in (1, 2, 3)]
    assert sparsities == sorted(sparsities)  # progressive pruning: later uploads are sparser


def test_federated_recipe_rejects_bad_options_and_too_few_subjects():
    data = RecordingDataset(10)
    with pytest.raises(ValueError, match="watch_client must be a client id in \\[0, 2\\), got 2"):
        federated_recipe(data, tiny_cnn, num_clients=2, num_rounds=1, watch_client=2)
    with pytest.raises(ValueError, match="num_rounds must be an integer >= 1, got 0"):
        federated_recipe(data, tiny_cnn, num_clients=2, num_rounds=0)
    with pytest.raises(ValueError, match="sparsity must be a fraction of zeroed weights in \\[0, 1\\), got 1.0"):
        federated_recipe(data, tiny_cnn, num_clients=2, num_rounds=1, sparsity=1.0)
    recipe = federated_recipe(data, tiny_cnn, num_clients=3, num_rounds=1)
    with pytest.raises(ValueError, match="num_clients must be in \\[1, 2\\]"):
        recipe(np.array([0, 1]), 0)


def test_federated_recipe_passes_partition_options():
    data = RecordingDataset(40)
    recipe = federated_recipe(data, tiny_cnn, num_clients=2, num_rounds=1, partition="dirichlet",
                              partition_options={"alpha": 0.5}, batch_size=8)
    trained = recipe(np.arange(0, 40, 2), 0)
    assert trained.client_index is not None and 1 <= trained.client_index.size < 20

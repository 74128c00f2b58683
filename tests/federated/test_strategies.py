"""Strategies: scheduled sparsity, fixed masks, local pruning, PruneFL re-adjustment, FedProx."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsparse_lib.federated.aggregation import fedavg
from fedsparse_lib.federated.simulation import run_federated
from fedsparse_lib.federated.strategies import (
    METHODS,
    SQGRAD_PREFIX,
    ClientTask,
    ClientUpdate,
    PruneFL,
    ServerState,
    make_strategy,
)
from fedsparse_lib.pruning import global_mask, ones_mask, prunable_names, random_scores, snip_scores
from fedsparse_lib.pruning.schedules import CubicSchedule
from fedsparse_lib.training import TrainConfig

ADAM = TrainConfig(lr=1e-3, optimizer="adam")


def _run(federation, method, *, rounds=4, **options):
    clients, test, model_fn = federation
    strategy = make_strategy(method, num_rounds=rounds, final_sparsity=0.9, **options)
    return run_federated(strategy, model_fn, clients, test, train_config=ADAM, progress=False)


def _num_prunable(model_fn) -> int:
    model = model_fn()
    return sum(p.numel() for n, p in model.named_parameters() if n in prunable_names(model))


@pytest.mark.parametrize("method", ["fedsparsify_global", "fedsparsify_local", "random"])
def test_progressive_methods_land_on_the_cubic_schedule(federation, method):
    # Prepare: the cubic schedule over 4 rounds to 0.9, and the exact count floor(s_t * N) per round
    _, _, model_fn = federation
    n = _num_prunable(model_fn)
    schedule = CubicSchedule(final_sparsity=0.9, total_steps=4)
    # Execute
    result = _run(federation, method)
    # Assert: every round's sparsity is floor(s_t N) / N, round 1 dense, round 4 at the target
    for row in result.rounds.itertuples():
        expected = math.floor(schedule.sparsity_at(row.server_round) * n) / n
        assert row.sparsity == pytest.approx(expected, abs=0.5 / n), row.server_round
    assert result.rounds.set_index("server_round").loc[1, "sparsity"] == 0.0
    assert result.rounds["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1 / n)


def test_local_without_reprune_keeps_the_vote_and_stays_near_the_schedule(federation):
    result = _run(federation, "fedsparsify_local", reprune=False)
    pruned = result.rounds.query("server_round >= 2")
    assert (pruned["sparsity"] == pruned["vote_sparsity"]).all()
    # four clients, threshold 2 (ties kept): the vote keeps at least what the clients agree on
    assert ((pruned["sparsity"] - pruned["target_sparsity"]).abs() < 0.1).all()
    assert (pruned["sparsity"] <= pruned["target_sparsity"] + 1e-9).all()
    assert not result.votes.empty and set(result.votes["votes"]) == {0, 1, 2, 3, 4}


def test_omp_prunes_once_at_t0(federation):
    result = _run(federation, "omp", start_round=2)
    sparsity = result.rounds.set_index("server_round")["sparsity"]
    assert sparsity[1] == 0.0
    assert sparsity[2] == pytest.approx(0.9, abs=1e-4) and sparsity[4] == sparsity[2]


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_pruning_at_initialisation_fixes_the_mask_from_the_first_client(federation, method):
    clients, _, model_fn = federation
    result = _run(federation, method, score_samples=3)
    # Independent: the score of the initial model on client 0's first 3 samples, top 10 % kept
    torch.manual_seed(0)
    model = model_fn()
    names = prunable_names(model)
    x, y = clients[0].first_samples(3)
    if method == "snip":
        scores = snip_scores(model, x, y, nn.functional.mse_loss, names=names)
    else:
        from fedsparse_lib.pruning import grasp_scores

        scores = grasp_scores(model, x, y, nn.functional.mse_loss, names=names)
    expected = global_mask(scores, 0.9)
    assert all(torch.equal(result.state.mask[k], expected[k]) for k in expected)
    assert (result.rounds["sparsity"] == result.rounds["sparsity"].iloc[0]).all()


def test_random_pruning_keeps_nested_prefixes_of_one_ranking(federation):
    _, _, model_fn = federation
    result = _run(federation, "random", seed=3)
    torch.manual_seed(0)
    model = model_fn()
    scores = random_scores(model, generator=torch.Generator().manual_seed(3), names=prunable_names(model))
    expected = global_mask(scores, 0.9)  # the final prefix, computed without any history
    assert all(torch.equal(result.state.mask[k], expected[k]) for k in expected)


def test_prunefl_readjusts_to_the_top_k_of_the_weighted_squared_gradients():
    # Prepare: a 2x2 weight, two clients with 1 and 3 examples and hand-chosen squared gradients
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    state = ServerState(weights={"w": w.clone()}, mask={"w": torch.tensor([[True, True], [False, False]])})
    g1 = torch.tensor([[4.0, 0.0], [0.0, 8.0]])
    g2 = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    updates = [ClientUpdate(client_id=k, weights={"w": w}, mask=state.mask, num_examples=n, train_loss=0.0,
                            extras={SQGRAD_PREFIX + "w": g}) for k, (n, g) in enumerate([(1, g1), (3, g2)])]
    strategy = PruneFL(final_sparsity=0.5, readjust_every=2, num_rounds=4)
    # Execute: round 1 does not re-adjust, round 2 does
    unchanged = strategy.prune(1, ServerState(weights={"w": w.clone()}, mask=dict(state.mask)), updates)
    readjusted = strategy.prune(2, state, updates)
    # Assert: weighted sum = 1/4 g1 + 3/4 g2 = [[1, 0], [3, 2]] -> keep (1, 0) and (1, 1)
    assert torch.equal(unchanged.mask["w"], torch.tensor([[True, True], [False, False]]))
    assert torch.equal(readjusted.mask["w"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(readjusted.weights["w"], torch.tensor([[0.0, 0.0], [3.0, 4.0]]))


def test_prunefl_runs_at_the_final_sparsity_and_readjusts(federation):
    result = _run(federation, "prunefl", readjust_every=2)
    assert result.rounds.query("server_round > 0")["sparsity"].round(3).eq(0.9).all()
    # the re-adjust round uploads the dense squared gradients too
    up = result.rounds.set_index("server_round")["bytes_up"]
    assert up[2] > 2 * up[1] and up[4] > 2 * up[3]


def test_fit_keeps_pruned_weights_at_zero_and_prunes_locally_to_the_exact_count(federation):
    clients, _, model_fn = federation
    torch.manual_seed(0)
    model = model_fn()
    names = prunable_names(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    mask = global_mask({k: weights[k].abs() for k in names}, 0.5)
    strategy = make_strategy("fedsparsify_local", num_rounds=4)
    update = strategy.fit(model, weights, mask, ClientTask(server_round=3, prune_to=0.8), clients[0],
                          local_epochs=2, train_config=ADAM)
    n = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in update.mask.values()) == n - math.floor(0.8 * n)
    for k in names:
        assert not update.mask[k][~mask[k]].any()  # masks only shrink
        assert (update.weights[k][~update.mask[k]] == 0).all()
    assert update.num_examples == 9 and math.isfinite(update.train_loss)


def test_fedprox_pulls_the_client_toward_the_round_start(federation):
    clients, _, model_fn = federation
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in model_fn().state_dict().items()}
    mask = ones_mask(start, prunable_names(start))

    def drift(mu: float) -> float:
        strategy = make_strategy("fedprox", num_rounds=2, prox_mu=mu)
        update = strategy.fit(model_fn(), start, mask, strategy.configure(1, ServerState(start, mask)), clients[0],
                              local_epochs=3, train_config=TrainConfig(lr=1e-4, optimizer="sgd"))
        return sum(float((update.weights[k] - start[k]).square().sum()) for k in start)

    assert drift(1000.0) < 0.5 * drift(1e-9)


def test_fedavg_aggregate_is_the_weighted_average():
    a = {"w": torch.tensor([[1.0, 0.0], [2.0, 4.0]])}
    b = {"w": torch.tensor([[3.0, 2.0], [0.0, 0.0]])}
    mask = {"w": torch.ones(2, 2, dtype=torch.bool)}
    strategy = make_strategy("fedavg", num_rounds=2)
    updates = [ClientUpdate(client_id=0, weights=a, mask=mask, num_examples=1, train_loss=0.0),
               ClientUpdate(client_id=1, weights=b, mask=mask, num_examples=3, train_loss=0.0)]
    merged = strategy.aggregate(1, ServerState(weights=a, mask=mask), updates)
    assert torch.allclose(merged.weights["w"], torch.tensor([[2.5, 1.5], [0.5, 1.0]]))
    assert torch.equal(merged.weights["w"], fedavg([a, b], [1, 3])["w"])


def test_local_merge_never_regrows_a_globally_pruned_coordinate():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    global_m = {"w": torch.tensor([[True, True], [True, False]])}
    regrown = {"w": torch.tensor([[True, True], [True, True]])}
    updates = [ClientUpdate(client_id=k, weights={"w": w}, mask=regrown, num_examples=1, train_loss=0.0)
               for k in range(2)]
    strategy = make_strategy("fedsparsify_local", num_rounds=4, reprune=False)
    merged = strategy.aggregate(1, ServerState(weights={"w": w}, mask=global_m), updates)
    assert torch.equal(merged.mask["w"], global_m["w"]) and merged.weights["w"][1, 1] == 0


def test_client_task_round_trips_through_a_flat_config():
    for task in (ClientTask(server_round=3), ClientTask(server_round=1, prune_to=0.5, prox_mu=0.1,
                                                        collect_sq_grads=True)):
        assert ClientTask.from_config(task.to_config()) == task


@pytest.mark.parametrize(("method", "options", "message"), [
    ("fedsparse", {}, "unknown method"),
    ("fedsparsify_global", {"final_sparsity": 1.0}, "final_sparsity"),
    ("fedsparsify_local", {"merge": "median"}, "merge"),
    ("fedsparsify_global", {"schedule": "linear"}, "schedule"),
    ("fedprox", {"prox_mu": -1.0}, "prox_mu"),
])
def test_bad_strategy_options_are_named(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(method, num_rounds=4, **options)


def test_every_method_runs(federation):
    for method in METHODS:
        result = _run(federation, method, rounds=2)
        assert len(result.rounds) == 3 and result.rounds["mae"].notna().all(), method

"""Aggregation maths on hand-worked 2x2 examples: FedAvg, majority vote with ties, masked average."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsparse_lib.federated.aggregation import (
    client_weights,
    fedavg,
    fedavg_majority_vote,
    majority_threshold,
    majority_vote,
    masked_average,
    proximal_term,
)

T, F = True, False


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _m(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _masks_with_votes(votes: list[list[int]], num_clients: int) -> list[dict[str, torch.Tensor]]:
    """Client k keeps a coordinate iff k < votes there (so the coordinate gets exactly that many votes)."""
    v = torch.tensor(votes)
    return [{"w": v > k} for k in range(num_clients)]


# --------------------------------------------------------------------------------------------
# Client weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_examples", "expected"),
    [
        ([1, 3], [0.25, 0.75]),  # 1/4, 3/4
        ([5], [1.0]),
        ([2, 2, 4], [0.25, 0.25, 0.5]),  # 2/8, 2/8, 4/8
        ([0.5, 1.5], [0.25, 0.75]),
    ],
)
def test_client_weights(num_examples: list[float], expected: list[float]) -> None:
    assert client_weights(num_examples) == expected


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf])
def test_client_weights_rejects_non_positive_or_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"num_examples\[1\].*finite and > 0"):
        client_weights([3, bad])


def test_client_weights_rejects_empty_and_non_numbers() -> None:
    with pytest.raises(ValueError, match="empty"):
        client_weights([])
    with pytest.raises(TypeError, match=r"num_examples\[0\]"):
        client_weights([True, 2])


# --------------------------------------------------------------------------------------------
# FedAvg
# --------------------------------------------------------------------------------------------
def test_fedavg_unequal_weights() -> None:
    # Prepare: n = [1, 3] -> a = [0.25, 0.75]
    states = [
        {"w": _t([[1, 2], [3, 4]]), "b": torch.tensor([2.0])},
        {"w": _t([[5, 6], [7, 8]]), "b": torch.tensor([-2.0])},
    ]
    # Execute
    merged = fedavg(states, [1, 3])
    # Assert: 0.25*1 + 0.75*5 = 4; 0.25*2 + 0.75*6 = 5; 0.25*3 + 0.75*7 = 6; 0.25*4 + 0.75*8 = 7
    #         bias: 0.25*2 + 0.75*(-2) = -1
    assert torch.equal(merged["w"], _t([[4, 5], [6, 7]]))
    assert torch.equal(merged["b"], torch.tensor([-1.0]))
    assert list(merged) == ["w", "b"]
    assert merged["w"].dtype == torch.float32


def test_fedavg_keeps_common_zeros() -> None:
    # Both clients pruned (1, 1): 0.5*0 + 0.5*0 = 0; elsewhere 0.5*2 + 0.5*4 = 3 etc.
    states = [{"w": _t([[2, 0], [6, 0]])}, {"w": _t([[4, 8], [0, 0]])}]
    assert torch.equal(fedavg(states, [10, 10])["w"], _t([[3, 4], [3, 0]]))


def test_fedavg_of_identical_states_is_exact() -> None:
    w = torch.from_numpy(np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32))
    # a = [0.1, 0.2, 0.7]: none exact in binary, the float64 sum still rounds back to w
    merged = fedavg([{"w": w.clone()} for _ in range(3)], [1, 2, 7])
    assert torch.equal(merged["w"], w)


def test_fedavg_rounds_integer_tensors() -> None:
    # 0.25*10 + 0.75*20 = 17.5 -> 18 (ties to even); 0.25*1 + 0.75*2 = 1.75 -> 2
    states = [{"n": torch.tensor([10, 1])}, {"n": torch.tensor([20, 2])}]
    merged = fedavg(states, [1, 3])
    assert torch.equal(merged["n"], torch.tensor([18, 2]))
    assert merged["n"].dtype == torch.int64


def test_fedavg_is_deterministic_and_does_not_modify_inputs() -> None:
    rng = np.random.default_rng(1)
    states = [{"w": torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32))} for _ in range(5)]
    copies = [{"w": s["w"].clone()} for s in states]
    first = fedavg(states, [3, 1, 4, 1, 5])
    second = fedavg(states, [3, 1, 4, 1, 5])
    assert torch.equal(first["w"], second["w"])
    assert all(torch.equal(s["w"], c["w"]) for s, c in zip(states, copies))
    assert first["w"] is not states[0]["w"]


# --------------------------------------------------------------------------------------------
# Majority vote
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_clients", "threshold"), [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (8, 4), (9, 4)])
def test_majority_threshold(num_clients: int, threshold: int) -> None:
    # max(1, floor(K/2))
    assert majority_threshold(num_clients) == threshold


@pytest.mark.parametrize(
    ("num_clients", "votes", "kept"),
    [
        # K=1: threshold max(1, 0) = 1 -> the lone client's own mask (nothing regrows)
        (1, [[1, 0], [0, 1]], [[T, F], [F, T]]),
        # K=2: threshold 1 -> kept by either client
        (2, [[2, 1], [1, 0]], [[T, T], [T, F]]),
        # K=3: threshold floor(3/2) = 1
        (3, [[3, 1], [2, 0]], [[T, T], [T, F]]),
        # K=4: threshold 2 -> a 2-2 tie is kept, 1 vote is dropped
        (4, [[4, 2], [1, 0]], [[T, T], [F, F]]),
        # K=8: threshold 4 -> 4 of 8 kept (tie), 3 of 8 dropped
        (8, [[8, 4], [3, 0]], [[T, T], [F, F]]),
    ],
)
def test_majority_vote(num_clients: int, votes: list[list[int]], kept: list[list[bool]]) -> None:
    masks = _masks_with_votes(votes, num_clients)
    global_mask, counted = majority_vote(masks)
    assert torch.equal(counted["w"], torch.tensor(votes, dtype=torch.int64))
    assert torch.equal(global_mask["w"], _m(kept))


def test_majority_vote_explicit_masks_k2() -> None:
    masks = [{"w": _m([[T, T], [F, F]])}, {"w": _m([[T, F], [T, F]])}]
    kept, votes = majority_vote(masks)
    assert torch.equal(votes["w"], torch.tensor([[2, 1], [1, 0]]))
    assert torch.equal(kept["w"], _m([[T, T], [T, F]]))


def test_majority_vote_threshold_override() -> None:
    masks = _masks_with_votes([[4, 2], [3, 0]], 4)
    kept, _ = majority_vote(masks, threshold=3)  # 4 >= 3, 2 < 3, 3 >= 3, 0 < 3
    assert torch.equal(kept["w"], _m([[T, F], [T, F]]))


@pytest.mark.parametrize("threshold", [0, 5, True, 2.0])
def test_majority_vote_rejects_bad_threshold(threshold: object) -> None:
    with pytest.raises(ValueError, match=r"threshold must be an int in \[1, 4\]"):
        majority_vote(_masks_with_votes([[4, 2], [1, 0]], 4), threshold=threshold)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# FedAvg + majority vote (FedSparsify-Local)
# --------------------------------------------------------------------------------------------
def test_fedavg_majority_vote_averages_in_zeros_k4() -> None:
    # Prepare: n = [1, 1, 1, 1] -> a = 0.25 each; threshold floor(4/2) = 2
    states = [
        {"w": _t([[1, 4], [8, 0]]), "b": torch.tensor([1.0])},
        {"w": _t([[2, 8], [0, 0]]), "b": torch.tensor([2.0])},
        {"w": _t([[3, 0], [0, 0]]), "b": torch.tensor([3.0])},
        {"w": _t([[4, 0], [0, 0]]), "b": torch.tensor([6.0])},
    ]
    masks = [
        {"w": _m([[T, T], [T, F]])},
        {"w": _m([[T, T], [F, F]])},
        {"w": _m([[T, F], [F, F]])},
        {"w": _m([[T, F], [F, F]])},
    ]
    # Execute
    merged, kept = fedavg_majority_vote(states, masks, [1, 1, 1, 1])
    # Assert: votes [[4, 2], [1, 0]] -> kept [[T, T], [F, F]]
    #   (0, 0): (1 + 2 + 3 + 4) / 4 = 2.5
    #   (0, 1): (4 + 8 + 0 + 0) / 4 = 3.0  (2 votes: tie kept, the two zeros averaged in)
    #   (1, 0): 1 vote < 2 -> 0;  (1, 1): 0 votes -> 0
    #   b (no mask, dense): (1 + 2 + 3 + 6) / 4 = 3
    assert torch.equal(kept["w"], _m([[T, T], [F, F]]))
    assert torch.equal(merged["w"], _t([[2.5, 3.0], [0, 0]]))
    assert torch.equal(merged["b"], torch.tensor([3.0]))
    assert set(kept) == {"w"}


def test_fedavg_majority_vote_unequal_weights_k2() -> None:
    # n = [1, 3] -> a = [0.25, 0.75]; K=2 -> threshold 1; votes [[2, 1], [1, 0]]
    states = [{"w": _t([[2, 4], [0, 0]])}, {"w": _t([[6, 0], [8, 0]])}]
    masks = [{"w": _m([[T, T], [F, F]])}, {"w": _m([[T, F], [T, F]])}]
    merged, kept = fedavg_majority_vote(states, masks, [1, 3])
    # (0,0): 0.25*2 + 0.75*6 = 5; (0,1): 0.25*4 + 0.75*0 = 1 (not 4); (1,0): 0.25*0 + 0.75*8 = 6
    assert torch.equal(merged["w"], _t([[5, 1], [6, 0]]))
    assert torch.equal(kept["w"], _m([[T, T], [T, F]]))


def test_fedavg_majority_vote_zeroes_dropped_coordinates_even_if_clients_sent_values() -> None:
    # K=4, threshold 2; coordinate (1, 0) has one vote but client 0 sent 8 there -> dropped to 0
    states = [{"w": _t([[1, 1], [8, 1]])} for _ in range(4)]
    masks = _masks_with_votes([[4, 2], [1, 0]], 4)
    merged, _ = fedavg_majority_vote(states, masks, [1, 1, 1, 1])
    assert torch.equal(merged["w"], _t([[1, 1], [0, 0]]))


# --------------------------------------------------------------------------------------------
# Masked average
# --------------------------------------------------------------------------------------------
def test_masked_average_k2() -> None:
    # Prepare: n = [1, 3] -> a = [0.25, 0.75]
    states = [
        {"w": _t([[2, 4], [0, 0]]), "b": torch.tensor([4.0])},
        {"w": _t([[6, 0], [8, 9]]), "b": torch.tensor([0.0])},  # 9 sent but not kept (mask False)
    ]
    masks = [{"w": _m([[T, T], [F, F]])}, {"w": _m([[T, F], [T, F]])}]
    # Execute
    merged, kept = masked_average(states, masks, [1, 3])
    # Assert:
    #   (0,0) kept by both: (0.25*2 + 0.75*6) / (0.25 + 0.75) = 5
    #   (0,1) kept by client 0 only: 0.25*4 / 0.25 = 4
    #   (1,0) kept by client 1 only: 0.75*8 / 0.75 = 8
    #   (1,1) kept by nobody: denominator 0 -> 0 (client 1's unmasked 9 is ignored)
    #   b (dense): 0.25*4 + 0.75*0 = 1
    assert torch.equal(merged["w"], _t([[5, 4], [8, 0]]))
    assert torch.equal(merged["b"], torch.tensor([1.0]))
    assert torch.equal(kept["w"], _m([[T, T], [T, F]]))


def test_masked_average_single_keeper_gets_its_value_exactly() -> None:
    # n = [1, 2] -> a = [1/3, 2/3] (inexact); kept by client 1 only -> exactly its float32 value
    value = torch.tensor(0.1, dtype=torch.float32)
    states = [{"w": _t([[0, 0], [0, 0]])}, {"w": _t([[0, 0], [0, 0]])}]
    states[1]["w"][0, 1] = value
    masks = [{"w": _m([[F, F], [F, F]])}, {"w": _m([[F, T], [F, F]])}]
    merged, _ = masked_average(states, masks, [1, 2])
    assert merged["w"][0, 1].item() == value.item()
    assert torch.equal(merged["w"][1], _t([[0, 0]])[0])


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _two() -> list[dict[str, torch.Tensor]]:
    return [{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[5, 6], [7, 8]])}]


@pytest.mark.parametrize(
    ("states", "num_examples", "error", "match"),
    [
        ([], [], ValueError, "states is empty"),
        ({"w": _t([[1, 2], [3, 4]])}, [1], TypeError, "sequence"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"v": _t([[1, 2], [3, 4]])}], [1, 1], ValueError,
         r"states\[1\] names differ.*missing \['w'\], unexpected \['v'\]"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, 2]])}], [1, 1], ValueError,
         r"states\[1\]\['w'\] has shape \(1, 2\), expected \(2, 2\)"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, 2], [3, 4]]).double()}], [1, 1], ValueError,
         r"states\[1\]\['w'\] has dtype torch.float64"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, math.nan], [3, 4]])}], [1, 1], ValueError,
         r"states\[1\]\['w'\] has 1 non-finite"),
        ([{"w": _t([[math.inf, 2], [3, 4]])}, {"w": _t([[1, 2], [3, 4]])}], [1, 1], ValueError,
         r"states\[0\]\['w'\] has 1 non-finite"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, 2], [3, 4]])}], [1, 1, 1], ValueError,
         "got 3 num_examples for 2 states"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, 2], [3, 4]])}], [1, 0], ValueError,
         r"num_examples\[1\] = 0"),
        ([{"w": _t([[1, 2], [3, 4]])}, {"w": _t([[1, 2], [3, 4]])}], [1, math.nan], ValueError,
         r"num_examples\[1\] = nan"),
        ([{"w": [[1, 2], [3, 4]]}], [1], TypeError, r"states\[0\]\['w'\] must be a torch.Tensor"),
    ],
)
def test_fedavg_validation(states, num_examples, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        fedavg(states, num_examples)


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ([], ValueError, "masks is empty"),
        ([{"w": _m([[T, F], [T, F]])}], ValueError, "got 1 masks for 2 states"),
        ([{"w": _m([[T, F], [T, F]])}, {"w": _t([[1, 0], [1, 0]])}], TypeError,
         r"masks\[1\]\['w'\] must be a torch.bool tensor"),
        ([{"w": _m([[T, F], [T, F]])}, {"v": _m([[T, F], [T, F]])}], ValueError, r"masks\[1\] names differ"),
        ([{"w": _m([[T, F]])}, {"w": _m([[T, F]])}], ValueError,
         r"masks\[0\]\['w'\] has shape \(1, 2\), but states\[0\]\['w'\] has shape \(2, 2\)"),
        ([{"w": _m([[T, F], [T, F]])}, {"w": _m([[T, F]])}], ValueError,
         r"masks\[1\]\['w'\] has shape \(1, 2\), expected \(2, 2\)"),
        ([{"x": _m([[T, F], [T, F]])}, {"x": _m([[T, F], [T, F]])}], ValueError,
         r"masks\[0\] has 'x', which is not a tensor of states\[0\]"),
    ],
)
@pytest.mark.parametrize("merge", [fedavg_majority_vote, masked_average])
def test_mask_validation(merge, masks, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        merge(_two(), masks, [1, 1])


def test_majority_vote_rejects_empty() -> None:
    with pytest.raises(ValueError, match="masks is empty"):
        majority_vote([])


# --------------------------------------------------------------------------------------------
# FedProx proximal term
# --------------------------------------------------------------------------------------------
def test_proximal_term_value_and_gradient() -> None:
    # w - w_g = [[1, 0], [0, 2]] -> ||.||^2 = 1 + 4 = 5; mu/2 * 5 = 0.25 * 5 = 1.25
    w = _t([[1, 2], [3, 4]]).requires_grad_(True)
    global_state = {"w": _t([[0, 2], [3, 2]]), "buffer": torch.tensor([7.0])}  # extra names ignored
    term = proximal_term({"w": w}, global_state, 0.5)
    assert term.item() == 1.25
    term.backward()
    # d/dw = mu * (w - w_g) = 0.5 * [[1, 0], [0, 2]]
    assert torch.equal(w.grad, _t([[0.5, 0], [0, 1]]))


def test_proximal_term_sums_over_tensors_and_zero_mu() -> None:
    state = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0])}
    global_state = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0])}
    assert proximal_term(state, global_state, 2.0).item() == 11.0  # 1 * (1 + 1 + 9)
    assert proximal_term(state, global_state, 0.0).item() == 0.0


@pytest.mark.parametrize(
    ("state", "global_state", "mu", "match"),
    [
        ({"w": torch.ones(2)}, {"w": torch.ones(2)}, -0.1, "mu must be a finite number >= 0"),
        ({"w": torch.ones(2)}, {"w": torch.ones(2)}, math.nan, "mu must be a finite number >= 0"),
        ({"w": torch.ones(2)}, {"v": torch.ones(2)}, 0.1, "global_state has no tensor 'w'"),
        ({"w": torch.ones(2)}, {"w": torch.ones(3)}, 0.1, r"state\['w'\] has shape \(2,\)"),
        ({}, {"w": torch.ones(3)}, 0.1, "state has no tensors"),
    ],
)
def test_proximal_term_validation(state, global_state, mu, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        proximal_term(state, global_state, mu)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    from fedsparse_lib.federated.aggregation import all_finite

    huge = torch.full((4,), 3e38)  # finite values whose float32 sum overflows to inf
    assert all_finite(huge) and all_finite(torch.zeros(3))
    assert not all_finite(torch.tensor([1.0, float("nan")])) and not all_finite(torch.tensor([float("-inf"), 1.0]))

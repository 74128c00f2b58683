"""The in-process engine: determinism, real byte counts, participation, faults, checkpoints, resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsparse_lib.federated import codec
from fedsparse_lib.federated.checkpoint import latest_round, load_latest
from fedsparse_lib.federated.simulation import FederationError, run_federated, select_clients
from fedsparse_lib.federated.strategies import make_strategy
from fedsparse_lib.training import TrainConfig

ADAM = TrainConfig(lr=1e-3, optimizer="adam")
HERE = Path(__file__).parent


def _run(federation, method="fedsparsify_global", *, rounds=4, clients=None, **kwargs):
    all_clients, test, model_fn = federation
    strategy = make_strategy(method, num_rounds=rounds, final_sparsity=0.9)
    return run_federated(strategy, model_fn, clients if clients is not None else all_clients, test,
                         train_config=ADAM, progress=False, **kwargs)


def _same_state(a, b) -> bool:
    return (list(a.weights) == list(b.weights)
            and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
            and all(torch.equal(a.mask[k], b.mask[k]) for k in a.mask))


def test_two_runs_with_the_same_seed_are_identical_and_another_seed_differs(federation):
    a, b = _run(federation, seed=1), _run(federation, seed=1)
    c = _run(federation, seed=2)
    assert _same_state(a.state, b.state)
    assert a.rounds["mae"].tolist() == b.rounds["mae"].tolist()
    assert not _same_state(a.state, c.state)


def test_reported_bytes_are_the_lengths_of_independently_encoded_messages(federation):
    clients, _, model_fn = federation
    result = _run(federation, keep_uploads=[2])
    # round 1 broadcast: the dense initial model, no mask
    torch.manual_seed(0)
    initial = model_fn().state_dict()
    rows = result.clients.set_index(["server_round", "client_id"])
    assert rows.loc[(1, 0), "bytes_down"] == len(codec.encode(initial, None, encoding="dense"))
    # a sparse upload: bit mask + kept values, zstd on the mask
    weights, mask = result.uploads[(2, 3)]
    assert rows.loc[(3, 2), "bytes_up"] == len(codec.encode(weights, mask, encoding="bitmask", compress_mask=True))
    assert rows.loc[(3, 2), "paper_bytes_up"] == 4 * sum(int(m.sum()) for m in mask.values())
    # per-round totals are the sums over the round's clients
    totals = result.clients.groupby("server_round")[["bytes_up", "bytes_down"]].sum()
    assert (result.rounds.set_index("server_round").loc[totals.index, ["bytes_up", "bytes_down"]] == totals).all().all()
    # pruning shrinks the messages
    down = result.rounds.set_index("server_round")["bytes_down"]
    assert down[4] < 0.3 * down[1]


def test_participation_selects_a_seeded_subset_each_round():
    picks = [select_clients(list(range(8)), participation=0.5, seed=0, server_round=t) for t in range(1, 6)]
    assert all(len(p) == 4 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert picks == [select_clients(list(range(8)), participation=0.5, seed=0, server_round=t) for t in range(1, 6)]
    assert select_clients([3, 5], participation=1.0, seed=0, server_round=1) == [3, 5]


def test_partial_participation_trains_only_the_selected_clients(federation):
    result = _run(federation, participation=0.5)
    assert (result.clients.groupby("server_round").size() == 2).all()
    assert (result.rounds.query("server_round > 0")["num_clients"] == 2).all()


def _nan(update):
    name = next(iter(update.weights))
    update.weights[name] = torch.full_like(update.weights[name], float("nan"))
    return update


def _reshape(update):
    name = next(iter(update.weights))
    update.weights[name] = update.weights[name].reshape(-1)[:-1].clone()
    return update


def _raise(update):
    raise RuntimeError("disk full on client")


def _slow(update):
    time.sleep(4.5)
    return update


@pytest.mark.parametrize(("fault", "reason"), [(_raise, "RuntimeError: disk full"), (_nan, "non-finite"),
                                               (_reshape, "shape"), (_slow, "timeout")])
def test_a_faulty_client_is_excluded_and_recorded(federation, fault, reason):
    # Prepare: client 3 fails in every round; the reference federation simply has no client 3
    clients, _, _ = federation

    def fault_fn(server_round, client_id, update):
        return fault(update) if client_id == 3 else update

    # Execute
    # a generous timeout (a healthy tiny client takes ~0.1 s, seconds on a loaded machine), one round
    timeout, rounds = (4.0, 2) if fault is _slow else (None, 3)
    result = _run(federation, rounds=rounds, fault_fn=fault_fn, client_timeout=timeout, min_clients=2)
    reference = _run(federation, rounds=rounds, clients=clients[:3])
    # Assert: recorded every round, and the model is the one trained without client 3, bit for bit
    assert result.faults["client_id"].tolist() == [3] * rounds
    assert result.faults["reason"].str.contains(reason).all()
    assert (result.rounds.query("server_round > 0")["num_excluded"] == 1).all()
    assert (result.clients.query("client_id == 3")["status"] == "excluded").all()
    assert _same_state(result.state, reference.state)


def test_too_few_usable_clients_fail_the_round_with_the_reasons(federation):
    def fault_fn(server_round, client_id, update):
        if server_round == 2 and client_id != 0:
            raise RuntimeError(f"client {client_id} lost power")
        return update

    with pytest.raises(FederationError, match=r"round 2: only 1 usable .* min_clients=2.*lost power"):
        _run(federation, rounds=3, fault_fn=fault_fn, min_clients=2)


def test_bad_engine_parameters_are_named(federation):
    with pytest.raises(ValueError, match="participation"):
        _run(federation, participation=0.0)
    with pytest.raises(ValueError, match="min_clients=3"):
        _run(federation, participation=0.5, min_clients=3)
    with pytest.raises(ValueError, match="local_epochs"):
        _run(federation, local_epochs=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _run(federation, resume=True)


def test_tune_rounds_train_under_the_final_mask(federation):
    result = _run(federation, rounds=3, tune_rounds=2)
    tune = result.rounds.query("phase == 'tune'")
    assert tune["server_round"].tolist() == [4, 5]
    final = result.rounds.set_index("server_round").loc[3, "sparsity"]
    assert (tune["sparsity"] == final).all()


def test_local_variant_records_mask_agreement_and_votes(federation):
    result = _run(federation, "fedsparsify_local", rounds=3)
    rounds = sorted(result.agreement["server_round"].unique())
    assert rounds == [2, 3]  # round 1 is dense: clients send the global mask back
    one = result.agreement.query("server_round == 3")
    assert len(one) == 16 and (one.query("client_a == client_b")["jaccard"] == 1).all()
    votes = result.votes.query("server_round == 3")
    assert votes["count"].sum() == sum(m.numel() for m in result.state.mask.values())


def test_checkpoints_are_written_every_round_and_a_resume_of_a_finished_run_changes_nothing(federation, tmp_path):
    first = _run(federation, rounds=3, checkpoint_dir=tmp_path)
    assert latest_round(tmp_path) == 3 and len(list(tmp_path.glob("round-*.json"))) == 2  # keep_last=2
    again = _run(federation, rounds=3, checkpoint_dir=tmp_path, resume=True)
    assert _same_state(first.state, again.state)
    assert again.rounds["mae"].tolist() == first.rounds["mae"].tolist()


def test_resume_refuses_a_different_run(federation, tmp_path):
    _run(federation, rounds=3, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="configuration differs in .*seed"):
        _run(federation, rounds=3, checkpoint_dir=tmp_path, resume=True, seed=5)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(federation, tmp_path):
    _run(federation, rounds=3, checkpoint_dir=tmp_path)
    newest = tmp_path / "round-0003.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10] + b"0123456789")
    assert load_latest(tmp_path).server_round == 2


SCRIPT = """
import os, signal, sys
import numpy as np, torch
sys.path.insert(0, {here!r})
from conftest import tiny_data, tiny_model
from torch.utils.data import TensorDataset
from fedsparse_lib.federated.simulation import DatasetClient, run_federated
from fedsparse_lib.federated.strategies import make_strategy
from fedsparse_lib.training import TrainConfig, save_checkpoint
torch.set_num_threads(1)
data = tiny_data()
test = TensorDataset(data.tensors[0][:12], data.tensors[1][:12])
clients = [DatasetClient(k, data, np.arange(12 + 9 * k, 21 + 9 * k), batch_size=4) for k in range(4)]
kill_round = int(os.environ.get("KILL_ROUND", "0"))

def fault_fn(server_round, client_id, update):
    if server_round == kill_round and client_id == 1:  # mid-round: two clients done, two to go
        os.kill(os.getpid(), signal.SIGKILL)
    return update

strategy = make_strategy({method!r}, num_rounds=5, final_sparsity=0.9)
result = run_federated(strategy, tiny_model, clients, test, train_config=TrainConfig(lr=1e-3, optimizer="adam"),
                       checkpoint_dir=sys.argv[1], resume=True, fault_fn=fault_fn, progress=False)
save_checkpoint(sys.argv[2], result.model, mask=result.state.mask)
result.rounds[["server_round", "mae", "sparsity"]].to_csv(sys.argv[2] + ".csv", index=False)
"""


@pytest.mark.parametrize("method", ["fedsparsify_global", "fedsparsify_local"])
def test_a_killed_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, method):
    # Prepare
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(here=str(HERE), method=method))
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(ckpt: Path, out: Path, kill_round: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(ckpt), str(out)], env={**env, "KILL_ROUND": str(kill_round)},
                              capture_output=True, text=True, timeout=300)

    # Execute: killed (SIGKILL) in the middle of round 3, then resumed; and one uninterrupted run
    killed = run(tmp_path / "ckpt", tmp_path / "resumed.safetensors", kill_round=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_round(tmp_path / "ckpt") == 2
    resumed = run(tmp_path / "ckpt", tmp_path / "resumed.safetensors", kill_round=0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "fresh", tmp_path / "straight.safetensors", kill_round=0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # Assert: identical final weights and masks, and identical per-round records
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "resumed.safetensors")), load_file(str(tmp_path / "straight.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra = np.loadtxt(tmp_path / "resumed.safetensors.csv", delimiter=",", skiprows=1)
    rb = np.loadtxt(tmp_path / "straight.safetensors.csv", delimiter=",", skiprows=1)
    assert np.array_equal(ra, rb) and ra.shape == (6, 3)

"""Round checkpoints: exact round trip (values, dtypes, name order), pruning of old ones, hash check."""

from __future__ import annotations

import torch

from fedsparse_lib.federated.checkpoint import latest_round, load_latest, save_round
from fedsparse_lib.federated.strategies import ServerState


def _state(seed: int) -> ServerState:
    g = torch.Generator().manual_seed(seed)
    weights = {"z.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g).double(),
               "m.count": torch.tensor([7], dtype=torch.int64)}
    mask = {"z.weight": torch.rand(3, 4, generator=g) > 0.5, "a.bias": torch.ones(4, dtype=torch.bool)}
    return ServerState(weights=weights, mask=mask, extras={"vote_sparsity": torch.tensor(0.25, dtype=torch.float64)})


def test_round_trip_is_exact_and_keeps_the_name_order(tmp_path):
    state = _state(0)
    save_round(tmp_path, server_round=4, state=state, records={"rounds": [{"server_round": 4, "mae": 0.1 + 0.2}]},
               config={"seed": 1})
    loaded = load_latest(tmp_path)
    assert loaded.server_round == 4 and loaded.config == {"seed": 1}
    assert loaded.records == {"rounds": [{"server_round": 4, "mae": 0.1 + 0.2}]}  # floats survive exactly
    for ours, theirs in ((state.weights, loaded.state.weights), (state.mask, loaded.state.mask),
                         (state.extras, loaded.state.extras)):
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def test_only_the_last_checkpoints_are_kept_and_an_empty_folder_has_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None and latest_round(tmp_path) is None
    for r in range(1, 5):
        save_round(tmp_path, server_round=r, state=_state(r), records={}, config={}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-0003.json", "round-0003.safetensors", "round-0004.json", "round-0004.safetensors"]
    assert latest_round(tmp_path) == 4


def test_a_tensor_file_without_its_json_is_not_a_checkpoint_and_a_bad_hash_is_skipped(tmp_path):
    save_round(tmp_path, server_round=1, state=_state(1), records={}, config={})
    save_round(tmp_path, server_round=2, state=_state(2), records={}, config={})
    (tmp_path / "round-0002.json").unlink()  # killed between the two writes: round 2 never committed
    assert load_latest(tmp_path).server_round == 1
    save_round(tmp_path, server_round=3, state=_state(3), records={}, config={})
    (tmp_path / "round-0003.safetensors").write_bytes((tmp_path / "round-0001.safetensors").read_bytes())
    loaded = load_latest(tmp_path)
    assert loaded.server_round == 1 and torch.equal(loaded.state.weights["z.weight"], _state(1).weights["z.weight"])

"""Sparse model storage: exact round trips, sizes worked out by hand, corrupt files, atomic writes."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import zstandard

from fedsparse_lib import sparse_storage
from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.pruning import apply_mask, global_magnitude_mask
from fedsparse_lib.sparse_storage import (
    STORAGE_FORMATS,
    decode_sparse,
    encode_sparse,
    load_sparse,
    pack_sparse,
    save_sparse,
    storage_report,
    unpack_sparse,
)
from fedsparse_lib.training import save_checkpoint

SHAPES = {"a.weight": (3, 5, 7), "a.bias": (3,), "b.weight": (13,), "c.scale": ()}


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def random_mask(state: dict[str, torch.Tensor], sparsity: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) >= sparsity for n, t in state.items()}


def pruned(state: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    apply_mask(out, mask)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float32 tensor (compares NaN payloads and the sign of zero)."""
    return t.contiguous().view(torch.int32)


def assert_same(state, mask, state2, mask2):
    assert list(state2) == list(state)
    assert list(mask2) == list(mask)
    for name, t in state.items():
        assert state2[name].dtype == t.dtype and state2[name].shape == t.shape, name
        if t.dtype == torch.float32:
            assert torch.equal(bits(state2[name]), bits(t)), name
        else:
            assert torch.equal(state2[name], t), name
    for name, m in mask.items():
        assert mask2[name].dtype == torch.bool and torch.equal(mask2[name], m), name
        assert torch.equal(bits(state2[name][~m]), torch.zeros(int((~m).sum()), dtype=torch.int32)), name


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 0.999])
def test_random_state_round_trips_exactly(tmp_path, sparsity):
    # Prepare
    state = random_state()
    mask = random_mask(state, sparsity)
    state = pruned(state, mask)
    # Execute
    n_bytes = save_sparse(tmp_path / "m.safetensors", state, mask)
    state2, mask2 = load_sparse(tmp_path / "m.safetensors")
    # Assert
    assert n_bytes == (tmp_path / "m.safetensors").stat().st_size
    assert_same(state, mask, state2, mask2)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 0.999])
def test_pruned_model_round_trips_and_predicts_the_same(tmp_path, sparsity):
    # Prepare: global magnitude mask of a tiny BrainAgeCNN (0.999 empties some tensors)
    torch.manual_seed(0)
    model = BrainAgeCNN((8, 8, 8), width=1 / 8, mean_age=60.0)
    mask = global_magnitude_mask(model, sparsity)
    apply_mask(model, mask)
    x = torch.randn(2, 1, 8, 8, 8)
    # Execute
    save_sparse(tmp_path / "m.safetensors", model, mask)
    state2, mask2 = load_sparse(tmp_path / "m.safetensors")
    model2 = BrainAgeCNN((8, 8, 8), width=1 / 8, mean_age=0.0)
    model2.load_state_dict(state2)
    # Assert
    assert_same(model.state_dict(), mask, state2, mask2)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model2.eval()(x))


def test_emptied_tensor_and_kept_special_values_round_trip():
    # Prepare: one tensor with nothing kept, one whose kept values are 0.0, -0.0, NaN, inf
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 0.0, 1.5])
    state = {"empty": torch.zeros(4, 3), "special": special}
    mask = {"empty": torch.zeros(4, 3, dtype=torch.bool),
            "special": torch.tensor([True, True, True, True, False, True])}
    # Execute
    arrays, metadata = pack_sparse(state, mask)
    state2, mask2 = decode_sparse(encode_sparse(state, mask))
    # Assert
    assert arrays["values/empty"].shape == (0,)
    assert arrays["values/special"].shape == (5,)  # the kept 0.0 and -0.0 are stored
    assert_same(state, mask, state2, mask2)
    assert bool(mask2["special"][0]) and bool(mask2["special"][1])  # kept zeros stay kept


def test_tensors_outside_the_mask_are_stored_dense_in_their_dtype():
    state = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "steps": torch.tensor(7, dtype=torch.int64),
             "half": torch.tensor([0.5, -1.0], dtype=torch.float16)}
    mask = {"w": torch.tensor([[True, False], [False, True]])}
    arrays, _ = pack_sparse(state, mask)
    state2, mask2 = decode_sparse(encode_sparse(state, mask))
    assert sorted(arrays) == ["dense/half", "dense/steps", "mask/w", "values/w"]
    assert_same(state, mask, state2, mask2)


# --- sizes by hand ----------------------------------------------------------------------------

def test_sixteen_floats_at_half_sparsity_take_two_mask_bytes_and_32_value_bytes():
    # Prepare: 16 float32, every other one kept -> bits 1010 1010 1010 1010 -> two bytes 0xAA
    w = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    mask = {"w": torch.tensor([True, False] * 8).reshape(4, 4)}
    state = pruned({"w": w}, mask)
    # Execute
    arrays, metadata = pack_sparse(state, mask)
    data = encode_sparse(state, mask)
    # Assert
    assert arrays["mask/w"].tolist() == [0xAA, 0xAA]
    assert arrays["values/w"].tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0]
    assert json.loads(metadata["tensors"]) == [{"name": "w", "shape": [4, 4], "dtype": "float32", "kind": "sparse"}]
    header_len = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + header_len + 2 + 32
    state2, mask2 = unpack_sparse(arrays, metadata)
    assert_same(state, mask, state2, mask2)


def test_storage_report_measures_real_bytes():
    # Prepare
    w = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    mask = {"w": torch.tensor([True, False] * 8).reshape(4, 4)}
    state = pruned({"w": w}, mask)
    dense = safetensors.torch.save(state)  # an independent writer of the dense file
    sparse = encode_sparse(state, mask)
    # Execute
    report = storage_report(state, mask)
    # Assert
    assert list(report.columns) == ["format", "bytes", "ratio_to_dense"]
    assert list(report["format"]) == list(STORAGE_FORMATS)
    got = dict(zip(report["format"], report["bytes"]))
    assert got["dense_float32"] == len(dense) == 8 + int.from_bytes(dense[:8], "little") + 64
    assert got["dense_float32_gzip"] == len(gzip.compress(dense, compresslevel=6, mtime=0))
    assert got["bitmask_values"] == len(sparse)
    assert got["bitmask_values_zstd"] == len(zstandard.ZstdCompressor(level=3).compress(sparse))
    assert got["paper_nonzero_x4"] == 8 * 4
    np.testing.assert_allclose(report["ratio_to_dense"], report["bytes"] / len(dense))


def test_storage_report_of_a_95_percent_sparse_model():
    torch.manual_seed(0)
    model = BrainAgeCNN((8, 8, 8), width=1 / 4)
    mask = global_magnitude_mask(model, 0.95)
    apply_mask(model, mask)
    report = storage_report(model, mask)
    got = dict(zip(report["format"], report["ratio_to_dense"]))
    n = sum(int(m.numel()) for m in mask.values())
    assert got["paper_nonzero_x4"] < got["bitmask_values"] < 1.0
    assert got["bitmask_values_zstd"] < got["bitmask_values"]
    # mask bits alone cost 1/32 of the dense floats; the values 5 %
    assert got["bitmask_values"] == pytest.approx(1 / 32 + 0.05, abs=0.01)
    assert n > 10_000


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, message", [
    ({"nope": torch.ones(3, dtype=torch.bool)}, "'nope' is not in the state"),
    ({"a.bias": torch.ones(4, dtype=torch.bool)}, "'a.bias' has shape (4,)"),
    ({"a.bias": torch.ones(3, dtype=torch.uint8)}, "'a.bias' must be a torch.bool tensor"),
    ({"a.bias": torch.tensor([True, False, True])}, "'a.bias' holds 1 non-zero value(s) at pruned"),
], ids=["unknown-name", "shape", "dtype", "unpruned-value"])
def test_mask_state_mismatch_names_the_tensor(tmp_path, mask, message):
    with pytest.raises(ValueError) as err:
        save_sparse(tmp_path / "m.safetensors", random_state(), mask)
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="'w' has dtype torch.bfloat16"):
        encode_sparse({"w": torch.zeros(2, dtype=torch.bfloat16)}, {})


def _tamper(data: bytes, change) -> bytes:
    """Re-encode a sparse file after ``change(arrays, metadata)`` edits it."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    arrays = safetensors.numpy.load(data)
    metadata = dict(header["__metadata__"])
    change(arrays, metadata)
    return safetensors.numpy.save(arrays, metadata=metadata)


def _valid() -> bytes:
    state = {"w": torch.arange(1, 12, dtype=torch.float32)}  # 11 coordinates: 5 padding bits
    mask = {"w": torch.tensor([True, False] * 5 + [True])}
    return encode_sparse(pruned(state, mask), mask)


def _set(key, value):
    def change(arrays, metadata):
        arrays[key] = value
    return change


@pytest.mark.parametrize("make, message", [
    (lambda: _valid()[:-5], "corrupt safetensors data"),
    (lambda: _valid()[:6], "too short"),
    (lambda: b"\xff" * 64, "exceeds"),
    (lambda: b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{", "unreadable safetensors header"),
    (lambda: safetensors.torch.save({"w": torch.zeros(3)}), "not a fedsparse.sparse file"),
    (lambda: _tamper(_valid(), _set("values/w", np.zeros(5, np.float32))), "the mask keeps 6"),
    (lambda: _tamper(_valid(), _set("values/w", np.zeros(6, np.float64))), "the mask keeps 6"),
    (lambda: _tamper(_valid(), _set("mask/w", np.zeros(3, np.uint8))), "expected uint8[2]"),
    (lambda: _tamper(_valid(), _set("mask/w", np.array([0xAA, 0xA1], np.uint8))), "padding bits"),
    (lambda: _tamper(_valid(), _set("extra", np.zeros(1, np.uint8))), "not listed in the metadata"),
    (lambda: _tamper(_valid(), lambda a, m: a.pop("values/w")), "'values/w' is missing"),
    (lambda: _tamper(_valid(), lambda a, m: m.update(tensors="[{]")), "unreadable tensor list"),
    (lambda: _tamper(_valid(), lambda a, m: m.update(version="9")), "unsupported version"),
    (lambda: _tamper(_valid(), lambda a, m: m.update(tensors=m["tensors"][:-1] + "," + m["tensors"][1:])),
     "repeated names"),
], ids=["truncated", "tiny", "garbage", "bad-header", "dense-file", "short-values", "values-dtype",
        "mask-length", "padding", "extra-array", "missing-array", "bad-metadata", "version", "repeated-name"])
def test_corrupt_file_is_refused_with_its_name(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make())
    with pytest.raises(ValueError) as err:
        load_sparse(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_a_dense_checkpoint_is_not_mistaken_for_a_sparse_file(tmp_path):
    model = BrainAgeCNN((8, 8, 8), width=1 / 16)
    save_checkpoint(tmp_path / "dense.safetensors", model)
    with pytest.raises(ValueError, match="not a fedsparse.sparse file"):
        load_sparse(tmp_path / "dense.safetensors")


# --- atomic writes ----------------------------------------------------------------------------

def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    state = random_state()
    mask = random_mask(state, 0.5)
    target = tmp_path / "sub" / "m.safetensors"
    save_sparse(target, pruned(state, mask), {})  # a first, dense version
    first = target.read_bytes()
    save_sparse(target, pruned(state, mask), mask)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() != first
    assert_same(pruned(state, mask), mask, *load_sparse(target))


def test_failed_rename_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    state = random_state()
    mask = random_mask(state, 0.5)
    target = tmp_path / "m.safetensors"
    save_sparse(target, pruned(state, mask), mask)
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_sparse(target, pruned(state, random_mask(state, 0.9)), random_mask(state, 0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() == before


def test_module_exports_resolve():
    assert all(hasattr(sparse_storage, name) for name in sparse_storage.__all__)

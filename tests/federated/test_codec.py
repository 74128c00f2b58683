"""Wire codec: exact round trips, float16 as documented, sizes by hand, clear errors."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from fedsparse_lib.federated.codec import (
    MAGIC,
    CodecError,
    Encoding,
    ValueDType,
    binary_entropy,
    decode,
    encode,
    message_bytes,
    paper_bytes,
    shannon_bound_bits,
)

ALL_OPTIONS = [
    dict(encoding=e, values=ValueDType.FLOAT32, compress_mask=cm, compress_payload=cp)
    for e in Encoding for cm in (False, True) for cp in (False, True)
]


def _state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "conv.bias": torch.randn(8, generator=gen),
            "fc.weight": torch.randn(5, 17, generator=gen), "fc.bias": torch.randn(5, generator=gen)}


def _pruned(sparsity: float, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    state = _state(gen)
    mask = {k: torch.rand(v.shape, generator=gen) >= sparsity for k, v in state.items() if k.endswith("weight")}
    for k, m in mask.items():
        state[k] = state[k].masked_fill(~m, 0.0)  # +0.0 at pruned coordinates (x * 0 may give -0.0)
    return state, mask


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8) if a[k].numel() else a[k],
                        b[k].reshape(-1).view(torch.uint8) if b[k].numel() else b[k])
        for k in a)


@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=lambda o: f"{o['encoding'].value}-cm{int(o['compress_mask'])}-cp{int(o['compress_payload'])}")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 0.99])
def test_round_trip_exact_pruned(sparsity: float, opts: dict) -> None:
    state, mask = _pruned(sparsity)
    got, got_mask = decode(encode(state, mask, **opts))
    assert _bits_equal(got, state)
    assert list(got_mask) == list(mask) and all(torch.equal(got_mask[k], mask[k]) for k in mask)


@pytest.mark.parametrize("opts", ALL_OPTIONS[::2])
def test_round_trip_exact_without_mask(opts: dict) -> None:
    state = _state(torch.Generator().manual_seed(1))
    state["weird"] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45])  # NaN, -0.0, subnormal
    got, got_mask = decode(encode(state, **opts))
    assert got_mask is None
    assert _bits_equal(got, state)


def test_emptied_tensor_and_kept_zero() -> None:
    state, mask = _pruned(0.5)
    mask["conv.weight"] = torch.zeros_like(mask["conv.weight"])  # emptied layer
    state["conv.weight"] = torch.zeros_like(state["conv.weight"])
    mask["fc.weight"][0, 0] = True
    state["fc.weight"][0, 0] = 0.0  # a kept weight that is exactly 0.0 stays kept
    for opts in ALL_OPTIONS:
        got, got_mask = decode(encode(state, mask, **opts))
        assert _bits_equal(got, state)
        assert not got_mask["conv.weight"].any()
        assert bool(got_mask["fc.weight"][0, 0])


def test_empty_mask_dict_scalar_and_zero_size_tensors() -> None:
    state = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "steps": torch.tensor([7], dtype=torch.int64),
             "flags": torch.tensor([True, False]), "half": torch.tensor([1.5, -2.0], dtype=torch.float16)}
    got, got_mask = decode(encode(state, {}))
    assert got_mask == {}
    assert _bits_equal(got, state)
    mask = {"empty": torch.zeros(0, 4, dtype=torch.bool), "steps": torch.tensor([True])}
    got, got_mask = decode(encode(state, mask, compress_mask=True))
    assert _bits_equal(got, state) and got_mask["empty"].shape == (0, 4)


def test_mask_in_other_order_is_returned_in_state_order() -> None:
    state, mask = _pruned(0.5)
    reversed_mask = dict(reversed(list(mask.items())))
    _, got_mask = decode(encode(state, reversed_mask))
    assert list(got_mask) == [k for k in state if k in mask]


def test_pruned_minus_zero_decodes_to_plus_zero() -> None:
    state = {"w": torch.tensor([1.0, -0.0])}
    mask = {"w": torch.tensor([True, False])}
    got, _ = decode(encode(state, mask))
    assert torch.equal(got["w"], torch.tensor([1.0, 0.0])) and not torch.signbit(got["w"][1])


@pytest.mark.parametrize("encoding", list(Encoding))
def test_float16_lossy_as_documented(encoding: Encoding) -> None:
    state, mask = _pruned(0.5)
    state["fc.bias"] = torch.tensor([1e5, -1e5, 1e-8, 0.1, 3.0])  # overflow to inf, underflow to 0
    state["ints"] = torch.arange(3)  # non-float32 tensors are sent exactly
    data = encode(state, mask, encoding=encoding, values=ValueDType.FLOAT16, compress_mask=True)
    got, got_mask = decode(data)
    want = {k: (v.half().float() if v.dtype == torch.float32 else v) for k, v in state.items()}
    assert _bits_equal(got, want)
    assert got["fc.bias"][0] == math.inf and got["fc.bias"][2] == 0.0
    assert not torch.equal(got["fc.weight"], state["fc.weight"])  # really lossy
    assert len(data) < len(encode(state, mask, encoding=encoding, compress_mask=True))


def test_options_accept_enum_values_as_strings() -> None:
    state, mask = _pruned(0.5)
    assert encode(state, mask, encoding="bitmask", values="float16") == encode(
        state, mask, encoding=Encoding.BITMASK, values=ValueDType.FLOAT16)
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode(state, mask, encoding="csr")
    with pytest.raises(ValueError, match="values must be one of"):
        encode(state, mask, values="int8")


def test_hand_computed_size() -> None:
    state = {"w": torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]), "b": torch.tensor([0.5, -0.5])}
    mask = {"w": torch.tensor([[True, False, True], [False, True, False]])}
    prefix = 4 + 1 + 1 + 4 + 4  # magic, version, payload codec, body_len, crc32
    options = 1 + 1 + 1 + 4  # encoding, values, flags, n_tensors
    w_header = 2 + 1 + 1 + 1 + 1 + 2 * 4  # name_len, "w", dtype, masked, ndim, 2 sizes
    b_header = 2 + 1 + 1 + 1 + 1 + 1 * 4
    mask_section = 4 + 1  # length + ceil(6 / 8) bytes
    assert message_bytes(state, mask) == prefix + options + w_header + b_header + mask_section + (3 + 2) * 4 == 70
    assert message_bytes(state, mask, values=ValueDType.FLOAT16) == 70 - 5 * 2
    # Dense: all 6 + 2 values, and the mask bits still travel.
    assert message_bytes(state, mask, encoding=Encoding.DENSE) == 70 + 3 * 4
    assert message_bytes(state) == prefix + options + w_header + b_header + 4 + 8 * 4
    data = encode(state, mask)
    assert data[:4] == MAGIC
    assert data[prefix + options + w_header + b_header + 4] == 0b10101000  # big bit order, zero padding
    assert paper_bytes(mask) == 12 and paper_bytes(mask, state) == 20


def test_shannon_bound() -> None:
    assert shannon_bound_bits(8, 4) == 4 * 32 + 8 * 1.0
    assert shannon_bound_bits(100, 0) == 0.0 and shannon_bound_bits(100, 100, 16) == 1600.0
    assert shannon_bound_bits(0, 0) == 0.0
    assert shannon_bound_bits(1000, 50) == pytest.approx(50 * 32 + 1000 * binary_entropy(0.05))
    assert binary_entropy(0.05) == pytest.approx(0.28639695711595625)
    with pytest.raises(ValueError, match="kept <= n"):
        shannon_bound_bits(10, 11)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_mask_state_mismatch_errors() -> None:
    state, mask = _pruned(0.5)
    with pytest.raises(ValueError, match="'nope' is not in the state"):
        encode(state, {**mask, "nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        encode(state, {"fc.weight": torch.ones(17, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be a torch.bool tensor"):
        encode(state, {"fc.weight": torch.ones(5, 17)})
    dirty = dict(state, **{"fc.weight": torch.ones(5, 17)})
    with pytest.raises(ValueError, match="'fc.weight' holds .* non-zero value"):
        encode(dirty, mask)
    nan = dict(state, **{"fc.weight": torch.full((5, 17), float("nan"))})
    with pytest.raises(ValueError, match="non-zero value"):
        encode(nan, mask)
    encode(dirty, mask, encoding=Encoding.DENSE)  # dense loses nothing: allowed
    with pytest.raises(ValueError, match="state is empty"):
        encode({})
    with pytest.raises(ValueError, match="dtype torch.complex64"):
        encode({"c": torch.zeros(2, dtype=torch.complex64)})


def _reframe(body: bytes, payload: int = 0) -> bytes:
    return struct.pack("<4sBBII", MAGIC, 1, payload, len(body), zlib.crc32(body)) + body


def test_corrupt_and_truncated_inputs() -> None:
    state, mask = _pruned(0.9)
    data = encode(state, mask, compress_mask=True)
    with pytest.raises(CodecError, match="shorter than the 14-byte prefix"):
        decode(data[:5])
    with pytest.raises(CodecError, match="not a fedsparse wire message"):
        decode(b"PK\x03\x04" + data[4:])
    with pytest.raises(CodecError, match="unsupported wire version 9"):
        decode(data[:4] + b"\x09" + data[5:])
    with pytest.raises(CodecError, match="message truncated: the prefix announces"):
        decode(data[:-3])
    with pytest.raises(CodecError, match="trailing byte"):
        decode(data + b"\x00")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(CodecError, match="CRC32"):
        decode(bytes(flipped))
    body = data[14:]
    # Well-framed but inconsistent bodies (CRC recomputed): each names what is wrong.
    with pytest.raises(CodecError, match="unread byte"):
        decode(_reframe(body + b"\x00\x00"))
    with pytest.raises(CodecError, match="values of tensor 'fc.bias'"):
        decode(_reframe(body[:-3]))
    with pytest.raises(CodecError, match="unknown option codes"):
        decode(_reframe(b"\x07" + body[1:]))
    with pytest.raises(CodecError, match="not valid zstd"):
        decode(_reframe(body, payload=1))
    with pytest.raises(CodecError, match="truncated: reading the options"):
        decode(_reframe(b"\x01"))
    raw = encode(state, mask)[14:]
    with pytest.raises(CodecError, match="truncated: reading the name of tensor #0"):
        decode(_reframe(raw[:9]))
    # Mask section of the wrong length.
    with pytest.raises(CodecError, match="mask section has"):
        decode(_reframe(encode({"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.bool)})[14:].replace(
            b"\x01\x00\x00\x00\x00", b"\x02\x00\x00\x00\x00\x00")))
    assert isinstance(CodecError("x"), ValueError)


def test_round_trip_random_states_many_seeds() -> None:
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        density = float(torch.rand(1, generator=gen))
        state, mask = _pruned(1 - density, seed)
        for opts in ALL_OPTIONS:
            got, got_mask = decode(encode(state, mask, level=1, **opts))
            assert _bits_equal(got, state) and all(torch.equal(got_mask[k], mask[k]) for k in mask)


def test_round_trip_pruned_model_state_bit_exact() -> None:
    from fedsparse_lib.models import BrainAgeCNN
    from fedsparse_lib.pruning import apply_mask, global_magnitude_mask

    torch.manual_seed(0)
    state = BrainAgeCNN((12, 12, 12), width=0.125).state_dict()
    mask = global_magnitude_mask(state, 0.95)
    apply_mask(state, mask)
    for opts in ALL_OPTIONS:
        got, got_mask = decode(encode(state, mask, **opts))
        assert _bits_equal(got, dict(state)) and all(torch.equal(got_mask[k], mask[k]) for k in mask)

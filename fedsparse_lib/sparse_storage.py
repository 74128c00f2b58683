"""Sparse model storage: a pruned model as bit mask + kept values, and what that saves.

A pruned model is stored as, per masked tensor, its mask packed to bits (``np.packbits``, big
bit order, ``ceil(n / 8)`` uint8) and its *kept* values in row-major order, in the tensor's own
dtype (float32 for :class:`~fedsparse_lib.models.BrainAgeCNN`). Tensors the mask does not name
(e.g. biases left dense) are stored dense. The container is a safetensors file (no pickle,
DESIGN.md decision 4) whose metadata lists every tensor in state order with its shape, dtype and
kind, so that shapes are known without the padding of the packed bits.

The mask is stored, never derived from ``w != 0``: a kept weight that is exactly 0.0 stays kept.
The round trip is exact: kept values bit for bit (NaN payloads and -0.0 included), the same mask,
and +0.0 at every pruned coordinate.

Keys in the file: ``mask/<name>`` (uint8, packed bits), ``values/<name>`` (1-D, kept values),
``dense/<name>`` (the tensor as is). Metadata: ``format`` = ``"fedsparse.sparse"``,
``version`` = ``"1"``, ``bitorder`` = ``"big"`` and ``tensors``, a JSON list of
``{"name", "shape", "dtype", "kind"}`` with kind ``"sparse"`` or ``"dense"``.

:func:`storage_report` compares the sizes of real bytes: the dense safetensors file, its gzip,
this sparse file and its zstd compression, beside the FedSparsify paper's formula (non-zero
count x 4 bytes), which ignores the cost of saying *where* the non-zeros are.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "STORAGE_FORMATS",
    "decode_sparse",
    "encode_sparse",
    "load_sparse",
    "pack_sparse",
    "save_sparse",
    "storage_report",
    "unpack_sparse",
]

FORMAT = "fedsparse.sparse"
_VERSION = "1"
_BITORDER = "big"
#: Row labels of :func:`storage_report`, in order.
STORAGE_FORMATS: tuple[str, ...] = (
    "dense_float32",
    "dense_float32_gzip",
    "bitmask_values",
    "bitmask_values_zstd",
    "paper_nonzero_x4",
)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _state_arrays(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Named C-contiguous numpy copies of a module's state dict or of a mapping of tensors."""
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = model_or_state
    else:
        raise ValueError(f"expected a torch.nn.Module or a mapping of names to tensors, "
                         f"got {type(model_or_state).__name__}")
    if not state:
        raise ValueError("the state is empty: nothing to store")
    out = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"state must map str names to torch tensors; {name!r} maps to "
                             f"{type(t).__name__}")
        try:
            out[name] = np.asarray(t.detach().cpu().numpy(), order="C")
        except TypeError as exc:  # bfloat16 and other dtypes numpy cannot hold
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which numpy cannot hold; convert "
                             f"it (e.g. to float32) before storing") from exc
    return out


def _mask_arrays(mask: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``mask`` against ``state`` (names, shapes, bool dtype); numpy bool copies."""
    if not isinstance(mask, Mapping):
        raise ValueError(f"mask must be a mapping of names to bool tensors, got {type(mask).__name__}")
    out = {}
    for name, m in mask.items():
        if name not in state:
            raise ValueError(f"mask tensor {name!r} is not in the state (state has e.g. {list(state)[:3]})")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask tensor {name!r} must be a torch.bool tensor, got {got}")
        if tuple(m.shape) != state[name].shape:
            raise ValueError(f"mask tensor {name!r} has shape {tuple(m.shape)}, the state's tensor has "
                             f"{state[name].shape}")
        out[name] = np.asarray(m.detach().cpu().numpy(), order="C")
    return out


# --------------------------------------------------------------------------------------------
# Pure packing
# --------------------------------------------------------------------------------------------
def pack_sparse(state: nn.Module | Mapping[str, torch.Tensor],
                mask: Mapping[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Split a pruned state into packed mask bits, kept values and dense tensors.

    Parameters
    ----------
    state : torch.nn.Module or mapping of str to torch.Tensor
        The (pruned) weights; a module stands for its ``state_dict()``.
    mask : mapping of str to torch.BoolTensor
        Kept coordinates (``True``) of some tensors of ``state``, same shapes. Every pruned
        coordinate must hold 0 (``apply_mask`` first); tensors not in ``mask`` are stored dense.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
        ``mask/<name>`` (uint8 of length ``ceil(n / 8)``), ``values/<name>`` (1-D, kept values
        in row-major order, the tensor's dtype) for masked tensors; ``dense/<name>`` otherwise.
    metadata : dict of str to str
        The safetensors metadata (format tag, version, bit order, ``tensors`` JSON list).

    Raises
    ------
    ValueError
        Naming the tensor, when a mask tensor is not in the state, has another shape or is not
        bool, or when a pruned coordinate holds a non-zero value (it would be lost).
    """
    arrays_in = _state_arrays(state)
    masks = _mask_arrays(mask, arrays_in)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for name, a in arrays_in.items():
        kind = "sparse" if name in masks else "dense"
        entries.append({"name": name, "shape": list(a.shape), "dtype": a.dtype.name, "kind": kind})
        if kind == "dense":
            arrays[f"dense/{name}"] = a
            continue
        m = masks[name].reshape(-1)
        flat = a.reshape(-1)
        lost = int(np.count_nonzero(flat[~m]))  # NaN counts as non-zero, -0.0 as zero
        if lost:
            raise ValueError(f"tensor {name!r} holds {lost} non-zero value(s) at pruned coordinates; "
                             f"apply the mask to the weights before storing them")
        arrays[f"mask/{name}"] = np.packbits(m, bitorder=_BITORDER)
        arrays[f"values/{name}"] = np.ascontiguousarray(flat[m])
    metadata = {"format": FORMAT, "version": _VERSION, "bitorder": _BITORDER,
                "tensors": json.dumps(entries, separators=(",", ":"))}
    return arrays, metadata


def unpack_sparse(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str], *,
                  source: str = "sparse model") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`pack_sparse`: rebuild the dense state and the mask.

    Parameters
    ----------
    arrays, metadata
        As returned by :func:`pack_sparse` (or read from a file).
    source : str
        Named in error messages (a file name).

    Returns
    -------
    state : dict of str to torch.Tensor
        Every tensor in its original order, shape and dtype; pruned coordinates are +0.
    mask : dict of str to torch.BoolTensor
        The masked tensors' masks.

    Raises
    ------
    ValueError
        Naming ``source`` and the tensor, for anything inconsistent (missing or extra arrays,
        wrong lengths or dtypes, non-zero padding bits).
    """
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{source}: not a {FORMAT} file (metadata format is {metadata.get('format')!r})")
    if metadata.get("version") != _VERSION or metadata.get("bitorder") != _BITORDER:
        raise ValueError(f"{source}: unsupported version {metadata.get('version')!r} / bit order "
                         f"{metadata.get('bitorder')!r} (expected {_VERSION!r} / {_BITORDER!r})")
    try:
        entries = json.loads(metadata["tensors"])
        specs = [(str(e["name"]), tuple(int(s) for s in e["shape"]), np.dtype(e["dtype"]), e["kind"])
                 for e in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: unreadable tensor list in the metadata ({exc})") from exc
    names = [spec[0] for spec in specs]
    bad = [n for n, shape in zip(names, (spec[1] for spec in specs)) if min(shape, default=0) < 0]
    if len(set(names)) != len(names) or bad:
        raise ValueError(f"{source}: tensor list in the metadata has repeated names or negative sizes "
                         f"({bad[:3] or sorted(n for n in set(names) if names.count(n) > 1)[:3]})")
    expected = set()
    state: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for name, shape, dtype, kind in specs:
        n = math.prod(shape)
        if kind == "dense":
            key = f"dense/{name}"
            expected.add(key)
            a = _get(arrays, key, source)
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{source}: tensor {name!r} is {a.dtype}{list(a.shape)}, the metadata "
                                 f"says {dtype}{list(shape)}")
            state[name] = torch.from_numpy(np.array(a, copy=True))
            continue
        if kind != "sparse":
            raise ValueError(f"{source}: tensor {name!r} has unknown kind {kind!r}")
        expected |= {f"mask/{name}", f"values/{name}"}
        bits = _get(arrays, f"mask/{name}", source)
        values = _get(arrays, f"values/{name}", source)
        if bits.dtype != np.uint8 or bits.shape != ((n + 7) // 8,):
            raise ValueError(f"{source}: mask of {name!r} is {bits.dtype}{list(bits.shape)}, expected "
                             f"uint8[{(n + 7) // 8}] for shape {list(shape)}")
        if n % 8 and bits[-1] & ((1 << (8 - n % 8)) - 1):
            raise ValueError(f"{source}: mask of {name!r} has non-zero padding bits (corrupt)")
        m = np.unpackbits(bits, count=n, bitorder=_BITORDER).astype(bool)
        kept = int(m.sum())
        if values.dtype != dtype or values.shape != (kept,):
            raise ValueError(f"{source}: values of {name!r} are {values.dtype}{list(values.shape)}, the "
                             f"mask keeps {kept} of dtype {dtype}")
        dense = np.zeros(n, dtype=dtype)
        dense[m] = values
        state[name] = torch.from_numpy(dense.reshape(shape))
        mask[name] = torch.from_numpy(m.reshape(shape))
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"{source}: arrays not listed in the metadata: {extra[:5]}")
    return state, mask


def _get(arrays: Mapping[str, np.ndarray], key: str, source: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"{source}: array {key!r} is missing")
    return arrays[key]


# --------------------------------------------------------------------------------------------
# Bytes and files
# --------------------------------------------------------------------------------------------
def encode_sparse(state: nn.Module | Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes of the sparse safetensors file (what :func:`save_sparse` writes).

    Parameters are those of :func:`pack_sparse`. The length of the result is the real storage
    (and wire) size: ``8 + header + packed bits + kept values + dense tensors``.
    """
    from safetensors.numpy import save

    arrays, metadata = pack_sparse(state, mask)
    return save(arrays, metadata=metadata)


def _header(data: bytes, source: str) -> dict:
    if len(data) < 8:
        raise ValueError(f"{source}: {len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{source}: header length {n} exceeds the {len(data)} bytes (truncated or not "
                         f"a safetensors file)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{source}: safetensors header is not a JSON object")
    return header


def decode_sparse(data: bytes, *, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_sparse`: ``(state, mask)`` from the file's bytes.

    Raises
    ------
    ValueError
        Naming ``source``, for bytes that are not a valid sparse model file.
    """
    from safetensors.numpy import load

    metadata = _header(data, source).get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{source}: not a {FORMAT} file (no such format tag in the safetensors metadata)")
    try:
        arrays = load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"{source}: corrupt safetensors data ({exc})") from exc
    return unpack_sparse(arrays, metadata, source=source)


def save_sparse(path: str | os.PathLike, model_or_state: nn.Module | Mapping[str, torch.Tensor],
                mask: Mapping[str, torch.Tensor]) -> int:
    """Write a pruned model as bit mask + kept values, atomically (temp file, then rename).

    Parameters
    ----------
    path : str or os.PathLike
        Target file (conventionally ``*.safetensors``); parent folders are created.
    model_or_state : torch.nn.Module or mapping of str to torch.Tensor
    mask : mapping of str to torch.BoolTensor
        As in :func:`pack_sparse`.

    Returns
    -------
    int
        Bytes written (the file size).
    """
    from .data.synthetic import write_atomic

    data = encode_sparse(model_or_state, mask)
    write_atomic(path, data)
    return len(data)


def load_sparse(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_sparse`.

    Returns
    -------
    state : dict of str to torch.Tensor
        Dense tensors, +0 at pruned coordinates (``model.load_state_dict(state)`` accepts it).
    mask : dict of str to torch.BoolTensor

    Raises
    ------
    ValueError
        Naming the file, when it is not a valid sparse model file.
    """
    target = Path(path)
    return decode_sparse(target.read_bytes(), source=str(target))


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
def storage_report(state: nn.Module | Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], *,
                   gzip_level: int = 6, zstd_level: int = 3) -> pd.DataFrame:
    """Sizes of a pruned model in several formats, all measured on real bytes but the last.

    Parameters
    ----------
    state : torch.nn.Module or mapping of str to torch.Tensor
        Pruned weights (zeros at pruned coordinates).
    mask : mapping of str to torch.BoolTensor
    gzip_level : int, default 6
        gzip compression level (1-9) applied to the dense file.
    zstd_level : int, default 3
        zstd compression level (1-22) applied to the sparse file.

    Returns
    -------
    pandas.DataFrame
        One row per format of :data:`STORAGE_FORMATS`, columns ``format`` (str), ``bytes`` (int)
        and ``ratio_to_dense`` (float, ``bytes / dense bytes``):

        - ``dense_float32``: the safetensors file of every tensor, dense;
        - ``dense_float32_gzip``: that file's bytes through gzip;
        - ``bitmask_values``: the :func:`save_sparse` file (packed mask bits + kept values);
        - ``bitmask_values_zstd``: that file's bytes through zstd;
        - ``paper_nonzero_x4``: the FedSparsify paper's count, 4 bytes per non-zero value of
          the state, with no cost for positions (a formula, not an encoding).
    """
    import zstandard
    from safetensors.numpy import save

    arrays = _state_arrays(state)
    dense = save(arrays)
    sparse = encode_sparse(state, mask)
    sizes = [
        len(dense),
        len(gzip.compress(dense, compresslevel=gzip_level, mtime=0)),
        len(sparse),
        len(zstandard.ZstdCompressor(level=zstd_level).compress(sparse)),
        4 * sum(int(np.count_nonzero(a)) for a in arrays.values()),
    ]
    frame = pd.DataFrame({"format": list(STORAGE_FORMATS), "bytes": pd.Series(sizes, dtype="int64")})
    frame["ratio_to_dense"] = frame["bytes"] / len(dense)
    return frame

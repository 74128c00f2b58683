"""Wire codec: a (possibly sparse) named state as the compact bytes of one message.

Every byte that would cross the network is really encoded, and the reported communication is
``len(encode(...))`` (DESIGN.md decision 3). The options are chosen per message:

- ``encoding``: :attr:`Encoding.DENSE` sends every value of every tensor;
  :attr:`Encoding.BITMASK` sends, for each masked tensor, only its *kept* values (row-major).
- ``values``: :attr:`ValueDType.FLOAT32` (exact, bit for bit) or :attr:`ValueDType.FLOAT16`
  (lossy: float32 tensors are sent as float16 and decoded as ``x.half().float()``; values beyond
  +-65504 become +-inf). Tensors of any other dtype are always sent in their own dtype, exactly.
- ``compress_mask``: zstd of the packed mask bits.
- ``compress_payload``: zstd of the whole body (header, mask and values).

When a mask is given it is always sent (also with ``DENSE``), so ``decode`` returns it: a mask is
data, never derived from ``w != 0``, and a kept weight that is exactly 0.0 stays kept.

Byte layout (little-endian; ``u8/u16/u32`` unsigned integers)::

    prefix (14 bytes, never compressed)
      magic      4  b"FSPW"
      version    u8 (1)
      payload    u8 0 = raw body, 1 = zstd body
      body_len   u32 length of the body as stored
      crc32      u32 zlib.crc32 of the body as stored
    body
      encoding   u8 0 = dense, 1 = bitmask
      values     u8 0 = float32, 1 = float16
      flags      u8 bit 0: a mask is present, bit 1: the mask bits are zstd-compressed
      n_tensors  u32
      n_tensors times, in state order:
        name_len u16, name (UTF-8), dtype u8 (see ``_DTYPE_CODES``), masked u8 (0/1),
        ndim u8, ndim x u32 sizes
      mask_len   u32, then the mask section: the masks of the masked tensors, in state order,
                 flattened row-major and concatenated into one bit stream, ``np.packbits``
                 (big bit order, zero padding to a whole byte), zstd-compressed if flagged
      values     the rest: each tensor in state order, its sent values as raw little-endian bytes

The first kept values of a tensor follow the last of the one before it, with no padding. Decoding
needs nothing but the bytes; every inconsistency (bad magic, version, CRC, truncation, trailing
bytes, unknown codes, section lengths) raises :class:`CodecError` naming what is wrong.

:func:`paper_bytes` is the FedSparsify paper's formula (non-zero count x 4 bytes), reported
beside the real length; :func:`shannon_bound_bits` is the i.i.d. estimate ``kept * value_bits +
n * H(kept / n)`` that a bitmask + values message can be compared against.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Mapping
from enum import Enum

import numpy as np
import torch
import zstandard

__all__ = [
    "MAGIC",
    "VERSION",
    "CodecError",
    "Encoding",
    "ValueDType",
    "binary_entropy",
    "decode",
    "encode",
    "message_bytes",
    "paper_bytes",
    "shannon_bound_bits",
]

if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian
    raise ImportError("fedsparse_lib.federated.codec supports little-endian hosts only")

MAGIC = b"FSPW"
VERSION = 1
_PREFIX = struct.Struct("<4sBBII")  # magic, version, payload codec, body_len, crc32
_OPTIONS = struct.Struct("<BBBI")  # encoding, values, flags, n_tensors
_FLAG_MASK = 0x01
_FLAG_MASK_ZSTD = 0x02
_MAX_U32 = 2**32 - 1


class CodecError(ValueError):
    """Bytes that are not a valid message of this codec (corrupt, truncated, unknown version)."""


class Encoding(str, Enum):
    """How tensor values are sent."""

    #: Every value of every tensor.
    DENSE = "dense"
    #: Packed mask bits + only the kept values of each masked tensor.
    BITMASK = "bitmask"


class ValueDType(str, Enum):
    """On-wire dtype of float32 tensors' values."""

    #: Exact, bit for bit.
    FLOAT32 = "float32"
    #: Lossy: half the bytes; decodes to ``x.half().float()``.
    FLOAT16 = "float16"


_ENCODING_CODES = {Encoding.DENSE: 0, Encoding.BITMASK: 1}
_VALUE_CODES = {ValueDType.FLOAT32: 0, ValueDType.FLOAT16: 1}
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
    torch.int64: 4, torch.int32: 5, torch.int16: 6, torch.int8: 7, torch.uint8: 8, torch.bool: 9,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def _enum(cls: type[Enum], value: object, what: str) -> Enum:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {[e.value for e in cls]}, got {value!r}") from None


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of str names to tensors, got {type(state).__name__}")
    if not state:
        raise ValueError("the state is empty: nothing to encode")
    out = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"state must map str names to torch tensors; {name!r} maps to {type(t).__name__}")
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the codec does not send "
                             f"(supported: {sorted(str(d) for d in _DTYPE_CODES)})")
        if len(name.encode("utf-8")) > 0xFFFF:
            raise ValueError(f"tensor name {name[:40]!r}... is longer than 65535 bytes")
        if t.ndim > 255 or any(s > _MAX_U32 for s in t.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}: at most 255 axes of at "
                             f"most {_MAX_U32} each")
        out[name] = t.detach().cpu().contiguous()
    return out


def _check_mask(mask: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(mask, Mapping):
        raise ValueError(f"mask must be a mapping of names to bool tensors, got {type(mask).__name__}")
    for name, m in mask.items():
        if name not in state:
            raise ValueError(f"mask tensor {name!r} is not in the state (state has e.g. {list(state)[:3]})")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask tensor {name!r} must be a torch.bool tensor, got {got}")
        if m.shape != state[name].shape:
            raise ValueError(f"mask tensor {name!r} has shape {tuple(m.shape)}, the state's tensor has "
                             f"{tuple(state[name].shape)}")
    # State order, whatever the mask's own order.
    return {name: mask[name].detach().cpu().contiguous() for name in state if name in mask}


def _raw(t: torch.Tensor) -> bytes:
    """Raw bytes (native order, little-endian on every supported host) of a contiguous tensor."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(buf: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A fresh, writable 1-D tensor of ``dtype`` from raw bytes."""
    if not len(buf):
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy()).view(dtype)


def _wire_dtype(dtype: torch.dtype, values: ValueDType) -> torch.dtype:
    return torch.float16 if (dtype == torch.float32 and values is ValueDType.FLOAT16) else dtype


# --------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------
def encode(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None, *,
           encoding: Encoding | str = Encoding.BITMASK, values: ValueDType | str = ValueDType.FLOAT32,
           compress_mask: bool = False, compress_payload: bool = False, level: int = 3) -> bytes:
    """Encode a named state (and its mask) as the bytes of one message.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The tensors to send, in the order they are to be decoded.
    mask : mapping of str to torch.BoolTensor, optional
        Kept coordinates (``True``) of some tensors of ``state`` (same shapes). Tensors it does
        not name are sent dense. With :attr:`Encoding.BITMASK`, every pruned coordinate must
        hold 0 (``-0.0`` is accepted and decodes to ``+0.0``).
    encoding : Encoding, default BITMASK
        :attr:`Encoding.DENSE` (all values, plus the mask bits if a mask is given) or
        :attr:`Encoding.BITMASK` (mask bits + kept values).
    values : ValueDType, default FLOAT32
        On-wire dtype of float32 tensors; :attr:`ValueDType.FLOAT16` is lossy.
    compress_mask : bool, default False
        zstd-compress the packed mask bits.
    compress_payload : bool, default False
        zstd-compress the whole body.
    level : int, default 3
        zstd level of both compressions.

    Returns
    -------
    bytes

    Raises
    ------
    ValueError
        Naming the tensor, when the state or mask is malformed, the mask does not match the state,
        or (``BITMASK``) a pruned coordinate holds a non-zero value that would be lost.
    """
    encoding = _enum(Encoding, encoding, "encoding")
    values = _enum(ValueDType, values, "values")
    tensors = _check_state(state)
    masks = _check_mask(mask, tensors) if mask is not None else {}
    flags = (_FLAG_MASK if mask is not None else 0) | (_FLAG_MASK_ZSTD if (mask is not None and compress_mask) else 0)

    parts = [_OPTIONS.pack(_ENCODING_CODES[encoding], _VALUE_CODES[values], flags, len(tensors))]
    for name, t in tensors.items():
        raw_name = name.encode("utf-8")
        parts.append(struct.pack(f"<H{len(raw_name)}sBBB{t.ndim}I", len(raw_name), raw_name,
                                 _DTYPE_CODES[t.dtype], int(name in masks), t.ndim, *t.shape))

    if mask is not None:
        bits = np.concatenate([m.reshape(-1).numpy() for m in masks.values()]) if masks else np.empty(0, bool)
        packed = np.packbits(bits, bitorder="big").tobytes()
        if compress_mask:
            packed = zstandard.ZstdCompressor(level=level).compress(packed)
        if len(packed) > _MAX_U32:
            raise ValueError(f"the mask section has {len(packed)} bytes, more than a u32 can describe")
        parts += [struct.pack("<I", len(packed)), packed]
    else:
        parts.append(struct.pack("<I", 0))

    for name, t in tensors.items():
        flat = t.reshape(-1)
        if name in masks and encoding is Encoding.BITMASK:
            m = masks[name].reshape(-1)
            lost = int(torch.count_nonzero(flat.masked_fill(m, 0)))  # NaN counts as non-zero
            if lost:
                raise ValueError(f"tensor {name!r} holds {lost} non-zero value(s) at pruned coordinates of "
                                 f"its mask; they would be lost (apply the mask first)")
            flat = flat[m]
        parts.append(_raw(flat.to(_wire_dtype(t.dtype, values)).contiguous()))

    body = b"".join(parts)
    if compress_payload:
        body = zstandard.ZstdCompressor(level=level).compress(body)
    if len(body) > _MAX_U32:
        raise ValueError(f"the message body has {len(body)} bytes, more than a u32 can describe")
    return _PREFIX.pack(MAGIC, VERSION, int(bool(compress_payload)), len(body), zlib.crc32(body)) + body


class _Reader:
    """Bounds-checked reads from a body, with errors that name the field."""

    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise CodecError(f"message truncated: reading {what} needs {n} bytes at offset {self.pos}, "
                             f"only {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _zstd_decompress(data: bytes | memoryview, what: str) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(bytes(data))
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt message: the {what} is not valid zstd data ({exc})") from None


def decode(data: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, torch.BoolTensor] | None]:
    """Decode the bytes of :func:`encode`.

    Parameters
    ----------
    data : bytes
        One whole message.

    Returns
    -------
    state : dict of str to torch.Tensor
        The tensors in the order they were encoded, each in its original dtype and shape.
        Exact (bit for bit) for float32 values; with :attr:`ValueDType.FLOAT16`, float32 tensors
        equal ``x.half().float()``. Pruned coordinates hold ``+0.0``.
    mask : dict of str to torch.BoolTensor or None
        The mask that was sent (keys in state order), or ``None`` if none was.

    Raises
    ------
    CodecError
        (a ``ValueError``) naming what is wrong: not a message of this codec, unsupported
        version, truncated, CRC mismatch, unknown option codes, inconsistent section lengths or
        trailing bytes.
    """
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise CodecError(f"message truncated: {len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, payload, body_len, crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not a fedsparse wire message: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported wire version {version} (this codec reads version {VERSION})")
    if payload not in (0, 1):
        raise CodecError(f"corrupt message: unknown payload compression code {payload}")
    body = data[_PREFIX.size:]
    if len(body) < body_len:
        raise CodecError(f"message truncated: the prefix announces {body_len} body bytes, got {len(body)}")
    if len(body) > body_len:
        raise CodecError(f"corrupt message: {len(body) - body_len} trailing byte(s) after the "
                         f"{body_len}-byte body")
    if zlib.crc32(body) != crc:
        raise CodecError(f"corrupt message: CRC32 of the body is {zlib.crc32(body):#010x}, the prefix says {crc:#010x}")
    if payload == 1:
        body = _zstd_decompress(body, "compressed body")

    r = _Reader(body)
    enc_code, val_code, flags, n_tensors = r.unpack(_OPTIONS.format, "the options")
    encoding = {v: k for k, v in _ENCODING_CODES.items()}.get(enc_code)
    values = {v: k for k, v in _VALUE_CODES.items()}.get(val_code)
    if encoding is None or values is None or flags & ~(_FLAG_MASK | _FLAG_MASK_ZSTD):
        raise CodecError(f"corrupt message: unknown option codes (encoding {enc_code}, values {val_code}, "
                         f"flags {flags:#04x})")
    has_mask = bool(flags & _FLAG_MASK)

    entries = []
    for i in range(n_tensors):
        (name_len,) = r.unpack("<H", f"the name length of tensor #{i}")
        try:
            name = bytes(r.take(name_len, f"the name of tensor #{i}")).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"corrupt message: the name of tensor #{i} is not UTF-8") from None
        dtype_code, masked, ndim = r.unpack("<BBB", f"the dtype/shape of tensor {name!r}")
        if dtype_code not in _CODE_DTYPES or masked not in (0, 1) or (masked and not has_mask):
            raise CodecError(f"corrupt message: tensor {name!r} has dtype code {dtype_code}, masked "
                             f"flag {masked} (mask present: {has_mask})")
        shape = r.unpack(f"<{ndim}I", f"the shape of tensor {name!r}")
        if any(e[0] == name for e in entries):
            raise CodecError(f"corrupt message: tensor {name!r} appears twice")
        entries.append((name, _CODE_DTYPES[dtype_code], bool(masked), tuple(shape)))

    (mask_len,) = r.unpack("<I", "the mask section length")
    mask_section = r.take(mask_len, "the mask section")
    masks: dict[str, torch.Tensor] = {}
    if has_mask:
        if flags & _FLAG_MASK_ZSTD:
            mask_section = _zstd_decompress(mask_section, "compressed mask section")
        n_bits = sum(math.prod(shape) for _, _, masked, shape in entries if masked)
        if len(mask_section) != (n_bits + 7) // 8:
            raise CodecError(f"corrupt message: the mask section has {len(mask_section)} bytes, the "
                             f"{n_bits} mask bits need {(n_bits + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(mask_section, np.uint8), bitorder="big")
        if bits[n_bits:].any():
            raise CodecError("corrupt message: the padding bits after the mask are not zero")
        start = 0
        for name, _, masked, shape in entries:
            if masked:
                n = math.prod(shape)
                masks[name] = torch.from_numpy(bits[start:start + n].astype(bool)).reshape(shape)
                start += n
    elif mask_len:
        raise CodecError(f"corrupt message: a {mask_len}-byte mask section but no mask flag")

    state: dict[str, torch.Tensor] = {}
    for name, dtype, masked, shape in entries:
        n = math.prod(shape)
        sparse = masked and encoding is Encoding.BITMASK
        count = int(masks[name].sum()) if sparse else n
        wire = _wire_dtype(dtype, values)
        size = torch.empty(0, dtype=wire).element_size()
        sent = _from_raw(r.take(count * size, f"the values of tensor {name!r} ({count} x {wire})"), wire)
        sent = sent.to(dtype)
        if sparse:
            full = torch.zeros(n, dtype=dtype)
            full[masks[name].reshape(-1)] = sent
            sent = full
        state[name] = sent.reshape(shape)
    if r.pos != len(body):
        raise CodecError(f"corrupt message: {len(body) - r.pos} unread byte(s) after the last tensor's values")
    return state, (masks if has_mask else None)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
def message_bytes(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None,
                  **options: object) -> int:
    """The real length in bytes of ``encode(state, mask, **options)``: the reported communication."""
    return len(encode(state, mask, **options))  # type: ignore[arg-type]


def paper_bytes(mask: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor] | None = None) -> int:
    """The FedSparsify paper's size formula: non-zero count x 4 bytes (ignores where they are).

    Parameters
    ----------
    mask : mapping of str to torch.BoolTensor
        Its ``True`` count is the non-zero count of the masked tensors.
    state : mapping of str to torch.Tensor, optional
        If given, the non-zero values of its tensors that ``mask`` does not name are added.

    Returns
    -------
    int
    """
    kept = sum(int(m.sum()) for m in mask.values())
    if state is not None:
        kept += sum(int(torch.count_nonzero(t)) for name, t in state.items() if name not in mask)
    return 4 * kept


def binary_entropy(p: float) -> float:
    """``H(p) = -p log2 p - (1 - p) log2 (1 - p)`` in bits, 0 at ``p`` in {0, 1}."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if p in (0.0, 1.0):
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def shannon_bound_bits(n: int, kept: int, value_bits: int = 32) -> float:
    """I.i.d. Shannon estimate of a sparse tensor's size: ``kept * value_bits + n * H(kept / n)``.

    The values are counted at ``value_bits`` each (incompressible) and the mask at the entropy of
    i.i.d. Bernoulli(density) bits. Not a floor for real masks, whose per-layer structure has
    lower entropy.

    Parameters
    ----------
    n : int
        Number of coordinates.
    kept : int
        Number of kept coordinates, ``0 <= kept <= n``.
    value_bits : int, default 32
        Bits per kept value.

    Returns
    -------
    float
        Bits.
    """
    if n < 0 or not 0 <= kept <= n:
        raise ValueError(f"need 0 <= kept <= n, got n={n!r}, kept={kept!r}")
    if n == 0:
        return 0.0
    return kept * value_bits + n * binary_entropy(kept / n)

"""The two messages of a round, as real bytes, and the server's check of what comes back.

- Broadcast (server -> client): the global weights and, once anything is pruned, the mask.
- Update (client -> server): the client's weights, its mask when anything is pruned, and any
  strategy extras (e.g. PruneFL's squared gradients, sent dense under ``sqgrad/`` names).

Both engines (in-process and Flower) send exactly these bytes, so the communication they report is
``len(message)`` (DESIGN.md decision 3). A dense model (all-ones mask) is sent with
:attr:`~fedsparse_lib.federated.codec.Encoding.DENSE` and no mask; a sparse one as bit mask + kept
values. :class:`WireOptions` chooses the value dtype and zstd, per run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from .aggregation import all_finite
from .codec import Encoding, ValueDType, decode, encode, paper_bytes
from .strategies import SQGRAD_PREFIX, ClientUpdate, ServerState

__all__ = ["ClientFault", "WireOptions", "check_update", "decode_broadcast", "decode_update", "encode_broadcast",
           "encode_update"]


class ClientFault(ValueError):
    """A client's update cannot be used this round (the reason is the message)."""


@dataclass(frozen=True)
class WireOptions:
    """Codec options of every message of a run.

    Attributes
    ----------
    values : {"float32", "float16"}
        On-wire dtype of the values; float16 is lossy (the clients and server then work with the
        rounded values, as they would in a real deployment).
    compress_mask : bool, default True
        zstd on the mask bits (lossless, cheap).
    compress_payload : bool, default False
        zstd on the whole message (lossless; also squeezes the float exponents).
    """

    values: str = "float32"
    compress_mask: bool = True
    compress_payload: bool = False

    def __post_init__(self) -> None:
        ValueDType(self.values)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _sparse(mask: Mapping[str, torch.Tensor]) -> bool:
    return any(not bool(m.all()) for m in mask.values())


def _encode(state: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], wire: WireOptions) -> bytes:
    if _sparse(mask):
        return encode(state, mask, encoding=Encoding.BITMASK, values=wire.values, compress_mask=wire.compress_mask,
                      compress_payload=wire.compress_payload)
    return encode(state, None, encoding=Encoding.DENSE, values=wire.values, compress_payload=wire.compress_payload)


def encode_broadcast(state: ServerState, wire: WireOptions) -> tuple[bytes, int]:
    """The broadcast message of ``state`` and the paper's byte count for it."""
    return _encode(state.weights, state.mask, wire), paper_bytes(state.mask, state.weights)


def decode_broadcast(message: bytes, ones_like: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                        dict[str, torch.Tensor]]:
    """Weights and mask of a broadcast; a message without a mask means all-ones over ``ones_like``'s names."""
    weights, mask = decode(message)
    if mask is None:
        mask = {k: torch.ones_like(v, dtype=torch.bool) for k, v in ones_like.items()}
    return weights, mask


def encode_update(update: ClientUpdate, wire: WireOptions) -> tuple[bytes, int]:
    """The upload message of ``update`` (weights, mask, extras) and the paper's byte count."""
    state = {**update.weights, **update.extras}
    return _encode(state, update.mask, wire), paper_bytes(update.mask, state)


def decode_update(message: bytes, *, client_id: int, num_examples: int, train_loss: float, train_seconds: float,
                  reference: ServerState) -> ClientUpdate:
    """Rebuild a :class:`ClientUpdate` from its bytes and check it (:func:`check_update`)."""
    state, mask = decode(message)
    if mask is None:
        mask = {k: torch.ones_like(v) for k, v in reference.mask.items()}
    extras = {k: v for k, v in state.items() if k.startswith(SQGRAD_PREFIX)}
    weights = {k: v for k, v in state.items() if not k.startswith(SQGRAD_PREFIX)}
    update = ClientUpdate(client_id=client_id, weights=weights, mask=mask, num_examples=num_examples,
                          train_loss=train_loss, extras=extras, train_seconds=train_seconds)
    check_update(update, reference)
    return update


def check_update(update: ClientUpdate, reference: ServerState) -> None:
    """Raise :class:`ClientFault` if ``update`` cannot be aggregated with ``reference``'s model.

    Checks: the same tensor names, shapes and dtypes as the global weights, a mask over the same
    names and shapes, finite weights and extras, a positive example count and a finite loss.
    """
    if not isinstance(update.num_examples, int) or update.num_examples < 1:
        raise ClientFault(f"num_examples must be a positive integer, got {update.num_examples!r}")
    if not math.isfinite(update.train_loss):
        raise ClientFault(f"training loss is {update.train_loss} (diverged)")
    names, expected = list(update.weights), list(reference.weights)
    if set(names) != set(expected):
        raise ClientFault(f"tensor names differ: missing {sorted(set(expected) - set(names))[:3]}, "
                          f"unexpected {sorted(set(names) - set(expected))[:3]}")
    for name, ref in reference.weights.items():
        got = update.weights[name]
        if got.shape != ref.shape:
            raise ClientFault(f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise ClientFault(f"{name} has dtype {got.dtype}, expected {ref.dtype}")
    for name, value in {**update.weights, **update.extras}.items():
        if value.is_floating_point() and not all_finite(value):
            raise ClientFault(f"{name} has {int((~torch.isfinite(value)).sum())} non-finite value(s)")
    if set(update.mask) != set(reference.mask):
        raise ClientFault("mask names differ from the global mask's")
    for name, ref in reference.mask.items():
        if update.mask[name].shape != ref.shape or update.mask[name].dtype != torch.bool:
            raise ClientFault(f"mask {name} has shape {tuple(update.mask[name].shape)} / dtype "
                              f"{update.mask[name].dtype}, expected {tuple(ref.shape)} / torch.bool")

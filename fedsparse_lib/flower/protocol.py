"""What crosses Flower: message types, record names, and our codec bytes inside a Flower record.

A round is three kinds of Flower ``Message`` (Message API of flwr >= 1.20):

``query.hello``       server -> every node, once: "who are you?"; the reply's ``metrics`` give the
                      node's ``client_id``, ``partition_id`` and ``num_examples``.
``query.initialize``  server -> the score client, once, only for strategies whose initial mask
                      is scored on a client's data (SNIP, GraSP, PruneFL): the client runs
                      :meth:`Strategy.initialize` and sends back the initial state (lossless).
``train``             server -> the round's clients: ``payload`` is the broadcast of
                      :func:`~fedsparse_lib.federated.messages.encode_broadcast`, ``config`` the
                      round's :class:`~fedsparse_lib.federated.strategies.ClientTask` and the
                      run's settings; the reply's ``payload`` is
                      :func:`~fedsparse_lib.federated.messages.encode_update`'s bytes and its
                      ``metrics`` the numbers that travel beside them.

The codec bytes travel as the ``data`` of one Flower ``Array`` (dtype ``uint8``, stype
``fedsparse.codec``) inside an ``ArrayRecord``: Flower forwards them untouched (in chunks), so the
communication reported is ``len`` of exactly these bytes, as in the in-process engine. Flower's
envelope (metadata, the small config and metric records) is not counted there;
:class:`~fedsparse_lib.flower.inline.InlineGrid` measures it separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from ..federated.messages import WireOptions
from ..federated.strategies import ClientTask
from ..training import TrainConfig

__all__ = ["MessageKind", "Record", "payload_bytes", "payload_record", "round_config", "settings_from_config"]

PAYLOAD_ARRAY = "message"
PAYLOAD_STYPE = "fedsparse.codec"


class MessageKind(str, Enum):
    """Flower message types of a federation (``category.action``)."""

    HELLO = "query.hello"
    INITIALIZE = "query.initialize"
    TRAIN = "train"


class Record(str, Enum):
    """Names of the records inside a message's ``RecordDict``."""

    PAYLOAD = "payload"  # ArrayRecord: one Array holding our codec bytes
    CONFIG = "config"  # ConfigRecord: server -> client settings
    METRICS = "metrics"  # MetricRecord: client -> server numbers


def payload_record(message: bytes) -> ArrayRecord:
    """Our codec bytes as an ``ArrayRecord`` holding one ``uint8`` Array (no copy of the meaning)."""
    if not isinstance(message, (bytes, bytearray)):
        raise TypeError(f"payload must be bytes, got {type(message).__name__}")
    data = bytes(message)
    array = Array(dtype="uint8", shape=(len(data),), stype=PAYLOAD_STYPE, data=data)
    return ArrayRecord({PAYLOAD_ARRAY: array})


def payload_bytes(message: Message) -> bytes:
    """The codec bytes carried by ``message`` (raises ``ValueError`` naming what is missing)."""
    content = message.content
    if Record.PAYLOAD.value not in content.array_records:
        raise ValueError(f"message has no {Record.PAYLOAD.value!r} ArrayRecord "
                         f"(records: {sorted(content.keys())})")
    record = content.array_records[Record.PAYLOAD.value]
    if PAYLOAD_ARRAY not in record:
        raise ValueError(f"the {Record.PAYLOAD.value!r} record has no {PAYLOAD_ARRAY!r} array")
    array = record[PAYLOAD_ARRAY]
    if array.stype != PAYLOAD_STYPE:
        raise ValueError(f"payload array has stype {array.stype!r}, expected {PAYLOAD_STYPE!r}")
    return array.data


def round_config(task: ClientTask, *, local_epochs: int, seed: int, train_config: TrainConfig,
                 wire: WireOptions) -> ConfigRecord:
    """The ``config`` record of a ``train`` (or ``initialize``) message: the task plus the run's settings.

    The server is the one source of the settings a client needs (epochs, optimizer, seed, how to
    encode its upload), so a client cannot drift from the run's configuration.
    """
    return ConfigRecord({**task.to_config(), "local_epochs": int(local_epochs), "seed": int(seed),
                         "lr": float(train_config.lr), "optimizer": train_config.optimizer,
                         "momentum": float(train_config.momentum),
                         "weight_decay": float(train_config.weight_decay), "values": wire.values,
                         "compress_mask": bool(wire.compress_mask),
                         "compress_payload": bool(wire.compress_payload)})


def settings_from_config(config: Mapping[str, Any]) -> tuple[ClientTask, int, int, TrainConfig, WireOptions]:
    """Inverse of :func:`round_config`: ``(task, local_epochs, seed, train_config, wire)``."""
    missing = [k for k in ("server_round", "local_epochs", "seed", "lr", "optimizer", "values") if k not in config]
    if missing:
        raise ValueError(f"config record lacks {missing} (got {sorted(config)})")
    train_config = TrainConfig(lr=float(config["lr"]), optimizer=str(config["optimizer"]),
                               momentum=float(config["momentum"]), weight_decay=float(config["weight_decay"]))
    wire = WireOptions(values=str(config["values"]), compress_mask=bool(config["compress_mask"]),
                       compress_payload=bool(config["compress_payload"]))
    return (ClientTask.from_config(config), int(config["local_epochs"]), int(config["seed"]), train_config, wire)

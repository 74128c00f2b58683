"""Run a whole Flower federation in this process: for tests, notebooks and demos (no Ray).

Flower 1.41's own simulation (``flwr.simulation.run_simulation`` and ``flwr run`` on a local
simulation) always starts its Ray backend, which ``flwr`` does not install by default.
:class:`InlineGrid` is a Flower ``Grid`` (the object a ServerApp's main function talks to) that
delivers each message to the ClientApp of its destination node in this process, one after another,
in the order sent. Every message, both ways, is serialised to Flower's protobuf wire form and
parsed back, so what the ClientApp and the ServerApp see is what they would receive over gRPC; an
exception raised by the ClientApp becomes an error reply, as on a SuperNode.

:func:`run_flower` runs the real :class:`~fedsparse_lib.flower.server_app.FlowerServer` and
ClientApp over an :class:`InlineGrid`, with the arguments of
:func:`~fedsparse_lib.federated.simulation.run_federated`; for the same seed both give the same
final weights, masks and communication, bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import torch
from flwr.app import Context, Error, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import Dataset

from ..federated.messages import WireOptions
from ..federated.simulation import DatasetClient
from ..federated.strategies import Strategy
from ..training import TrainConfig
from .client_app import FaultFn, by_partition, make_client_app
from .server_app import FlowerResult, FlowerServer

__all__ = ["InlineGrid", "run_flower"]

logger = logging.getLogger(__name__)


def _wire_roundtrip(message: Message) -> tuple[Message, int]:
    """``message`` as Flower serialises it for the network, parsed back, and the serialised length."""
    data = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data)), len(data)


class InlineGrid(Grid):
    """A Flower ``Grid`` whose nodes are one ClientApp run in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app every node runs.
    node_configs : sequence of mapping
        One node config per node (Flower's ``context.node_config``), e.g.
        ``{"partition-id": 0, "num-partitions": 4}``.
    run_config : mapping, optional
        The run config the nodes (and :meth:`run_server_app`'s server) see
        (``context.run_config``).
    seed : int, default 0
        Seed of the node ids (random 63-bit integers, as Flower's).

    Attributes
    ----------
    traffic : list of dict
        One row per message: group_id, message_type, node_id, direction (``down`` = to the node,
        ``up`` = its reply), bytes (the serialised message, envelope included), seconds (the
        ClientApp's run time, on ``up`` rows).
    """

    def __init__(self, client_app: ClientApp, node_configs: Sequence[Mapping[str, UserConfigValue]], *,
                 run_config: Mapping[str, UserConfigValue] | None = None, seed: int = 0) -> None:
        if not node_configs:
            raise ValueError("need at least one node config")
        rng = np.random.default_rng(seed)
        node_ids: list[int] = []
        while len(node_ids) < len(node_configs):
            node_id = int(rng.integers(2, 2**63 - 1))
            if node_id not in node_ids and node_id != SUPERLINK_NODE_ID:
                node_ids.append(node_id)
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self._run = Run.create_empty(int(rng.integers(1, 2**63 - 1)))
        self._contexts = {n: Context(run_id=self._run.run_id, node_id=n, node_config=dict(cfg), state=RecordDict(),
                                     run_config=dict(self.run_config))
                          for n, cfg in zip(node_ids, node_configs, strict=True)}
        self._replies: dict[str, tuple[Message, float]] = {}
        self.traffic: list[dict[str, Any]] = []

    # -- Grid interface -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the replies for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            if node_id not in self._contexts:
                raise ValueError(f"message to unknown node {node_id}; nodes: {list(self._contexts)}")
            message.metadata.__dict__["_message_id"] = str(uuid4())  # the SuperLink's job, as InMemoryGrid does
            received, size = _wire_roundtrip(message)
            group, kind = message.metadata.group_id, message.metadata.message_type
            self.traffic.append({"group_id": group, "message_type": kind, "node_id": node_id, "direction": "down",
                                 "bytes": size, "seconds": 0.0})
            start = time.perf_counter()
            try:
                reply = self.client_app(received, self._contexts[node_id])
            except Exception as exc:  # as a SuperNode does: the failure becomes an error reply
                logger.info("node %s: ClientApp raised on %s %s: %s", node_id, kind, group, exc, exc_info=True)
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=received)
            seconds = time.perf_counter() - start
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            back, size = _wire_roundtrip(reply)
            self.traffic.append({"group_id": group, "message_type": kind, "node_id": node_id, "direction": "up",
                                 "bytes": size, "seconds": seconds})
            self._replies[message.metadata.message_id] = (back, seconds)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i)[0] for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver and collect; with ``timeout``, replies whose ClientApp ran longer are dropped (late)."""
        ids = list(self.push_messages(messages))
        if timeout is not None:
            for i in ids:
                if i in self._replies and self._replies[i][1] > timeout:
                    late, seconds = self._replies.pop(i)
                    logger.info("node %s replied after %.2f s > timeout %s s: dropped", late.metadata.src_node_id,
                                seconds, timeout)
        return self.pull_messages(ids)

    # -- running a ServerApp ----------------------------------------------------------------------
    def run_server_app(self, server_app: ServerApp, *,
                       run_config: Mapping[str, UserConfigValue] | None = None) -> Context:
        """Run ``server_app`` over this grid, as the SuperLink would; return its (updated) context."""
        context = Context(run_id=self._run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=dict(self.run_config if run_config is None else run_config))
        with _task_identity(self._run.run_id, SUPERLINK_NODE_ID):
            server_app(self, context)
        return context


@contextmanager
def _task_identity(run_id: int, node_id: int) -> Iterator[None]:
    """Set Flower's process-wide task identity (new messages are stamped with it), then restore it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


def run_flower(strategy: Strategy, model_fn: Callable[[], nn.Module], clients: Sequence[DatasetClient],
               test_set: Dataset | None = None, *, local_epochs: int = 1, tune_rounds: int = 0,
               participation: float = 1.0, train_config: TrainConfig = TrainConfig(), seed: int = 0,
               device: str | torch.device = "cpu", min_clients: int = 1, client_timeout: float | None = None,
               wire: WireOptions = WireOptions(), checkpoint_dir: str | Path | None = None,
               fault_fn: FaultFn | None = None, score_client: int | None = None, eval_batch_size: int = 32,
               progress: bool = True, label: str = "") -> FlowerResult:
    """Run a federation through Flower's ServerApp and ClientApp, in this process.

    Node ``k`` gets ``partition-id = k`` and serves ``clients[k]``. The arguments are those of
    :func:`~fedsparse_lib.federated.simulation.run_federated` (``fault_fn`` runs in the ClientApp;
    ``client_timeout`` drops replies whose ClientApp ran longer, since inline clients cannot be
    interrupted), and the result has the same tables, plus ``nodes`` (node id <-> client id) and
    ``traffic`` (every Flower message's serialised size).

    Returns
    -------
    FlowerResult
    """
    if not clients:
        raise ValueError("no clients")
    ids = [c.client_id for c in clients]
    if len(set(ids)) != len(ids):
        raise ValueError(f"client ids must be distinct, got {ids}")
    server = FlowerServer(strategy, model_fn, num_clients=len(clients), local_epochs=local_epochs,
                          tune_rounds=tune_rounds, participation=participation, train_config=train_config, seed=seed,
                          device=device, min_clients=min_clients, client_timeout=client_timeout, wire=wire,
                          test_set=test_set, score_client=score_client, checkpoint_dir=checkpoint_dir,
                          connect_timeout=60.0, eval_batch_size=eval_batch_size, progress=progress, label=label)
    client_app = make_client_app(strategy, model_fn, by_partition(clients), device=device, fault_fn=fault_fn)
    grid = InlineGrid(client_app, [{"partition-id": k, "num-partitions": len(clients)} for k in range(len(clients))],
                      seed=seed)
    grid.run_server_app(server.app())
    result = server.result()
    result.traffic = pd.DataFrame(grid.traffic)
    return result

"""The Flower ClientApp: decode the broadcast, :meth:`Strategy.fit`, encode the update.

No algorithm code of its own (DESIGN.md decision 2): :class:`FlowerClient` only moves bytes
between Flower messages and the engine-agnostic core, exactly as the in-process engine's client
step does (:func:`~fedsparse_lib.federated.simulation.run_federated`).

Which data a node trains on
---------------------------
``data_fn(context)`` returns the node's :class:`~fedsparse_lib.federated.strategies.ClientData`.
With :func:`by_partition` (the default of :func:`~fedsparse_lib.flower.inline.run_flower`) a node
serves ``clients[partition_id]``, where ``partition_id`` is Flower's
``context.node_config["partition-id"]`` (``flower-supernode --node-config "partition-id=0"``; the
simulation sets it to 0..N-1). The ``client_id`` the server selects, seeds and records is the
data's own ``client_id``, which the node reports in its ``query.hello`` reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ..federated.codec import Encoding, encode
from ..federated.messages import check_update, decode_broadcast, encode_update
from ..federated.strategies import ClientData, ClientUpdate, ServerState, Strategy
from ..pruning import prunable_names
from .protocol import Record, payload_bytes, payload_record, settings_from_config

__all__ = ["DataFn", "FaultFn", "FlowerClient", "by_partition", "client_app_from", "make_client_app", "partition_id"]

DataFn = Callable[[Context], ClientData]
FaultFn = Callable[[int, int, ClientUpdate], ClientUpdate]


def partition_id(context: Context) -> int:
    """The node's ``partition-id`` (Flower node config), with a clear error when it is missing."""
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError(f"node {context.node_id} has no 'partition-id' in its node config "
                         f"{dict(context.node_config)}; start it with "
                         "flower-supernode --node-config 'partition-id=0 ...'")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"partition-id must be an integer >= 0, got {value!r}")
    return value


def by_partition(clients: Sequence[ClientData]) -> DataFn:
    """A ``data_fn`` serving ``clients[partition-id]`` to each node."""
    clients = list(clients)

    def data_fn(context: Context) -> ClientData:
        pid = partition_id(context)
        if pid >= len(clients):
            raise ValueError(f"partition-id {pid} is out of range for {len(clients)} clients")
        return clients[pid]

    return data_fn


class FlowerClient:
    """The client side of a federation: the handlers of the ClientApp.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy (the server's configuration; only :meth:`Strategy.fit` and, for the
        score client, :meth:`Strategy.initialize` run here).
    model_fn : callable () -> nn.Module
        Builds the federation's architecture (its initial weights are overwritten every round).
    data_fn : callable (Context) -> ClientData
        The node's local data (see :func:`by_partition`).
    device : str or torch.device, default "cpu"
        Where the node trains.
    fault_fn : callable (server_round, client_id, update) -> update, optional
        Called on the update before it is encoded, as in
        :func:`~fedsparse_lib.federated.simulation.run_federated` (fault injection for tests and
        teaching: it may raise, or corrupt the update).
    """

    def __init__(self, strategy: Strategy, model_fn: Callable[[], nn.Module], data_fn: DataFn, *,
                 device: str | torch.device = "cpu", fault_fn: FaultFn | None = None) -> None:
        self.strategy = strategy
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.device = device
        self.fault_fn = fault_fn
        self._data: dict[int, ClientData] = {}
        self._model: nn.Module | None = None
        self._ones: dict[str, torch.Tensor] | None = None

    def app(self) -> ClientApp:
        """A Flower ``ClientApp`` whose handlers are this client's."""
        return client_app_from(lambda context: self)

    # -- helpers ------------------------------------------------------------------------------
    def data(self, context: Context) -> ClientData:
        """The node's data (built once per node)."""
        if context.node_id not in self._data:
            self._data[context.node_id] = self.data_fn(context)
        return self._data[context.node_id]

    def model(self) -> nn.Module:
        """The work model (built once, without touching the process's global RNG)."""
        if self._model is None:
            with torch.random.fork_rng(devices=[]):
                model = self.model_fn()
            state = model.state_dict()
            names = prunable_names(model, exclude=self.strategy.exclude)
            self._ones = {k: torch.ones(state[k].shape, dtype=torch.bool) for k in names}
            self._model = model.to(self.device)
        return self._model

    # -- handlers -----------------------------------------------------------------------------
    def hello(self, message: Message, context: Context) -> Message:
        """Reply with who this node is: ``client_id``, ``partition_id`` (-1 if none), ``num_examples``."""
        data = self.data(context)
        pid = context.node_config.get("partition-id", -1)
        metrics = MetricRecord({"client_id": int(data.client_id), "partition_id": int(pid),
                                "num_examples": int(data.num_examples)})
        return Message(RecordDict({Record.METRICS.value: metrics}), reply_to=message)

    def initialize(self, message: Message, context: Context) -> Message:
        """Run :meth:`Strategy.initialize` on this node's data; reply with the initial state.

        The model is built as the in-process engine builds it (``torch.manual_seed(seed)``, then
        the global model and the clients' model), so the initial weights and any randomness of
        the scores are the same. The state is sent losslessly (float32 values, mask always
        included), whatever the run's wire options.
        """
        task, local_epochs, seed, train_config, _ = settings_from_config(message.content.config_records[
            Record.CONFIG.value])
        data = self.data(context)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_fn().to(self.device)
            self.model_fn()  # the engine's second model: keeps the global RNG stream identical
            state = self.strategy.initialize(model, data=data, train_config=train_config,
                                             local_epochs=local_epochs, device=self.device, seed=seed)
        if state.extras:
            raise ValueError(f"initial state has extras {sorted(state.extras)}, which the initialize message "
                             "cannot carry")
        blob = encode(state.weights, state.mask, encoding=Encoding.BITMASK, values="float32")
        metrics = MetricRecord({"client_id": int(data.client_id)})
        return Message(RecordDict({Record.PAYLOAD.value: payload_record(blob), Record.METRICS.value: metrics}),
                       reply_to=message)

    def train(self, message: Message, context: Context) -> Message:
        """One round: decode the broadcast, :meth:`Strategy.fit`, encode the update."""
        start = time.perf_counter()
        task, local_epochs, seed, train_config, wire = settings_from_config(message.content.config_records[
            Record.CONFIG.value])
        data = self.data(context)
        model = self.model()
        weights, mask = decode_broadcast(payload_bytes(message), self._ones or {})
        update = self.strategy.fit(model, weights, mask, task, data, local_epochs=local_epochs,
                                   train_config=train_config, device=self.device, seed=seed)
        if self.fault_fn is not None:
            update = self.fault_fn(task.server_round, int(data.client_id), update)
        check_update(update, ServerState(weights=weights, mask=mask))  # as the in-process client: name the problem
        up, paper_up = encode_update(update, wire)
        metrics: dict[str, Any] = {"client_id": int(data.client_id), "num_examples": update.num_examples,
                                   "train_loss": float(update.train_loss),
                                   "train_seconds": float(update.train_seconds), "paper_bytes_up": int(paper_up),
                                   "seconds": time.perf_counter() - start}
        return Message(RecordDict({Record.PAYLOAD.value: payload_record(up),
                                   Record.METRICS.value: MetricRecord(metrics)}), reply_to=message)


def client_app_from(client_fn: Callable[[Context], FlowerClient]) -> ClientApp:
    """A ClientApp whose handlers are those of ``client_fn(context)`` (built per run from its config)."""
    app = ClientApp()

    @app.query("hello")
    def _hello(message: Message, context: Context) -> Message:
        return client_fn(context).hello(message, context)

    @app.query("initialize")
    def _initialize(message: Message, context: Context) -> Message:
        return client_fn(context).initialize(message, context)

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return client_fn(context).train(message, context)

    return app


def make_client_app(strategy: Strategy, model_fn: Callable[[], nn.Module], data_fn: DataFn, *,
                    device: str | torch.device = "cpu", fault_fn: FaultFn | None = None) -> ClientApp:
    """A Flower ``ClientApp`` over ``strategy`` (see :class:`FlowerClient` for the parameters)."""
    return FlowerClient(strategy, model_fn, data_fn, device=device, fault_fn=fault_fn).app()

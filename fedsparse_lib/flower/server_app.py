"""The Flower ServerApp: the in-process engine's round loop, with Flower carrying the messages.

:class:`FlowerServer` is the ServerApp's ``main(grid, context)``. It has no algorithm code of its own
(DESIGN.md decision 2) and does what :func:`~fedsparse_lib.federated.simulation.run_federated`
does, in the same order, so that for the same seed both engines end with the same bits:

1. ``torch.manual_seed(seed)``, build the global model.
2. ``query.hello`` to every connected node: learn each node's ``client_id`` (and its
   ``partition_id``); the federation's client order is by partition id (then client id), which is
   the order of the ``clients`` list of :func:`~fedsparse_lib.flower.inline.run_flower`.
3. :meth:`Strategy.initialize` here, or, for strategies that score the initial mask on a client's
   data (SNIP, GraSP, PruneFL), on the score client (``query.initialize``).
4. Every round: :func:`~fedsparse_lib.federated.simulation.select_clients`,
   :meth:`Strategy.configure`, :func:`~fedsparse_lib.federated.messages.encode_broadcast`, one
   ``train`` message per selected client, then, in selection order,
   :func:`~fedsparse_lib.federated.messages.decode_update` (which checks the update),
   :meth:`Strategy.aggregate`, evaluation on the server's test set (if any), checkpoint (if any).

Faults: a client whose reply is an error (its ClientApp raised), does not arrive within
``client_timeout`` seconds, or does not decode or match the model, is excluded from the round and
recorded; fewer than ``min_clients`` usable updates raise
:class:`~fedsparse_lib.federated.simulation.FederationError`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..federated.checkpoint import save_round
from ..federated.codec import decode
from ..federated.messages import WireOptions, decode_update, encode_broadcast
from ..federated.simulation import FederationError, check_int, num_selected, round_record, select_clients
from ..federated.strategies import ClientTask, ClientUpdate, PruneFL, ServerState, Strategy
from ..training import TrainConfig
from .protocol import MessageKind, Record, payload_bytes, payload_record, round_config

__all__ = ["FlowerResult", "FlowerServer", "needs_client_data"]

logger = logging.getLogger(__name__)

_TABLES = ("rounds", "clients", "faults")


def needs_client_data(strategy: Strategy) -> bool:
    """Whether ``strategy.initialize`` scores the initial mask on a client's data (SNIP, GraSP, PruneFL)."""
    return isinstance(strategy, PruneFL) or getattr(strategy, "score", None) in ("snip", "grasp")


@dataclass
class FlowerResult:
    """What a :class:`FlowerServer` recorded (the same columns as the in-process engine's tables).

    Attributes
    ----------
    model : nn.Module
        The final global model.
    state : ServerState
    rounds : pandas.DataFrame
        One row per round (0 = the initial model): server_round, phase, mae / rmse / r / mean_gap
        (with a test set), sparsity, target_sparsity, vote_sparsity, num_clients, num_excluded,
        bytes_down, bytes_up, paper_bytes_down, paper_bytes_up, client_seconds, train_seconds,
        server_seconds, eval_seconds, wall_seconds.
    clients : pandas.DataFrame
        One row per (server_round, client_id): node_id, num_examples, status, reason, train_loss,
        bytes_down, bytes_up, paper_bytes_down, paper_bytes_up, seconds, train_seconds.
    faults : pandas.DataFrame
        server_round, client_id, reason of every excluded client.
    nodes : pandas.DataFrame
        client_id, partition_id, node_id, num_examples: how Flower's nodes map to clients.
    config : dict
    traffic : pandas.DataFrame
        Filled by :func:`~fedsparse_lib.flower.inline.run_flower`: the size of every Flower
        message as serialised (envelope included).
    """

    model: nn.Module
    state: ServerState
    rounds: pd.DataFrame
    clients: pd.DataFrame
    faults: pd.DataFrame
    nodes: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    traffic: pd.DataFrame = field(default_factory=pd.DataFrame)


class FlowerServer:
    """The server side of a Flower federation: ``main(grid, context)`` and what it recorded.

    Parameters
    ----------
    strategy : Strategy
        Its ``num_rounds`` is the number of rounds (the pruning horizon).
    model_fn : callable () -> nn.Module
        Builds the model; called after ``torch.manual_seed(seed)``.
    num_clients : int
        SuperNodes to wait for before the first round (all connected nodes then take part).
    local_epochs, tune_rounds, participation, train_config, seed, device, min_clients, wire,
    score_client, eval_batch_size, progress, label
        As in :func:`~fedsparse_lib.federated.simulation.run_federated`; ``device`` is where the
        server evaluates (each node chooses its own training device).
    client_timeout : float, optional
        Seconds to wait for a round's replies; later replies are discarded.
    test_set : Dataset, optional
        Held-out (volume, age) pairs on the server, evaluated after every round.
    checkpoint_dir : path, optional
        Checkpoint after every round (:mod:`~fedsparse_lib.federated.checkpoint`).
    connect_timeout : float, default 600
        Seconds to wait for ``num_clients`` nodes and for their hello / initialize replies.
    """

    def __init__(self, strategy: Strategy, model_fn: Callable[[], nn.Module], *, num_clients: int,
                 local_epochs: int = 1, tune_rounds: int = 0, participation: float = 1.0,
                 train_config: TrainConfig = TrainConfig(), seed: int = 0, device: str | torch.device = "cpu",
                 min_clients: int = 1, client_timeout: float | None = None, wire: WireOptions = WireOptions(),
                 test_set: Dataset | None = None, score_client: int | None = None,
                 checkpoint_dir: str | Path | None = None, connect_timeout: float = 600.0,
                 eval_batch_size: int = 32, progress: bool = True, label: str = "") -> None:
        self.strategy = strategy
        self.model_fn = model_fn
        self.num_clients = check_int("num_clients", num_clients, 1)
        self.local_epochs = check_int("local_epochs", local_epochs, 1)
        self.tune_rounds = check_int("tune_rounds", tune_rounds, 0)
        self.min_clients = check_int("min_clients", min_clients, 1)
        num_selected(1, participation)  # validates participation
        if client_timeout is not None and not client_timeout > 0:
            raise ValueError(f"client_timeout must be > 0 seconds, got {client_timeout!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.participation = participation
        self.train_config = train_config
        self.seed = int(seed)
        self.device = device
        self.client_timeout = client_timeout
        self.wire = wire
        self.test_set = test_set
        self.score_client = score_client
        self.checkpoint_dir = checkpoint_dir
        self.connect_timeout = float(connect_timeout)
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.label = label
        self.model: nn.Module | None = None
        self.state: ServerState | None = None
        self.tables: dict[str, list[dict[str, Any]]] = {t: [] for t in _TABLES}
        self.node_rows: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {}

    def app(self) -> ServerApp:
        """A Flower ``ServerApp`` whose main function is this server."""
        app = ServerApp()
        app.main()(self)
        return app

    # -- the main function --------------------------------------------------------------------
    def __call__(self, grid: Grid, context: Context) -> None:
        """Run the federation over ``grid`` (Flower calls this as the ServerApp's main)."""
        from tqdm.auto import tqdm

        strategy = self.strategy
        self.tables = {t: [] for t in _TABLES}
        torch.manual_seed(self.seed)
        model = self.model_fn().to(self.device)
        self.model = model
        test_loader = (DataLoader(self.test_set, batch_size=self.eval_batch_size)
                       if self.test_set is not None else None)
        nodes = self._connect(grid)
        ids = list(nodes)
        if num_selected(len(ids), self.participation) < self.min_clients:
            raise ValueError(f"participation {self.participation} selects {num_selected(len(ids), self.participation)} "
                             f"of {len(ids)} clients per round, fewer than min_clients={self.min_clients}")
        num_examples = {r["client_id"]: r["num_examples"] for r in self.node_rows}
        total_rounds = strategy.num_rounds + self.tune_rounds
        self.config = {"engine": "flower", "strategy": strategy.describe(),
                       "clients": {str(c): num_examples[c] for c in ids}, "local_epochs": self.local_epochs,
                       "tune_rounds": self.tune_rounds, "participation": self.participation,
                       "train_config": asdict(self.train_config), "seed": self.seed, "min_clients": self.min_clients,
                       "wire": self.wire.as_dict(), "score_client": self.score_client,
                       "num_test": len(self.test_set) if self.test_set is not None else 0}  # type: ignore[arg-type]

        state = self._initialize(grid, model, nodes)
        self.state = state
        self.tables["rounds"].append(round_record(0, "init", model, state, self.strategy, test_loader, self.device,
                                                      [], []))

        bar = tqdm(range(1, total_rounds + 1), desc=self.label or f"{strategy.name} (flower)",
                   disable=not self.progress, leave=False)
        for server_round in bar:
            t_round = time.perf_counter()
            phase = "train" if server_round <= strategy.num_rounds else "tune"
            chosen = select_clients(ids, participation=self.participation, seed=self.seed, server_round=server_round)
            t0 = time.perf_counter()
            task = strategy.configure(server_round, state)
            down, paper_down = encode_broadcast(state, self.wire)
            messages = [Message(RecordDict({Record.PAYLOAD.value: payload_record(down),
                                            Record.CONFIG.value: round_config(task, local_epochs=self.local_epochs,
                                                                              seed=self.seed,
                                                                              train_config=self.train_config,
                                                                              wire=self.wire)}),
                                nodes[c], MessageKind.TRAIN.value, group_id=str(server_round)) for c in chosen]
            server_seconds = time.perf_counter() - t0
            replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=self.client_timeout)}
            updates: list[ClientUpdate] = []
            rows: list[dict[str, Any]] = []
            for client_id in chosen:
                row = {"server_round": server_round, "client_id": client_id, "node_id": nodes[client_id],
                       "num_examples": num_examples[client_id], "status": "ok", "reason": "",
                       "train_loss": math.nan, "bytes_down": len(down), "bytes_up": 0,
                       "paper_bytes_down": paper_down, "paper_bytes_up": 0, "seconds": 0.0, "train_seconds": 0.0}
                t1 = time.perf_counter()
                update = self._receive(replies.get(nodes[client_id]), client_id, state, row)
                server_seconds += time.perf_counter() - t1
                rows.append(row)
                self.tables["clients"].append(row)
                if update is None:
                    self.tables["faults"].append({"server_round": server_round, "client_id": client_id,
                                                  "reason": row["reason"]})
                    logger.warning("round %d: client %s excluded: %s", server_round, client_id, row["reason"])
                    continue
                updates.append(update)
            if len(updates) < self.min_clients:
                reasons = {r["client_id"]: r["reason"] for r in rows if r["status"] != "ok"}
                raise FederationError(f"round {server_round}: only {len(updates)} usable client update(s), fewer "
                                      f"than min_clients={self.min_clients}; excluded: {reasons}")
            t0 = time.perf_counter()
            state = strategy.aggregate(server_round, state, updates)
            self.state = state
            model.load_state_dict(state.weights)
            server_seconds += time.perf_counter() - t0
            row = round_record(server_round, phase, model, state, self.strategy, test_loader, self.device, updates,
                               rows)
            self.tables["rounds"].append(row)
            if self.checkpoint_dir is not None:
                t0 = time.perf_counter()
                row["server_seconds"] = server_seconds
                save_round(self.checkpoint_dir, server_round=server_round, state=state, records=self.tables,
                           config=self.config)
                server_seconds += time.perf_counter() - t0
            row["server_seconds"] = server_seconds
            row["wall_seconds"] = time.perf_counter() - t_round
            bar.set_postfix(sparsity=f"{row['sparsity']:.3f}", **({"mae": f"{row['mae']:.2f}"} if "mae" in row else {}))
        model.load_state_dict(state.weights)

    def result(self) -> FlowerResult:
        """The recorded run (after the main function returned)."""
        if self.state is None or self.model is None:
            raise RuntimeError("the server has not run yet")
        frames = {t: pd.DataFrame(self.tables[t]) for t in _TABLES}
        if frames["faults"].empty:
            frames["faults"] = pd.DataFrame(columns=["server_round", "client_id", "reason"])
        return FlowerResult(model=self.model, state=self.state, rounds=frames["rounds"], clients=frames["clients"],
                            faults=frames["faults"], nodes=pd.DataFrame(self.node_rows), config=dict(self.config))

    # -- steps --------------------------------------------------------------------------------
    def _connect(self, grid: Grid) -> dict[int, int]:
        """Wait for the nodes, say hello; return ``{client_id: node_id}`` in federation order."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            node_ids = sorted(int(n) for n in grid.get_node_ids())
            if len(node_ids) >= self.num_clients:
                break
            if time.monotonic() > deadline:
                raise FederationError(f"only {len(node_ids)} of num_clients={self.num_clients} SuperNodes connected "
                                      f"within {self.connect_timeout:.0f} s")
            time.sleep(1.0)
        messages = [Message(RecordDict(), n, MessageKind.HELLO.value, group_id="hello") for n in node_ids]
        replies = list(grid.send_and_receive(messages, timeout=self.connect_timeout))
        rows = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                raise FederationError(f"node {node_id} failed to say hello: {reply.error.reason}")
            metrics = reply.content.metric_records[Record.METRICS.value]
            rows.append({"client_id": int(metrics["client_id"]), "partition_id": int(metrics["partition_id"]),
                         "node_id": int(node_id), "num_examples": int(metrics["num_examples"])})
        missing = sorted(set(node_ids) - {r["node_id"] for r in rows})
        if missing:
            raise FederationError(f"nodes {missing} did not answer hello within {self.connect_timeout:.0f} s")
        ids = [r["client_id"] for r in rows]
        if len(set(ids)) != len(ids):
            raise FederationError(f"client ids must be distinct across nodes, got {sorted(ids)} (node config "
                                  "'partition-id' repeated?)")
        rows.sort(key=lambda r: (r["partition_id"], r["client_id"]))
        self.node_rows = rows
        logger.info("federation of %d clients: %s", len(rows), {r["client_id"]: r["node_id"] for r in rows})
        return {r["client_id"]: r["node_id"] for r in rows}

    def _initialize(self, grid: Grid, model: nn.Module, nodes: Mapping[int, int]) -> ServerState:
        """The first server state, computed here or (scored on client data) by the score client."""
        if not needs_client_data(self.strategy):
            return self.strategy.initialize(model, data=None, train_config=self.train_config,
                                            local_epochs=self.local_epochs, device=self.device, seed=self.seed)
        client_id = self.score_client if self.score_client is not None else next(iter(nodes))
        if client_id not in nodes:
            raise ValueError(f"score_client {client_id} is not among the federation's clients {list(nodes)}")
        config = round_config(ClientTask(server_round=0), local_epochs=self.local_epochs, seed=self.seed,
                              train_config=self.train_config, wire=self.wire)
        message = Message(RecordDict({Record.CONFIG.value: config}), nodes[client_id], MessageKind.INITIALIZE.value,
                          group_id="0")
        replies = list(grid.send_and_receive([message], timeout=self.connect_timeout))
        if not replies:
            raise FederationError(f"score client {client_id} sent no initial state within {self.connect_timeout:.0f} s")
        if replies[0].has_error():
            raise FederationError(f"score client {client_id} failed to initialise: {replies[0].error.reason}")
        weights, mask = decode(payload_bytes(replies[0]))
        if mask is None:
            raise FederationError(f"score client {client_id} sent an initial state without a mask")
        model.load_state_dict(weights, strict=True)
        logger.info("initial state from client %s (scored on its data)", client_id)
        return ServerState(weights=weights, mask=mask)

    def _receive(self, reply: Message | None, client_id: int, state: ServerState,
                 row: dict[str, Any]) -> ClientUpdate | None:
        """Decode and check one reply, filling ``row``; None (and the reason in ``row``) if excluded."""
        if reply is None:
            timeout = f"within client_timeout {self.client_timeout} s" if self.client_timeout else ""
            row.update(status="excluded", reason=f"no reply {timeout}".strip())
            return None
        if reply.has_error():
            row.update(status="excluded", reason=f"{reply.error.reason} (Flower error code {reply.error.code})")
            return None
        try:
            metrics = reply.content.metric_records[Record.METRICS.value]
            up = payload_bytes(reply)
            if int(metrics["client_id"]) != client_id:
                raise ValueError(f"reply names client {metrics['client_id']}, expected {client_id}")
            row.update(train_loss=float(metrics["train_loss"]), train_seconds=float(metrics["train_seconds"]),
                       seconds=float(metrics["seconds"]), bytes_up=len(up),
                       paper_bytes_up=int(metrics["paper_bytes_up"]))
            num_examples = metrics["num_examples"]
            return decode_update(up, client_id=client_id, num_examples=num_examples,  # type: ignore[arg-type]
                                 train_loss=float(metrics["train_loss"]),
                                 train_seconds=float(metrics["train_seconds"]), reference=state)
        except Exception as exc:  # a bad reply excludes its client, not the round
            row.update(status="excluded", reason=f"{type(exc).__name__}: {exc}")
            return None


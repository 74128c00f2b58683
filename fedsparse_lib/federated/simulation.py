"""The in-process federated engine: clients run one after another in this process.

Every round (DESIGN.md data flow): select clients -> encode the broadcast -> each client decodes
it, trains under the mask (:meth:`Strategy.fit`) and encodes its update -> the server decodes and
checks each update, aggregates and prunes (:meth:`Strategy.aggregate`) -> evaluate the global
model on the test set -> checkpoint.

Determinism (DESIGN.md decision 5): the initial weights come from ``seed``; the clients of round
``t`` and the batch order of client ``k`` in epoch ``e`` of round ``t`` come from seeds derived from
``(seed, t)`` and ``(seed, t, k, e)`` (:func:`~fedsparse_lib.federated.strategies.derive_seed`), not
from a stream that runs through the whole run. A run resumed from its last checkpoint therefore
ends bit for bit where an uninterrupted run ends, and the Flower engine, which runs the clients
elsewhere, reproduces the same numbers.

Faults: a client whose work raises, whose update does not decode or does not match the model
(names, shapes, dtypes), holds non-finite values, or that takes longer than ``client_timeout``
seconds, is excluded from the round and recorded (who, why). The round goes on if at least
``min_clients`` updates remain; otherwise :class:`FederationError` is raised, and the last
checkpoint (the previous round) stays for ``resume=True``. In this engine a slow client cannot be
interrupted: its result arrives late and is discarded (the Flower engine stops waiting instead).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..training import TrainConfig, evaluate, predict, regression_metrics
from .agreement import jaccard_matrix, vote_histogram
from .checkpoint import load_latest, save_round
from .codec import ValueDType
from .messages import WireOptions, check_update, decode_broadcast, decode_update, encode_broadcast, encode_update
from .strategies import ClientUpdate, ServerState, Strategy, derive_seed

__all__ = ["DatasetClient", "FederatedResult", "FederationError", "check_int", "num_selected", "round_record",
           "run_federated", "select_clients"]

logger = logging.getLogger(__name__)

FaultFn = Callable[[int, int, ClientUpdate], ClientUpdate]
_SELECT = 2**31 - 1  # stream id of the client selection, apart from client ids


class FederationError(RuntimeError):
    """A round cannot proceed (too few usable clients)."""


@dataclass
class DatasetClient:
    """A client's slice of a dataset (implements :class:`~fedsparse_lib.federated.strategies.ClientData`).

    Parameters
    ----------
    client_id : int
    dataset : torch Dataset of (volume (1, X, Y, Z), age)
    indices : array of int
        Positions of the client's examples in ``dataset``.
    batch_size : int
    """

    client_id: int
    dataset: Dataset
    indices: np.ndarray
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        if self.indices.size == 0:
            raise ValueError(f"client {self.client_id} has no examples")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    @property
    def num_examples(self) -> int:
        return int(self.indices.size)

    def batches(self, *, seed: int) -> DataLoader:
        return DataLoader(Subset(self.dataset, self.indices.tolist()), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    def ordered_batches(self, batch_size: int = 32) -> DataLoader:
        return DataLoader(Subset(self.dataset, self.indices.tolist()), batch_size=batch_size)

    def first_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(i)] for i in self.indices[:n]]
        return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def num_selected(num_clients: int, participation: float) -> int:
    """Clients per round: ``max(1, round(participation * num_clients))``."""
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must be in (0, 1], got {participation!r}")
    return max(1, int(round(participation * num_clients)))


def select_clients(client_ids: Sequence[int], *, participation: float, seed: int, server_round: int) -> list[int]:
    """The clients of ``server_round`` (all when ``participation`` is 1), in ``client_ids`` order."""
    m = num_selected(len(client_ids), participation)
    if m == len(client_ids):
        return list(client_ids)
    rng = np.random.default_rng(derive_seed(seed, server_round, _SELECT))
    chosen = set(rng.choice(len(client_ids), size=m, replace=False).tolist())
    return [c for i, c in enumerate(client_ids) if i in chosen]


@dataclass
class FederatedResult:
    """Outcome of :func:`run_federated`.

    Attributes
    ----------
    model : nn.Module
        The final global model (weights loaded, pruned coordinates 0).
    state : ServerState
    clients : pandas.DataFrame
        One row per (server_round, client_id): num_examples, status (``ok`` / ``excluded``), reason,
        train_loss, bytes_down, bytes_up, paper_bytes_down, paper_bytes_up, seconds (all of the
        client's work), train_seconds (local training alone).
    rounds : pandas.DataFrame
        One row per round: server_round, phase (``train`` / ``tune``), mae, rmse, r, mean_gap,
        sparsity, target_sparsity, vote_sparsity (FedSparsify-Local: after the vote, before any
        re-prune), num_clients (aggregated), num_excluded, bytes_down, bytes_up, paper_bytes_down,
        paper_bytes_up (sums over the round's clients), client_seconds, train_seconds,
        server_seconds (encode, decode, aggregate, prune, checkpoint), eval_seconds, wall_seconds.
        Round 0 is the initial model.
    faults : pandas.DataFrame
        server_round, client_id, reason of every excluded client.
    agreement : pandas.DataFrame
        For rounds where clients send their own masks: server_round, client_a, client_b, jaccard.
    votes : pandas.DataFrame
        Same rounds: server_round, votes, count (coordinates kept by exactly ``votes`` clients).
    predictions : pandas.DataFrame
        Final test predictions: participant_id, age, predicted, gap.
    client_mae : pandas.DataFrame
        The final global model on each client's own training data: client_id, num_examples,
        mean_age, mae.
    uploads : dict
        ``{(client_id, server_round): (weights, mask)}`` for the clients in ``keep_uploads``.
    config : dict
    """

    model: nn.Module
    state: ServerState
    clients: pd.DataFrame
    rounds: pd.DataFrame
    faults: pd.DataFrame
    agreement: pd.DataFrame
    votes: pd.DataFrame
    predictions: pd.DataFrame
    client_mae: pd.DataFrame
    uploads: dict[tuple[int, int], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(
        default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_TABLES = ("clients", "rounds", "faults", "agreement", "votes")


def run_federated(strategy: Strategy, model_fn: Callable[[], nn.Module], clients: Sequence[DatasetClient],
                  test_set: Dataset, *, local_epochs: int = 1, tune_rounds: int = 0, participation: float = 1.0,
                  train_config: TrainConfig = TrainConfig(), seed: int = 0, device: str | torch.device = "cpu",
                  min_clients: int = 1, client_timeout: float | None = None, wire: WireOptions = WireOptions(),
                  checkpoint_dir: str | Path | None = None, resume: bool = False, fault_fn: FaultFn | None = None,
                  keep_uploads: Sequence[int] = (), score_client: int | None = None,
                  test_ids: Sequence[str] | None = None, eval_batch_size: int = 32, progress: bool = True,
                  label: str = "") -> FederatedResult:
    """Run a federation in this process.

    Parameters
    ----------
    strategy : Strategy
        From :func:`~fedsparse_lib.federated.strategies.make_strategy`; its ``num_rounds`` is the
        number of rounds (the pruning horizon).
    model_fn : callable () -> nn.Module
        Builds the model; called after ``torch.manual_seed(seed)``, so the initial weights depend
        on ``seed`` only.
    clients : sequence of DatasetClient
        The federation's clients (distinct ``client_id``).
    test_set : Dataset
        Held-out (volume, age) pairs on which the global model is evaluated after every round.
    local_epochs : int, default 1
        Epochs of local training per round (the paper: 4).
    tune_rounds : int, default 0
        Extra rounds after ``strategy.num_rounds`` under the final mask (no pruning).
    participation : float, default 1
        Fraction of clients selected each round, in (0, 1].
    train_config : TrainConfig
        The clients' optimizer (reset every round).
    seed : int
    device : str or torch.device
        Where clients train and the model is evaluated; server maths run on the CPU.
    min_clients : int, default 1
        Fewest usable updates a round may aggregate; fewer raise :class:`FederationError`.
    client_timeout : float, optional
        Seconds after which a client's update is discarded.
    wire : WireOptions
        Codec options of every message.
    checkpoint_dir : path, optional
        Checkpoint after every round there (:mod:`~fedsparse_lib.federated.checkpoint`).
    resume : bool, default False
        Continue from the newest checkpoint in ``checkpoint_dir`` (which must belong to a run
        with the same configuration); start afresh if there is none.
    fault_fn : callable (server_round, client_id, update) -> update, optional
        Called on every client's update before it is encoded: fault injection for tests and
        teaching (it may raise, sleep, or return a corrupted update).
    keep_uploads : sequence of int
        Client ids whose decoded uploads are kept (``result.uploads``) for server-side privacy
        attacks; with ``checkpoint_dir`` they are also saved there and reloaded on resume.
    score_client : int, optional
        Client whose data score the mask at initialisation (SNIP, GraSP, PruneFL); default the
        first client.
    test_ids : sequence of str, optional
        Participant ids of ``test_set`` for the predictions table.
    eval_batch_size : int, default 32
    progress : bool, default True
    label : str
        Progress bar title.

    Returns
    -------
    FederatedResult
    """
    from tqdm.auto import tqdm

    local_epochs = check_int("local_epochs", local_epochs, 1)
    tune_rounds = check_int("tune_rounds", tune_rounds, 0)
    min_clients = check_int("min_clients", min_clients, 1)
    if not clients:
        raise ValueError("no clients")
    ids = [c.client_id for c in clients]
    if len(set(ids)) != len(ids):
        raise ValueError(f"client ids must be distinct, got {ids}")
    by_id = {c.client_id: c for c in clients}
    selected = num_selected(len(clients), participation)
    if selected < min_clients:
        raise ValueError(f"participation {participation} selects {selected} of {len(clients)} clients per round, "
                         f"fewer than min_clients={min_clients}")
    if client_timeout is not None and not client_timeout > 0:
        raise ValueError(f"client_timeout must be > 0 seconds, got {client_timeout!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    total_rounds = strategy.num_rounds + tune_rounds
    config = {"strategy": strategy.describe(), "clients": {str(c.client_id): c.num_examples for c in clients},
              "batch_size": [c.batch_size for c in clients], "local_epochs": local_epochs,
              "tune_rounds": tune_rounds, "participation": participation, "train_config": asdict(train_config),
              "seed": seed, "min_clients": min_clients, "wire": wire.as_dict(), "score_client": score_client,
              "num_test": len(test_set)}  # type: ignore[arg-type]

    torch.manual_seed(seed)
    model = model_fn().to(device)
    work_model = model_fn().to(device)  # the clients' model: trained, then its weights are replaced
    test_loader = DataLoader(test_set, batch_size=eval_batch_size)
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in _TABLES}
    uploads: dict[tuple[int, int], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    upload_dir = Path(checkpoint_dir) / "uploads" if checkpoint_dir is not None else None

    checkpoint = load_latest(checkpoint_dir) if resume else None
    if checkpoint is not None:
        diff = sorted(k for k in set(config) | set(checkpoint.config)
                      if _json_roundtrip(config.get(k)) != checkpoint.config.get(k))
        if diff:
            raise ValueError(f"cannot resume from {checkpoint_dir}: the run configuration differs in {diff}")
        state = checkpoint.state
        tables = {t: list(checkpoint.records.get(t, [])) for t in _TABLES}
        start_round = checkpoint.server_round + 1
        if upload_dir is not None:
            uploads = _load_uploads(upload_dir, keep_uploads, checkpoint.server_round)
        logger.info("%s: resuming after round %d", label or strategy.name, checkpoint.server_round)
    else:
        init_client = by_id[score_client] if score_client is not None else clients[0]
        state = strategy.initialize(model, data=init_client, train_config=train_config, local_epochs=local_epochs,
                                    device=device, seed=seed)
        start_round = 1
        tables["rounds"].append(round_record(0, "init", model, state, strategy, test_loader, device, [], []))

    bar = tqdm(range(start_round, total_rounds + 1), desc=label or strategy.name, disable=not progress, leave=False)
    for server_round in bar:
        t_round = time.perf_counter()
        phase = "train" if server_round <= strategy.num_rounds else "tune"
        chosen = select_clients(ids, participation=participation, seed=seed, server_round=server_round)
        t0 = time.perf_counter()
        task = strategy.configure(server_round, state)
        down, paper_down = encode_broadcast(state, wire)
        server_seconds = time.perf_counter() - t0
        # every client decodes the same bytes: decode once (deterministic) and hand each the result
        t0 = time.perf_counter()
        received = decode_broadcast(down, state.mask)
        decode_seconds = time.perf_counter() - t0
        updates: list[ClientUpdate] = []
        for client_id in chosen:
            row, update = _run_client(strategy, work_model, by_id[client_id], down, received, decode_seconds, task,
                                      state, local_epochs=local_epochs,
                                      train_config=train_config, device=device, seed=seed, wire=wire,
                                      fault_fn=fault_fn, client_timeout=client_timeout)
            row.update(server_round=server_round, paper_bytes_down=paper_down)
            server_seconds += row.pop("server_decode_seconds")
            tables["clients"].append(row)
            if update is None:
                tables["faults"].append({"server_round": server_round, "client_id": client_id, "reason": row["reason"]})
                logger.warning("round %d: client %s excluded: %s", server_round, client_id, row["reason"])
                continue
            updates.append(update)
            if client_id in keep_uploads:
                uploads[(client_id, server_round)] = (update.weights, update.mask)
                if upload_dir is not None:
                    _save_upload(upload_dir, client_id, server_round, update)
        if len(updates) < min_clients:
            reasons = {r["client_id"]: r["reason"] for r in tables["faults"] if r["server_round"] == server_round}
            raise FederationError(f"round {server_round}: only {len(updates)} usable client update(s), fewer than "
                                  f"min_clients={min_clients}; excluded: {reasons}")
        t0 = time.perf_counter()
        own_masks = [u.mask for u in updates if any(not torch.equal(u.mask[k], state.mask[k]) for k in state.mask)]
        if own_masks and len(own_masks) == len(updates):
            _agreement_rows(tables, server_round, updates)
        state = strategy.aggregate(server_round, state, updates)
        model.load_state_dict(state.weights)
        server_seconds += time.perf_counter() - t0
        client_rows = [r for r in tables["clients"] if r["server_round"] == server_round]
        row = round_record(server_round, phase, model, state, strategy, test_loader, device, updates, client_rows)
        if checkpoint_dir is not None:
            t0 = time.perf_counter()
            row["server_seconds"] = server_seconds
            tables["rounds"].append(row)
            save_round(checkpoint_dir, server_round=server_round, state=state, records=tables, config=config)
            server_seconds += time.perf_counter() - t0
        else:
            tables["rounds"].append(row)
        row["server_seconds"] = server_seconds
        row["wall_seconds"] = time.perf_counter() - t_round
        bar.set_postfix(mae=f"{row['mae']:.2f}", sparsity=f"{row['sparsity']:.3f}")

    model.load_state_dict(state.weights)
    _, predictions = evaluate(model, test_loader, participant_ids=test_ids, device=device)
    client_mae = []
    for c in clients:
        pred, age = predict(model, c.ordered_batches(eval_batch_size), device=device)
        client_mae.append({"client_id": c.client_id, "num_examples": c.num_examples, "mean_age": float(age.mean()),
                           "mae": regression_metrics(pred, age)["mae"]})
    frames = {t: pd.DataFrame(tables[t]) for t in _TABLES}
    if frames["faults"].empty:
        frames["faults"] = pd.DataFrame(columns=["server_round", "client_id", "reason"])
    return FederatedResult(model=model, state=state, clients=frames["clients"], rounds=frames["rounds"],
                           faults=frames["faults"], agreement=frames["agreement"], votes=frames["votes"],
                           predictions=predictions, client_mae=pd.DataFrame(client_mae), uploads=uploads, config=config)


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _run_client(strategy: Strategy, model: nn.Module, client: DatasetClient, down: bytes,
                received: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], decode_seconds: float, task: Any,
                state: ServerState, *, local_epochs: int, train_config: TrainConfig, device: str | torch.device,
                seed: int, wire: WireOptions, fault_fn: FaultFn | None,
                client_timeout: float | None) -> tuple[dict[str, Any], ClientUpdate | None]:
    """One client's round: (decoded broadcast), fit, (fault hook), encode; then the server's check.

    ``received`` is ``decode_broadcast(down)``, decoded once for all clients of the round (the
    same bytes decode to the same tensors); its time counts in every client's seconds. With
    lossless (float32) values the server aggregates the client's own tensors, which equal
    ``decode(encode(...))`` bit for bit (tested in the codec's round-trip tests), instead of
    decoding a copy; lossy values are decoded so that their rounding reaches the server.
    """
    row: dict[str, Any] = {"client_id": client.client_id, "num_examples": client.num_examples, "status": "ok",
                           "reason": "", "train_loss": math.nan, "bytes_down": len(down), "bytes_up": 0,
                           "paper_bytes_up": 0, "seconds": 0.0, "train_seconds": 0.0, "server_decode_seconds": 0.0}
    t0 = time.perf_counter() - decode_seconds
    try:
        weights, mask = received
        update = strategy.fit(model, weights, mask, task, client, local_epochs=local_epochs,
                              train_config=train_config, device=device, seed=seed)
        if fault_fn is not None:
            update = fault_fn(task.server_round, client.client_id, update)
        try:
            up, paper_up = encode_update(update, wire)
        except Exception:
            check_update(update, state)  # name the problem (e.g. NaN at a pruned coordinate) if it can
            raise
    except Exception as exc:  # a failing client is excluded, not fatal
        row.update(status="excluded", reason=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
        return row, None
    row.update(seconds=time.perf_counter() - t0, train_seconds=update.train_seconds, train_loss=update.train_loss,
               bytes_up=len(up), paper_bytes_up=paper_up)
    if client_timeout is not None and row["seconds"] > client_timeout:
        row.update(status="excluded", reason=f"timeout: {row['seconds']:.2f} s > client_timeout {client_timeout} s")
        return row, None
    t1 = time.perf_counter()
    try:
        if ValueDType(wire.values) is ValueDType.FLOAT32:
            check_update(update, state)
            arrived = update
        else:
            arrived = decode_update(up, client_id=client.client_id, num_examples=update.num_examples,
                                    train_loss=update.train_loss, train_seconds=update.train_seconds, reference=state)
    except Exception as exc:
        row.update(status="excluded", reason=f"{type(exc).__name__}: {exc}")
        return row, None
    finally:
        row["server_decode_seconds"] = time.perf_counter() - t1
    return row, arrived


def round_record(server_round: int, phase: str, model: nn.Module, state: ServerState, strategy: Strategy,
                 test_loader: DataLoader | None, device: str | torch.device, updates: Sequence[ClientUpdate],
                 rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-round row of both engines: test metrics (if a test loader is given), sparsity, totals.

    ``rows`` are the round's per-client rows (bytes, seconds, status); ``model`` receives
    ``state.weights`` for the evaluation. ``server_seconds`` and ``wall_seconds`` are filled in by
    the engine afterwards.
    """
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    if test_loader is not None:
        model.load_state_dict(state.weights)
        metrics, _ = evaluate(model, test_loader, device=device)
    vote = state.extras.get("vote_sparsity")
    return {"server_round": server_round, "phase": phase, **metrics, "sparsity": state.sparsity,
            "target_sparsity": strategy.target_sparsity(server_round),
            "vote_sparsity": float(vote) if vote is not None and updates else math.nan,
            "num_clients": len(updates), "num_excluded": sum(r["status"] != "ok" for r in rows),
            **{k: int(sum(r[k] for r in rows)) for k in ("bytes_down", "bytes_up", "paper_bytes_down",
                                                          "paper_bytes_up")},
            "client_seconds": float(sum(r["seconds"] for r in rows)),
            "train_seconds": float(sum(r["train_seconds"] for r in rows)),
            "server_seconds": 0.0, "eval_seconds": time.perf_counter() - t0, "wall_seconds": 0.0}


def _agreement_rows(tables: dict[str, list[dict[str, Any]]], server_round: int,
                    updates: Sequence[ClientUpdate]) -> None:
    masks = [u.mask for u in updates]
    jac = jaccard_matrix(masks)
    for i, a in enumerate(updates):
        for j, b in enumerate(updates):
            tables["agreement"].append({"server_round": server_round, "client_a": a.client_id,
                                        "client_b": b.client_id, "jaccard": float(jac[i, j])})
    for r in vote_histogram(masks).itertuples(index=False):
        tables["votes"].append({"server_round": server_round, "votes": int(r.votes), "count": int(r.count)})


def _save_upload(directory: Path, client_id: int, server_round: int, update: ClientUpdate) -> None:
    from safetensors.torch import save

    from ..data.synthetic import write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights/{k}": v.contiguous() for k, v in update.weights.items()}
    tensors.update({f"mask/{k}": v.to(torch.uint8).contiguous() for k, v in update.mask.items()})
    write_atomic(directory / f"client-{client_id}-round-{server_round:04d}.safetensors", save(tensors))


def _load_uploads(directory: Path, keep: Sequence[int], last_round: int) -> dict[tuple[int, int], tuple[dict, dict]]:
    from safetensors.torch import load_file

    out: dict[tuple[int, int], tuple[dict, dict]] = {}
    for client_id in keep:
        for path in sorted(directory.glob(f"client-{client_id}-round-*.safetensors")):
            server_round = int(path.stem.rsplit("-", 1)[1])
            if server_round > last_round:
                continue
            tensors = load_file(str(path))
            weights = {k[8:]: v for k, v in tensors.items() if k.startswith("weights/")}
            mask = {k[5:]: v.bool() for k, v in tensors.items() if k.startswith("mask/")}
            out[(client_id, server_round)] = (weights, mask)
    return out

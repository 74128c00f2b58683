"""The ServerApp and ClientApp of a real deployment: ``flwr run`` on a SuperLink and SuperNodes.

Components for ``[tool.flwr.app.components]``::

    serverapp = "fedsparse_lib.flower.deploy:server_app"
    clientapp = "fedsparse_lib.flower.deploy:client_app"

Everything is configured by Flower's configs, nothing is hard-coded:

- the **run config** (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``),
  the same for the server and every node: the strategy, rounds, optimisation, wire format and
  model; :data:`RUN_CONFIG` lists every key with its default (:func:`run_config_toml` prints the
  section);
- each SuperNode's **node config** (``flower-supernode --node-config``): ``partition-id`` (the
  node's ``client_id``, distinct per node, 0..N-1), ``data-dir`` (its BIDS-like folder, read by
  :func:`~fedsparse_lib.data.datasets.build_manifest`), optional ``cache-dir`` (preprocessed
  volumes, reused across runs) and ``device`` (default ``"cpu"``).

The server waits for ``num-clients`` nodes, evaluates on ``test-dir`` when given (a BIDS-like
folder on the SuperLink's machine), and writes round checkpoints (safetensors + JSON) and the
tables ``rounds.csv``, ``clients.csv``, ``faults.csv``, ``nodes.csv`` under ``output-dir``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context, UserConfigValue
from flwr.serverapp import Grid, ServerApp
from torch import nn

from ..federated.messages import WireOptions
from ..federated.simulation import DatasetClient
from ..federated.strategies import Strategy, make_strategy
from ..training import TrainConfig
from .client_app import FlowerClient, client_app_from, partition_id
from .server_app import FlowerResult, FlowerServer

__all__ = ["RUN_CONFIG", "client_app", "client_from_context", "model_fn_from_config", "run_config_toml",
           "server_app", "server_from_config", "strategy_from_config", "write_tables"]

logger = logging.getLogger(__name__)

#: Every run-config key, its default and meaning (the paper profile's values where it has one).
RUN_CONFIG: dict[str, tuple[UserConfigValue, str]] = {
    "method": ("fedsparsify_global", "strategy: one of fedsparse_lib.federated.strategies.METHODS"),
    "num-rounds": (40, "rounds of the pruning horizon"),
    "tune-rounds": (0, "extra rounds under the final mask"),
    "final-sparsity": (0.95, "target sparsity of the pruning methods, in [0, 1)"),
    "schedule": ("cubic", "cubic or nnz"),
    "start-round": (1, "t0: the first prune ends round t0 + 1"),
    "frequency": (1, "rounds between prunes"),
    "prox-mu": (0.01, "FedProx mu (fedprox only)"),
    "num-clients": (8, "SuperNodes to wait for before round 1"),
    "participation": (1.0, "fraction of clients selected per round, in (0, 1]"),
    "min-clients": (1, "fewest usable updates a round may aggregate"),
    "client-timeout": (0.0, "seconds to wait for a round's replies (0 = no limit)"),
    "connect-timeout": (600.0, "seconds to wait for the SuperNodes to connect"),
    "local-epochs": (4, "local epochs per round"),
    "batch-size": (1, "local batch size"),
    "lr": (5e-5, "learning rate"),
    "optimizer": ("sgd", "sgd or adam"),
    "momentum": (0.0, "SGD momentum"),
    "weight-decay": (0.0, "L2 penalty"),
    "seed": (0, "seed of the initial model, client selection and batch order"),
    "wire-values": ("float32", "float32 or float16 values on the wire"),
    "compress-mask": (True, "zstd on the mask bits"),
    "compress-payload": (False, "zstd on the whole message"),
    "resolution-mm": (2, "model input grid: 2, 4 or 6 mm"),
    "width": (1.0, "channel multiplier of BrainAgeCNN"),
    "mean-age": (62.68, "initial prediction in years"),
    "output-scale": (1.0, "fixed output multiplier (years per unit)"),
    "test-dir": ("", "BIDS-like folder on the server to evaluate on ('' = none)"),
    "output-dir": ("results/flower", "where the server writes checkpoints and tables (absolute path advised)"),
}


def _settings(run_config: Mapping[str, UserConfigValue]) -> dict[str, Any]:
    unknown = sorted(set(run_config) - set(RUN_CONFIG))
    if unknown:
        logger.warning("run config keys %s are not used by fedsparse (known: %s)", unknown, sorted(RUN_CONFIG))
    return {k: run_config.get(k, default) for k, (default, _) in RUN_CONFIG.items()}


def run_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section with every key at its default (for ``pyproject.toml``)."""
    def value(v: UserConfigValue) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)

    key_width = max(len(k) for k in RUN_CONFIG)
    value_width = max(len(value(v)) for v, _ in RUN_CONFIG.values())
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{k:<{key_width}} = {value(v):<{value_width}}  # {doc}" for k, (v, doc) in RUN_CONFIG.items()]
    return "\n".join(lines) + "\n"


def strategy_from_config(run_config: Mapping[str, UserConfigValue]) -> Strategy:
    """The run's strategy (:func:`~fedsparse_lib.federated.strategies.make_strategy`)."""
    s = _settings(run_config)
    return make_strategy(str(s["method"]), num_rounds=int(s["num-rounds"]), final_sparsity=float(s["final-sparsity"]),
                         schedule=str(s["schedule"]), start_round=int(s["start-round"]), frequency=int(s["frequency"]),
                         prox_mu=float(s["prox-mu"]), seed=int(s["seed"]))


def model_fn_from_config(run_config: Mapping[str, UserConfigValue]) -> Callable[[], nn.Module]:
    """Builds the run's BrainAgeCNN (input grid from ``resolution-mm``)."""
    from ..data.grids import grid_for_resolution
    from ..models import BrainAgeCNN

    s = _settings(run_config)
    shape, _ = grid_for_resolution(int(s["resolution-mm"]))
    width, mean_age, scale = float(s["width"]), float(s["mean-age"]), float(s["output-scale"])
    return lambda: BrainAgeCNN(shape, width=width, mean_age=mean_age, output_scale=scale)


def _dataset(folder: str, resolution_mm: int, cache_dir: str | None) -> Any:
    from ..data.datasets import BrainAgeDataset, build_manifest

    return BrainAgeDataset(build_manifest(folder), resolution_mm=resolution_mm, cache_dir=cache_dir or None,
                           progress=False)


def server_from_config(run_config: Mapping[str, UserConfigValue]) -> FlowerServer:
    """The :class:`FlowerServer` of a run config."""
    s = _settings(run_config)
    test_set = _dataset(str(s["test-dir"]), int(s["resolution-mm"]), None) if s["test-dir"] else None
    timeout = float(s["client-timeout"])
    return FlowerServer(strategy_from_config(run_config), model_fn_from_config(run_config),
                        num_clients=int(s["num-clients"]), local_epochs=int(s["local-epochs"]),
                        tune_rounds=int(s["tune-rounds"]), participation=float(s["participation"]),
                        train_config=TrainConfig(lr=float(s["lr"]), optimizer=str(s["optimizer"]),
                                                 momentum=float(s["momentum"]),
                                                 weight_decay=float(s["weight-decay"])),
                        seed=int(s["seed"]), min_clients=int(s["min-clients"]),
                        client_timeout=timeout if timeout > 0 else None,
                        wire=WireOptions(values=str(s["wire-values"]), compress_mask=bool(s["compress-mask"]),
                                         compress_payload=bool(s["compress-payload"])),
                        test_set=test_set, checkpoint_dir=Path(str(s["output-dir"])) / "checkpoints",
                        connect_timeout=float(s["connect-timeout"]), progress=False)


_CLIENTS: dict[tuple[int, int], FlowerClient] = {}


def client_from_context(context: Context) -> FlowerClient:
    """The node's :class:`FlowerClient` (built once per run and node from the run and node configs)."""
    key = (context.run_id, context.node_id)
    if key not in _CLIENTS:
        s = _settings(context.run_config)
        data_dir = context.node_config.get("data-dir")
        if not data_dir:
            raise ValueError(f"node {context.node_id} has no 'data-dir' in its node config "
                             f"{dict(context.node_config)}; start it with flower-supernode --node-config "
                             "'partition-id=0 data-dir=\"/path/to/site\"'")
        cache_dir = context.node_config.get("cache-dir")
        device = str(context.node_config.get("device", "cpu"))
        strategy = strategy_from_config(context.run_config)
        model_fn = model_fn_from_config(context.run_config)

        def data_fn(ctx: Context) -> DatasetClient:
            dataset = _dataset(str(data_dir), int(s["resolution-mm"]), str(cache_dir) if cache_dir else None)
            return DatasetClient(partition_id(ctx), dataset, np.arange(len(dataset)), batch_size=int(s["batch-size"]))

        _CLIENTS[key] = FlowerClient(strategy, model_fn, data_fn, device=device)
    return _CLIENTS[key]


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(result: FlowerResult, output_dir: str | os.PathLike) -> None:
    """Write ``rounds.csv``, ``clients.csv``, ``faults.csv`` and ``nodes.csv`` (atomically) under ``output_dir``."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("rounds", "clients", "faults", "nodes"):
        _write_csv_atomic(getattr(result, name), folder / f"{name}.csv")


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    server = server_from_config(context.run_config)
    server(grid, context)
    output_dir = _settings(context.run_config)["output-dir"]
    write_tables(server.result(), str(output_dir))
    logger.info("wrote the run's tables and checkpoints under %s", output_dir)


client_app = client_app_from(client_from_context)

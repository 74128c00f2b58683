"""Flower adapters over the engine-agnostic federated core (no algorithm code of their own).

The same :class:`~fedsparse_lib.federated.strategies.Strategy` that the in-process engine
(:func:`~fedsparse_lib.federated.simulation.run_federated`) drives runs here as a Flower
``ServerApp`` and ``ClientApp`` (Message API), for federations across machines (DESIGN.md decision 2).

server_app
    :class:`FlowerServer`: the ServerApp's main function (select, configure, broadcast, decode and
    check updates, aggregate, evaluate, checkpoint) and its records (:class:`FlowerResult`).
client_app
    :class:`FlowerClient` / :func:`make_client_app`: the ClientApp (decode, fit, encode); a node's
    data from its ``partition-id`` (:func:`by_partition`).
protocol
    Message types, record names, and our codec bytes inside a Flower ``ArrayRecord``.
inline
    :func:`run_flower`: a whole Flower federation in this process over :class:`InlineGrid`
    (Flower's wire format, no Ray); bit-identical to ``run_federated`` for the same seed.
deploy
    ``server_app`` / ``client_app`` configured from ``flwr run``'s run config and each SuperNode's
    node config, for a real deployment (``fedsparse_lib.flower.deploy:server_app``).
"""

from fedsparse_lib.flower.client_app import FlowerClient, by_partition, client_app_from, make_client_app, partition_id
from fedsparse_lib.flower.inline import InlineGrid, run_flower
from fedsparse_lib.flower.protocol import MessageKind, Record
from fedsparse_lib.flower.server_app import FlowerResult, FlowerServer, needs_client_data

__all__ = [
    "FlowerClient",
    "FlowerResult",
    "FlowerServer",
    "InlineGrid",
    "MessageKind",
    "Record",
    "by_partition",
    "client_app_from",
    "make_client_app",
    "needs_client_data",
    "partition_id",
    "run_flower",
]

"""Federated learning: one engine-agnostic core, the in-process engine, the wire codec.

strategies
    What clients receive, what they do, how the server merges and prunes: FedAvg, FedProx,
    FedSparsify-Global, FedSparsify-Local (majority vote), OMP, random, SNIP, GraSP, PruneFL
    (:func:`make_strategy`).
simulation
    The in-process engine (:func:`run_federated`): sequential clients, participation, seeds,
    faults, per-round tidy records, checkpoints and exact resume.
messages / codec
    The bytes of each message (dense or bit mask + kept values, float32 or float16, zstd); the
    reported communication is their length, beside the paper's formula and the Shannon estimate.
aggregation / agreement
    Pure maths over named tensors: FedAvg, majority vote (ties kept), masked average, proximal
    term; Jaccard agreement of client masks and vote histograms.
checkpoint
    Atomic round checkpoints (safetensors + JSON).

The Flower apps in :mod:`fedsparse_lib.flower` call the same strategies.
"""

from fedsparse_lib.federated.codec import (
    CodecError,
    Encoding,
    ValueDType,
    decode,
    encode,
    message_bytes,
    paper_bytes,
    shannon_bound_bits,
)
from fedsparse_lib.federated.messages import ClientFault, WireOptions
from fedsparse_lib.federated.simulation import DatasetClient, FederatedResult, FederationError, run_federated
from fedsparse_lib.federated.strategies import METHODS, ClientTask, ClientUpdate, ServerState, Strategy, make_strategy

__all__ = [
    "METHODS",
    "ClientFault",
    "ClientTask",
    "ClientUpdate",
    "CodecError",
    "DatasetClient",
    "Encoding",
    "FederatedResult",
    "FederationError",
    "ServerState",
    "Strategy",
    "ValueDType",
    "WireOptions",
    "decode",
    "encode",
    "make_strategy",
    "message_bytes",
    "paper_bytes",
    "run_federated",
    "shannon_bound_bits",
]

"""Benchmark: overhead of the in-process federated engine against the clients' local training.

Target (issue 5): everything except the clients' local training (selection, encoding and decoding
every message, the server's checks, aggregation, pruning, checkpointing) takes under 3 % of a
round's wall time at quick-profile sizes.

Setup: BrainAgeCNN at 6 mm (30 x 36 x 30), width 0.5 (``--width``; notebook 03's quick profile
uses 0.25), 8 clients of 30 volumes (the quick cohort's 240 training subjects), batch 8, 1 local
epoch (``--local-epochs``; the quick profile uses 4), Adam 1e-3, 60 test volumes; synthetic random
volumes and ages from a fixed seed; ``--threads`` torch threads (default 2). FedSparsify-Global and
FedSparsify-Local to 95 % over 5 rounds (so both dense and sparse messages are timed), with a
checkpoint after every round.

The round's wall time is split from the engine's own records into: local training (inside
``Strategy.fit``), evaluation of the global model on the test set (a measurement the user asks
for, reported apart), and the engine's overhead (the rest). Printed per method with the target;
written to ``<out>/engine.json``; exits 1 when the overhead misses the target.

Usage::

    .venv/bin/python benchmarks/bench_engine.py [--rounds 5] [--width 0.5] [--local-epochs 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from _common import write_results

from fedsparse_lib.federated import DatasetClient, make_strategy, run_federated
from fedsparse_lib.models import BrainAgeCNN, count_parameters
from fedsparse_lib.training import TrainConfig

TARGET = 0.03
SHAPE = (30, 36, 30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=30)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.clients * args.per_client + 60
    ages = torch.rand(n, generator=g) * 37 + 45
    data = TensorDataset(torch.randn(n, 1, *SHAPE, generator=g), ages)
    test = TensorDataset(data.tensors[0][-60:], ages[-60:])
    clients = [DatasetClient(k, data, np.arange(k * args.per_client, (k + 1) * args.per_client), batch_size=8)
               for k in range(args.clients)]

    def model_fn() -> BrainAgeCNN:
        return BrainAgeCNN(SHAPE, width=args.width, mean_age=63.5, output_scale=10.0)

    results: dict[str, object] = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                                  "parameters": count_parameters(model_fn()), "rounds": args.rounds,
                                  "clients": args.clients, "per_client": args.per_client, "width": args.width,
                                  "local_epochs": args.local_epochs, "target": TARGET}
    print(f"{'method':<20}{'wall s':>9}{'train':>9}{'eval':>9}{'engine':>9}{'engine/wall':>13}{'target':>9}")
    status = 0
    for method in ("fedsparsify_global", "fedsparsify_local"):
        strategy = make_strategy(method, num_rounds=args.rounds, final_sparsity=0.95)
        with tempfile.TemporaryDirectory() as ckpt:
            result = run_federated(strategy, model_fn, clients, test, local_epochs=args.local_epochs,
                                   train_config=TrainConfig(lr=1e-3, optimizer="adam"), checkpoint_dir=ckpt,
                                   progress=False)
        rounds = result.rounds.query("server_round > 0")
        wall = float(rounds["wall_seconds"].sum())
        train = float(rounds["train_seconds"].sum())
        evaluation = float(rounds["eval_seconds"].sum())
        engine = wall - train - evaluation
        ratio = engine / wall
        status |= ratio >= TARGET
        print(f"{method:<20}{wall:9.2f}{train:9.2f}{evaluation:9.2f}{engine:9.3f}{ratio:13.2%}{TARGET:9.0%}")
        results[method] = {"wall_seconds": wall, "train_seconds": train, "eval_seconds": evaluation,
                           "engine_seconds": engine, "engine_fraction": ratio,
                           "engine_fraction_with_eval": (engine + evaluation) / wall,
                           "bytes_up": int(rounds["bytes_up"].sum()), "bytes_down": int(rounds["bytes_down"].sum()),
                           "final_sparsity": float(rounds["sparsity"].iloc[-1])}
        print(f"{'':<20}(evaluation included: {(engine + evaluation) / wall:.1%} of the wall time)")
    write_results(args.out, "engine.json", results)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: size on disk and inference time of the paper's model, dense vs pruned, honestly.

For the full-width BrainAgeCNN (2,948,801 parameters), random (Glorot) weights or a trained
checkpoint, pruned with global magnitude masks at several sparsities:

- storage (``sparse_storage.storage_report``): dense float32 safetensors, its gzip, bit mask +
  float32 kept values (the real file), that file through zstd, and the paper's formula (non-zero
  count x 4 bytes, which ignores where the non-zeros are); the file is also written, read back
  and compared, and encode/decode times are measured;
- inference time per volume, batch 1 and 8, at 6 mm and 2 mm input: the dense model against the
  same model with pruned weights set to 0, both on PyTorch's dense kernels (repetitions
  interleaved). Unstructured zeros give no speed-up with dense kernels: the multiply-adds by 0
  are still done. PyTorch has no sparse Conv3d: the benchmark tries ``F.conv3d`` with a sparse
  (COO) weight and records the error.

Usage::

    .venv/bin/python benchmarks/bench_sparse_model.py [--sparsities 0 0.5 0.9 0.95 0.99]
        [--checkpoint model.safetensors] [--resolutions 6 2] [--batches 1 8]

Prints tables and writes ``<out>/sparse_model.json``. Informational: no target, exit 0 unless
the round trip fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import write_results

from fedsparse_lib.models import BrainAgeCNN, count_parameters, flops_per_volume
from fedsparse_lib.pruning import apply_mask, emptied_layers, global_magnitude_mask, mask_sparsity
from fedsparse_lib.sparse_storage import decode_sparse, encode_sparse, load_sparse, save_sparse, storage_report
from fedsparse_lib.training import load_checkpoint

GRIDS = {6: (30, 36, 30), 4: (45, 54, 45), 2: (91, 109, 91)}


def storage(state: dict[str, torch.Tensor], sparsity: float, tmp: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Mask, prune, report sizes, and check the file round trip; returns (record, mask)."""
    mask = global_magnitude_mask(state, sparsity)
    pruned = {k: v.clone() for k, v in state.items()}
    apply_mask(pruned, mask)
    report = storage_report(pruned, mask)
    t0 = time.perf_counter()
    data = encode_sparse(pruned, mask)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_sparse(data)
    decode_s = time.perf_counter() - t0
    path = tmp / f"model_{sparsity}.safetensors"
    file_bytes = save_sparse(path, pruned, mask)
    state2, mask2 = load_sparse(path)
    exact = (all(torch.equal(state2[k].view(torch.int32), pruned[k].view(torch.int32)) for k in pruned)
             and all(torch.equal(mask2[k], mask[k]) for k in mask))
    record = {
        "sparsity": sparsity, "mask_sparsity": mask_sparsity(mask),
        "kept": sum(int(m.sum()) for m in mask.values()),
        "emptied_weight_tensors": [n for n in emptied_layers(mask) if n.endswith("weight")],
        "sizes": report.to_dict(orient="records"), "file_bytes": file_bytes,
        "file_bytes_match_report": file_bytes == int(report.set_index("format").loc["bitmask_values", "bytes"]),
        "round_trip_exact": exact, "encode_s": encode_s, "decode_s": decode_s,
    }
    return record, mask


def time_inference(states: dict[str, dict[str, torch.Tensor]], shape: tuple[int, int, int], batch: int,
                   repeats: int, seed: int) -> dict[str, list[float]]:
    """Seconds per forward pass of each state's model.

    Repetitions are interleaved across models, and the order rotates from one repetition to the
    next so that no model always runs first (after the others' memory has been freed).
    """
    models = {}
    for label, state in states.items():
        model = BrainAgeCNN(shape)
        model.load_state_dict(state)
        models[label] = model.eval()
    x = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (allocator, oneDNN primitive cache)
            model(x)
        labels = list(models)
        for r in range(repeats):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                model = models[label]
                t0 = time.perf_counter()
                model(x)
                times[label].append(time.perf_counter() - t0)
    return times


def sparse_conv_attempt() -> str:
    """Try a Conv3d with a sparse (COO) weight; return what happens."""
    w = torch.randn(4, 1, 3, 3, 3)
    w[w.abs() < 1] = 0
    try:
        torch.nn.functional.conv3d(torch.randn(1, 1, 6, 6, 6), w.to_sparse(), padding=1)
    except Exception as exc:  # noqa: BLE001 - the point is to report whatever PyTorch raises
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "ran (a sparse Conv3d exists in this PyTorch build)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.95, 0.99])
    parser.add_argument("--checkpoint", default=None,
                        help="a training.save_checkpoint file of the full-width model (default: random weights)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[6, 2], choices=sorted(GRIDS),
                        help="input grids in mm")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--time-sparsities", type=float, nargs="+", default=[0.95],
                        help="pruned models timed against the dense one")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model at 6 / 4 mm")
    parser.add_argument("--repeats-2mm", type=int, default=3, help="timed forward passes per model at 2 mm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to time (on a busy machine, 2 threads can wait for a "
                             "free core at every op: 1 thread is then faster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads))
    t_start = time.perf_counter()

    torch.manual_seed(args.seed)
    model = BrainAgeCNN()
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "platform": platform.platform(),
                    "load_avg_1min": os.getloadavg()[0]},
        "weights": args.checkpoint or f"random Glorot initialisation, seed {args.seed}",
        "parameters": count_parameters(model), "storage": [], "inference": [],
    }

    # --- storage -----------------------------------------------------------------------------
    masks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in sorted(set(args.sparsities) | set(args.time_sparsities)):
            record, masks[s] = storage(state, s, Path(tmp))
            if s in args.sparsities:
                results["storage"].append(record)
    formats = [row["format"] for row in results["storage"][0]["sizes"]]
    print(f"\nmodel size: BrainAgeCNN, {results['parameters']:,d} parameters, weights: {results['weights']}")
    print(f"{'sparsity':>8s} " + " ".join(f"{f:>22s}" for f in formats))
    for r in results["storage"]:
        cells = [f"{row['bytes'] / 1e3:9.1f} kB ({row['ratio_to_dense']:6.3f})" for row in r["sizes"]]
        print(f"{r['sparsity']:8.3f} " + " ".join(f"{c:>22s}" for c in cells))
    print("kB = 1000 bytes; (ratio to dense). dense_float32 = safetensors of the dense tensors; "
          "bitmask_values = the save_sparse file (packed mask bits + float32 kept values, real bytes); "
          "paper_nonzero_x4 = the paper's formula (no cost for positions).")
    for r in results["storage"]:
        emptied = r["emptied_weight_tensors"]
        note = f"; emptied weight tensors: {', '.join(emptied)}" if emptied else ""
        print(f"  sparsity {r['sparsity']:.3f}: kept {r['kept']:,d}; encode {1000 * r['encode_s']:.0f} ms, decode "
              f"{1000 * r['decode_s']:.0f} ms; file == report: {r['file_bytes_match_report']}; exact round trip: "
              f"{r['round_trip_exact']}{note}")

    # --- inference ---------------------------------------------------------------------------
    timed = {"dense": state}
    for s in args.time_sparsities:
        pruned = {k: v.clone() for k, v in state.items()}
        apply_mask(pruned, masks[s])
        timed[f"pruned {s:g}"] = pruned
    print("\ninference time per volume (ms), dense kernels, median of interleaved repetitions (order rotating); "
          "ratio = pruned / dense")
    print(f"{'threads':>7s} {'grid':>5s} {'batch':>5s} {'GFLOP/vol':>9s} " + " ".join(f"{k:>12s}" for k in timed)
          + " " + " ".join(f"{'ratio ' + k.split()[-1]:>11s}" for k in list(timed)[1:]))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mm in args.resolutions:
            shape = GRIDS[mm]
            gflop = flops_per_volume(BrainAgeCNN(shape)) / 1e9
            for batch in args.batches:
                reps = args.repeats_2mm if mm == 2 else args.repeats
                times = time_inference(timed, shape, batch, reps, args.seed)
                per_vol = {k: statistics.median(v) / batch for k, v in times.items()}
                rec = {"threads": threads, "resolution_mm": mm, "input_shape": list(shape), "batch": batch,
                       "repeats": reps, "gflop_per_volume_dense_kernels": gflop, "s_per_forward": times,
                       "s_per_volume_median": per_vol,
                       "ratio_to_dense": {k: v / per_vol["dense"] for k, v in per_vol.items()}}
                results["inference"].append(rec)
                print(f"{threads:7d} {mm:3d}mm {batch:5d} {gflop:9.2f} "
                      + " ".join(f"{1000 * v:12.1f}" for v in per_vol.values())
                      + " " + " ".join(f"{rec['ratio_to_dense'][k]:11.3f}" for k in list(timed)[1:]))
    results["sparse_conv3d_attempt"] = sparse_conv_attempt()
    results["total_s"] = time.perf_counter() - t_start
    print("Unstructured zeros give no speed-up with dense kernels: a pruned model does the same multiply-adds "
          "(same GFLOP) as the dense one, so its time matches the dense time up to noise (ratio ~1).")
    print(f"PyTorch has no sparse Conv3d: F.conv3d with a sparse COO weight -> {results['sparse_conv3d_attempt']}")
    if results["machine"]["load_avg_1min"] > (os.cpu_count() or 1):
        print("The machine is busy (load average above the core count): an op split over several threads can wait "
              "for a free core at every step, so multi-thread timings may overstate the cost; compare rows "
              "with the same thread count.")
    print(f"1-minute load average at start {results['machine']['load_avg_1min']:.2f} on {os.cpu_count()} cpus; "
          f"total {results['total_s']:.0f} s")
    write_results(args.out, "sparse_model.json", results)
    ok = all(r["round_trip_exact"] and r["file_bytes_match_report"] for r in results["storage"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

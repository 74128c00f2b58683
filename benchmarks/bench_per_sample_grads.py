"""Benchmark: per-sample gradients with ``torch.func.vmap(grad(...))`` against a Python loop, same run.

What is measured (issue 6): :func:`fedsparse_lib.privacy.per_sample_gradients` computes the
gradient of every subject's squared error for the white-box membership attacks. ``method="vmap"``
runs one batched forward/backward per batch; ``method="loop"`` (the reference) one forward and one
``autograd.grad`` per sample. Both run on BrainAgeCNN at 6 mm (30 x 36 x 30), width 0.5 (add
``--shapes 45 54 45`` for 4 mm), for the last two layers (``net.conv6.*``, ``net.output.*``, the
attack's default) and for all layers, on the same random volumes and ages (fixed seed), with
``torch.set_num_threads(1)`` by default: on a shared 2-core machine two threads per op spin-wait for
each other whenever another process holds a core, which slows the batch-1 loop by up to 20x and
makes the ratio meaningless (``--threads 2`` on an idle machine measures the multi-threaded case).

After one untimed warm-up of each, the peak RSS of one run of each is sampled (above the level
before it), then the timed repetitions are interleaved (loop_0, vmap_0, loop_1, ..., vmap_{R-1},
loop_R) so that drift in machine load hits both alike. Reported: median samples per second of
each, the speed-up (loop time / vmap time) of the medians, the median over repetitions of vmap_i
against the mean of its two loop neighbours (the "pair speed-up"), the same in process CPU time,
and the largest difference between the two methods' gradients relative to the largest gradient
(they must agree: exit 1 otherwise).
There is no speed target; the numbers say whether vmap is worth its memory.

Usage::

    .venv/bin/python benchmarks/bench_per_sample_grads.py [--shapes 30 36 30 [45 54 45]] [--width 0.5]
        [--samples 16] [--batch 8] [--repeats 5]

Prints a table (layers, loop, vmap, speed-up) and writes ``<out>/per_sample_grads.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

from _common import PeakMemory, write_results

from fedsparse_lib.models import BrainAgeCNN, count_parameters
from fedsparse_lib.privacy import last_layer_names, per_sample_gradients

# max |vmap - loop| / max |loop|. float32 rounding: at 4 mm the loop's single-sample weight gradient of
# conv1 (a sum over ~110k voxels) is off by ~3e-4 of the largest gradient against a float64 loop,
# while vmap's batched one is off by ~5e-6.
TOLERANCE = 1e-3


def measure(shape: tuple[int, int, int], layers: str, *, width: float, samples: int, batch: int, repeats: int,
            seed: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BrainAgeCNN(shape, width=width, mean_age=63.0, output_scale=10.0)
    x = torch.randn(samples, 1, *shape, generator=g)
    y = 45 + 36 * torch.rand(samples, generator=g)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, samples, batch)]
    names = last_layer_names(model) if layers == "last" else [n for n, _ in model.named_parameters()]
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)

    def run(method: str) -> tuple[float, float, dict[str, torch.Tensor]]:
        c0, t0 = time.process_time(), time.perf_counter()
        grads = per_sample_gradients(model, batches, names=names, method=method)
        return time.perf_counter() - t0, time.process_time() - c0, grads

    _, _, ref = run("loop")  # warm-up (and the reference gradients)
    _, _, fast = run("vmap")
    scale = max(float(t.abs().max()) for t in ref.values())
    max_rel_diff = max(float((fast[n] - ref[n]).abs().max()) for n in names) / scale
    del ref, fast
    peak_above = {}
    for method in ("loop", "vmap"):
        rss = psutil.Process().memory_info().rss
        with PeakMemory() as mem:
            run(method)
        peak_above[method] = max(0, mem.peak - rss) / 2**20
    # loop_0, vmap_0, loop_1, ..., vmap_{R-1}, loop_R: every vmap run has a loop run on each side
    t_loop, t_vmap, cpu_loop, cpu_vmap = [], [], [], []
    for i in range(repeats + 1):
        wall, cpu, _ = run("loop")
        t_loop.append(wall)
        cpu_loop.append(cpu)
        if i < repeats:
            wall, cpu, _ = run("vmap")
            t_vmap.append(wall)
            cpu_vmap.append(cpu)
    pair = [(t_loop[i] + t_loop[i + 1]) / 2 / t_vmap[i] for i in range(repeats)]
    cpu_pair = [(cpu_loop[i] + cpu_loop[i + 1]) / 2 / cpu_vmap[i] for i in range(repeats)]
    return {
        "input_shape": list(shape), "width": width, "layers": layers, "parameters_differentiated": n_params,
        "parameters_model": count_parameters(model), "samples": samples, "batch": batch, "repeats": repeats,
        "loop_s": t_loop, "vmap_s": t_vmap,
        "loop_samples_per_s": samples / statistics.median(t_loop),
        "vmap_samples_per_s": samples / statistics.median(t_vmap),
        "speedup_of_medians": statistics.median(t_loop) / statistics.median(t_vmap),
        "median_pair_speedup": statistics.median(pair),
        "median_pair_speedup_cpu_time": statistics.median(cpu_pair),
        "loop_peak_rss_above_start_mb": peak_above["loop"],
        "vmap_peak_rss_above_start_mb": peak_above["vmap"],
        "max_relative_difference": max_rel_diff,
        "agree": max_rel_diff <= TOLERANCE,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=int, nargs="+", default=[30, 36, 30],
                        help="one or more input sizes, 3 numbers each (default 6 mm: 30 36 30)")
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier")
    parser.add_argument("--layers", nargs="+", default=["last", "all"], choices=["last", "all"])
    parser.add_argument("--samples", type=int, default=16, help="samples per repetition")
    parser.add_argument("--batch", type=int, default=8, help="samples per vmap call")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of vmap (loop: one more)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads spin-wait for each other)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    if len(args.shapes) % 3:
        parser.error(f"--shapes takes 3 numbers per input size, got {args.shapes}")
    shapes = [tuple(args.shapes[i:i + 3]) for i in range(0, len(args.shapes), 3)]
    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_1min": os.getloadavg()[0]},
        "tolerance": TOLERANCE, "runs": [],
    }
    t_start = time.perf_counter()
    for shape in shapes:
        for layers in args.layers:
            results["runs"].append(measure(shape, layers, width=args.width, samples=args.samples, batch=args.batch,
                                           repeats=args.repeats, seed=args.seed))
    results["total_s"] = time.perf_counter() - t_start

    print(f"\nper-sample gradients of the squared error: BrainAgeCNN width {args.width}, {args.samples} samples per "
          f"repetition, vmap batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'input':>12s} {'layers':>6s} {'params':>9s} {'loop smp/s':>10s} {'vmap smp/s':>10s} {'speed-up':>8s} "
          f"{'pair sp-up':>10s} {'cpu sp-up':>9s} {'loop MB':>8s} {'vmap MB':>8s} {'rel diff':>9s}")
    ok = True
    for r in results["runs"]:
        ok &= r["agree"]
        print(f"{'x'.join(map(str, r['input_shape'])):>12s} {r['layers']:>6s} {r['parameters_differentiated']:9,d} "
              f"{r['loop_samples_per_s']:10.1f} {r['vmap_samples_per_s']:10.1f} {r['speedup_of_medians']:7.2f}x "
              f"{r['median_pair_speedup']:9.2f}x {r['median_pair_speedup_cpu_time']:8.2f}x "
              f"{r['loop_peak_rss_above_start_mb']:8.0f} "
              f"{r['vmap_peak_rss_above_start_mb']:8.0f} {r['max_relative_difference']:9.1e}")
    print("loop = one forward + autograd.grad per sample; vmap = torch.func.vmap(grad(...)) per batch. speed-up = "
          "loop/vmap of the median times; pair sp-up = median of loop/vmap over interleaved neighbours (robust to "
          "load drift); cpu sp-up = the same in process CPU time; MB = peak RSS above the level before one run;\n"
          f"rel diff = max |vmap - loop| / max |loop| (must be <= {TOLERANCE:g}).")
    if results["machine"]["load_avg_1min"] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("The machine is busy (load average above the core count): with several torch threads every op can "
              "wait for a free core; the timings are then noisy and pessimistic. Compare with --threads 1.")
    print(f"1-minute load average at start {results['machine']['load_avg_1min']:.2f} on {os.cpu_count()} cpus; "
          f"total {results['total_s']:.0f} s")
    write_results(args.out, "per_sample_grads.json", results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the MRI preprocessing pipeline on the synthetic raw cohort: accuracy and speed.

Targets (issue 3), over 20 raw subjects: mean brain-mask Dice >= 0.95, mean registration error
<= 2 mm (mean distance over the true brain between the estimated and the true raw -> MNI affine),
and under 20 s per subject on a 2-core machine (wall-clock time of the whole run divided by the
number of subjects, ``--jobs`` worker processes). Each skull-stripping method is run in turn on
the same cohort; per-step seconds are the means of the times measured inside the workers.

Usage::

    .venv/bin/python benchmarks/bench_preprocess.py [--n-subjects 20] [--jobs N]
        [--skull-strip deepbet template] [--out benchmarks/out]

Prints a table (measured, target, ratio) per method and writes ``<out>/preprocess.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


from _common import PeakMemory, write_results

from fedsparse_lib.data.anatomy import load_template_anatomy
from fedsparse_lib.data.preprocess import STEPS, deepbet_available, preprocess_dataset
from fedsparse_lib.data.synthetic import synthesize_cohort

TARGET_DICE = 0.95
TARGET_ERROR_MM = 2.0
TARGET_S_PER_SUBJECT = 20.0


def run_method(raw: Path, out: Path, method: str, jobs: int, seed: int) -> dict:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        qc = preprocess_dataset(raw, out, n_jobs=jobs, skull_strip=method, seed=seed, progress=False)
        wall = time.perf_counter() - t0
    ok = qc[qc["status"] == "ok"]
    return {
        "skull_strip": method,
        "n_ok": int(len(ok)),
        "n_failed": int(len(qc) - len(ok)),
        "failures": qc.loc[qc["status"] != "ok", ["participant_id", "step", "reason"]].to_dict("records"),
        "wall_s": wall,
        "wall_s_per_subject": wall / len(qc),
        "worker_s_per_subject": float(ok["runtime_total_s"].mean()),
        "step_s_per_subject": {s: float(ok[f"runtime_{s}_s"].mean()) for s in STEPS},
        "mean_dice": float(ok["dice"].mean()),
        "min_dice": float(ok["dice"].min()),
        "mean_registration_error_mm": float(ok["registration_error_mm"].mean()),
        "max_registration_error_mm": float(ok["registration_error_mm"].max()),
        "mean_similarity": float(ok["similarity"].mean()),
        "peak_rss_gib": mem.peak / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-subjects", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--skull-strip", nargs="+", default=["deepbet", "template"], choices=["deepbet", "template"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the cohort and of the registrations")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    jobs = args.jobs or os.cpu_count() or 1
    methods = [m for m in args.skull_strip if m != "deepbet" or deepbet_available()]
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "n_subjects": args.n_subjects, "jobs": jobs, "seed": args.seed,
                     "targets": {"mean_dice": TARGET_DICE, "mean_registration_error_mm": TARGET_ERROR_MM,
                                 "wall_s_per_subject": TARGET_S_PER_SUBJECT},
                     "methods": {}}
    load_template_anatomy()  # the generator's cache, outside the timings

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        t0 = time.perf_counter()
        synthesize_cohort(raw, n_subjects=args.n_subjects, seed=args.seed, raw=True, n_jobs=jobs, progress=False)
        results["synthesize_s"] = time.perf_counter() - t0
        for method in methods:
            results["methods"][method] = run_method(raw, Path(tmp) / f"out-{method}", method, jobs, args.seed)

    print(f"\npreprocessing benchmark: {args.n_subjects} raw synthetic subjects, {jobs} worker(s), "
          f"{os.cpu_count()} cpus")
    ok = True
    for method, r in results["methods"].items():
        rows = [("mean brain-mask Dice", r["mean_dice"], TARGET_DICE, r["mean_dice"] >= TARGET_DICE),
                ("mean registration error (mm)", r["mean_registration_error_mm"], TARGET_ERROR_MM,
                 r["mean_registration_error_mm"] <= TARGET_ERROR_MM),
                ("wall seconds per subject", r["wall_s_per_subject"], TARGET_S_PER_SUBJECT,
                 r["wall_s_per_subject"] <= TARGET_S_PER_SUBJECT)]
        print(f"\nskull_strip={method}: {r['n_ok']} ok, {r['n_failed']} failed")
        print(f"{'measure':32s} {'measured':>10s} {'target':>10s} {'ratio':>8s}  met")
        for name, value, target, met in rows:
            print(f"{name:32s} {value:10.3f} {target:10.3f} {value / target:8.2f}  {'yes' if met else 'NO'}")
            ok &= bool(met) and r["n_failed"] == 0
        steps = "  ".join(f"{s} {t:.2f}" for s, t in r["step_s_per_subject"].items())
        print(f"seconds per subject per step (one worker): {steps}; total {r['worker_s_per_subject']:.2f}")
        print(f"worst Dice {r['min_dice']:.4f}, worst registration error {r['max_registration_error_mm']:.2f} mm, "
              f"peak memory {r['peak_rss_gib']:.2f} GiB")
        for failure in r["failures"]:
            print(f"  failed: {failure['participant_id']} at {failure['step']}: {failure['reason']}")
    write_results(args.out, "preprocess.json", results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

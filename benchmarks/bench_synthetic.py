"""Benchmark of the synthetic cohort generator: speed, peak memory, learnability.

Targets (issue 2): 500 subjects at 2 mm in under 60 s on a 2-core machine, peak memory under
4 GiB (the whole process tree), and a ridge regression on 6 mm voxels (400 train / 100 test)
reaching a test MAE at most 60 % of the predict-the-mean MAE, printed beside the theoretical floor
and the best single-feature read-outs.

Usage::

    .venv/bin/python benchmarks/bench_synthetic.py [--n-subjects 500] [--jobs N] [--out benchmarks/out]

Prints a table (measured, target, ratio) and writes ``<out>/synthetic.json``.
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
from fedsparse_lib.data.datasets import build_manifest
from fedsparse_lib.data.learnability import learnability_report
from fedsparse_lib.data.synthetic import mae_floor, synthesize_cohort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-subjects", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    jobs = args.jobs or os.cpu_count() or 1
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()}, "n_subjects": args.n_subjects, "jobs": jobs}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        load_template_anatomy(cache_dir=Path(tmp) / "cache")
        results["template_cache_build_s"] = time.perf_counter() - t0
        load_template_anatomy()  # make sure the default cache exists before timing generation

        cohort = Path(tmp) / "cohort"
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            synthesize_cohort(cohort, n_subjects=args.n_subjects, seed=args.seed, n_jobs=jobs, progress=False)
            gen_s = time.perf_counter() - t0
        results["generate_s"] = gen_s
        results["subjects_per_s"] = args.n_subjects / gen_s
        results["peak_rss_gib"] = mem.peak / 2**30
        results["disk_mib"] = sum(f.stat().st_size for f in cohort.rglob("*") if f.is_file()) / 2**20

        serial = Path(tmp) / "serial"
        t0 = time.perf_counter()
        synthesize_cohort(serial, n_subjects=20, seed=args.seed + 1, n_jobs=1, progress=False)
        results["serial_s_per_subject"] = (time.perf_counter() - t0) / 20

        manifest = build_manifest(cohort, check_images=False)
        n_train = int(round(0.8 * len(manifest)))
        learn = []
        for split_seed in (0, 1):
            rep = learnability_report(manifest, n_train=n_train, n_test=len(manifest) - n_train, seed=split_seed,
                                      sigma_gap=3.0, progress=False)
            learn.append({"split_seed": split_seed, **{k: v for k, v in rep.__dict__.items()}})
        results["learnability"] = learn

    scale = args.n_subjects / 500
    rows = [
        ("generate 500 subjects (s)", results["generate_s"] / scale, 60.0),
        ("peak memory, process tree (GiB)", results["peak_rss_gib"], 4.0),
        *[(f"ridge / mean-predictor MAE (split {r['split_seed']})", r["ratio"], 0.60) for r in learn],
    ]
    print(f"\nsynthetic cohort benchmark: {args.n_subjects} subjects, {jobs} worker(s), {os.cpu_count()} cpus")
    print(f"{'measure':42s} {'measured':>10s} {'target':>10s} {'ratio':>8s}")
    for name, value, target in rows:
        print(f"{name:42s} {value:10.3f} {target:10.3f} {value / target:8.2f}")
    print(f"\nsubjects per second {results['subjects_per_s']:.1f}; one process {results['serial_s_per_subject']:.3f} "
          f"s/subject; template cache build (first use) {results['template_cache_build_s']:.1f} s; "
          f"dataset on disk {results['disk_mib']:.0f} MiB")
    for r in learn:
        print(f"split {r['split_seed']}: ridge MAE {r['ridge_mae']:.2f} y vs predict-the-mean {r['mean_predictor_mae']:.2f} y "
              f"(floor {mae_floor(3.0):.2f} y); best single voxel |r| {r['best_voxel_abs_r']:.2f} -> MAE "
              f"{r['best_voxel_test_mae']:.2f} y; best global statistic '{r['best_global_statistic']}' |r| "
              f"{r['best_global_abs_r']:.2f} -> MAE {r['best_global_test_mae']:.2f} y")
    write_results(args.out, "synthetic.json", results)
    ok = results["generate_s"] / scale < 60 and results["peak_rss_gib"] < 4 and all(r["ratio"] <= 0.6 for r in learn)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

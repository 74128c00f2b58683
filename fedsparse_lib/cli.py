"""The ``fedsparse`` command line.

Subcommands
-----------
synth       generate a synthetic brain-MRI cohort (BIDS-like)
check-data  report every problem of a dataset at once (exit 1 if any)
preprocess  raw T1 scans -> skull-stripped, MNI-registered model input, with QC
download    fetch a real dataset and convert it to the BIDS-like layout
run         execute the notebook suite headlessly with papermill
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedsparse`` command."""
    parser = argparse.ArgumentParser(prog="fedsparse", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate a synthetic brain-MRI cohort",
                       description="Generate a synthetic T1 cohort with known ages and brain-age gaps.")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--n-subjects", type=int, required=True, help="number of subjects")
    p.add_argument("--seed", type=int, required=True, help="seed of everything")
    p.add_argument("--sites", type=int, default=3, help="number of sites / scanners (default 3)")
    p.add_argument("--age-range", type=float, nargs=2, default=(45.0, 82.0), metavar=("MIN", "MAX"),
                   help="age range in years (default 45 82)")
    p.add_argument("--sigma-gap", type=float, default=3.0, help="sd of the brain-age gap in years (default 3)")
    p.add_argument("--raw", action="store_true", help="unprocessed scans (skull, misplacement, own grid)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a cohort made with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("check-data", help="validate a dataset and list every problem",
                       description="Check participants.tsv and every image of a BIDS-like dataset.")
    p.add_argument("root", help="dataset folder (participants.tsv, sub-*/anat/*_T1w.nii.gz)")
    p.add_argument("--no-images", action="store_true", help="check the table and file names only")

    p = sub.add_parser("preprocess", help="raw T1 scans -> skull-stripped, MNI-registered model input",
                       description="Reorient, N4, skull-strip, register to MNI152, resample to 2 mm, normalise; "
                                   "cached, resumable, parallel, with a QC table (derivatives/preprocess/qc.tsv).")
    p.add_argument("in_dir", help="BIDS-like dataset of raw scans")
    p.add_argument("out_dir", help="output dataset on the 2 mm MNI grid")
    p.add_argument("--skull-strip", choices=("deepbet", "template"), default="deepbet",
                   help="deepbet CNN (default) or the MNI template mask after registration")
    p.add_argument("--normalization", choices=("zscore", "zscore_brain"), default="zscore",
                   help="per-volume z-score (paper, default) or within the brain mask")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores, bounded by memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the registration's sampling")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any subject fails")
    p.add_argument("--overwrite", action="store_true", help="recompute subjects already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .data.download import add_download_arguments

    p = sub.add_parser("download", help="download a real dataset (IXI, OASIS-1, ds000030) and convert it",
                       description="Print the licence, fetch (resumable, checksum-verified), extract safely and "
                                   "convert to the BIDS-like layout.")
    add_download_arguments(p)

    p = sub.add_parser("run", help="execute the notebook suite with papermill",
                       description="Generate (or reuse) the cohort and execute every notebook headlessly.")
    p.add_argument("--profile", default="quick", help="parameter profile: quick (CPU, minutes) or paper")
    p.add_argument("--out", default="results", help="results folder (default results)")
    p.add_argument("--data-dir", default=None, help="use this dataset instead of the synthetic cohort")
    p.add_argument("--notebooks", nargs="*", default=None, help="only these notebooks (names or stems)")
    p.add_argument("--notebook-dir", default=None, help="folder of the notebooks (default: ./notebooks)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsparse`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "synth":
            return _synth(args)
        if args.command == "check-data":
            return _check_data(args)
        if args.command == "run":
            return _run(args)
        if args.command == "preprocess":
            return _preprocess(args)
        if args.command == "download":
            from .data.download import run_download

            return run_download(args, echo_fn=_echo)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        _echo(f"fedsparse {args.command}: error: {exc}", err=True)
        return 2
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown ones


def _echo(text: str, *, err: bool = False) -> None:
    """Write a line of command output (the library itself only logs)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")


def _synth(args: argparse.Namespace) -> int:
    from .data.synthetic import mae_floor, synthesize_cohort

    participants = synthesize_cohort(
        args.out, n_subjects=args.n_subjects, seed=args.seed, n_sites=args.sites, age_range=tuple(args.age_range),
        sigma_gap=args.sigma_gap, raw=args.raw, n_jobs=args.jobs, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    counts = participants["site"].value_counts().sort_index()
    _echo(f"{len(participants)} subjects in {args.out} "
          f"({', '.join(f'{site}: {n}' for site, n in counts.items())}); "
          f"ages {participants['age'].min():.1f}-{participants['age'].max():.1f}; "
          f"best achievable MAE {mae_floor(args.sigma_gap):.2f} years")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    import pandas as pd

    from .data.nifti import check_dataset

    problems = check_dataset(args.root, check_images=not args.no_images)
    if problems.empty:
        _echo(f"{args.root}: no problems found")
        return 0
    with pd.option_context("display.max_rows", None, "display.max_colwidth", 200, "display.width", 250):
        _echo(problems.to_string(index=False))
    _echo(f"\n{args.root}: {len(problems)} problem(s)", err=True)
    return 1


def _preprocess(args: argparse.Namespace) -> int:
    from .data.preprocess import PreprocessError, preprocess_dataset

    try:
        qc = preprocess_dataset(args.in_dir, args.out_dir, n_jobs=args.jobs, skull_strip=args.skull_strip,
                                normalization=args.normalization, strict=args.strict, seed=args.seed,
                                overwrite=args.overwrite, progress=not args.no_progress)
    except PreprocessError as exc:
        _echo(f"fedsparse preprocess: {exc}", err=True)
        return 1
    failed = qc[qc["status"] != "ok"]
    columns = [c for c in ("participant_id", "status", "step", "reason", "runtime_total_s", "similarity",
                           "brain_volume_ml", "dice", "registration_error_mm") if c in qc]
    with pd_options():
        _echo(qc[columns].to_string(index=False))
    _echo(f"{len(qc) - len(failed)} of {len(qc)} subjects preprocessed into {args.out_dir}"
          + (f"; {len(failed)} failed (see derivatives/preprocess/qc.tsv)" if len(failed) else ""))
    return 0


def pd_options():  # noqa: D103 - wide tables in a terminal
    import pandas as pd

    return pd.option_context("display.max_rows", None, "display.max_colwidth", 80, "display.width", 250)


def _run(args: argparse.Namespace) -> int:
    from .runner import run_suite

    summary = run_suite(profile=args.profile, out_dir=args.out, data_dir=args.data_dir,
                        notebooks=args.notebooks, notebook_dir=args.notebook_dir)
    failed = summary[summary["status"] != "ok"]
    _echo(summary.to_string(index=False))
    return 1 if len(failed) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

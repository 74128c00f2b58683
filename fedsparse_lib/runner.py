"""Run the notebook suite headlessly with papermill.

A *profile* (``notebooks/params/<name>.yaml``) says which cohort to generate when no dataset is
given, the parameters every notebook receives, and per-notebook overrides::

    cohort: {n_subjects: 300, seed: 0, n_sites: 3, age_range: [45, 82], sigma_gap: 3.0}
    parameters: {resolution_mm: 6, seed: 0, device: cpu}
    notebooks:
      01_mri_preprocessing: {n_show: 4}

Each notebook receives only the parameters its ``parameters`` cell declares, plus ``data_dir``
and ``output_dir`` (``<out>/<notebook stem>``). Executed notebooks go to ``<out>/notebooks``; a
notebook that fails is kept as ``<stem>.FAILED.ipynb`` beside them and the others still run.
``<out>/run_summary.csv`` lists status and seconds per notebook.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from .data.summary import cohort_summary
from .data.synthetic import synthesize_cohort, write_atomic

__all__ = ["load_profile", "run_suite", "find_notebooks", "default_notebook_dir"]

logger = logging.getLogger(__name__)

_PROFILE_KEYS = {"cohort", "parameters", "notebooks", "description"}


def default_notebook_dir() -> Path:
    """``./notebooks`` if it exists, else the repository's notebooks folder beside the package."""
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def load_profile(profile: str | os.PathLike, *, notebook_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a profile by name (``quick``, ``paper``: ``<notebook_dir>/params/<name>.yaml``) or path.

    Raises
    ------
    FileNotFoundError
        No such profile (the message lists the available ones).
    ValueError
        The file is not a mapping or has unknown top-level keys.
    """
    nb_dir = Path(notebook_dir) if notebook_dir is not None else default_notebook_dir()
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = nb_dir / "params" / f"{profile}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (nb_dir / "params").glob("*.yaml"))
        raise FileNotFoundError(f"profile {str(profile)!r} not found ({path}); available: {names}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - _PROFILE_KEYS:
        raise ValueError(f"{path}: a profile is a mapping with keys {sorted(_PROFILE_KEYS)}, "
                         f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    data.setdefault("cohort", {})
    data.setdefault("parameters", {})
    data.setdefault("notebooks", {})
    return data


def find_notebooks(notebook_dir: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Notebooks of the suite in order (``NN_name.ipynb``), optionally only ``names`` (stems or file names)."""
    found = sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))
    if names is None:
        return found
    by_stem = {p.stem: p for p in found}
    wanted = []
    for name in names:
        stem = Path(name).stem
        if stem not in by_stem:
            raise FileNotFoundError(f"notebook {name!r} not in {notebook_dir}; available: {sorted(by_stem)}")
        wanted.append(by_stem[stem])
    return wanted


def _kernel_name() -> str:
    """The ``fedsparse`` kernel installed by ``make`` if present, else ``python3``."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return "fedsparse" if "fedsparse" in KernelSpecManager().find_kernel_specs() else "python3"
    except Exception:  # pragma: no cover - jupyter_client is a papermill dependency
        return "python3"


_COHORT_KEYS = {"n_subjects", "seed", "n_sites", "age_range", "sigma_gap", "raw", "n_jobs"}


def _check_profile_against_notebooks(config: dict, paths: Sequence[Path], all_paths: Sequence[Path],
                                     pm: Any) -> dict[Path, dict]:
    """Fail before anything runs if the profile names unknown notebooks, parameters or cohort keys."""
    unknown_cohort = set(config["cohort"]) - _COHORT_KEYS
    if unknown_cohort:
        raise ValueError(f"profile cohort has unknown keys {sorted(unknown_cohort)}; allowed: {sorted(_COHORT_KEYS)}")
    stems = {p.stem for p in all_paths}
    unknown_nb = set(config["notebooks"]) - stems
    if unknown_nb:
        raise ValueError(f"profile sets parameters for unknown notebooks {sorted(unknown_nb)}; "
                         f"notebooks: {sorted(stems)}")
    declared_by_path = {}
    for path in paths:
        declared = pm.inspect_notebook(str(path))
        unknown = set(config["notebooks"].get(path.stem) or {}) - set(declared)
        if unknown:
            raise ValueError(f"profile sets {sorted(unknown)} for {path.stem}, which declares only {sorted(declared)}")
        declared_by_path[path] = declared
    return declared_by_path


def _describe_error(exc: BaseException) -> str:
    """One line naming what a notebook raised (papermill's own message starts with a newline)."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def run_suite(*, profile: str | os.PathLike = "quick", out_dir: str | os.PathLike = "results",
              data_dir: str | os.PathLike | None = None, notebooks: Sequence[str] | None = None,
              notebook_dir: str | os.PathLike | None = None, kernel_name: str | None = None,
              progress: bool | None = None) -> pd.DataFrame:
    """Generate or reuse the dataset, then execute the notebooks in order.

    Parameters
    ----------
    profile : str or path, default "quick"
    out_dir : path, default "results"
    data_dir : path, optional
        A BIDS-like dataset; default: the profile's synthetic cohort in ``<out>/data/synthetic``.
    notebooks : sequence of str, optional
        Only these notebooks (stems such as ``01_mri_preprocessing``).
    notebook_dir : path, optional
    kernel_name : str, optional
        Jupyter kernel; default the ``fedsparse`` kernel that ``make`` installs, else ``python3``.
    progress : bool, optional
        Progress bars; default only when standard error is a terminal (clean logs when headless).

    Returns
    -------
    pandas.DataFrame
        notebook, status (``ok`` / ``failed``), seconds, output, error.
    """
    import sys

    import papermill as pm

    if progress is None:
        progress = sys.stderr.isatty()
    nb_dir = Path(notebook_dir) if notebook_dir is not None else default_notebook_dir()
    config = load_profile(profile, notebook_dir=nb_dir)
    paths = find_notebooks(nb_dir, notebooks)
    declared_by_path = _check_profile_against_notebooks(config, paths, find_notebooks(nb_dir), pm)
    out = Path(out_dir).resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)

    if data_dir is None:
        data_path = out / "data" / "synthetic"
        cohort = {"n_subjects": 300, "seed": 0, **config["cohort"]}
        if "age_range" in cohort:
            cohort["age_range"] = tuple(cohort["age_range"])
        participants = synthesize_cohort(data_path, overwrite=True, progress=progress, **cohort)
    else:
        from .data.nifti import load_participants

        data_path = Path(data_dir).resolve()
        participants = load_participants(data_path / "participants.tsv")
    write_atomic(out / "tables" / "cohort_summary.csv", cohort_summary(participants).to_csv(index=False))
    logger.info("dataset %s: %d subjects", data_path, len(participants))

    kernel = kernel_name or _kernel_name()
    rows = []
    for path, declared in declared_by_path.items():
        stem = path.stem
        params = {**config["parameters"], **(config["notebooks"].get(stem) or {}),
                  "data_dir": str(data_path), "output_dir": str(out / stem)}
        params = {k: v for k, v in params.items() if k in declared}
        target = out / "notebooks" / path.name
        failed = target.with_name(f"{stem}.FAILED.ipynb")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{stem}.", suffix=".ipynb")
        os.close(fd)
        start = time.perf_counter()
        logger.info("executing %s with %s", path.name, params)
        try:
            pm.execute_notebook(str(path), tmp, parameters=params, kernel_name=kernel, progress_bar=progress,
                                cwd=str(nb_dir))
            os.replace(tmp, target)
            failed.unlink(missing_ok=True)
            status, error, output = "ok", "", target
        except Exception as exc:  # a failing notebook is recorded, the suite goes on
            if Path(tmp).exists():
                os.replace(tmp, failed)
            target.unlink(missing_ok=True)  # no stale success beside the failure
            status, error, output = "failed", _describe_error(exc), failed
            logger.error("%s failed: %s (executed notebook kept as %s)", path.name, error, failed)
        rows.append({"notebook": stem, "status": status, "seconds": round(time.perf_counter() - start, 1),
                     "output": str(output), "error": error})
    summary = pd.DataFrame(rows, columns=["notebook", "status", "seconds", "output", "error"])
    write_atomic(out / "run_summary.csv", summary.to_csv(index=False))
    write_atomic(out / "run_config.json", json.dumps({"profile": str(profile), "config": config,
                                                     "data_dir": str(data_path), "kernel": kernel}, indent=2))
    return summary

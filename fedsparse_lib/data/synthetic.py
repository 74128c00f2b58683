"""The synthetic brain-MRI cohort: sampling subjects and sites, and writing a BIDS-like dataset.

The cohort is the default dataset of every notebook and test (see ``spec/data.md`` section 1).
Each subject has a chronological age (the label) and a biological age ``age + N(0, sigma_gap)``
from which its image is generated (:mod:`.simulate`), so the best achievable mean absolute error
of any age predictor is ``sigma_gap * sqrt(2 / pi)`` (:func:`mae_floor`).

Layout written under ``out_dir``::

    dataset_description.json
    participants.tsv                 participant_id, age, sex, site
    participants.json                column descriptions
    sub-0001/anat/sub-0001_T1w.nii.gz
    derivatives/truth/               hidden ground truth, never needed to train
        synth_config.json            the generator's parameters
        sites.tsv                    scanner and recruitment profile per site
        truth.tsv                    biological age, brain-age gap, individual factors, volumes
        sub-0001/sub-0001_truth.json
        sub-0001/sub-0001_desc-brain_mask.nii.gz   (raw mode: mask on the raw grid)

Every file is written atomically (temporary file, then rename). The tables are written last, so a
dataset with ``participants.tsv`` is complete; an interrupted run resumes where it stopped when
called again with the same parameters.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from .. import __version__
from .anatomy import TemplateAnatomy, load_template_anatomy
from .simulate import SiteProfile, SubjectSpec, simulate_subject

__all__ = [
    "synthesize_cohort",
    "sample_sites",
    "sample_subjects",
    "mae_floor",
    "write_atomic",
    "save_img_atomic",
]

logger = logging.getLogger(__name__)

_CONFIG_VERSION = 1
_RAW_GRIDS: tuple[tuple[float, float, float], ...] = ((1.5, 1.5, 1.5), (1.2, 1.2, 1.5), (1.4, 1.4, 1.4))
_RAW_ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "ASL")


def mae_floor(sigma_gap: float) -> float:
    """Best achievable MAE (years) when the image encodes ``age + N(0, sigma_gap)``.

    ``E|N(0, sigma)| = sigma * sqrt(2 / pi)``: 2.39 years for ``sigma_gap = 3``.
    """
    return float(sigma_gap) * math.sqrt(2.0 / math.pi)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def sample_sites(n_sites: int, *, seed: int, age_range: tuple[float, float] = (45.0, 82.0)) -> list[SiteProfile]:
    """Draw the scanner and recruitment profile of each site.

    Site ``k`` (0-based) recruits around ``lo + (hi - lo) * (0.3 + 0.4 * k / (K - 1))`` years with
    standard deviation ``(hi - lo) / 5``, so sites differ in age as they do in real consortia.
    Scanner draws: gain U(500, 1100), gamma U(0.9, 1.1), noise U(1 %, 3.5 %), blur U(0, 1) mm,
    bias U(0.03, 0.10), grey-matter contrast U(0.94, 1.06).

    Parameters
    ----------
    n_sites : int
        Number of sites, at least 1.
    seed : int
    age_range : (float, float)
        Cohort age range in years.
    """
    _check_positive_int("n_sites", n_sites)
    lo, hi = _check_age_range(age_range)
    sites = []
    for k in range(n_sites):
        rng = _rng(seed, 0, k)
        frac = 0.5 if n_sites == 1 else 0.3 + 0.4 * k / (n_sites - 1)
        sites.append(
            SiteProfile(
                name=f"site{k + 1}",
                gain=float(rng.uniform(500.0, 1100.0)),
                gamma=float(rng.uniform(0.9, 1.1)),
                noise=float(rng.uniform(0.01, 0.035)),
                blur_mm=float(rng.uniform(0.0, 1.0)),
                bias=float(rng.uniform(0.03, 0.10)),
                gm_contrast=float(rng.uniform(0.94, 1.06)),
                age_mean=lo + (hi - lo) * frac,
                age_sd=(hi - lo) / (4.0 if n_sites == 1 else 5.0),
                raw_voxel_mm=_RAW_GRIDS[k % len(_RAW_GRIDS)],
                raw_orientation=_RAW_ORIENTATIONS[k % len(_RAW_ORIENTATIONS)],
            )
        )
    return sites


def sample_subjects(n_subjects: int, sites: Sequence[SiteProfile], *, seed: int,
                    age_range: tuple[float, float] = (45.0, 82.0), sigma_gap: float = 3.0) -> list[SubjectSpec]:
    """Draw the subjects: site, sex, age, brain-age gap and individual anatomy factors.

    Subject ``i`` depends only on ``(seed, i)`` and the sites, so a cohort of 100 is the first 100
    subjects of a cohort of 500 with the same seed, whatever the number of worker processes.
    Site sizes are unequal (weights U(0.5, 1.5) per site, drawn from the seed).
    """
    _check_positive_int("n_subjects", n_subjects)
    lo, hi = _check_age_range(age_range)
    _check_sigma_gap(sigma_gap)
    _check_seed(seed)
    weights = _rng(seed, 2).uniform(0.5, 1.5, size=len(sites))
    weights /= weights.sum()
    width = _id_width(n_subjects)
    subjects = []
    for i in range(n_subjects):
        rng = _rng(seed, 1, i)
        site = sites[int(rng.choice(len(sites), p=weights))]
        sex = "M" if rng.random() < 0.5 else "F"
        age = rng.normal(site.age_mean, site.age_sd)
        while not lo <= age <= hi:  # truncated normal by rejection
            age = rng.normal(site.age_mean, site.age_sd)
        age = round(float(age), 1)
        scale = float(np.clip(np.exp(rng.normal(0.0, 0.035)) * (1.02 if sex == "M" else 0.98), 0.88, 1.14))
        subjects.append(
            SubjectSpec(
                participant_id=f"sub-{i + 1:0{width}d}",
                age=age,
                biological_age=float(age + rng.normal(0.0, sigma_gap)),
                sex=sex,
                site=site.name,
                head_scale=scale,
                ventricle_factor=float(np.exp(rng.normal(0.0, 0.1))),
                ventricle_offset_mm=float(rng.normal(0.0, 0.15)),
                cortex_factor=float(np.exp(rng.normal(0.0, 0.1))),
                seed=(int(seed), 3, i),
            )
        )
    return subjects


def synthesize_cohort(out_dir: str | os.PathLike, *, n_subjects: int, seed: int, n_sites: int = 3,
                      age_range: tuple[float, float] = (45.0, 82.0), sigma_gap: float = 3.0, raw: bool = False,
                      n_jobs: int | None = None, overwrite: bool = False, progress: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Generate a synthetic cohort and write it as a BIDS-like dataset.

    Parameters
    ----------
    out_dir : path
        Dataset folder; created if missing.
    n_subjects : int
        Number of subjects, at least 1.
    seed : int
        Seed of everything: the same seed gives the same arrays, whatever ``n_jobs``.
    n_sites : int, default 3
        Number of sites (scanners with their own age distributions).
    age_range : (float, float), default (45, 82)
        Chronological ages in years (UK Biobank-like by default).
    sigma_gap : float, default 3.0
        Standard deviation in years of the brain-age gap (biological - chronological age).
    raw : bool, default False
        Write unprocessed scans (skull, misplacement, own grid) with ground-truth transforms and
        masks, for the preprocessing tutorial.
    n_jobs : int, optional
        Worker processes; default all cores. 1 runs in this process.
    overwrite : bool, default False
        Replace an existing cohort generated with other parameters (only a folder this function
        wrote is ever deleted). With the same parameters an existing cohort is reused, and an
        interrupted one is completed.
    progress : bool, default True
        Show a progress bar.
    cache_dir : path, optional
        Cache of the template anatomy (see :func:`~fedsparse_lib.data.anatomy.load_template_anatomy`).

    Returns
    -------
    pandas.DataFrame
        ``participants.tsv`` as written (participant_id, age, sex, site).
    """
    lo, hi = _check_age_range(age_range)
    _check_positive_int("n_subjects", n_subjects)
    _check_positive_int("n_sites", n_sites)
    _check_seed(seed)
    _check_sigma_gap(sigma_gap)
    if n_jobs is None:
        n_jobs = os.cpu_count() or 1
    _check_positive_int("n_jobs", n_jobs)
    out = Path(out_dir)
    truth_dir = out / "derivatives" / "truth"
    config = {"generator": "fedsparse.synthetic", "config_version": _CONFIG_VERSION, "n_subjects": int(n_subjects),
              "seed": int(seed), "n_sites": int(n_sites), "age_range": [lo, hi], "sigma_gap": float(sigma_gap),
              "raw": bool(raw)}
    config_path = truth_dir / "synth_config.json"
    if out.exists() and any(out.iterdir()):
        previous = _read_json(config_path)
        if not isinstance(previous, dict) or previous.get("generator") != config["generator"]:
            previous = None
        if previous != config:
            if previous is None:
                raise FileExistsError(
                    f"{out} is not empty and was not written by fedsparse synth; choose an empty or new folder")
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds a synthetic cohort made with other parameters ({previous}); "
                    "pass overwrite=True (--overwrite) to replace it")
            logger.info("replacing the cohort in %s", out)
            _remove_cohort(out)
        elif (out / "participants.tsv").exists() and all(
                _subject_done(out, f"sub-{i + 1:0{_id_width(n_subjects)}d}") for i in range(n_subjects)):
            logger.info("cohort in %s is complete and up to date; reusing it", out)
            return pd.read_csv(out / "participants.tsv", sep="\t", dtype={"participant_id": str, "site": str})
    truth_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config_path, json.dumps(config, indent=2))

    sites = sample_sites(n_sites, seed=seed, age_range=(lo, hi))
    subjects = sample_subjects(n_subjects, sites, seed=seed, age_range=(lo, hi), sigma_gap=sigma_gap)
    site_of = {s.name: s for s in sites}
    todo = [s for s in subjects if not _subject_done(out, s.participant_id)]
    if len(todo) < len(subjects):
        logger.info("resuming: %d of %d subjects already written", len(subjects) - len(todo), len(subjects))
    anatomy = load_template_anatomy(cache_dir=cache_dir)  # computes the cache before workers start
    tasks = [(str(out), s, site_of[s.site], raw) for s in todo]
    _run_tasks(tasks, anatomy=anatomy, n_jobs=n_jobs, progress=progress, cache_dir=cache_dir)

    rows = [_read_json(_truth_path(out, s.participant_id)) for s in subjects]
    truth = pd.DataFrame(rows)
    participants = truth[["participant_id", "age", "sex", "site"]].copy()
    write_atomic(truth_dir / "sites.tsv", pd.DataFrame([s.to_dict() for s in sites]).to_csv(sep="\t", index=False))
    write_atomic(truth_dir / "truth.tsv",
                 truth.drop(columns=["raw_to_mni"], errors="ignore").to_csv(sep="\t", index=False, float_format="%.4f"))
    write_atomic(out / "dataset_description.json", json.dumps(_description(config), indent=2))
    write_atomic(out / "participants.json", json.dumps(_PARTICIPANTS_SIDECAR, indent=2))
    write_atomic(out / "participants.tsv", participants.to_csv(sep="\t", index=False))
    logger.info("wrote %d subjects to %s", len(subjects), out)
    return participants


# --- workers ----------------------------------------------------------------------------------

_WORKER_ANATOMY: TemplateAnatomy | None = None


def _init_worker(cache_dir: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    global _WORKER_ANATOMY
    _WORKER_ANATOMY = load_template_anatomy(cache_dir=cache_dir)


def _write_subject(task: tuple[str, SubjectSpec, SiteProfile, bool], anatomy: TemplateAnatomy | None = None) -> str:
    out_dir, subject, site, raw = task
    anatomy = anatomy if anatomy is not None else _WORKER_ANATOMY
    assert anatomy is not None, "worker not initialised"
    scan = simulate_subject(anatomy, subject, site, raw=raw)
    out = Path(out_dir)
    pid = subject.participant_id
    img = nib.Nifti1Image(scan.data, scan.affine)
    img.header.set_xyzt_units("mm", "sec")
    code = 1 if raw else 4  # scanner / MNI152
    img.set_sform(scan.affine, code=code)
    img.set_qform(scan.affine, code=code)
    save_img_atomic(img, out / pid / "anat" / f"{pid}_T1w.nii.gz")
    record: dict[str, Any] = {
        "participant_id": pid, "age": subject.age, "sex": subject.sex, "site": subject.site,
        "biological_age": round(subject.biological_age, 3),
        "brain_age_gap": round(subject.biological_age - subject.age, 3),
        "head_scale": subject.head_scale, "ventricle_factor": subject.ventricle_factor,
        "ventricle_offset_mm": subject.ventricle_offset_mm, "cortex_factor": subject.cortex_factor,
        **{k: round(v, 3) for k, v in scan.truth.items()},
    }
    if raw:
        mask = nib.Nifti1Image(scan.brain_mask.astype(np.uint8), scan.affine)
        mask.set_sform(scan.affine, code=1)
        mask.set_qform(scan.affine, code=1)
        save_img_atomic(mask, _truth_path(out, pid).parent / f"{pid}_desc-brain_mask.nii.gz")
        record["raw_to_mni"] = np.round(scan.raw_to_mni, 6).tolist()
    write_atomic(_truth_path(out, pid), json.dumps(record, indent=1))  # last: marks the subject done
    return pid


def _run_tasks(tasks: list, *, anatomy: TemplateAnatomy, n_jobs: int, progress: bool,
               cache_dir: str | os.PathLike | None) -> None:
    from tqdm.auto import tqdm

    if not tasks:
        return
    bar = tqdm(total=len(tasks), desc="synthesizing subjects", unit="subject", disable=not progress)
    try:
        if n_jobs == 1 or len(tasks) == 1:
            for task in tasks:
                _write_subject(task, anatomy)
                bar.update()
            return
        ctx = mp.get_context("spawn")  # fork is unsafe once torch/OpenMP threads exist
        with ProcessPoolExecutor(max_workers=min(n_jobs, len(tasks)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(None if cache_dir is None else str(cache_dir),)) as pool:
            futures = [pool.submit(_write_subject, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


# --- files ------------------------------------------------------------------------------------

def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_img_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """``nibabel.save`` to a temporary ``.nii.gz`` beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _id_width(n_subjects: int) -> int:
    """Digits of participant labels: 4 (sub-0001) up to 9,999 subjects, more beyond."""
    return len(str(max(n_subjects, 9999)))


def _subject_done(out: Path, pid: str) -> bool:
    """A subject is complete when its image and its truth record (written last) both exist."""
    return _truth_path(out, pid).exists() and (out / pid / "anat" / f"{pid}_T1w.nii.gz").exists()


def _truth_path(out: Path, pid: str) -> Path:
    return out / "derivatives" / "truth" / pid / f"{pid}_truth.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove_cohort(out: Path) -> None:
    for child in out.iterdir():
        if child.name.startswith("sub-") and child.is_dir():
            shutil.rmtree(child)
    shutil.rmtree(out / "derivatives" / "truth", ignore_errors=True)
    for name in ("participants.tsv", "participants.json", "dataset_description.json"):
        (out / name).unlink(missing_ok=True)


def _description(config: dict) -> dict:
    return {
        "Name": "fedsparse synthetic brain-age cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (synthetic; derived from the MNI152 2009 templates bundled with nilearn)",
        "GeneratedBy": [{"Name": "fedsparse", "Version": __version__, "Description": "fedsparse synth"}],
        "fedsparse_synth": config,
    }


_PARTICIPANTS_SIDECAR = {
    "participant_id": {"Description": "subject label"},
    "age": {"Description": "chronological age at scan (the label)", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "site": {"Description": "acquisition site / scanner"},
}


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _check_sigma_gap(sigma_gap: Any) -> None:
    try:
        ok = np.isfinite(float(sigma_gap)) and float(sigma_gap) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sigma_gap must be a finite number >= 0 (years), got {sigma_gap!r}")


def _check_age_range(age_range: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(a) for a in age_range)
    except (TypeError, ValueError):
        raise ValueError(f"age_range must be two numbers (min, max) in years, got {age_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi <= 120):
        raise ValueError(f"age_range must satisfy 0 <= min < max <= 120 years, got {age_range!r}")
    return lo, hi

"""One subject through the preprocessing pipeline: steps, timings, QC record, cached outputs.

:func:`preprocess_subject` runs, with deepbet (default) or with the template-mask fallback::

    load -> reorient -> n4 -> skull_strip (deepbet) -> register (brain) -> resample -> normalize -> write
    load -> reorient -> n4 -> register (whole head) -> skull_strip (template) -> resample -> ...

and writes, in the BIDS-like layout of the input (``OUT`` is the output dataset)::

    OUT/sub-0001/anat/sub-0001_T1w.nii.gz                       float32, 91 x 109 x 91, 2 mm, normalised
    OUT/sub-0001/anat/sub-0001_desc-brain_mask.nii.gz           uint8, same grid
    OUT/sub-0001/anat/sub-0001_from-T1w_to-MNI152_xfm.json      4 x 4 scanner RAS mm -> MNI RAS mm
    OUT/derivatives/preprocess/sub-0001/sub-0001_qc.json        the QC record, written last

The QC record (one row of the QC table, :data:`QC_COLUMNS`):

=========================  ====================================================================
participant_id             ``sub-<label>``
status, step, reason       ``"ok"``, or ``"failed"`` with the step of :data:`STEPS` and why
skull_strip                method that ran (``"deepbet"`` or ``"template"``)
normalization              ``"zscore"`` or ``"zscore_brain"``
runtime_<step>_s           seconds per step (NaN if not reached); runtime_total_s for all
similarity                 final Mattes mutual information with the template (nats)
correlation                correlation with the template inside its brain mask
scale                      geometric mean of the subject -> MNI scale factors (1 / head size)
brain_volume_ml            brain-mask volume in the subject's space (ml)
dice                       Dice of the brain mask against the ground truth (NaN without truth)
registration_error_mm      mean distance over the true brain between the estimated and the true
                           scanner -> MNI affine (NaN without truth)
cached                     True when the record comes from an earlier run
=========================  ====================================================================

Every file is written atomically. A subject whose record exists with status ``ok``, the same
options and the same input file (name, size, modification time) is not recomputed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from .datasets import NORMALIZATIONS
from .mri import (
    SKULL_STRIP_METHODS,
    brain_volume_ml,
    deepbet_available,
    n4_correct_img,
    normalize_img,
    reorient_img,
    resample_to_mni_img,
    skull_strip_img,
)
from .nifti import PARTICIPANT_ID_PATTERN, load_img
from .registration import RegistrationResult, register_img, registration_error_mm
from .synthetic import save_img_atomic, write_atomic

__all__ = ["QC_COLUMNS", "STEPS", "PreprocessError", "StepError", "preprocess_subject"]

logger = logging.getLogger(__name__)

#: Steps of :func:`preprocess_subject`, in the order of the deepbet pipeline.
STEPS: tuple[str, ...] = ("load", "reorient", "n4", "skull_strip", "register", "resample", "normalize", "write")
#: Columns of the QC table (one row per subject; times in seconds, NaN when not run / no truth).
QC_COLUMNS: tuple[str, ...] = (
    "participant_id", "status", "step", "reason", "skull_strip", "normalization",
    *(f"runtime_{s}_s" for s in STEPS), "runtime_total_s",
    "similarity", "correlation", "scale", "brain_volume_ml", "dice", "registration_error_mm", "cached",
)
_FORMAT_VERSION = 1


class PreprocessError(RuntimeError):
    """Preprocessing of a dataset failed (strict mode, or every subject failed)."""


class StepError(PreprocessError):
    """One subject failed at one step.

    Attributes
    ----------
    participant_id, step, reason, path : str
        Who, at which step of :data:`STEPS`, why, and the input file.
    seconds : dict of str to float
        Run time of each step attempted, the failed one included.
    """

    def __init__(self, participant_id: str, step: str, reason: str, path: str,
                 seconds: dict[str, float] | None = None) -> None:
        super().__init__(f"{participant_id} ({path}): step '{step}' failed: {reason}")
        self.participant_id, self.step, self.reason, self.path = participant_id, step, reason, path
        self.seconds = dict(seconds or {})

    def __reduce__(self) -> tuple:  # picklable across worker processes
        return (StepError, (self.participant_id, self.step, self.reason, self.path, self.seconds))


def _paths(out_root: Path, pid: str) -> dict[str, Path]:
    anat = out_root / pid / "anat"
    return {
        "image": anat / f"{pid}_T1w.nii.gz",
        "mask": anat / f"{pid}_desc-brain_mask.nii.gz",
        "xfm": anat / f"{pid}_from-T1w_to-MNI152_xfm.json",
        "qc": out_root / "derivatives" / "preprocess" / pid / f"{pid}_qc.json",
    }


def _options(skull_strip: str, normalization: str, seed: int) -> dict[str, Any]:
    return {"format_version": _FORMAT_VERSION, "skull_strip": skull_strip, "normalization": normalization,
            "seed": int(seed)}


def _source_stamp(in_path: Path) -> dict[str, Any] | None:
    """What identifies the input file's content cheaply: name, size, modification time."""
    try:
        stat = in_path.stat()
    except OSError:
        return None
    return {"name": in_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_record(out_root: Path, pid: str, options: dict[str, Any], in_path: Path) -> dict[str, Any] | None:
    """The QC record of a subject finished earlier from the same file with the same options, else None."""
    paths = _paths(out_root, pid)
    try:
        saved = json.loads(paths["qc"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("options") != options or saved.get("record", {}).get("status") != "ok":
        return None
    source = _source_stamp(in_path)
    if source is None or saved.get("source") != source:
        return None
    if not all(paths[k].is_file() for k in ("image", "mask", "xfm")):
        return None
    return {**saved["record"], "cached": True}


class _Timer:
    """Runs the steps of one subject, timing each and turning any exception into a StepError."""

    def __init__(self, pid: str, path: Path) -> None:
        self.pid, self.path = pid, path
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except StepError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a step is recorded, with its reason
            self._add(step, start)
            reason = " ".join(str(err).split()) or type(err).__name__
            raise StepError(self.pid, step, reason, str(self.path), self.seconds) from err
        self._add(step, start)

    def _add(self, step: str, start: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start


def preprocess_subject(in_path: str | os.PathLike, out_dir: str | os.PathLike, *, participant_id: str | None = None,
                       skull_strip: Literal["deepbet", "template"] = "deepbet",
                       normalization: Literal["zscore", "zscore_brain"] = "zscore",
                       truth_dir: str | os.PathLike | None = None, seed: int = 0, n_threads: int | None = 1,
                       overwrite: bool = False) -> dict[str, Any]:
    """Preprocess one T1 scan and write it, its brain mask and its transform on the MNI grid.

    Parameters
    ----------
    in_path : path
        The raw T1 scan (``.nii`` / ``.nii.gz``).
    out_dir : path
        Output dataset folder: files go to ``out_dir/<participant_id>/anat/`` (module docstring).
    participant_id : str, optional
        ``sub-<label>``; default: the file name's first entity (``sub-0001_T1w.nii.gz``).
    skull_strip : {"deepbet", "template"}, default "deepbet"
        See :func:`~fedsparse_lib.data.mri.skull_strip_img`. Without deepbet installed,
        ``"deepbet"`` falls back to ``"template"`` with a warning (the QC record says which ran).
    normalization : {"zscore", "zscore_brain"}, default "zscore"
        See :func:`~fedsparse_lib.data.mri.normalize_img`.
    truth_dir : path, optional
        Folder with ground truth (the synthetic raw cohort's ``derivatives/truth/<id>``):
        ``<id>_truth.json`` (its ``raw_to_mni``) and ``<id>_desc-brain_mask.nii.gz``. When given,
        the QC record includes the mask Dice and the registration error in mm.
    seed : int, default 0
        Seed of the registration's metric sampling.
    n_threads : int or None, default 1
        ITK and torch threads (None: their defaults). Results are reproducible for a fixed value.
    overwrite : bool, default False
        Recompute even if the subject was finished earlier with the same options.

    Returns
    -------
    dict
        The QC record: the keys of :data:`QC_COLUMNS` (module docstring).

    Raises
    ------
    StepError
        If a step fails (unreadable or 4D file, blank scan, diverged registration...): names the
        subject, the step and the reason. No output file of the subject is left behind.
    """
    in_path = Path(in_path)
    out_root = Path(out_dir)
    pid = participant_id if participant_id is not None else _participant_of(in_path)
    if not PARTICIPANT_ID_PATTERN.match(pid):
        raise ValueError(f"participant_id must be 'sub-' followed by letters and digits, got {pid!r}")
    _check_options(skull_strip, normalization)
    method = skull_strip
    if method == "deepbet" and not deepbet_available():
        _warn_no_deepbet()
        method = "template"
    options = _options(skull_strip, normalization, seed)
    if not overwrite and (cached := _cached_record(out_root, pid, options, in_path)) is not None:
        logger.debug("%s: already preprocessed, skipping", pid)
        return cached

    paths = _paths(out_root, pid)
    run = _Timer(pid, in_path)
    record: dict[str, Any] = {c: np.nan for c in QC_COLUMNS}
    record.update(participant_id=pid, status="ok", step="", reason="", skull_strip=method,
                  normalization=normalization, cached=False)
    start = time.perf_counter()
    try:
        with run("load"):
            raw = load_img(in_path)
        with run("reorient"):
            img = reorient_img(raw)
        with run("n4"):
            img, _ = n4_correct_img(img, n_threads=n_threads)
        mask = None
        if method == "deepbet":
            with run("skull_strip"):
                mask = skull_strip_img(img, method="deepbet", n_threads=n_threads)
        with run("register"):
            reg = register_img(img, mask_img=mask, seed=seed, n_threads=n_threads)
        if mask is None:
            with run("skull_strip"):
                mask = skull_strip_img(img, method="template", world_to_mni=reg.affine)
        with run("resample"):
            brain = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0),
                                    img.affine)
            mni = resample_to_mni_img(brain, reg.affine)
            mni_mask = resample_to_mni_img(mask, reg.affine)
            mni_mask = nib.Nifti1Image((np.asarray(mni_mask.dataobj) > 0.5).astype(np.uint8), mni_mask.affine,
                                       header=mni_mask.header)
        with run("normalize"):
            out = normalize_img(mni, method=normalization, mask_img=mni_mask)  # type: ignore[arg-type]
        record.update(similarity=reg.similarity, correlation=reg.correlation,
                      scale=float(np.prod(reg.scales)) ** (1.0 / 3.0), brain_volume_ml=brain_volume_ml(mask))
        if truth_dir is not None:
            record.update(_score(Path(truth_dir), pid, mask, reg.affine))
        with run("write"):
            out.set_data_dtype(np.float32)
            mni_mask.set_data_dtype(np.uint8)
            save_img_atomic(out, paths["image"])
            save_img_atomic(mni_mask, paths["mask"])
            write_atomic(paths["xfm"], json.dumps(_transform_json(reg, in_path), indent=1))
        record.update({f"runtime_{s}_s": run.seconds.get(s, np.nan) for s in STEPS},
                      runtime_total_s=time.perf_counter() - start)
        with run("write"):  # last: marks the subject done
            saved = {"options": options, "source": _source_stamp(in_path), "record": _jsonable(record)}
            write_atomic(paths["qc"], json.dumps(saved, indent=1))
    except BaseException:
        for path in paths.values():  # never leave a mix of old and new outputs
            path.unlink(missing_ok=True)
        raise
    logger.debug("%s: done in %.1f s (MI %.3f)", pid, record["runtime_total_s"], reg.similarity)
    return record


@functools.lru_cache(maxsize=1)
def _warn_no_deepbet() -> None:
    logger.warning("deepbet is not installed: skull stripping with the template mask instead")


def _participant_of(path: Path) -> str:
    label = path.name.split("_")[0]
    if PARTICIPANT_ID_PATTERN.match(label):
        return label
    if len(path.parents) >= 2 and PARTICIPANT_ID_PATTERN.match(path.parents[1].name):
        return path.parents[1].name
    raise ValueError(f"{path}: cannot tell the participant from the file name; pass participant_id='sub-...'")


def _check_options(skull_strip: str, normalization: str) -> None:
    if skull_strip not in SKULL_STRIP_METHODS:
        raise ValueError(f"skull_strip must be one of {SKULL_STRIP_METHODS}, got {skull_strip!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def _transform_json(reg: RegistrationResult, in_path: Path) -> dict[str, Any]:
    return {
        "world_to_mni": np.round(reg.affine, 8).tolist(),
        "description": "4x4 affine taking scanner world coordinates (RAS+ mm, as in the NIfTI affine of the "
                       "source image) to MNI152 coordinates (RAS+ mm)",
        "source": str(in_path), "template": "MNI152 (nilearn), 2 mm", "similarity": reg.similarity,
        "correlation": reg.correlation, "scales": list(reg.scales),
    }


def _score(truth_dir: Path, pid: str, mask_img: nib.Nifti1Image, world_to_mni: np.ndarray) -> dict[str, float]:
    """Dice of the brain mask and registration error (mm) against the synthetic ground truth."""
    try:
        truth_mask = nib.load(truth_dir / f"{pid}_desc-brain_mask.nii.gz")
        raw_to_mni = np.asarray(json.loads((truth_dir / f"{pid}_truth.json").read_text())["raw_to_mni"], dtype=float)
        truth = np.asarray(truth_mask.dataobj) > 0
        # the true mask onto the grid of the estimated one (the same voxels after reorientation)
        mapping = np.linalg.solve(truth_mask.affine, mask_img.affine)
        on_grid = ndimage.affine_transform(truth.astype(np.uint8), mapping[:3, :3], offset=mapping[:3, 3],
                                           output_shape=mask_img.shape, order=0) > 0
        error = registration_error_mm(world_to_mni, raw_to_mni, truth_mask)
    except Exception as err:  # noqa: BLE001 - scoring is QC: a bad truth file must not fail the subject
        logger.warning("%s: ground truth in %s unusable (%s); not scored", pid, truth_dir, err)
        return {}
    estimated = np.asarray(mask_img.dataobj) > 0
    dice = 2.0 * np.count_nonzero(estimated & on_grid) / max(np.count_nonzero(estimated) + np.count_nonzero(on_grid), 1)
    return {"dice": float(dice), "registration_error_mm": error}


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, (np.floating, float)):
            v = None if not np.isfinite(v) else float(v)
        elif isinstance(v, np.bool_):
            v = bool(v)
        out[k] = v
    return out

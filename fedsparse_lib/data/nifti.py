"""Load and validate NIfTI images and BIDS-like datasets.

A dataset is a folder laid out like BIDS::

    ROOT/participants.tsv                       participant_id, age, [sex], [site], ...
    ROOT/dataset_description.json               (optional here; checked when present)
    ROOT/sub-XXXX/anat/sub-XXXX_T1w.nii.gz      one 3D T1 image per participant

:func:`load_img` and :func:`load_participants` stop at the first problem with a :class:`DataError`
that names the file and what is wrong. :func:`check_dataset` instead collects *every* problem of a
dataset into one table, which is what ``fedsparse check-data DIR`` prints.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from numpy.typing import DTypeLike

__all__ = [
    "AGE_RANGE_YEARS",
    "PARTICIPANT_ID_PATTERN",
    "VOXEL_SIZE_RANGE_MM",
    "DataError",
    "check_dataset",
    "find_images",
    "image_path",
    "load_img",
    "load_participants",
    "load_volume",
]

logger = logging.getLogger(__name__)

StrPath = str | PathLike[str]

#: Plausible voxel sizes of a brain MRI, in mm (inclusive bounds).
VOXEL_SIZE_RANGE_MM: tuple[float, float] = (0.1, 20.0)
#: Plausible ages, in years (inclusive bounds).
AGE_RANGE_YEARS: tuple[float, float] = (0.0, 120.0)
#: BIDS subject label: ``sub-`` followed by letters and digits only.
PARTICIPANT_ID_PATTERN: re.Pattern[str] = re.compile(r"^sub-[A-Za-z0-9]+$")

PARTICIPANTS_FILE = "participants.tsv"
DESCRIPTION_FILE = "dataset_description.json"
REQUIRED_COLUMNS: tuple[str, ...] = ("participant_id", "age")
STRING_COLUMNS: tuple[str, ...] = ("participant_id", "age", "sex", "site")
# Markers of a missing value in a TSV (BIDS uses "n/a").
_NA_VALUES = ["", "n/a", "N/A", "NA", "na", "nan", "NaN", "None", "null"]
# Everything a damaged or truncated (gzipped) file can raise while being read.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, MemoryError)


class DataError(ValueError):
    """Bad input data: the message names the file and what is wrong with it."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def image_path(root: StrPath, participant_id: str) -> Path:
    """Path of a participant's T1 image in the BIDS-like layout.

    Parameters
    ----------
    root : str or path-like
        Dataset folder.
    participant_id : str
        BIDS subject id such as ``"sub-0001"``.

    Returns
    -------
    pathlib.Path
        ``root / participant_id / "anat" / f"{participant_id}_T1w.nii.gz"``.

    Raises
    ------
    ValueError
        If ``participant_id`` is not ``sub-`` followed by letters and digits.
    """
    if not isinstance(participant_id, str) or not PARTICIPANT_ID_PATTERN.match(participant_id):
        raise ValueError(f"participant_id must be 'sub-' followed by letters and digits (BIDS), got {participant_id!r}")
    return Path(root) / participant_id / "anat" / f"{participant_id}_T1w.nii.gz"


def find_images(root: StrPath) -> list[Path]:
    """All T1 images found in the layout, ``ROOT/sub-*/anat/*_T1w.nii[.gz]``, sorted."""
    root = Path(root)
    found = set(root.glob("sub-*/anat/*_T1w.nii.gz")) | set(root.glob("sub-*/anat/*_T1w.nii"))
    return sorted(found)


def _affine_problem(affine: np.ndarray) -> str | None:
    """Describe what is implausible about a voxel-to-world affine, or return None."""
    affine = np.asarray(affine, dtype=float)
    with np.printoptions(precision=4, suppress=True):
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            return f"affine is not a finite 4x4 matrix: {affine.tolist()}"
        linear = affine[:3, :3]
        det = float(np.linalg.det(linear))
        voxel_sizes = np.sqrt((linear**2).sum(axis=0))
        if abs(det) < 1e-6 * max(float(np.prod(voxel_sizes)), 1e-300) or det == 0.0:
            return f"affine is singular (determinant {det:.3g}): {affine[:3].tolist()}"
        low, high = VOXEL_SIZE_RANGE_MM
        if np.any(voxel_sizes < low) or np.any(voxel_sizes > high):
            return (
                f"implausible voxel sizes {np.round(voxel_sizes, 4).tolist()} mm (expected each in [{low}, {high}] mm)"
            )
    return None


def load_img(path: StrPath) -> nib.Nifti1Image:
    """Load a 3D NIfTI image and check that it is usable.

    The voxel data are read in full (so that a truncated ``.nii.gz`` is detected here rather than
    later) and the returned image holds them in memory.

    Parameters
    ----------
    path : str or path-like
        A ``.nii`` or ``.nii.gz`` file (any format nibabel reads is accepted).

    Returns
    -------
    nibabel.Nifti1Image
        The image, 3D, with the file's data type (scaled data come back as float), its affine and
        header. A 4D image whose 4th dimension is 1 is squeezed to 3D.

    Raises
    ------
    DataError
        If the file is missing or unreadable (corrupt, truncated, not an image), the image is not
        3D, has no voxels or a non-numeric data type, has NaN or infinite voxels, or its affine is
        not finite, singular, or has voxel sizes outside :data:`VOXEL_SIZE_RANGE_MM`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)  # forces decompression of every byte
        affine = np.array(img.affine, dtype=float)
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the image (corrupt or truncated file?): {err}") from err
    logger.debug("loaded %s: shape %s, dtype %s", path, data.shape, data.dtype)

    shape = tuple(int(s) for s in data.shape)
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    elif data.ndim != 3:
        raise DataError(f"{path}: expected a 3D image, got shape {shape} ({len(shape)}D)")
    if data.size == 0:
        raise DataError(f"{path}: image has no voxels (shape {shape})")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise DataError(f"{path}: unsupported voxel data type {data.dtype} (expected integers or floats)")
    if np.issubdtype(data.dtype, np.floating):
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        if n_nan or n_inf:
            raise DataError(
                f"{path}: {n_nan} NaN and {n_inf} infinite voxels out of {data.size} (expected finite values)"
            )
    problem = _affine_problem(affine)
    if problem is not None:
        raise DataError(f"{path}: {problem}")

    # Keep a NIfTI-1 header (descriptions, units, codes); other formats (NIfTI-2, MGH, ...) get a
    # fresh one.
    keep_header = isinstance(img, nib.Nifti1Image) and not isinstance(img, nib.Nifti2Image)
    return nib.Nifti1Image(data, affine, header=img.header.copy() if keep_header else None, dtype=data.dtype)


def load_volume(path: StrPath, *, dtype: DTypeLike = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load a validated 3D volume as an array.

    Parameters
    ----------
    path : str or path-like
        NIfTI file, checked by :func:`load_img`.
    dtype : numpy dtype, default float32
        Data type of the returned voxel array.

    Returns
    -------
    data : numpy.ndarray of shape (X, Y, Z)
        Voxel values (scaled by the header's slope / intercept, if any).
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-world affine in mm.

    Raises
    ------
    DataError
        As :func:`load_img`.
    """
    img = load_img(path)
    data = np.asarray(img.dataobj).astype(dtype, copy=False)
    return data, np.array(img.affine, dtype=float)


# --------------------------------------------------------------------------------------------
# participants.tsv
# --------------------------------------------------------------------------------------------
def _read_participants(path: Path) -> tuple[pd.DataFrame | None, list[tuple[str, str]]]:
    """Read and check participants.tsv.

    Returns
    -------
    table : DataFrame or None
        The table with ``age`` as float (NaN where bad), or None when the file is unusable
        (missing, unreadable, no required columns, no rows).
    problems : list of (participant_id, problem)
        Every problem found, one per bad row and kind; ``participant_id`` is ``""`` when the
        problem concerns the whole file or a row without id.
    """
    if not path.is_file():
        return None, [("", "participants.tsv not found" if not path.exists() else "participants.tsv is not a file")]
    try:
        present = pd.read_csv(path, sep="\t", nrows=0).columns
        dtypes = {c: str for c in STRING_COLUMNS if c in present}
        table = pd.read_csv(path, sep="\t", dtype=dtypes, na_values=_NA_VALUES, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        return None, [("", f"cannot read participants.tsv as a tab-separated table: {err}")]
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        return None, [
            ("", f"participants.tsv lacks required column(s) {missing} (found columns {list(table.columns)})")
        ]
    if len(table) == 0:
        return None, [("", "participants.tsv has no participants (empty table)")]

    problems: list[tuple[str, str]] = []
    ids = pd.Series(
        [v.strip() if isinstance(v, str) and v.strip() else None for v in table["participant_id"]],
        index=table.index,
        dtype=object,
    )
    for row, pid in enumerate(ids):
        line = row + 2  # 1-based, after the header line
        if pid is None or pid == "":
            problems.append(("", f"line {line}: missing participant_id"))
        elif not PARTICIPANT_ID_PATTERN.match(pid):
            problems.append((pid, f"line {line}: participant_id {pid!r} is not 'sub-' followed by letters and digits"))
    duplicated = ids[ids.notna() & ids.duplicated(keep=False)]
    for pid in sorted(set(duplicated)):
        lines = [int(i) + 2 for i in np.flatnonzero((ids == pid).to_numpy())]
        problems.append((pid, f"duplicate participant_id on lines {lines}"))

    raw_age = table["age"].astype(object)
    age = pd.to_numeric(table["age"], errors="coerce").astype(float)
    low, high = AGE_RANGE_YEARS
    for row, (pid, raw, value) in enumerate(zip(ids, raw_age, age, strict=True)):
        label = pid or ""
        where = f"line {row + 2}"
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            problems.append((label, f"{where}: missing age"))
        elif math.isnan(value):
            problems.append((label, f"{where}: non-numeric age {raw!r}"))
        elif not math.isfinite(value):
            problems.append((label, f"{where}: non-finite age {raw!r}"))
        elif not low <= value <= high:
            problems.append((label, f"{where}: implausible age {value:g} (expected years in [{low:g}, {high:g}])"))

    table = table.copy()
    table["participant_id"] = ids.astype(object)
    table["age"] = age.where(np.isfinite(age) & (age >= low) & (age <= high))
    for col in ("sex", "site"):
        if col in table.columns:
            table[col] = table[col].astype(object).map(lambda v: v.strip() if isinstance(v, str) else "n/a")
    return table, problems


def _format_problems(source: object, problems: Iterable[tuple[str, str]], limit: int = 20) -> str:
    items = [f"{pid}: {text}" if pid else text for pid, text in problems]
    shown = items[:limit]
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{source}: {len(items)} problem(s):\n  " + "\n  ".join(shown) + more


def load_participants(path: StrPath) -> pd.DataFrame:
    """Load and validate a ``participants.tsv`` table.

    Parameters
    ----------
    path : str or path-like
        Tab-separated file with at least the columns ``participant_id`` (``sub-<label>``, unique)
        and ``age`` (years in :data:`AGE_RANGE_YEARS`). ``n/a`` or an empty cell is a missing value.

    Returns
    -------
    pandas.DataFrame
        One row per participant in file order: ``participant_id`` (str), ``age`` (float64 years),
        ``sex`` and ``site`` as strings when present (a missing value becomes ``"n/a"``), and any
        other column as pandas reads it.

    Raises
    ------
    DataError
        If the file is missing or unreadable, lacks a required column, is empty, or has rows with a
        missing / bad participant_id, duplicate ids, or a missing, non-numeric, non-finite or
        implausible age. The message lists every offending participant.
    """
    path = Path(path)
    table, problems = _read_participants(path)
    if problems:
        raise DataError(_format_problems(path, problems))
    assert table is not None
    table["participant_id"] = table["participant_id"].astype(str)
    table["age"] = table["age"].astype(np.float64)
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Whole dataset
# --------------------------------------------------------------------------------------------
def check_dataset(root: StrPath, *, check_images: bool = True) -> pd.DataFrame:
    """Find every problem of a BIDS-like dataset at once.

    Checks, without stopping at the first problem: ``participants.tsv`` (each bad row separately,
    see :func:`load_participants`), ``dataset_description.json`` when present (must be a JSON
    object; its absence is not a problem), participants listed without an image, images without a
    participants row or with an unexpected name, and every image with :func:`load_img`'s checks.

    Parameters
    ----------
    root : str or path-like
        Dataset folder.
    check_images : bool, default True
        Load every image to validate it (reads all the data). When False only the files'
        existence is checked.

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (str, the file concerned), ``participant_id`` (str, ``""`` when none) and
        ``problem`` (str); one row per problem. An empty frame means the dataset is OK.
    """
    root = Path(root)
    rows: list[tuple[str, str, str]] = []
    if not root.is_dir():
        rows.append((str(root), "", "dataset folder not found" if not root.exists() else "not a folder"))
        return pd.DataFrame(rows, columns=["path", "participant_id", "problem"])

    tsv = root / PARTICIPANTS_FILE
    table, problems = _read_participants(tsv)
    rows.extend((str(tsv), pid, text) for pid, text in problems)

    description = root / DESCRIPTION_FILE
    if description.exists():
        try:
            content = json.loads(description.read_text(encoding="utf-8"))
            if not isinstance(content, dict):
                rows.append((str(description), "", "dataset_description.json is not a JSON object"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            rows.append((str(description), "", f"invalid dataset_description.json: {err}"))

    images = find_images(root)
    listed: set[str] = set()
    if table is not None:
        for pid in table["participant_id"]:
            if not isinstance(pid, str) or not PARTICIPANT_ID_PATTERN.match(pid) or pid in listed:
                continue
            listed.add(pid)
            expected = image_path(root, pid)
            if not expected.exists():
                rows.append((str(expected), pid, "participant has no image (file not found)"))

    for img_file in images:
        pid = img_file.parent.parent.name
        if not PARTICIPANT_ID_PATTERN.match(pid) or img_file != image_path(root, pid):
            expected_name = f"{pid}_T1w.nii.gz"
            rows.append((str(img_file), pid, f"unexpected image name (expected {expected_name})"))
        elif table is not None and pid not in listed:
            rows.append((str(img_file), pid, "image has no row in participants.tsv (unmatched)"))
        if check_images:
            try:
                load_img(img_file)
            except DataError as err:
                message = str(err)
                prefix = f"{img_file}: "
                rows.append((str(img_file), pid, message[len(prefix) :] if message.startswith(prefix) else message))

    report = pd.DataFrame(rows, columns=["path", "participant_id", "problem"])
    if len(report):
        logger.info("%s: %d problem(s) found", root, len(report))
    else:
        logger.info("%s: dataset OK (%d images)", root, len(images))
    return report

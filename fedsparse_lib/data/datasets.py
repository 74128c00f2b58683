"""From a BIDS-like folder to model input: manifest, resampling, normalisation, torch Dataset.

The model input is a volume on the MNI grid of :mod:`fedsparse_lib.data.grids` (91 x 109 x 91 at
2 mm, 45 x 54 x 45 at 4 mm, 30 x 36 x 30 at 6 mm), z-scored per volume as in the paper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import uuid
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .grids import SUPPORTED_RESOLUTIONS_MM, grid_for_resolution
from .nifti import (
    PARTICIPANTS_FILE,
    DataError,
    _affine_problem,
    _format_problems,
    check_dataset,
    image_path,
    load_participants,
    load_volume,
)

__all__ = [
    "NORMALIZATIONS",
    "BrainAgeDataset",
    "build_manifest",
    "resample_volume",
    "split_train_test",
    "zscore",
]

logger = logging.getLogger(__name__)

StrPath = str | PathLike[str]

#: Intensity normalisations of :class:`BrainAgeDataset`.
NORMALIZATIONS: tuple[str, ...] = ("zscore", "zscore_brain")
#: FWHM of a Gaussian in units of its standard deviation, 2 * sqrt(2 ln 2).
FWHM_PER_SIGMA: float = 2.0 * np.sqrt(2.0 * np.log(2.0))
_CACHE_FORMAT_VERSION = 1
MANIFEST_COLUMNS: tuple[str, ...] = ("participant_id", "age", "sex", "site", "path")


def build_manifest(root: StrPath, *, check_images: bool = True) -> pd.DataFrame:
    """Validated table of a dataset's participants and image files.

    Parameters
    ----------
    root : str or path-like
        BIDS-like dataset folder (see :mod:`fedsparse_lib.data.nifti`).
    check_images : bool, default True
        Load every image to validate it (:func:`~fedsparse_lib.data.nifti.check_dataset`); when
        False only the table and the images' existence are checked (faster).

    Returns
    -------
    pandas.DataFrame
        Columns ``participant_id``, ``age`` (float years), ``sex``, ``site`` (strings, ``"n/a"``
        when participants.tsv has no such column), ``path`` (str, absolute image path), then any
        extra participants.tsv columns; one row per participant in file order.

    Raises
    ------
    DataError
        Listing every problem :func:`~fedsparse_lib.data.nifti.check_dataset` found.
    """
    root = Path(root)
    report = check_dataset(root, check_images=check_images)
    if len(report):
        problems = [(row.participant_id, f"{row.path}: {row.problem}") for row in report.itertuples()]
        raise DataError(_format_problems(root, problems))
    table = load_participants(root / PARTICIPANTS_FILE)
    for col in ("sex", "site"):
        if col not in table.columns:
            table[col] = "n/a"
    absolute = root.resolve()
    table["path"] = [str(image_path(absolute, pid)) for pid in table["participant_id"]]
    extras = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    logger.info("%s: manifest of %d participants", root, len(table))
    return table[list(MANIFEST_COLUMNS) + extras]


def resample_volume(data: np.ndarray, affine: np.ndarray, resolution_mm: float, *, order: int = 1) -> np.ndarray:
    """Resample a volume onto the MNI grid at ``resolution_mm``.

    First a Gaussian anti-aliasing filter matched to the voxel-size ratio, then interpolation at
    the target voxel centres mapped through the affines (world coordinates in mm), so any input
    grid, orientation or voxel size works. The filter has, along input axis ``i`` with voxel size
    ``v_i`` mm, ``FWHM = sqrt(r**2 - v_i**2)`` mm for an output voxel size ``r`` (none when
    ``v_i >= r``), i.e. ``sigma_i = sqrt(r**2 - v_i**2) / 2.355 / v_i`` input voxels. Target voxels
    outside the input's field of view are 0.

    Parameters
    ----------
    data : numpy.ndarray of shape (X, Y, Z)
        Voxel values.
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-world affine of ``data``, in mm.
    resolution_mm : float
        Output voxel size in mm, at least 2 (2, 4 and 6 are the package's grids).
    order : int, default 1
        Spline order of the interpolation in [0, 5] (1: trilinear).

    Returns
    -------
    numpy.ndarray of float32, shape ``grid_for_resolution(resolution_mm)[0]``
        The resampled volume. With input already on the 2 mm MNI grid and ``resolution_mm=2``
        this is ``data`` as float32.
    """
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=float)
    if data.ndim != 3:
        raise ValueError(f"data must be a 3D array, got shape {data.shape}")
    if not isinstance(order, (int, np.integer)) or not 0 <= order <= 5:
        raise ValueError(f"order must be an integer spline order in [0, 5], got {order!r}")
    problem = _affine_problem(affine)
    if problem is not None:
        raise ValueError(problem)
    out_shape, out_affine = grid_for_resolution(resolution_mm)
    r = float(resolution_mm)

    volume = data.astype(np.float32, copy=True)
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.sqrt(np.clip(r**2 - voxel_sizes**2, 0.0, None)) / FWHM_PER_SIGMA / voxel_sizes
    if np.any(sigma > 0.0):
        volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="nearest")

    mapping = np.linalg.inv(affine) @ out_affine  # target voxel -> input voxel
    if tuple(out_shape) == data.shape and np.allclose(mapping, np.eye(4), atol=1e-9):
        return volume
    return ndimage.affine_transform(
        volume,
        mapping[:3, :3],
        offset=mapping[:3, 3],
        output_shape=out_shape,
        output=np.float32,
        order=int(order),
        mode="constant",
        cval=0.0,
        prefilter=order > 1,
    )


def zscore(volume: np.ndarray, *, mask: np.ndarray | None = None, name: str | None = None) -> np.ndarray:
    """Per-volume z-score.

    Parameters
    ----------
    volume : numpy.ndarray
        Voxel values, any shape.
    mask : numpy.ndarray of bool, same shape as ``volume``, optional
        Brain mask. Without it (the paper) mean and standard deviation are taken over all voxels,
        background included; with it they are taken inside the mask and voxels outside are 0.
    name : str, optional
        Name of the volume (e.g. its file) for error messages.

    Returns
    -------
    numpy.ndarray of float32, same shape
        ``(volume - mean) / std`` (population std, ``ddof=0``).

    Raises
    ------
    DataError
        If the volume (or its masked part) is constant, or the mask is empty.
    ValueError
        If the mask's shape differs from the volume's.
    """
    label = f"{name}: " if name else ""
    values = np.asarray(volume, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise ValueError(f"{label}mask shape {mask.shape} differs from volume shape {values.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise DataError(f"{label}brain mask is empty: cannot z-score inside it")
        inside = values[mask]
    else:
        inside = values.ravel()
    mean = inside.mean()
    std = inside.std()
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        where = " inside the brain mask" if mask is not None else ""
        raise DataError(f"{label}volume is constant{where} (std {std:.3g}): cannot z-score it")
    out = (values - mean) / std
    if mask is not None:
        out[~mask] = 0.0
    return out.astype(np.float32)


class BrainAgeDataset(Dataset):
    """Preprocessed volumes and ages of a manifest, as a torch Dataset.

    Each image is loaded, resampled to the MNI grid at ``resolution_mm`` and z-scored once; the
    float32 result is kept in memory. With ``cache_dir`` all volumes are preprocessed up front
    into one stacked ``.npy`` file (written atomically, memory-mapped for reading) that later
    datasets with the same files and options reuse.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``participant_id``, ``age`` (years) and ``path`` (NIfTI file), e.g. from
        :func:`build_manifest`; row order is the dataset order.
    resolution_mm : {2, 4, 6}, default 2
        Voxel size of the model input grid.
    normalization : {"zscore", "zscore_brain"}, default "zscore"
        ``"zscore"``: mean / std over the whole volume, background included (the paper).
        ``"zscore_brain"``: statistics inside the brain, which is ``mask`` when given, else the
        image's nonzero voxels (resampled with the image, threshold 0.5); voxels outside are 0.
    mask : numpy.ndarray of bool, optional
        Brain mask on the target grid (shape ``grid_for_resolution(resolution_mm)[0]``); only with
        ``normalization="zscore_brain"``.
    cache_dir : str or path-like, optional
        Folder of the stacked ``.npy`` cache (created if needed). The cache key covers every
        file's path, size and modification time and the options.
    progress : bool, default True
        Show a progress bar while building the disk cache.

    Attributes
    ----------
    ages : numpy.ndarray of float32, shape (N,)
    participant_ids : list of str
    shape : tuple of int
        Grid shape of each volume, ``(X, Y, Z)``.
    cache_path : pathlib.Path or None
        The stacked ``.npy`` file, when ``cache_dir`` is given.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        *,
        resolution_mm: int = 2,
        normalization: str = "zscore",
        mask: np.ndarray | None = None,
        cache_dir: StrPath | None = None,
        progress: bool = True,
    ) -> None:
        missing = [c for c in ("participant_id", "age", "path") if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks column(s) {missing} (found {list(manifest.columns)})")
        if len(manifest) == 0:
            raise ValueError("manifest is empty")
        if resolution_mm not in SUPPORTED_RESOLUTIONS_MM:
            raise ValueError(f"resolution_mm must be one of {SUPPORTED_RESOLUTIONS_MM}, got {resolution_mm!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        ages = pd.to_numeric(manifest["age"], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(ages)):
            bad = manifest["participant_id"][~np.isfinite(ages)].tolist()
            raise ValueError(f"manifest has missing or non-numeric ages for {bad}")

        self.manifest = manifest.reset_index(drop=True).copy()
        self.resolution_mm = int(resolution_mm)
        self.normalization = normalization
        self.shape, _ = grid_for_resolution(self.resolution_mm)
        self.ages = ages.astype(np.float32)
        self.participant_ids = [str(p) for p in self.manifest["participant_id"]]
        self._paths = [Path(p) for p in self.manifest["path"]]
        self._mask: np.ndarray | None = None
        if mask is not None:
            if normalization != "zscore_brain":
                raise ValueError("mask is only used with normalization='zscore_brain'")
            mask = np.asarray(mask)
            if mask.shape != self.shape:
                raise ValueError(f"mask shape {mask.shape} differs from the {self.resolution_mm} mm grid {self.shape}")
            self._mask = mask.astype(bool)
        self._cache: dict[int, np.ndarray] = {}
        self._stack: np.ndarray | None = None
        self.cache_path: Path | None = None
        if cache_dir is not None:
            self.cache_path = (
                Path(cache_dir) / f"brainage_{self.resolution_mm}mm_{normalization}_{self._cache_key()}.npy"
            )
            self._stack = self._open_or_build_stack(self.cache_path, progress=progress)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume of shape (1, X, Y, Z) and age (scalar), both float32 tensors."""
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} volumes")
        i %= n
        if self._stack is not None:
            volume = np.array(self._stack[i], dtype=np.float32)
        else:
            if i not in self._cache:
                self._cache[i] = self._preprocess(i)
            volume = self._cache[i].copy()
        return torch.from_numpy(volume).unsqueeze(0), torch.tensor(self.ages[i], dtype=torch.float32)

    def _preprocess(self, i: int) -> np.ndarray:
        path = self._paths[i]
        data, affine = load_volume(path)
        volume = resample_volume(data, affine, self.resolution_mm)
        if self.normalization == "zscore":
            return zscore(volume, name=str(path))
        brain = self._mask
        if brain is None:
            brain = resample_volume((data != 0).astype(np.float32), affine, self.resolution_mm) >= 0.5
        return zscore(volume, mask=brain, name=str(path))

    def _cache_key(self) -> str:
        files = []
        for path in self._paths:
            try:
                stat = path.stat()
            except OSError as err:
                raise DataError(f"{path}: cannot read the image file: {err}") from err
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        mask_hash = None if self._mask is None else hashlib.sha256(np.packbits(self._mask).tobytes()).hexdigest()
        payload = {
            "version": _CACHE_FORMAT_VERSION,
            "files": files,
            "resolution_mm": self.resolution_mm,
            "normalization": self.normalization,
            "mask": mask_hash,
            "order": 1,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def _open_or_build_stack(self, path: Path, *, progress: bool) -> np.ndarray:
        expected = (len(self), *self.shape)
        if path.exists():
            try:
                stack = np.load(path, mmap_mode="r")
                if stack.shape == expected and stack.dtype == np.float32:
                    logger.info("using cached volumes %s", path)
                    return stack
                logger.warning("ignoring cache %s: shape %s dtype %s", path, stack.shape, stack.dtype)
            except (OSError, ValueError) as err:
                logger.warning("ignoring unreadable cache %s: %s", path, err)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=expected)
            for i in tqdm(range(len(self)), desc="preprocessing", disable=not progress):
                out[i] = self._preprocess(i)
            out.flush()
            del out
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("wrote %d preprocessed volumes to %s", len(self), path)
        return np.load(path, mmap_mode="r")


def split_train_test(
    participants: pd.DataFrame,
    *,
    test_fraction: float = 0.2,
    seed: int,
    num_age_bins: int = 5,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fixed held-out test split, stratified by age (and site).

    Participants are grouped into strata: ``num_age_bins`` equal-count age bins, crossed with the
    sites when there is a ``site`` column. The test set has ``round(n * test_fraction)``
    participants (at least 1, at most n - 1), allocated to the strata in proportion to their sizes
    (largest-remainder rounding, ties broken at random) and drawn at random inside each stratum.

    Parameters
    ----------
    participants : pandas.DataFrame
        Needs an ``age`` column; ``site`` is used when present.
    test_fraction : float, default 0.2
        Fraction of participants held out, in (0, 1).
    seed : int
        Seed of the split; the same seed and table give the same split.
    num_age_bins : int, default 5
        Number of equal-count age bins used as strata.

    Returns
    -------
    train, test : pandas.DataFrame
        Disjoint row subsets of ``participants`` covering it, original index and order kept.
    """
    n = len(participants)
    if n < 2:
        raise ValueError(f"need at least 2 participants to split, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if int(num_age_bins) < 1:
        raise ValueError(f"num_age_bins must be >= 1, got {num_age_bins!r}")
    if "age" not in participants.columns:
        raise ValueError(f"participants lacks an 'age' column (found {list(participants.columns)})")
    ages = pd.to_numeric(participants["age"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(ages)):
        raise ValueError("participants has missing or non-numeric ages")
    rng = np.random.default_rng(seed)
    n_test = int(np.clip(round(n * test_fraction), 1, n - 1))

    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(ages, kind="stable")] = np.arange(n)
    age_bin = ranks * int(num_age_bins) // n
    keys = pd.Series(age_bin.astype(str))
    if "site" in participants.columns:
        keys = keys + "|" + participants["site"].astype(str).to_numpy()
    stratum, _ = pd.factorize(keys)
    sizes = np.bincount(stratum)
    exact = sizes * n_test / n
    quota = np.floor(exact).astype(int)
    remainder = exact - quota
    extra = n_test - int(quota.sum())
    order = np.lexsort((rng.random(len(sizes)), -remainder))
    quota[order[:extra]] += 1

    is_test = np.zeros(n, dtype=bool)
    for s, k in enumerate(quota):
        members = np.flatnonzero(stratum == s)
        is_test[rng.permutation(members)[:k]] = True
    return participants[~is_test], participants[is_test]

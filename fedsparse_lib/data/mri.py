"""The single-image steps of MRI preprocessing, each usable on its own in a notebook.

The pipeline (``spec/data.md`` section 3; run per subject and per dataset by :mod:`.preprocess`)::

    reorient_img        canonical RAS+ voxel order (nibabel)
    n4_correct_img      N4 bias-field correction (SimpleITK), returns the image and the bias field
    skull_strip_img     brain mask: deepbet (CPU), or the MNI152 brain mask brought back through
                        the inverse registration (``method="template"``)
    register_img        rigid then affine registration to MNI152 (in :mod:`.registration`)
    resample_to_mni_img onto the 91 x 109 x 91 2 mm grid of :mod:`.grids`
    normalize_img       z-score over the whole volume (the paper) or inside the brain mask

With deepbet the brain is extracted first and only the brain is registered; with the template
fallback the whole head is registered first and the template mask is then mapped back.
:func:`register_img` lives in :mod:`.registration`; :mod:`.preprocess` re-exports every step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .datasets import NORMALIZATIONS, zscore
from .grids import grid_for_resolution
from .registration import _sitk_to_array, itk_threads, template_arrays, to_sitk_image

__all__ = [
    "MIN_BRAIN_ML",
    "SKULL_STRIP_METHODS",
    "brain_volume_ml",
    "deepbet_available",
    "n4_correct_img",
    "normalize_img",
    "reorient_img",
    "resample_to_mni_img",
    "skull_strip_img",
]

logger = logging.getLogger(__name__)

#: Skull-stripping methods of :func:`skull_strip_img`.
SKULL_STRIP_METHODS: tuple[str, ...] = ("deepbet", "template")
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_MAX_BIAS = 20.0  # a field beyond 20x (or 1/20x) the mean is a failed fit, not a scanner
#: Smallest brain mask accepted (ml): below it no brain was found.
MIN_BRAIN_ML: float = 100.0

Img = nib.spatialimages.SpatialImage


def reorient_img(img: Img) -> nib.Nifti1Image:
    """Reorder the voxel axes to canonical RAS+ (the closest to the affine's orientation).

    Only the voxel order and the affine change; world coordinates, and therefore every later
    transform, are the same. A sagittal ``ASL`` scan becomes ``RAS``.

    Parameters
    ----------
    img : nibabel image, 3D

    Returns
    -------
    nibabel.Nifti1Image
        The same voxels, axes ordered left->Right, posterior->Anterior, inferior->Superior.
    """
    canonical = nib.as_closest_canonical(img)
    if not isinstance(canonical, nib.Nifti1Image):
        canonical = nib.Nifti1Image(np.asanyarray(canonical.dataobj), canonical.affine)
    return canonical


def n4_correct_img(img: Img, *, mask_img: Img | None = None, shrink_mm: float = 6.0,
                   n_iterations: tuple[int, ...] = (50, 50, 30),
                   n_threads: int | None = 1) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """N4 bias-field correction (SimpleITK), estimated on a shrunk copy for speed.

    The scan is modelled as ``true * bias`` with a smooth multiplicative ``bias``. N4 estimates
    ``log(bias)`` as a B-spline on a copy shrunk to about ``shrink_mm`` voxels, and the field is
    then evaluated on the full grid. The field is scaled to geometric mean 1 over the mask, so the
    corrected image keeps the scanner's intensity scale.

    Parameters
    ----------
    img : nibabel image, 3D
        The scan (negative values, e.g. reconstruction ringing, are set to 0).
    mask_img : nibabel image, optional
        Voxels to fit the field on (same grid). Default: the head, by Otsu thresholding.
    shrink_mm : float, default 6.0
        Approximate voxel size in mm of the shrunk image N4 runs on (integer shrink per axis).
    n_iterations : tuple of int, default (50, 50, 30)
        Maximum iterations per fitting level; the number of levels is its length (the B-spline
        control grid doubles at each level).
    n_threads : int or None, default 1
        ITK threads (None: all cores). The result is reproducible for a fixed value.

    Returns
    -------
    corrected : nibabel.Nifti1Image of float32
        ``img / bias``.
    bias : nibabel.Nifti1Image of float32
        The estimated multiplicative bias field on the grid of ``img`` (about 1 everywhere).

    Raises
    ------
    ValueError
        If the image is blank (constant) or has non-finite voxels, or the fit diverged (a field
        beyond 20 times the mean).
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    _check_intensities(data)
    if data.min() < 0:  # reconstruction ringing: N4 models positive magnitudes
        data = np.clip(data, 0.0, None)
    image = to_sitk_image(nib.Nifti1Image(data, img.affine))
    factors = [max(1, int(round(float(shrink_mm) / s))) for s in image.GetSpacing()]
    small = sitk.Shrink(image, factors)
    if mask_img is None:
        small_mask = sitk.OtsuThreshold(small, 0, 1, 200)  # inside value 0 (background), outside 1 (head)
    else:
        small_mask = sitk.Shrink(to_sitk_image(mask_img, dtype=np.uint8), factors)
    mask_array = sitk.GetArrayFromImage(small_mask) > 0
    if mask_array.sum() < 10:
        raise ValueError("the mask for the bias field is (almost) empty: no foreground found")
    with itk_threads(n_threads):
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations([int(n) for n in n_iterations])
        if n_threads is not None:
            n4.SetNumberOfThreads(int(n_threads))
        n4.Execute(small, small_mask)
        # a copy, not GetArrayViewFromImage: a view of a temporary image would outlive its buffer
        log_small = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(small))
        offset = float(np.mean(log_small[mask_array], dtype=np.float64))
        log_bias = _sitk_to_array(n4.GetLogBiasFieldAsImage(image)) - offset
    if not np.all(np.isfinite(log_bias)) or np.abs(log_bias).max() > np.log(_MAX_BIAS):
        raise ValueError(f"the bias-field estimation diverged (log-bias range [{np.nanmin(log_bias):.3g}, "
                         f"{np.nanmax(log_bias):.3g}], expected within +-log({_MAX_BIAS:g}))")
    bias = np.exp(log_bias).astype(np.float32)
    corrected = nib.Nifti1Image(data / bias, img.affine)
    return corrected, nib.Nifti1Image(bias, img.affine)


def deepbet_available() -> bool:
    """Whether deepbet (and its bundled weights) can be imported."""
    return importlib.util.find_spec("deepbet") is not None


@functools.lru_cache(maxsize=1)
def _deepbet_model() -> Any:
    from deepbet import BrainExtraction

    logger.debug("loading deepbet's models (CPU)")
    with warnings.catch_warnings():  # deepbet's TorchScript weights: torch deprecates jit.load, not ours to fix
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return BrainExtraction(no_gpu=True)


@contextlib.contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    import torch

    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def skull_strip_img(img: Img, *, method: Literal["deepbet", "template"] = "deepbet",
                    world_to_mni: np.ndarray | None = None, threshold: float = 0.5,
                    n_threads: int | None = 1) -> nib.Nifti1Image:
    """Brain mask of a T1 scan.

    Parameters
    ----------
    img : nibabel image, 3D
        The scan (bias-corrected is best), any orientation.
    method : {"deepbet", "template"}, default "deepbet"
        ``"deepbet"``: the deepbet network (Fisch et al. 2024, MIT licence; weights ship inside
        its wheel, no network), on the CPU. ``"template"``: nilearn's MNI152 brain mask mapped onto
        the scan through the inverse of ``world_to_mni`` (needs a registration of the whole head).
    world_to_mni : numpy.ndarray of shape (4, 4), optional
        Scanner RAS mm -> MNI mm, from :func:`register_img`; required by ``"template"``.
    threshold : float, default 0.5
        deepbet's probability threshold, in (0, 1).
    n_threads : int or None, default 1
        Torch threads for deepbet (restored afterwards; None: leave torch's setting).

    Returns
    -------
    nibabel.Nifti1Image of uint8
        0 / 1 brain mask on the grid of ``img``.

    Raises
    ------
    ImportError
        ``method="deepbet"`` without deepbet installed.
    ValueError
        Unknown method, ``"template"`` without ``world_to_mni``, or no brain found (a mask
        smaller than :data:`MIN_BRAIN_ML`).
    """
    if method not in SKULL_STRIP_METHODS:
        raise ValueError(f"method must be one of {SKULL_STRIP_METHODS}, got {method!r}")
    if method == "template":
        if world_to_mni is None:
            raise ValueError("method='template' needs world_to_mni (from register_img of the whole head)")
        mask_img = _template_mask_img(img, world_to_mni)
    else:
        if not deepbet_available():
            raise ImportError("deepbet is not installed (pip install deepbet); use method='template' instead")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        data = np.asarray(img.dataobj, dtype=np.float32)
        _check_intensities(data)
        with _torch_threads(n_threads):
            _, mask, _ = _deepbet_model().run(nib.Nifti1Image(data, img.affine), threshold=float(threshold))
        mask_img = nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), img.affine)
    volume = brain_volume_ml(mask_img)
    if volume < MIN_BRAIN_ML:
        raise ValueError(f"no brain found: the {method} mask holds {volume:.1f} ml (expected >= {MIN_BRAIN_ML:g} ml)")
    return mask_img


def brain_volume_ml(mask_img: Img) -> float:
    """Volume of a mask's nonzero voxels in ml (voxel volume from the affine)."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(mask_img.affine)[:3, :3]))) / 1000.0
    return float(np.count_nonzero(np.asarray(mask_img.dataobj))) * voxel_ml


def normalize_img(img: Img, *, method: Literal["zscore", "zscore_brain"] = "zscore",
                  mask_img: Img | None = None) -> nib.Nifti1Image:
    """Per-volume intensity normalisation.

    Parameters
    ----------
    img : nibabel image, 3D
    method : {"zscore", "zscore_brain"}, default "zscore"
        ``"zscore"``: mean and standard deviation over every voxel, background included (the
        paper). ``"zscore_brain"``: over the voxels of ``mask_img``; voxels outside are 0.
    mask_img : nibabel image, optional
        Brain mask on the same grid; required by ``"zscore_brain"``.

    Returns
    -------
    nibabel.Nifti1Image of float32
        Same grid and affine.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"method must be one of {NORMALIZATIONS}, got {method!r}")
    mask = None
    if method == "zscore_brain":
        if mask_img is None:
            raise ValueError("method='zscore_brain' needs mask_img")
        mask = np.asarray(mask_img.dataobj) > 0
    out = nib.Nifti1Image(zscore(np.asarray(img.dataobj), mask=mask), img.affine, header=img.header)
    out.set_data_dtype(np.float32)
    return out


def resample_to_mni_img(img: Img, world_to_mni: np.ndarray, *,
                        resolution_mm: float = 2.0,
                        interpolation: Literal["linear", "nearest"] = "linear") -> nib.Nifti1Image:
    """Resample a subject image onto the MNI grid through a subject -> MNI affine.

    Parameters
    ----------
    img : nibabel image, 3D
        Subject image (scanner world coordinates).
    world_to_mni : numpy.ndarray of shape (4, 4)
        Subject world RAS mm -> MNI RAS mm (:attr:`RegistrationResult.affine`).
    resolution_mm : float, default 2
        Output grid (:func:`~fedsparse_lib.data.grids.grid_for_resolution`): 91 x 109 x 91 at 2 mm.
    interpolation : {"linear", "nearest"}, default "linear"
        Linear interpolation after a Gaussian anti-aliasing filter matched to the voxel-size
        ratio (``FWHM = sqrt(r_out**2 - r_in**2)`` per axis); nearest for label images.

    Returns
    -------
    nibabel.Nifti1Image of float32
        On the MNI grid; voxels outside the subject's field of view are 0.
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    world_to_mni = np.asarray(world_to_mni, dtype=float)
    if world_to_mni.shape != (4, 4) or not np.all(np.isfinite(world_to_mni)):
        raise ValueError(f"world_to_mni must be a finite 4x4 matrix, got {world_to_mni!r}")
    shape, out_affine = grid_for_resolution(resolution_mm)
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=float)
    # output voxel -> MNI mm -> subject mm -> subject voxel
    mapping = np.linalg.inv(affine) @ np.linalg.inv(world_to_mni) @ out_affine
    if interpolation == "linear":
        # voxel size of the subject grid expressed in MNI mm (includes the registration's scaling)
        in_mm = np.sqrt(((world_to_mni[:3, :3] @ affine[:3, :3]) ** 2).sum(axis=0))
        sigma = np.sqrt(np.clip(float(resolution_mm) ** 2 - in_mm**2, 0.0, None)) / _FWHM_PER_SIGMA / in_mm
        if np.any(sigma > 0.05):
            data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    out = ndimage.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=shape,
                                   order=1 if interpolation == "linear" else 0, mode="constant", cval=0.0)
    result = nib.Nifti1Image(out.astype(np.float32, copy=False), out_affine)
    result.header.set_xyzt_units("mm", "sec")
    result.set_sform(out_affine, code=4)  # MNI152
    result.set_qform(out_affine, code=4)
    return result


def _template_mask_img(img: Img, world_to_mni: np.ndarray) -> nib.Nifti1Image:
    """The template brain mask brought onto a subject's grid through the inverse registration.

    For every voxel of ``img``: subject world -> MNI mm (``world_to_mni``) -> nilearn's 1 mm
    MNI152 brain mask, linearly interpolated and thresholded at 0.5.

    Returns
    -------
    nibabel.Nifti1Image of uint8
        0 / 1 mask on the grid of ``img``.
    """
    mask_1mm, affine_1mm = template_arrays("brain_mask_1mm")
    mapping = np.linalg.inv(affine_1mm) @ np.asarray(world_to_mni, dtype=float) @ np.asarray(img.affine, dtype=float)
    prob = ndimage.affine_transform(mask_1mm, mapping[:3, :3], offset=mapping[:3, 3], output_shape=img.shape[:3],
                                    order=1, mode="constant", cval=0.0)
    return nib.Nifti1Image((prob > 0.5).astype(np.uint8), img.affine)


def _check_intensities(data: np.ndarray) -> None:
    if not np.all(np.isfinite(data)):
        raise ValueError(f"the image has {int((~np.isfinite(data)).sum())} non-finite voxels")
    lo, hi = float(data.min()), float(data.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise ValueError(f"the image is blank (every voxel is {hi:g})")

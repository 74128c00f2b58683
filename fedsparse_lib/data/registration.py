"""Affine registration of a T1 scan to MNI152 (SimpleITK), the MNI templates, and scoring.

Coordinate conventions
----------------------
nibabel (and NIfTI, nilearn, this package) give world coordinates in **RAS+** mm: x grows to the
subject's Right, y to Anterior, z to Superior. ITK's physical space is **LPS+**: x grows to the
Left, y to Posterior. The two differ by ``F = diag(-1, -1, 1)``::

    p_lps = F @ p_ras        (and back: p_ras = F @ p_lps, F is its own inverse)

so a nibabel image with voxel-to-world affine ``A`` becomes an ITK image with
``origin = F @ A[:3, 3]``, ``spacing = column norms of A[:3, :3]`` and
``direction = F @ A[:3, :3] / spacing``; the voxel array is transposed because ITK/NumPy index
``[k, j, i]`` where nibabel indexes ``[i, j, k]`` (:func:`to_sitk_image`).

An ITK registration transform ``T`` maps a point of the *fixed* image (here the MNI template) to
the *moving* image (the subject), in LPS mm. The transform this module returns maps the other
way, subject world (RAS mm) to MNI (RAS mm), as a 4 x 4 matrix::

    world_to_mni = F4 @ inv(T4) @ F4        with F4 = diag(-1, -1, 1, 1)

(:func:`sitk_transform_to_ras`). Every function here takes and returns RAS+ affines; LPS never
leaves this module.

Registration
------------
Fixed image: nilearn's MNI152 T1 template (skull-stripped) on the 2 mm grid of :mod:`.grids`.
Moving image: the subject, skull-stripped when a brain mask is given (the template is then
compared with the brain only), otherwise the whole head, with the metric restricted to a dilated
template brain mask. Centre-of-mass (image moments) initialisation, then a rigid (6 parameters) and
an affine (12 parameters) stage, both maximising Mattes mutual information over a multi-resolution
pyramid, with a fixed random sampling seed: for a given number of ITK threads the result is
reproducible bit for bit. A registration that diverges (pure noise, a blank scan, a wrong header)
raises :class:`RegistrationError` instead of returning a transform.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE

__all__ = [
    "RegistrationError",
    "RegistrationResult",
    "SCALE_RANGE",
    "itk_threads",
    "mni_template_img",
    "register_img",
    "registration_error_mm",
    "sitk_transform_to_ras",
    "to_sitk_image",
]

logger = logging.getLogger(__name__)

_F4 = np.diag([-1.0, -1.0, 1.0, 1.0])
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: Plausible linear scale factors (singular values of the subject -> MNI matrix).
SCALE_RANGE: tuple[float, float] = (0.67, 1.5)
_TEMPLATE_MM = 2.0


class RegistrationError(RuntimeError):
    """A registration failed or diverged (the message says which check and the values)."""


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of :func:`register_img`.

    Attributes
    ----------
    affine : numpy.ndarray of shape (4, 4)
        Subject world (scanner RAS+ mm) -> MNI152 (RAS+ mm).
    similarity : float
        Mattes mutual information (nats, higher is better) at the end of the affine stage, on the
        2 mm template grid.
    rigid_similarity : float
        The same at the end of the rigid stage, whose finest level is 4 mm (so its value is not
        comparable with ``similarity``).
    correlation : float
        Pearson correlation, inside the template brain mask, between the template and the
        subject resampled through ``affine`` (in [-1, 1]; about 0.8-0.9 for a good T1 match).
    scales : tuple of float
        Singular values of the linear part of ``affine``: the subject -> MNI scaling per principal
        axis (1 = same size as the template).
    """

    affine: np.ndarray
    similarity: float
    rigid_similarity: float
    correlation: float
    scales: tuple[float, float, float]


# --- conversions --------------------------------------------------------------------------------

def to_sitk_image(img: nib.spatialimages.SpatialImage, *, dtype: type = np.float32) -> sitk.Image:
    """Convert a 3D nibabel image to a SimpleITK image with the same world geometry.

    Parameters
    ----------
    img : nibabel image, 3D
    dtype : numpy dtype, default float32
        Pixel type of the result.

    Returns
    -------
    SimpleITK.Image
        Same voxels; origin, spacing and direction in ITK's LPS convention (module docstring).

    Raises
    ------
    ValueError
        If the image is not 3D or its affine has sheared (non-orthogonal) axes, which ITK cannot
        represent.
    """
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    lps = _F4 @ np.asarray(img.affine, dtype=float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(f"affine has sheared axes, which ITK cannot represent: {np.round(img.affine, 4).tolist()}")
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.astype(dtype, copy=False).transpose(2, 1, 0)))
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(o) for o in lps[:3, 3]])
    out.SetDirection([float(d) for d in direction.ravel()])
    return out


def _sitk_to_array(image: sitk.Image) -> np.ndarray:
    """Voxel array of an ITK image in nibabel's ``[i, j, k]`` order."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def sitk_transform_to_ras(transform: sitk.Transform) -> np.ndarray:
    """Turn an ITK fixed(MNI) -> moving(subject) LPS transform into a subject -> MNI RAS matrix.

    Parameters
    ----------
    transform : SimpleITK.Transform
        An affine-family transform (translation, Euler3D, Similarity3D, Affine, or a composite of
        such), as returned by a registration with the template as fixed image.

    Returns
    -------
    numpy.ndarray of shape (4, 4)
        ``F4 @ inv(T4) @ F4``: subject world RAS mm -> MNI RAS mm.
    """
    t4 = _transform_matrix_lps(transform)
    return _F4 @ np.linalg.inv(t4) @ _F4


def _transform_matrix_lps(transform: sitk.Transform) -> np.ndarray:
    """4 x 4 matrix of an affine-family ITK transform, read off the images of the unit points.

    Works for any transform that is affine (translation, Euler, similarity, affine, composites
    of these); a non-affine one (B-spline, displacement field) is detected and refused.
    """
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    m[:3, 3] = origin
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 100.0  # mm: well above rounding, well inside any field of view
        m[:3, axis] = (np.array(transform.TransformPoint(unit)) - origin) / 100.0
    probe = np.array([37.0, -53.0, 71.0])
    if not np.allclose(transform.TransformPoint(probe.tolist()), m[:3, :3] @ probe + origin, atol=1e-6):
        raise ValueError(f"{transform.GetName()} is not an affine transform")
    return m


@contextlib.contextmanager
def itk_threads(n_threads: int | None) -> Iterator[None]:
    """Temporarily set SimpleITK's global default number of threads (None: leave it)."""
    if n_threads is None:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n_threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


# --- the template -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def template_arrays(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (array, affine) of a nilearn MNI152 image, cached per process.

    ``kind``: ``"t1"`` or ``"brain_mask"`` on the 2 mm grid of :mod:`.grids`, or
    ``"brain_mask_1mm"`` (nilearn's 1 mm mask, for mapping back onto finer subject grids).
    """
    from nilearn import datasets

    if kind == "t1":
        src = datasets.load_mni152_template(resolution=2)
    elif kind == "brain_mask":
        src = datasets.load_mni152_brain_mask(resolution=2)
    elif kind == "brain_mask_1mm":  # finer mask for bringing back to a subject grid
        src = datasets.load_mni152_brain_mask(resolution=1)
        data = (np.asarray(src.get_fdata(dtype=np.float32)) > 0.5).astype(np.float32)
        data.setflags(write=False)
        return data, np.array(src.affine)
    else:
        raise ValueError(f"kind must be 't1', 'brain_mask' or 'brain_mask_1mm', got {kind!r}")
    target = np.array(MNI_2MM_AFFINE)
    mapping = np.linalg.solve(src.affine, target)  # 2 mm grid voxel -> template voxel
    data = ndimage.affine_transform(src.get_fdata(dtype=np.float32), mapping[:3, :3], offset=mapping[:3, 3],
                                    output_shape=MNI_2MM_SHAPE, order=1, mode="constant", cval=0.0)
    if kind == "brain_mask":
        data = (data > 0.5).astype(np.float32)
    data.setflags(write=False)
    return data, target


def mni_template_img(kind: Literal["t1", "brain_mask"] = "t1") -> nib.Nifti1Image:
    """nilearn's MNI152 template on the package's 91 x 109 x 91 2 mm grid (RAS+).

    Parameters
    ----------
    kind : {"t1", "brain_mask"}, default "t1"
        The skull-stripped T1 template (intensities in [0, 1]) or the brain mask (0 / 1).

    Returns
    -------
    nibabel.Nifti1Image of float32
        Bundled with nilearn: no network needed. Cached in memory after the first call.
    """
    if kind not in ("t1", "brain_mask"):
        raise ValueError(f"kind must be 't1' or 'brain_mask', got {kind!r}")
    data, affine = template_arrays(kind)
    return nib.Nifti1Image(np.array(data), affine)


# --- registration -------------------------------------------------------------------------------

def register_img(img: nib.spatialimages.SpatialImage, *, mask_img: nib.spatialimages.SpatialImage | None = None,
                 seed: int = 0, n_threads: int | None = 1, sampling_fraction: float = 0.15,
                 n_bins: int = 32, min_similarity: float = 0.1, min_correlation: float = 0.5,
                 scale_range: tuple[float, float] = SCALE_RANGE) -> RegistrationResult:
    """Affine registration of a T1 scan to the MNI152 template (rigid, then affine).

    Parameters
    ----------
    img : nibabel image, 3D
        The subject's T1 scan (bias-corrected works best), any grid and orientation.
    mask_img : nibabel image, optional
        Brain mask on the grid of ``img``. When given, only the brain is registered (to the
        skull-stripped template); without it the whole head is, with the metric restricted to the
        template's dilated brain mask.
    seed : int, default 0
        Seed of ITK's random metric sampling.
    n_threads : int or None, default 1
        ITK threads (None: ITK's default, all cores). The result is reproducible for a fixed value.
    sampling_fraction : float, default 0.15
        Fraction of the template's voxels sampled by the metric at each pyramid level, in (0, 1].
    n_bins : int, default 32
        Histogram bins of the Mattes mutual information.
    min_similarity : float, default 0.1
        Below this final mutual information (nats) the registration is deemed diverged.
    min_correlation : float, default 0.5
        Below this correlation with the template (see :class:`RegistrationResult`) likewise.
    scale_range : (float, float), default (0.67, 1.5)
        Plausible range of the scale factors; outside it likewise.

    Returns
    -------
    RegistrationResult

    Raises
    ------
    RegistrationError
        If the image (or its masked part) is blank or constant, ITK fails, or the result is
        implausible: similarity or correlation too low, a scale factor out of range, a reflection.
    """
    if not 0.0 < float(sampling_fraction) <= 1.0:
        raise ValueError(f"sampling_fraction must be in (0, 1], got {sampling_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**31 - 1), got {seed!r}")
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask_img is not None:
        mask = np.asarray(mask_img.dataobj) > 0
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {data.shape}")
        data = np.where(mask, data, 0.0).astype(np.float32)
    _check_not_blank(data, "the masked image" if mask_img is not None else "the image")
    # a robust intensity range: clip the brightest 0.1 % (vessels, fat) that would waste MI bins
    high = float(np.percentile(data[data > 0], 99.9)) if np.any(data > 0) else float(data.max())
    data, affine = _downsample(np.clip(data, None, high), np.asarray(img.affine, dtype=float), _TEMPLATE_MM)
    moving = to_sitk_image(nib.Nifti1Image(data, affine))
    template, template_affine = template_arrays("t1")
    fixed = to_sitk_image(nib.Nifti1Image(np.array(template), template_affine))
    brain, _ = template_arrays("brain_mask")
    fixed_mask = None
    if mask_img is None:
        dilated = ndimage.binary_dilation(brain > 0.5, iterations=4)  # 8 mm around the brain
        fixed_mask = to_sitk_image(nib.Nifti1Image(dilated.astype(np.uint8), template_affine), dtype=np.uint8)

    with itk_threads(n_threads):
        try:
            initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                        sitk.CenteredTransformInitializerFilter.MOMENTS)
            method = _method(seed, n_threads, sampling_fraction, n_bins, fixed_mask, shrink=(4, 2),
                             sigmas_mm=(4.0, 2.0), learning_rate=2.0, min_step=1e-3)
            method.SetInitialTransform(initial, inPlace=False)
            rigid = _unwrap(method.Execute(fixed, moving))
            rigid_value = -float(method.GetMetricValue())
            affine = sitk.AffineTransform(3)
            affine.SetCenter(rigid.GetCenter())
            affine.SetMatrix(rigid.GetMatrix())
            affine.SetTranslation(rigid.GetTranslation())
            method = _method(seed, n_threads, sampling_fraction, n_bins, fixed_mask, shrink=(2, 1),
                             sigmas_mm=(2.0, 0.0), learning_rate=1.0, min_step=1e-4)
            method.SetInitialTransform(affine, inPlace=False)
            final = _unwrap(method.Execute(fixed, moving))
            value = -float(method.GetMetricValue())
            warped = _sitk_to_array(sitk.Resample(moving, fixed, final, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        except RuntimeError as err:
            raise RegistrationError(f"ITK registration failed: {str(err).strip().splitlines()[-1]}") from err

    world_to_mni = sitk_transform_to_ras(final)
    inside = brain > 0.5
    correlation = float(np.corrcoef(warped[inside], template[inside])[0, 1]) if warped[inside].std() > 0 else 0.0
    scales = tuple(float(s) for s in np.linalg.svd(world_to_mni[:3, :3], compute_uv=False))
    result = RegistrationResult(affine=world_to_mni, similarity=value, rigid_similarity=rigid_value,
                                correlation=correlation, scales=scales)  # type: ignore[arg-type]
    logger.debug("registration: MI %.3f (rigid %.3f), r %.3f, scales %s", value, rigid_value, correlation,
                 np.round(scales, 3))
    _check_result(result, min_similarity=min_similarity, min_correlation=min_correlation, scale_range=scale_range)
    return result


def _downsample(data: np.ndarray, affine: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased resampling of the axes finer than ``voxel_mm`` to about ``voxel_mm``.

    The template is a 2 mm image, so finer detail in the moving image cannot help the metric; a
    1 mm scan registers ~8x faster at 2 mm with the same result. Voxel 0 keeps its centre.
    """
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factor = np.where(sizes < 0.9 * voxel_mm, voxel_mm / sizes, 1.0)
    if np.all(factor == 1.0):
        return data, affine
    sigma = np.sqrt(np.clip((sizes * factor) ** 2 - sizes**2, 0.0, None)) / _FWHM_PER_SIGMA / sizes
    smooth = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    shape = tuple(int(n) for n in np.maximum(np.floor((np.array(data.shape) - 1) / factor) + 1, 1))
    out = ndimage.affine_transform(smooth, factor, output_shape=shape, order=1, mode="nearest")
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * factor
    return out.astype(np.float32, copy=False), new


def _method(seed: int, n_threads: int | None, fraction: float, n_bins: int, fixed_mask: sitk.Image | None, *,
            shrink: tuple[int, ...], sigmas_mm: tuple[float, ...], learning_rate: float,
            min_step: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(n_bins))
    method.SetMetricSamplingStrategy(method.RANDOM)
    # ITK reads seed 0 as "seed from the wall clock": shift by one so that every seed is fixed
    method.SetMetricSamplingPercentage(float(fraction), int(seed) + 1)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step,
                                                   numberOfIterations=200, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if n_threads is not None:
        method.SetNumberOfThreads(int(n_threads))
    return method


def _unwrap(transform: sitk.Transform) -> sitk.Transform:
    """The single transform inside the composite that ``Execute`` returns with ``inPlace=False``."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return composite.GetNthTransform(0).Downcast()
    return transform.Downcast()


def _check_not_blank(data: np.ndarray, what: str) -> None:
    finite = np.isfinite(data)
    if not finite.all():
        raise RegistrationError(f"{what} has {int((~finite).sum())} non-finite voxels")
    lo, hi = float(data.min()), float(data.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise RegistrationError(f"{what} is blank (every voxel is {hi:g}): nothing to register")


def _check_result(result: RegistrationResult, *, min_similarity: float, min_correlation: float,
                  scale_range: tuple[float, float]) -> None:
    problems = []
    if not np.all(np.isfinite(result.affine)):
        problems.append("the transform is not finite")
    if np.linalg.det(result.affine[:3, :3]) <= 0:
        problems.append("the transform flips the image (negative determinant)")
    if not result.similarity >= min_similarity:
        problems.append(f"mutual information {result.similarity:.3f} < {min_similarity:g}")
    if not result.correlation >= min_correlation:
        problems.append(f"correlation with the template {result.correlation:.3f} < {min_correlation:g}")
    lo, hi = scale_range
    if not all(lo <= s <= hi for s in result.scales):
        problems.append(f"scale factors {np.round(result.scales, 3).tolist()} outside [{lo:g}, {hi:g}]")
    if problems:
        raise RegistrationError("registration diverged: " + "; ".join(problems))


# --- scoring ---------------------------------------------------------------------

def registration_error_mm(estimated: np.ndarray, true: np.ndarray,
                          mask_img: nib.spatialimages.SpatialImage) -> float:
    """Mean distance (mm) between two subject -> MNI affines over the voxels of a mask.

    Parameters
    ----------
    estimated, true : numpy.ndarray of shape (4, 4)
        Subject world RAS mm -> MNI RAS mm.
    mask_img : nibabel image
        Mask (e.g. the true brain mask) in subject space; its nonzero voxels are the points.

    Returns
    -------
    float
        ``mean ||estimated @ p - true @ p||`` over the mask's voxel centres ``p`` (world mm).
    """
    mask = np.asarray(mask_img.dataobj) > 0
    if not mask.any():
        raise ValueError("mask is empty: no voxel to measure the registration error on")
    ijk = np.argwhere(mask).T.astype(float)
    points = mask_img.affine[:3, :3] @ ijk + mask_img.affine[:3, 3:4]
    diff = np.asarray(estimated, dtype=float) - np.asarray(true, dtype=float)
    return float(np.linalg.norm(diff[:3, :3] @ points + diff[:3, 3:4], axis=0).mean())

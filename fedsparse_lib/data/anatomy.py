"""The template anatomy the synthetic cohort is built from.

Everything comes from the MNI152 2009 templates that nilearn ships inside its wheel (T1 brain
mask, grey-matter and white-matter probability maps at 1 mm; no network). From them this module
derives, once, a stack of smooth *channels* on a padded 2 mm grid that the subject simulator warps
and combines:

=============  ==============================================================================
``gm``         grey-matter probability in [0, 1]
``wm``         white-matter probability in [0, 1]
``brain``      brain-mask probability in [0, 1] (CSF = brain - gm - wm)
``d_vent``     signed distance to the lateral / third ventricles in mm (negative inside)
``d_sulc``     distance to the nearest sulcal / external CSF in mm (0 in CSF, grows into tissue)
``regional``   regional atrophy weight (frontal and temporal cortex age faster), mean 1 over GM
``d_head``     distance outside the brain in mm (0 inside), for the skull and scalp of raw scans
=============  ==============================================================================

The result is cached as an ``.npy`` file (no pickle) under ``$FEDSPARSE_CACHE`` or
``~/.cache/fedsparse`` and reloaded in milliseconds by every worker process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE

__all__ = ["CHANNELS", "TemplateAnatomy", "load_template_anatomy", "default_cache_dir"]

logger = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = ("gm", "wm", "brain", "d_vent", "d_sulc", "regional", "d_head")
_VERSION = 1
#: padding, in 2 mm voxels, around the 91 x 109 x 91 grid (room for skull and scalp in raw mode)
PAD_VOXELS = 10


@dataclass(frozen=True)
class TemplateAnatomy:
    """Template channels on the padded 2 mm grid.

    Attributes
    ----------
    channels : numpy.ndarray of shape (7, 111, 129, 111), float32
        The channels named in :data:`CHANNELS`, in that order.
    affine : numpy.ndarray of shape (4, 4)
        Voxel-to-world (MNI mm, RAS+) affine of the padded grid.
    centre_mm : numpy.ndarray of shape (3,)
        Centre of mass of the brain mask in MNI mm: the fixed point of head-size scaling.
    """

    channels: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray

    def channel(self, name: str) -> np.ndarray:
        """Return one channel by name (a view)."""
        return self.channels[CHANNELS.index(name)]


def default_cache_dir() -> Path:
    """Cache folder: ``$FEDSPARSE_CACHE`` if set, else ``~/.cache/fedsparse``."""
    env = os.environ.get("FEDSPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedsparse"


def padded_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the 2 mm MNI grid padded by :data:`PAD_VOXELS` on every side."""
    shape = tuple(int(n + 2 * PAD_VOXELS) for n in MNI_2MM_SHAPE)
    affine = np.array(MNI_2MM_AFFINE, dtype=float)
    affine[:3, 3] -= 2.0 * PAD_VOXELS
    return shape, affine  # type: ignore[return-value]


def _cache_key() -> str:
    import nilearn

    text = f"anatomy-v{_VERSION}-nilearn-{nilearn.__version__}-pad{PAD_VOXELS}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_template_anatomy(*, cache_dir: str | os.PathLike | None = None) -> TemplateAnatomy:
    """Load the template channels, computing and caching them on first use (about 10 s).

    Parameters
    ----------
    cache_dir : path, optional
        Where the ``.npy`` cache lives; default :func:`default_cache_dir`. If it cannot be
        written, the channels are computed in memory and a warning is logged.

    Returns
    -------
    TemplateAnatomy
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"template-anatomy-{_cache_key()}.npy"
    _, affine = padded_grid()
    if path.exists():
        try:
            stack = np.load(path, allow_pickle=False)
            centre = stack[-1, 0, 0, :3].astype(float).copy()
            return TemplateAnatomy(channels=stack[:-1], affine=affine, centre_mm=centre)
        except (OSError, ValueError) as exc:  # a damaged cache is rebuilt, never trusted
            logger.warning("template anatomy cache %s unreadable (%s); rebuilding", path, exc)
    channels, centre = _compute_channels()
    extra = np.zeros((1,) + channels.shape[1:], dtype=np.float32)
    extra[0, 0, 0, :3] = centre
    stack = np.concatenate([channels, extra])
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, stack, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache template anatomy in %s (%s)", directory, exc)
    return TemplateAnatomy(channels=channels, affine=affine, centre_mm=centre)


def _compute_channels() -> tuple[np.ndarray, np.ndarray]:
    """Derive the channels from nilearn's 1 mm MNI152 templates and resample to 2 mm."""
    from nilearn import datasets

    logger.info("computing the template anatomy from nilearn's MNI152 templates (once)")
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    aff1 = mask_img.affine
    brain = mask_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    gm, wm = gm / max(float(gm.max()), 1e-6), wm / max(float(wm.max()), 1e-6)
    inside = brain > 0.5
    gm, wm = gm * inside, wm * inside
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    vox = float(abs(np.linalg.det(aff1[:3, :3]))) ** (1 / 3)

    # ventricles: deep CSF in large central components (lateral + third ventricles)
    depth = ndi.distance_transform_edt(inside) * vox
    candidate = (csf > 0.5) & (depth > 12.0)
    labels, n = ndi.label(candidate)
    ventricles = np.zeros_like(candidate)
    if n:
        sizes = ndi.sum(candidate, labels, range(1, n + 1))
        centres = ndi.center_of_mass(candidate, labels, range(1, n + 1))
        for k, (size, c) in enumerate(zip(sizes, centres), start=1):
            world = aff1[:3, :3] @ np.asarray(c) + aff1[:3, 3]
            if size * vox**3 > 3000 and abs(world[0]) < 20 and world[2] > 0:
                ventricles |= labels == k
    if ventricles.sum() == 0:
        raise RuntimeError("could not locate the ventricles in nilearn's MNI152 template")
    d_vent = (ndi.distance_transform_edt(~ventricles) - ndi.distance_transform_edt(ventricles)) * vox

    # sulcal / external CSF: CSF-dominated voxels or outside the brain, away from the ventricles
    outer = ((csf > 0.5) | ~inside) & (d_vent > 3.0)
    d_sulc = ndi.distance_transform_edt(~outer) * vox
    d_head = ndi.distance_transform_edt(~inside) * vox

    # regional weight: frontal lobes and lateral temporal cortex atrophy faster
    ijk = np.indices(brain.shape, dtype=np.float32)
    x = aff1[0, 0] * ijk[0] + aff1[0, 3]
    y = aff1[1, 1] * ijk[1] + aff1[1, 3]
    z = aff1[2, 2] * ijk[2] + aff1[2, 3]
    del ijk

    def sig(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    regional = 0.7 + 0.6 * sig(y / 15.0) + 0.4 * sig((-z - 5.0) / 8.0) * sig((np.abs(x) - 35.0) / 6.0)
    regional /= float((regional * gm).sum() / gm.sum())
    centre_vox = np.asarray(ndi.center_of_mass(inside))
    centre_mm = aff1[:3, :3] @ centre_vox + aff1[:3, 3]

    shape2, aff2 = padded_grid()
    maps = {"gm": gm, "wm": wm, "brain": brain, "d_vent": d_vent, "d_sulc": d_sulc,
            "regional": regional, "d_head": d_head}
    out = np.empty((len(CHANNELS),) + shape2, dtype=np.float32)
    # 2 mm voxel centres in 1 mm voxel coordinates
    to1 = np.linalg.solve(aff1, aff2)
    coords = np.indices(shape2, dtype=np.float64).reshape(3, -1)
    coords = to1[:3, :3] @ coords + to1[:3, 3:4]
    for c, name in enumerate(CHANNELS):
        vol = maps[name].astype(np.float32)
        # anti-aliasing for the 1 -> 2 mm step (FWHM of one output voxel)
        vol = ndi.gaussian_filter(vol, sigma=0.85)
        distance = name.startswith("d_")
        out[c] = ndi.map_coordinates(
            vol, coords, order=1, mode="nearest" if distance else "constant", cval=0.0
        ).reshape(shape2)
    return out, centre_mm.astype(np.float32)

"""Voxel grids of the package: the 2 mm MNI152 grid and its 4 / 6 mm downsampled versions.

The model input grid is FSL's MNI152 2 mm grid: 91 x 109 x 91 voxels covering x in [-90, 90],
y in [-126, 90], z in [-72, 108] mm. FSL stores it with the x axis flipped (LAS); this package
stores it in RAS+ orientation (the affine below), which nibabel's ``as_closest_canonical`` and
nilearn use natively. Coarser grids keep the same field of view: ``floor(n * 2 / r)`` voxels per
axis of size ``r`` mm, centred on the 2 mm grid (45 x 54 x 45 at 4 mm, 30 x 36 x 30 at 6 mm).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MNI_2MM_AFFINE",
    "MNI_2MM_SHAPE",
    "SUPPORTED_RESOLUTIONS_MM",
    "grid_for_resolution",
]

MNI_2MM_SHAPE: tuple[int, int, int] = (91, 109, 91)
MNI_2MM_AFFINE: np.ndarray = np.array(
    [
        [2.0, 0.0, 0.0, -90.0],
        [0.0, 2.0, 0.0, -126.0],
        [0.0, 0.0, 2.0, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
MNI_2MM_AFFINE.setflags(write=False)

SUPPORTED_RESOLUTIONS_MM: tuple[int, ...] = (2, 4, 6)


def grid_for_resolution(resolution_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the MNI grid at ``resolution_mm``.

    Parameters
    ----------
    resolution_mm : float
        Isotropic voxel size in mm, at least 2 (the model grid).

    Returns
    -------
    shape : tuple of int
        ``floor(n * 2 / resolution_mm)`` per axis of the 2 mm grid.
    affine : numpy.ndarray of shape (4, 4)
        RAS+ voxel-to-world affine, centred on the 2 mm grid's field of view.
    """
    r = float(resolution_mm)
    if not np.isfinite(r) or r < 2.0:
        raise ValueError(f"resolution_mm must be a finite number >= 2 (the 2 mm MNI grid), got {resolution_mm!r}")
    base = np.asarray(MNI_2MM_SHAPE)
    shape = np.floor(base * 2.0 / r).astype(int)
    centre = MNI_2MM_AFFINE[:3, :3] @ ((base - 1) / 2.0) + MNI_2MM_AFFINE[:3, 3]
    origin = centre - r * (shape - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([r, r, r])
    affine[:3, 3] = origin
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine

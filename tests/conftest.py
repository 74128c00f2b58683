"""Shared fixtures: a seeded generator, tiny NIfTI images and a tiny BIDS-like dataset builder."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

# Tiny tensors on a shared 2-core machine: one torch thread avoids spin-waiting between two.
torch.set_num_threads(1)

# A coarse 8 mm RAS+ grid covering the MNI field of view: tiny images (23 x 28 x 23 voxels) that
# the loaders accept and the resampler can bring to the 2 / 4 / 6 mm grids.
TINY_SHAPE: tuple[int, int, int] = (23, 28, 23)
TINY_AFFINE: np.ndarray = np.array(
    [
        [8.0, 0.0, 0.0, -90.0],
        [0.0, 8.0, 0.0, -126.0],
        [0.0, 0.0, 8.0, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded numpy generator (seed 0)."""
    return np.random.default_rng(0)


def _brain_volume(shape: Sequence[int], affine: np.ndarray, age: float, rng: np.random.Generator) -> np.ndarray:
    """An int16 ellipsoidal 'brain' on a zero background whose intensity falls with age."""
    ijk = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    centre = np.array([[0.0], [-18.0], [18.0]])
    radii = np.array([[70.0], [90.0], [70.0]])
    inside = (((xyz - centre) / radii) ** 2).sum(axis=0) <= 1.0
    values = np.where(inside, 1000.0 - 5.0 * age + rng.normal(0.0, 50.0, inside.size), 0.0)
    return values.reshape(tuple(shape)).round().astype(np.int16)


@pytest.fixture
def write_img(tmp_path: Path) -> Callable[..., Path]:
    """Write an array as a NIfTI file under tmp_path and return its path.

    ``write_img(data, affine=TINY_AFFINE, *, name="img.nii.gz")``; the file's data type is the
    array's.
    """

    def _write(data: np.ndarray, affine: np.ndarray | None = None, *, name: str = "img.nii.gz") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.asarray(data), TINY_AFFINE if affine is None else affine)
        img.set_data_dtype(np.asarray(data).dtype)
        nib.save(img, path)
        return path

    return _write


@pytest.fixture
def make_bids_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build a tiny valid BIDS-like dataset and return its root.

    ``make_bids_dataset(ages=(50, 60, 70, 80), *, sites=None, sexes=None, name="ds",
    shape=TINY_SHAPE, affine=TINY_AFFINE, seed=0)`` writes ``participants.tsv`` (participant_id
    ``sub-0001``..., age, sex, site), ``dataset_description.json`` and one int16 image per
    participant at ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz``.
    """

    def _make(
        ages: Sequence[float] = (50.0, 60.0, 70.0, 80.0),
        *,
        sites: Sequence[str] | None = None,
        sexes: Sequence[str] | None = None,
        name: str = "ds",
        shape: Sequence[int] = TINY_SHAPE,
        affine: np.ndarray = TINY_AFFINE,
        seed: int = 0,
    ) -> Path:
        root = tmp_path / name
        root.mkdir(parents=True)
        generator = np.random.default_rng(seed)
        ids = [f"sub-{i + 1:04d}" for i in range(len(ages))]
        table = pd.DataFrame(
            {
                "participant_id": ids,
                "age": [float(a) for a in ages],
                "sex": list(sexes) if sexes is not None else ["F" if i % 2 else "M" for i in range(len(ages))],
                "site": list(sites) if sites is not None else [f"site{i % 2 + 1}" for i in range(len(ages))],
            }
        )
        table.to_csv(root / "participants.tsv", sep="\t", index=False)
        (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
        for pid, age in zip(ids, ages, strict=True):
            anat = root / pid / "anat"
            anat.mkdir(parents=True)
            data = _brain_volume(shape, affine, float(age), generator)
            nib.save(nib.Nifti1Image(data, affine), anat / f"{pid}_T1w.nii.gz")
        return root

    return _make


@pytest.fixture(scope="session")
def nilearn_mask() -> np.ndarray:
    """nilearn's MNI152 brain mask resampled (by nilearn, an independent implementation) to the 2 mm model grid."""
    from nilearn import datasets, image

    from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE

    target = nib.Nifti1Image(np.zeros(MNI_2MM_SHAPE, dtype=np.uint8), np.array(MNI_2MM_AFFINE))
    mask = image.resample_to_img(datasets.load_mni152_brain_mask(resolution=2), target,
                                 interpolation="nearest", force_resample=True, copy_header=True)
    return np.asarray(mask.dataobj) > 0.5

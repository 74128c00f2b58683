"""Tests of fedsparse_lib.data.mri: the single-image preprocessing steps.

Ground truth comes from outside the code under test: a voxel's world coordinates (reorientation),
a multiplicative bias field the test applies itself to nilearn's MNI152 T1 (N4), the synthetic raw
cohort's true brain mask and raw -> MNI affine (skull stripping), index shifts worked out by hand
(resampling) and numpy's mean / std (normalisation).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from nilearn import datasets

from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from fedsparse_lib.data.mri import (
    brain_volume_ml,
    deepbet_available,
    n4_correct_img,
    normalize_img,
    reorient_img,
    resample_to_mni_img,
    skull_strip_img,
)
from fedsparse_lib.data.synthetic import synthesize_cohort


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def raw_subject(tmp_path_factory) -> tuple[nib.Nifti1Image, nib.Nifti1Image, np.ndarray]:
    """One raw synthetic scan (skull, misplacement, LPS 1.5 mm grid), its true brain mask and raw -> MNI."""
    root = tmp_path_factory.mktemp("raw") / "cohort"
    synthesize_cohort(root, n_subjects=1, seed=3, raw=True, n_jobs=1, progress=False)
    truth = root / "derivatives" / "truth" / "sub-0001"
    img = nib.load(root / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
    mask = nib.load(truth / "sub-0001_desc-brain_mask.nii.gz")
    raw_to_mni = np.array(json.loads((truth / "sub-0001_truth.json").read_text())["raw_to_mni"])
    return img, mask, raw_to_mni


# --------------------------------------------------------------------------------------------
# reorientation
# --------------------------------------------------------------------------------------------
RAS = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -50.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])


def _reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> nib.Nifti1Image:
    """The same image stored with voxel axes in the orientation ``codes`` (e.g. "LPS", "ASL")."""
    target = nib.orientations.axcodes2ornt(tuple(codes))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), target)
    new_data = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return nib.Nifti1Image(new_data, new_affine)


@pytest.mark.parametrize("codes", ["LPS", "ASL", "RAS", "IPR"])
def test_reorient_img_round_trips_a_known_orientation(codes, rng):
    # Prepare: a RAS image stored in another orientation
    data = rng.normal(size=(10, 12, 8)).astype(np.float32)
    stored = _reoriented(data, RAS, codes)
    assert nib.aff2axcodes(stored.affine) == tuple(codes)
    # Execute
    out = reorient_img(stored)
    # Assert: back to the RAS voxels and affine
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.affine, RAS)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)


def test_reorient_img_keeps_world_coordinates(rng):
    # Prepare: a stored LPS image; the voxel at world point (-30, -40, -21) mm (RAS voxel 5, 5, 3)
    data = rng.normal(size=(10, 12, 8)).astype(np.float32)
    stored = _reoriented(data, RAS, "LPS")
    world = np.array([-30.0, -40.0, -21.0, 1.0])
    # Execute
    out = reorient_img(stored)
    # Assert: the same intensity at the same world point
    i_in = np.rint(np.linalg.solve(stored.affine, world)[:3]).astype(int)
    i_out = np.rint(np.linalg.solve(out.affine, world)[:3]).astype(int)
    assert tuple(i_out) == (5, 5, 3)
    assert np.asarray(stored.dataobj)[tuple(i_in)] == np.asarray(out.dataobj)[tuple(i_out)] == data[5, 5, 3]


# --------------------------------------------------------------------------------------------
# N4
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biased_template() -> dict:
    """nilearn's MNI152 T1 (2 mm) times a known smooth bias field (about +-15 %), plus noise."""
    t1 = datasets.load_mni152_template(resolution=2)
    clean = t1.get_fdata(dtype=np.float32) * 1000.0
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata() > 0.9
    x = np.indices(clean.shape, dtype=np.float32) / np.array(clean.shape, dtype=np.float32)[:, None, None, None] - 0.5
    bias = np.exp(0.3 * x[0] - 0.25 * x[1] + 0.35 * x[2] + 0.4 * x[0] * x[2]).astype(np.float32)
    noise = np.random.default_rng(2).normal(0.0, 10.0, size=clean.shape).astype(np.float32)
    observed = np.abs(clean * bias + noise)
    return {"img": nib.Nifti1Image(observed, t1.affine), "clean": clean, "bias": bias, "wm": wm}


def cov(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.mark.slow
def test_n4_reduces_white_matter_intensity_variation(biased_template):
    # Prepare
    wm, observed = biased_template["wm"], np.asarray(biased_template["img"].dataobj)
    before, clean = cov(observed[wm]), cov(biased_template["clean"][wm])
    assert before > 2.0 * clean  # the applied field dominates the white-matter variation
    # Execute
    corrected, bias = n4_correct_img(biased_template["img"])
    # Assert: the variation is back near the clean image's, and the field found is the one applied
    after = cov(np.asarray(corrected.dataobj)[wm])
    assert after < 0.6 * before
    assert after < 1.25 * clean
    ratio = np.asarray(bias.dataobj)[wm] / biased_template["bias"][wm]
    assert np.abs(ratio / np.exp(np.log(ratio).mean()) - 1.0).mean() < 0.03  # up to a global scale
    np.testing.assert_allclose(np.asarray(corrected.dataobj) * np.asarray(bias.dataobj), observed, rtol=1e-4)


def test_n4_is_deterministic_whatever_ran_before(biased_template):
    # Prepare: other work in between, which must not leak into the next fit
    img, fast = biased_template["img"], {"n_iterations": (20, 20)}
    first = np.asarray(n4_correct_img(img, **fast)[1].dataobj).copy()
    other = nib.Nifti1Image(biased_template["clean"][::-1].copy() + 1.0, img.affine)
    n4_correct_img(other, **fast)
    # Execute
    again = np.asarray(n4_correct_img(img, **fast)[1].dataobj)
    # Assert
    np.testing.assert_array_equal(again, first)


def test_n4_rejects_a_blank_image():
    with pytest.raises(ValueError, match="blank"):
        n4_correct_img(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)))


# --------------------------------------------------------------------------------------------
# skull stripping
# --------------------------------------------------------------------------------------------
def _truth_on_grid(mask_img: nib.Nifti1Image, like: nib.Nifti1Image) -> np.ndarray:
    """The true mask on the grid of ``like`` (the same voxels, maybe reordered)."""
    reordered = reorient_img(mask_img) if nib.aff2axcodes(like.affine) == ("R", "A", "S") else mask_img
    np.testing.assert_allclose(reordered.affine, like.affine)
    return np.asarray(reordered.dataobj) > 0


@pytest.mark.slow
@pytest.mark.skipif(not deepbet_available(), reason="deepbet not installed")
def test_deepbet_mask_matches_the_true_brain(raw_subject):
    # Prepare
    img, truth, _ = raw_subject
    img = reorient_img(img)
    # Execute
    mask = skull_strip_img(img, method="deepbet")
    # Assert
    assert mask.get_data_dtype() == np.uint8
    assert dice(np.asarray(mask.dataobj) > 0, _truth_on_grid(truth, img)) >= 0.95


def test_template_mask_through_the_true_transform_matches_the_true_brain(raw_subject):
    # Prepare: the ground-truth raw -> MNI affine (so this tests the inverse mapping alone)
    img, truth, raw_to_mni = raw_subject
    # Execute
    mask = skull_strip_img(img, method="template", world_to_mni=raw_to_mni)
    # Assert: only the individual non-linear deformation (~1-2 mm) separates them
    estimated = np.asarray(mask.dataobj) > 0
    assert dice(estimated, np.asarray(truth.dataobj) > 0) >= 0.95
    voxel_mm3 = float(np.prod(img.header.get_zooms()[:3]))
    assert brain_volume_ml(mask) == pytest.approx(estimated.sum() * voxel_mm3 / 1000.0, rel=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [({"method": "bet"}, "method must be"),
                                                 ({"method": "template"}, "needs world_to_mni")])
def test_skull_strip_rejects_bad_options(kwargs, message):
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=message):
        skull_strip_img(img, **kwargs)


def test_template_skull_strip_of_a_scan_off_the_template_finds_no_brain():
    # Prepare: a transform that puts the whole scan 1 m away from the MNI brain
    img = nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4))
    far = np.eye(4)
    far[0, 3] = 1000.0
    # Execute / Assert
    with pytest.raises(ValueError, match="no brain found"):
        skull_strip_img(img, method="template", world_to_mni=far)


def test_brain_volume_by_hand():
    data = np.zeros((20, 20, 20), np.uint8)
    data[:10, :10, :10] = 1  # 1000 voxels of 2 x 2 x 2 mm = 8000 mm3 = 8 ml
    assert brain_volume_ml(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))) == pytest.approx(8.0)


# --------------------------------------------------------------------------------------------
# resampling to the MNI grid
# --------------------------------------------------------------------------------------------
def test_resample_identity_on_the_mni_grid_is_the_image(rng):
    # Prepare
    data = rng.integers(0, 5, size=MNI_2MM_SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, np.array(MNI_2MM_AFFINE))
    # Execute
    out = resample_to_mni_img(img, np.eye(4), interpolation="nearest")
    # Assert
    assert out.shape == MNI_2MM_SHAPE
    np.testing.assert_array_equal(out.affine, MNI_2MM_AFFINE)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)


def test_resample_applies_the_transform_direction_subject_to_mni(rng):
    # Prepare: subject -> MNI moves every point 4 mm to the right (+x), i.e. 2 voxels on the 2 mm grid
    data = rng.integers(0, 5, size=MNI_2MM_SHAPE).astype(np.float32)
    img = nib.Nifti1Image(data, np.array(MNI_2MM_AFFINE))
    shift = np.eye(4)
    shift[0, 3] = 4.0
    # Execute
    out = np.asarray(resample_to_mni_img(img, shift, interpolation="nearest").dataobj)
    # Assert: the MNI voxel i shows the subject voxel i - 2; the first two columns are outside
    np.testing.assert_array_equal(out[2:], data[:-2])
    assert not out[:2].any()


def test_resample_to_a_coarser_grid(rng):
    img = nib.Nifti1Image(np.ones(MNI_2MM_SHAPE, np.float32), np.array(MNI_2MM_AFFINE))
    out = resample_to_mni_img(img, np.eye(4), resolution_mm=4)
    assert out.shape == (45, 54, 45)
    np.testing.assert_allclose(np.asarray(out.dataobj)[5:-5, 5:-5, 5:-5], 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
def test_zscore_uses_every_voxel(rng):
    data = rng.normal(100.0, 20.0, size=(10, 10, 10))
    out = np.asarray(normalize_img(nib.Nifti1Image(data, np.eye(4))).dataobj)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (data - data.mean()) / data.std(), rtol=1e-5, atol=1e-5)


def test_zscore_brain_uses_the_mask_and_zeroes_the_rest(rng):
    data = rng.normal(100.0, 20.0, size=(10, 10, 10))
    mask = np.zeros(data.shape, np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    out = np.asarray(normalize_img(nib.Nifti1Image(data, np.eye(4)), method="zscore_brain",
                                   mask_img=nib.Nifti1Image(mask, np.eye(4))).dataobj)
    inside = data[mask > 0]
    np.testing.assert_allclose(out[mask > 0], (inside - inside.mean()) / inside.std(), rtol=1e-5, atol=1e-5)
    assert not out[mask == 0].any()


@pytest.mark.parametrize(("kwargs", "message"), [({"method": "minmax"}, "method must be"),
                                                 ({"method": "zscore_brain"}, "needs mask_img")])
def test_normalize_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normalize_img(nib.Nifti1Image(np.ones((4, 4, 4)), np.eye(4)), **kwargs)


def test_steps_are_reexported_by_preprocess():
    from fedsparse_lib.data import preprocess

    for name in ("reorient_img", "n4_correct_img", "skull_strip_img", "register_img", "resample_to_mni_img",
                 "normalize_img"):
        assert name in preprocess.__all__ and callable(getattr(preprocess, name))


"""Tests of fedsparse_lib.data.registration: LPS/RAS conversions, registration to MNI152, scoring.

Expected values are independent of the code under test: world coordinates from nibabel's affine
against ITK's own ``TransformIndexToPhysicalPoint`` / ``TransformPoint``; distances worked out by
hand; the registration is checked against an affine the test applies itself to an MNI-space image
built from nilearn's grey / white matter maps (a contrast unlike the T1 template's).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nilearn import datasets
from scipy import ndimage

from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from fedsparse_lib.data.registration import (
    RegistrationError,
    RegistrationResult,
    _check_result,
    mni_template_img,
    register_img,
    registration_error_mm,
    sitk_transform_to_ras,
    to_sitk_image,
)

F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_from(linear: np.ndarray, translation) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation
    return out


# --------------------------------------------------------------------------------------------
# conversions between nibabel (RAS) and ITK (LPS)
# --------------------------------------------------------------------------------------------
ORIENTED_AFFINES = {
    "RAS 1 mm": affine_from(np.eye(3), [-20.0, 30.0, -10.0]),
    "LPS anisotropic": affine_from(np.diag([-1.2, -1.2, 1.5]), [100.0, 120.0, -80.0]),
    "ASL sagittal": affine_from(np.array([[0, 0, -1.4], [1.4, 0, 0], [0, 1.4, 0]]), [110.0, -127.0, -119.0]),
    "oblique": affine_from(rotation((10.0, -5.0, 20.0)) @ np.diag([1.0, 1.1, 1.3]), [5.0, -7.0, 9.0]),
}


@pytest.mark.parametrize("name", list(ORIENTED_AFFINES))
def test_to_sitk_image_keeps_world_coordinates_and_voxels(name, rng):
    # Prepare
    affine = ORIENTED_AFFINES[name]
    data = rng.normal(size=(7, 8, 9)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    # Execute
    image = to_sitk_image(img)
    # Assert: same voxel at the same index, and the index's ITK point (LPS) is nibabel's (RAS) flipped
    for ijk in [(0, 0, 0), (6, 7, 8), (3, 1, 5)]:
        ras = affine[:3, :3] @ np.array(ijk, dtype=float) + affine[:3, 3]
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(F @ lps, ras, atol=1e-5)
        assert image.GetPixel(*ijk) == pytest.approx(float(data[ijk]))


def test_to_sitk_image_rejects_sheared_affine():
    sheared = affine_from(np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), [0, 0, 0])
    with pytest.raises(ValueError, match="sheared"):
        to_sitk_image(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), sheared))


def _itk_affine(rng: np.random.Generator) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix((rotation((8.0, -6.0, 12.0)) @ np.diag([1.05, 0.97, 1.02])).ravel().tolist())
    t.SetCenter(rng.uniform(-20, 20, 3).tolist())
    t.SetTranslation(rng.uniform(-15, 15, 3).tolist())
    return t


@pytest.mark.parametrize("kind", ["affine", "euler", "composite"])
def test_sitk_transform_to_ras_inverts_itk_fixed_to_moving_map(kind, rng):
    # Prepare: an ITK transform mapping fixed (MNI) LPS points to moving (subject) LPS points
    if kind == "affine":
        transform = _itk_affine(rng)
    elif kind == "euler":
        transform = sitk.Euler3DTransform((3.0, -4.0, 5.0), 0.1, -0.2, 0.15, (10.0, -20.0, 5.0))
    else:
        transform = sitk.CompositeTransform([_itk_affine(rng), sitk.TranslationTransform(3, (4.0, -2.0, 7.0))])
    subject_ras = rng.uniform(-80, 80, size=(5, 3))
    # Execute
    world_to_mni = sitk_transform_to_ras(transform)
    # Assert: ITK maps the MNI point back onto the subject point
    for p in subject_ras:
        q = world_to_mni[:3, :3] @ p + world_to_mni[:3, 3]
        back = np.array(transform.TransformPoint((F @ q).tolist()))
        np.testing.assert_allclose(F @ back, p, atol=1e-6)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def test_registration_error_of_a_pure_translation_is_its_length():
    # Prepare: a 3-4-5 triangle: every point is off by (3, 4, 0) mm
    mask = nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4))
    shifted = affine_from(np.eye(3), [3.0, 4.0, 0.0])
    # Execute / Assert
    assert registration_error_mm(shifted, np.eye(4), mask) == pytest.approx(5.0)


def test_registration_error_of_a_scaling_by_hand():
    # Prepare: two voxels at x = 10 and x = 20 mm; a 10 % scaling about the origin moves them 1 and 2 mm
    data = np.zeros((3, 1, 1), np.uint8)
    data[1] = data[2] = 1
    mask = nib.Nifti1Image(data, np.diag([10.0, 1.0, 1.0, 1.0]))
    # Execute / Assert: mean of 1 and 2 mm
    assert registration_error_mm(np.diag([1.1, 1.0, 1.0, 1.0]), np.eye(4), mask) == pytest.approx(1.5)


def test_registration_error_needs_a_nonempty_mask():
    with pytest.raises(ValueError, match="empty"):
        registration_error_mm(np.eye(4), np.eye(4), nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)))


# --------------------------------------------------------------------------------------------
# the template
# --------------------------------------------------------------------------------------------
def test_mni_template_is_on_the_package_grid(nilearn_mask):
    t1, mask = mni_template_img("t1"), mni_template_img("brain_mask")
    assert t1.shape == mask.shape == MNI_2MM_SHAPE
    np.testing.assert_array_equal(t1.affine, MNI_2MM_AFFINE)
    # same voxels as nilearn's own resampling of its mask (conftest), and the T1 is brain-only
    agreement = np.mean((np.asarray(mask.dataobj) > 0.5) == nilearn_mask)
    assert agreement > 0.999
    data = np.asarray(t1.dataobj)
    assert data[~nilearn_mask].mean() < 0.02 * data[nilearn_mask].mean()


def test_mni_template_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        mni_template_img("t2")


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
#: the known subject -> MNI map the tests apply: rotations of 6-9 degrees, 5 % larger head
#: (so the MNI image is 1 / 1.05 of the subject), 12 mm off centre
KNOWN_WORLD_TO_MNI = affine_from(rotation((7.0, -6.0, 9.0)) / 1.05, [12.0, -9.0, 6.0])
SUBJECT_AFFINE = affine_from(np.diag([-1.5, 1.5, 1.5]), [110.0, -130.0, -100.0])  # LAS, 1.5 mm
SUBJECT_SHAPE = (148, 170, 150)


@pytest.fixture(scope="module")
def known_subject() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """An MNI-space tissue image (CSF 0.2, GM 0.62, WM 1 x 800, Rician-like noise) moved to a subject grid
    through the inverse of KNOWN_WORLD_TO_MNI; and its brain mask on that grid."""
    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata()
    g = gm.get_fdata()
    csf = np.clip(brain - g - wm, 0, 1)
    tissue = 800.0 * (0.2 * csf + 0.62 * g + 1.0 * wm)
    # subject voxel -> subject mm -> MNI mm -> template voxel
    mapping = np.linalg.inv(gm.affine) @ KNOWN_WORLD_TO_MNI @ SUBJECT_AFFINE
    ijk = np.indices(SUBJECT_SHAPE, dtype=np.float64).reshape(3, -1)
    coords = mapping[:3, :3] @ ijk + mapping[:3, 3:4]
    data = ndimage.map_coordinates(tissue, coords, order=1, cval=0.0).reshape(SUBJECT_SHAPE)
    mask = ndimage.map_coordinates(brain, coords, order=1, cval=0.0).reshape(SUBJECT_SHAPE) > 0.5
    noise = np.random.default_rng(3).normal(0.0, 15.0, size=(2,) + SUBJECT_SHAPE)
    data = np.sqrt((data + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)
    return nib.Nifti1Image(data, SUBJECT_AFFINE), nib.Nifti1Image(mask.astype(np.uint8), SUBJECT_AFFINE)


def mean_error_over_mni_brain(world_to_mni: np.ndarray, nilearn_mask: np.ndarray) -> float:
    """Mean ||E p - q|| over MNI brain voxels q, with p = KNOWN^-1 q the subject point that truly lands on q."""
    q = MNI_2MM_AFFINE[:3, :3] @ np.argwhere(nilearn_mask).T + MNI_2MM_AFFINE[:3, 3:4]
    inverse = np.linalg.inv(KNOWN_WORLD_TO_MNI)
    p = inverse[:3, :3] @ q + inverse[:3, 3:4]
    return float(np.linalg.norm(world_to_mni[:3, :3] @ p + world_to_mni[:3, 3:4] - q, axis=0).mean())


@pytest.fixture(scope="module")
def registered(known_subject) -> RegistrationResult:
    img, mask = known_subject
    return register_img(img, mask_img=mask, seed=0)


@pytest.mark.slow
def test_register_img_recovers_a_known_affine_within_1mm(registered, nilearn_mask):
    # Execute (fixture) / Assert
    assert mean_error_over_mni_brain(registered.affine, nilearn_mask) < 1.0
    np.testing.assert_allclose(registered.scales, [1 / 1.05] * 3, atol=0.02)
    assert registered.similarity > 0.3
    assert registered.correlation > 0.7


@pytest.mark.slow
def test_register_img_is_deterministic(known_subject, registered):
    img, mask = known_subject
    again = register_img(img, mask_img=mask, seed=0)
    np.testing.assert_array_equal(again.affine, registered.affine)
    assert again.similarity == registered.similarity


@pytest.mark.slow
def test_register_img_whole_head_mode_recovers_the_affine(known_subject, nilearn_mask):
    # Prepare: no brain mask: the metric is restricted to the template's dilated brain instead
    img, _ = known_subject
    # Execute
    result = register_img(img, seed=1)
    # Assert
    assert mean_error_over_mni_brain(result.affine, nilearn_mask) < 1.0


@pytest.mark.slow
def test_register_img_raises_when_registration_diverges_on_noise():
    # Prepare: pure noise on a plausible grid and header
    noise = np.random.default_rng(5).normal(300.0, 80.0, size=(120, 140, 120)).clip(0).astype(np.float32)
    img = nib.Nifti1Image(noise, affine_from(np.eye(3) * 1.6, [-96.0, -112.0, -96.0]))
    # Execute / Assert
    with pytest.raises(RegistrationError, match="diverged"):
        register_img(img)


@pytest.mark.parametrize("value", [0.0, 250.0])
def test_register_img_rejects_a_blank_scan(value):
    img = nib.Nifti1Image(np.full((40, 40, 40), value, np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(RegistrationError, match="blank"):
        register_img(img)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scales": (1.8, 1.0, 1.0)}, "scale factors"),
        ({"similarity": 0.02}, "mutual information"),
        ({"correlation": 0.1}, "correlation"),
        ({"affine": np.diag([-1.0, 1.0, 1.0, 1.0])}, "flips"),
    ],
)
def test_implausible_results_are_reported_as_divergence(change, message):
    # Prepare: a plausible result, then one implausible value
    fields = {"affine": np.eye(4), "similarity": 0.8, "rigid_similarity": 0.8, "correlation": 0.9,
              "scales": (1.0, 1.0, 1.0), **change}
    # Execute / Assert
    with pytest.raises(RegistrationError, match=message):
        _check_result(RegistrationResult(**fields), min_similarity=0.1, min_correlation=0.5, scale_range=(0.67, 1.5))

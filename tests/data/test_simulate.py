"""Tests of fedsparse_lib.data.simulate: one synthetic T1 scan from the template anatomy.

The subject and site are written out by hand here (not drawn by the cohort sampler). Expectations
come from the MNI152 brain mask that nilearn ships (resampled by nilearn), from hand-worked grid
geometry, and from comparisons *within the image* (voxel counts and intensities), independently of
the ground-truth volumes that the simulator reports.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from fedsparse_lib.data import ageing
from fedsparse_lib.data.anatomy import PAD_VOXELS, load_template_anatomy
from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from fedsparse_lib.data.simulate import SiteProfile, SubjectSpec, raw_grid, simulate_subject

SITE = SiteProfile(name="siteA", gain=800.0, gamma=1.0, noise=0.02, blur_mm=0.5, bias=0.05, gm_contrast=1.0,
                   age_mean=60.0, age_sd=8.0)
SUBJECT = SubjectSpec(participant_id="sub-0001", age=55.0, biological_age=55.0, sex="F", site="siteA",
                      head_scale=1.0, ventricle_factor=1.0, ventricle_offset_mm=0.0, cortex_factor=1.0,
                      seed=(1, 2, 3))
#: the 91 x 109 x 91 MNI grid inside the padded template grid
CROP = (slice(PAD_VOXELS, -PAD_VOXELS),) * 3


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def anatomy():
    return load_template_anatomy()


@pytest.fixture(scope="module")
def scan(anatomy):
    return simulate_subject(anatomy, SUBJECT, SITE)


@pytest.fixture(scope="module")
def young_and_old(anatomy):
    """The same subject imaged at biological ages 30 and 80 (same seed: same anatomy and scanner)."""
    young = simulate_subject(anatomy, dataclasses.replace(SUBJECT, biological_age=30.0), SITE)
    old = simulate_subject(anatomy, dataclasses.replace(SUBJECT, biological_age=80.0), SITE)
    return young, old


# --------------------------------------------------------------------------------------------
# raw_grid
# --------------------------------------------------------------------------------------------
# (orientation, voxel mm, expected shape: FOV 224 x 256 x 240 mm (R-L, A-P, S-I) / voxel size)
RAW_GRIDS = [
    ("LPS", (1.5, 1.5, 1.5), (149, 171, 160)),  # 224/1.5 = 149.3, 256/1.5 = 170.7, 240/1.5 = 160
    ("RAS", (1.2, 1.2, 1.5), (187, 213, 160)),  # 186.7, 213.3, 160
    ("ASL", (1.4, 1.4, 1.4), (183, 171, 160)),  # A-P 182.9, S-I 171.4, L-R 160
]


@pytest.mark.parametrize(("orientation", "voxel_mm", "shape"), RAW_GRIDS)
def test_raw_grid_geometry(orientation, voxel_mm, shape):
    # Prepare
    site = dataclasses.replace(SITE, raw_orientation=orientation, raw_voxel_mm=voxel_mm)
    # Execute
    got_shape, affine = raw_grid(site)
    # Assert: shape, orientation and voxel size, and the grid is centred on the scanner origin
    assert got_shape == shape
    assert "".join(nib.aff2axcodes(affine)) == orientation
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), voxel_mm)
    centre = affine @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


@pytest.mark.parametrize("orientation", ["LLS", "LP", "XYZ", "LPSA", "RRR"])
def test_raw_grid_rejects_bad_orientation(orientation):
    site = dataclasses.replace(SITE, raw_orientation=orientation)
    with pytest.raises(ValueError, match="raw_orientation"):
        raw_grid(site)


# --------------------------------------------------------------------------------------------
# standard mode: a skull-stripped image on the 2 mm MNI grid
# --------------------------------------------------------------------------------------------
def test_standard_scan_is_on_the_mni_grid(scan):
    assert scan.data.shape == MNI_2MM_SHAPE
    assert scan.data.dtype == np.int16
    np.testing.assert_array_equal(scan.affine, MNI_2MM_AFFINE)
    assert scan.brain_mask.shape == MNI_2MM_SHAPE
    assert scan.brain_mask.dtype == bool
    assert scan.raw_to_mni is None


def test_standard_scan_is_skull_stripped(scan):
    # Assert: exactly zero outside the brain mask, signal (> 0) inside it
    assert not scan.data[~scan.brain_mask].any()
    assert (scan.data[scan.brain_mask] > 0).mean() > 0.99


def test_standard_brain_mask_overlaps_nilearn_mni_mask(scan, nilearn_mask):
    # Execute
    overlap = dice(scan.brain_mask, nilearn_mask)
    # Assert
    assert overlap > 0.85


def test_without_deformation_the_brain_is_the_template_brain(anatomy):
    # Prepare
    template_brain = anatomy.channel("brain")[CROP] > 0.5
    # Execute
    scan = simulate_subject(anatomy, SUBJECT, SITE, deform_mm=0.0)
    # Assert: standard images are registered to MNI, so with no individual deformation the brain
    # is the template's voxel for voxel (head size is normalised away)
    np.testing.assert_array_equal(scan.brain_mask, template_brain)


def test_truth_volumes_are_consistent(scan):
    truth = scan.truth
    assert set(truth) == {"gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "lesion_ml", "brain_ml"}
    assert all(v >= 0 for v in truth.values())
    # the tissue classes share out the brain
    assert truth["gm_ml"] + truth["wm_ml"] + truth["csf_ml"] == pytest.approx(truth["brain_ml"], rel=0.01)
    assert truth["ventricle_ml"] < truth["csf_ml"]
    assert truth["lesion_ml"] < truth["wm_ml"]
    # an MNI-sized brain (head_scale 1) is about 1.9 l; the mask holds it (8 mm^3 voxels)
    assert truth["brain_ml"] == pytest.approx(scan.brain_mask.sum() * 8e-3, rel=0.03)
    assert 1700 < truth["brain_ml"] < 2100


def test_same_spec_gives_the_same_array_and_another_seed_does_not(anatomy, scan):
    # Execute
    again = simulate_subject(anatomy, SUBJECT, SITE)
    other = simulate_subject(anatomy, dataclasses.replace(SUBJECT, seed=(1, 2, 4)), SITE)
    # Assert
    np.testing.assert_array_equal(again.data, scan.data)
    assert again.truth == scan.truth
    brain = scan.brain_mask | other.brain_mask
    assert (other.data[brain] != scan.data[brain]).mean() > 0.5


def test_truth_volumes_do_not_depend_on_the_number_of_threads(anatomy):
    # Prepare
    previous = torch.get_num_threads()
    try:
        # Execute
        torch.set_num_threads(1)
        one_thread = simulate_subject(anatomy, SUBJECT, SITE)
        torch.set_num_threads(2)
        two_threads = simulate_subject(anatomy, SUBJECT, SITE)
    finally:
        torch.set_num_threads(previous)
    # Assert: the image is the same (it is), so must be the volumes measured on it
    np.testing.assert_array_equal(one_thread.data, two_threads.data)
    assert one_thread.truth == two_threads.truth


def test_subject_of_another_site_is_refused(anatomy):
    with pytest.raises(ValueError, match="siteB"):
        simulate_subject(anatomy, SUBJECT, dataclasses.replace(SITE, name="siteB"))


# --------------------------------------------------------------------------------------------
# ageing: visible in the image, not only in the truth table
# --------------------------------------------------------------------------------------------
def test_older_biological_age_has_more_csf_and_less_grey_matter_in_truth(young_and_old):
    young, old = young_and_old
    assert old.truth["ventricle_ml"] > young.truth["ventricle_ml"] * 1.5
    assert old.truth["csf_ml"] > young.truth["csf_ml"]
    assert old.truth["gm_ml"] < young.truth["gm_ml"]
    # ageing changes tissue, not the size of the brain
    assert old.truth["brain_ml"] == pytest.approx(young.truth["brain_ml"], rel=1e-6)


def test_older_biological_age_shows_larger_ventricles_in_the_image(anatomy, young_and_old):
    # Prepare: dark (CSF-like) voxels are below half the median brain intensity of the young scan;
    # the periventricular region is within 8 mm of the template ventricles
    young, old = young_and_old
    threshold = 0.5 * np.median(young.data[young.brain_mask])
    near_ventricles = young.brain_mask & (anatomy.channel("d_vent")[CROP] < 8.0)
    # Execute
    dark_young = int(((young.data < threshold) & near_ventricles).sum())
    dark_old = int(((old.data < threshold) & near_ventricles).sum())
    dark_brain_young = int(((young.data < threshold) & young.brain_mask).sum())
    dark_brain_old = int(((old.data < threshold) & old.brain_mask).sum())
    # Assert
    assert dark_old > 1.5 * dark_young
    assert dark_brain_old > 1.5 * dark_brain_young


def test_older_biological_age_shows_cortical_thinning_in_the_image(anatomy, young_and_old):
    # Prepare: cortical grey matter next to sulcal CSF in the template
    young, old = young_and_old
    cortex = young.brain_mask & (anatomy.channel("gm")[CROP] > 0.7) & (anatomy.channel("d_sulc")[CROP] < 3.0)
    # Execute
    ratio = old.data[cortex].mean() / young.data[cortex].mean()
    # Assert: grey matter turned into (darker) CSF
    assert ratio < 0.95


def test_white_matter_intensity_follows_the_ageing_factor(anatomy, young_and_old):
    # Prepare: deep white matter, away from the ventricles (periventricular lesions) and the cortex
    young, old = young_and_old
    deep_wm = young.brain_mask & (anatomy.channel("wm")[CROP] > 0.95) & (anatomy.channel("d_vent")[CROP] > 10.0)
    expected = ageing.wm_intensity_factor(80.0) / ageing.wm_intensity_factor(30.0)
    # Execute: the site has gamma 1, and the same seed gives the same gain, bias field and noise
    ratio = np.median(old.data[deep_wm]) / np.median(young.data[deep_wm])
    # Assert
    assert ratio == pytest.approx(expected, abs=0.01)

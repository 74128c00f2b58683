"""Tests of fedsparse_lib.data.datasets: manifest, resampling, z-score, Dataset, train/test split."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn.image import resample_img
from scipy import ndimage

from fedsparse_lib.data import datasets
from fedsparse_lib.data.datasets import (
    BrainAgeDataset,
    build_manifest,
    resample_volume,
    split_train_test,
    zscore,
)
from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE, grid_for_resolution
from fedsparse_lib.data.nifti import DataError, image_path, load_volume


def _world(shape, affine):
    """World coordinates (3, N) of every voxel centre of a grid."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def _rotated_grid(voxel_mm, shape, degrees):
    """A grid rotated about z, with voxel size ``voxel_mm``, centred on the MNI field of view."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * voxel_mm
    affine[:3, 3] = np.array([0.0, -18.0, 18.0]) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


# --------------------------------------------------------------------------------------------
# build_manifest
# --------------------------------------------------------------------------------------------
def test_build_manifest_columns_and_paths(make_bids_dataset):
    # Prepare
    root = make_bids_dataset((45.0, 62.5, 80.0), sites=("siteA", "siteB", "siteA"), sexes=("F", "M", "F"))
    # Execute
    manifest = build_manifest(root)
    # Assert
    assert list(manifest.columns) == ["participant_id", "age", "sex", "site", "path"]
    assert manifest["participant_id"].tolist() == ["sub-0001", "sub-0002", "sub-0003"]
    assert manifest["age"].tolist() == [45.0, 62.5, 80.0]
    assert manifest["site"].tolist() == ["siteA", "siteB", "siteA"]
    assert manifest["sex"].tolist() == ["F", "M", "F"]
    for pid, path in zip(manifest["participant_id"], manifest["path"], strict=True):
        assert os.path.isabs(path)
        assert path == str(image_path(root.resolve(), pid))


def test_build_manifest_fills_missing_optional_columns(make_bids_dataset):
    root = make_bids_dataset((50.0, 60.0))
    pd.DataFrame({"participant_id": ["sub-0001", "sub-0002"], "age": [50, 60], "group": ["a", "b"]}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    manifest = build_manifest(root)
    assert list(manifest.columns) == ["participant_id", "age", "sex", "site", "path", "group"]
    assert manifest["site"].tolist() == ["n/a", "n/a"]


def test_build_manifest_raises_listing_every_problem(make_bids_dataset):
    root = make_bids_dataset((50.0, 60.0, 70.0))
    image_path(root, "sub-0001").unlink()
    image_path(root, "sub-0003").write_bytes(b"broken")
    with pytest.raises(DataError, match="2 problem") as info:
        build_manifest(root)
    assert "sub-0001" in str(info.value) and "sub-0003" in str(info.value)


# --------------------------------------------------------------------------------------------
# resample_volume
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("resolution", "shape"), [(2, (91, 109, 91)), (4, (45, 54, 45)), (6, (30, 36, 30))])
def test_resample_volume_shapes(resolution, shape):
    data = np.ones((10, 12, 10), np.int16)
    affine = np.diag([20.0, 20.0, 20.0, 1.0])
    affine[:3, 3] = (-90.0, -126.0, -72.0)
    out = resample_volume(data, affine, resolution)
    assert out.shape == shape and out.dtype == np.float32


def test_resample_volume_is_identity_on_the_2mm_grid(rng):
    data = rng.normal(size=MNI_2MM_SHAPE).astype(np.float32)
    out = resample_volume(data, MNI_2MM_AFFINE, 2)
    np.testing.assert_allclose(out, data, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("case", "shape", "affine"),
    [
        ("2 mm MNI", MNI_2MM_SHAPE, MNI_2MM_AFFINE),
        ("3 mm rotated 10 deg", (80, 95, 80), _rotated_grid(3.0, (80, 95, 80), 10.0)),
        (
            "1.5 mm LAS",
            (130, 150, 130),
            np.diag([-1.5, 1.5, 1.5, 1.0])
            + np.array([[0, 0, 0, 96.75], [0, 0, 0, -129.75], [0, 0, 0, -78.75], [0, 0, 0, 0]]),
        ),
    ],
)
@pytest.mark.parametrize("resolution", [4, 6])
def test_resample_volume_keeps_a_constant_constant(case, shape, affine, resolution):
    out = resample_volume(np.full(shape, 7.0, np.float32), affine, resolution)
    np.testing.assert_allclose(out, 7.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("case", "shape", "affine"),
    [
        ("2 mm MNI", MNI_2MM_SHAPE, MNI_2MM_AFFINE),
        (
            "2 mm MNI stored LAS",
            MNI_2MM_SHAPE,
            np.array([[-2.0, 0, 0, 90.0], [0, 2.0, 0, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]]),
        ),
        ("3 mm rotated 10 deg", (80, 95, 80), _rotated_grid(3.0, (80, 95, 80), 10.0)),
    ],
)
@pytest.mark.parametrize("resolution", [4, 6])
def test_resample_volume_keeps_a_world_linear_ramp(case, shape, affine, resolution):
    # Prepare: f(x, y, z) = 0.5 x - 0.3 y + 0.2 z + 7, sampled on the input grid
    coef = np.array([0.5, -0.3, 0.2])
    data = (coef @ _world(shape, affine) + 7.0).reshape(shape).astype(np.float32)
    out_shape, out_affine = grid_for_resolution(resolution)
    expected = (coef @ _world(out_shape, out_affine) + 7.0).reshape(out_shape)
    # Execute
    out = resample_volume(data, affine, resolution)
    # Assert: exact (float32) away from the edges, where the smoothing pads with edge values
    np.testing.assert_allclose(out[2:-2, 2:-2, 2:-2], expected[2:-2, 2:-2, 2:-2], rtol=0, atol=2e-3)


@pytest.mark.parametrize("resolution", [4, 6])
def test_resample_volume_matches_smoothing_then_nilearn(rng, resolution):
    """Independent check: Gaussian with the hand-computed sigma, then nilearn's resample_img."""
    # Prepare
    shape = (40, 50, 40)
    affine = _rotated_grid(3.0, shape, 10.0)
    data = ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)
    sigma_voxels = np.sqrt(resolution**2 - 3.0**2) / 2.3548 / 3.0  # FWHM^2 = r_out^2 - r_in^2
    smoothed = ndimage.gaussian_filter(data, sigma_voxels, mode="nearest")
    out_shape, out_affine = grid_for_resolution(resolution)
    expected = resample_img(
        nib.Nifti1Image(smoothed, affine), target_affine=out_affine, target_shape=out_shape, interpolation="linear"
    ).get_fdata()
    # Execute
    out = resample_volume(data, affine, resolution)
    # Assert (nilearn also sets voxels outside the input's field of view to 0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    assert (expected == 0).any() and (expected != 0).any()


@pytest.mark.parametrize(("resolution", "max_std"), [(4, 0.3), (6, 0.15)])
def test_resample_volume_antialiases_white_noise(rng, resolution, max_std):
    """Striding would keep the noise's std of 1; the anti-aliasing filter averages it down."""
    noise = rng.normal(size=MNI_2MM_SHAPE).astype(np.float32)
    out = resample_volume(noise, MNI_2MM_AFFINE, resolution)
    assert out.std() < max_std
    assert abs(out.mean()) < 0.01


@pytest.mark.parametrize("resolution", [4, 6])
def test_resample_volume_preserves_the_mean(rng, resolution):
    smooth = 100.0 + 20.0 * ndimage.gaussian_filter(rng.normal(size=MNI_2MM_SHAPE), 4.0) / 0.05
    out = resample_volume(smooth.astype(np.float32), MNI_2MM_AFFINE, resolution)
    assert out.mean() == pytest.approx(smooth.mean(), rel=2e-3)


def test_resample_volume_of_a_flipped_copy_is_the_same():
    shape = (91, 109, 91)
    ramp = (np.arange(91)[:, None, None] ** 2 + np.arange(109)[None, :, None] + np.zeros(shape)).astype(np.float32)
    las = MNI_2MM_AFFINE.copy()
    las[0, 0], las[0, 3] = -2.0, 90.0
    np.testing.assert_allclose(
        resample_volume(ramp[::-1], las, 4), resample_volume(ramp, MNI_2MM_AFFINE, 4), rtol=1e-6, atol=1e-3
    )


@pytest.mark.parametrize(
    ("data", "affine", "resolution", "order", "fragment"),
    [
        (np.ones((4, 4)), np.eye(4), 4, 1, "3D"),
        (np.ones((4, 4, 4)), np.diag([2.0, 0.0, 2.0, 1.0]), 4, 1, "singular"),
        (np.ones((4, 4, 4)), np.eye(4), 4, 7, "order"),
        (np.ones((4, 4, 4)), np.eye(4), 1, 1, "resolution_mm"),
    ],
)
def test_resample_volume_rejects_bad_input(data, affine, resolution, order, fragment):
    with pytest.raises(ValueError, match=fragment):
        resample_volume(data, affine, resolution, order=order)


# --------------------------------------------------------------------------------------------
# zscore
# --------------------------------------------------------------------------------------------
def test_zscore_by_hand():
    # Prepare: mean 5, population std 2
    volume = np.array([2, 4, 4, 4, 5, 5, 7, 9], dtype=np.int16).reshape(2, 2, 2)
    expected = np.array([-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]).reshape(2, 2, 2)
    # Execute
    out = zscore(volume)
    # Assert
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_zscore_inside_a_mask_by_hand():
    # Prepare: inside values 1, 3 (mean 2, std 1); outside values must become 0
    volume = np.array([[[1.0, 3.0], [100.0, -50.0]]])
    mask = np.array([[[True, True], [False, False]]])
    # Execute
    out = zscore(volume, mask=mask)
    # Assert
    np.testing.assert_allclose(out, [[[-1.0, 1.0], [0.0, 0.0]]], atol=1e-6)


@pytest.mark.parametrize(
    ("volume", "mask", "error", "fragment"),
    [
        (np.full((3, 3, 3), 4.0), None, DataError, "sub-0042.nii.gz: volume is constant"),
        (np.arange(27.0).reshape(3, 3, 3), np.zeros((3, 3, 3), bool), DataError, "brain mask is empty"),
        (
            np.r_[np.ones(13), np.arange(14.0)].reshape(3, 3, 3),
            np.arange(27).reshape(3, 3, 3) < 13,
            DataError,
            "constant inside the brain mask",
        ),
        (np.arange(27.0).reshape(3, 3, 3), np.ones((3, 3), bool), ValueError, "mask shape"),
    ],
)
def test_zscore_rejects(volume, mask, error, fragment):
    with pytest.raises(error, match=fragment):
        zscore(volume, mask=mask, name="sub-0042.nii.gz")


# --------------------------------------------------------------------------------------------
# BrainAgeDataset
# --------------------------------------------------------------------------------------------
@pytest.fixture
def manifest(make_bids_dataset):
    return build_manifest(make_bids_dataset((45.0, 55.5, 70.0, 81.0), sites=("s1", "s2", "s1", "s2")))


@pytest.fixture
def count_loads(monkeypatch):
    """Count calls of load_volume made by the datasets module."""
    calls: list[str] = []

    def counting(path, **kwargs):
        calls.append(str(path))
        return load_volume(path, **kwargs)

    monkeypatch.setattr(datasets, "load_volume", counting)
    return calls


@pytest.mark.parametrize(("resolution", "shape"), [(4, (45, 54, 45)), (6, (30, 36, 30))])
def test_dataset_items_shapes_dtypes_and_ages(manifest, resolution, shape):
    # Execute
    dataset = BrainAgeDataset(manifest, resolution_mm=resolution)
    volume, age = dataset[1]
    # Assert
    assert len(dataset) == 4 and dataset.shape == shape
    assert volume.shape == (1, *shape) and volume.dtype == torch.float32
    assert age.shape == () and age.dtype == torch.float32 and float(age) == 55.5
    assert dataset.participant_ids == ["sub-0001", "sub-0002", "sub-0003", "sub-0004"]
    np.testing.assert_array_equal(dataset.ages, np.array([45.0, 55.5, 70.0, 81.0], np.float32))
    assert float(volume.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(volume.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_dataset_item_equals_the_pipeline_by_hand(manifest):
    data, affine = load_volume(manifest["path"][2])
    resampled = resample_volume(data, affine, 6)
    expected = (resampled - resampled.astype(np.float64).mean()) / resampled.astype(np.float64).std()
    volume, _ = BrainAgeDataset(manifest, resolution_mm=6)[2]
    np.testing.assert_allclose(volume[0].numpy(), expected, atol=1e-5)


def test_dataset_zscore_brain_uses_nonzero_voxels(manifest):
    dataset = BrainAgeDataset(manifest, resolution_mm=6, normalization="zscore_brain")
    volume = dataset[0][0][0].numpy()
    brain = volume != 0
    assert 0.1 < brain.mean() < 0.9  # the ellipsoid, not the background
    assert volume[brain].mean() == pytest.approx(0.0, abs=1e-4)
    assert volume[brain].std() == pytest.approx(1.0, abs=1e-3)


def test_dataset_zscore_brain_with_a_given_mask(manifest):
    shape, _ = grid_for_resolution(6)
    mask = np.zeros(shape, bool)
    mask[10:20, 10:25, 10:20] = True
    volume = BrainAgeDataset(manifest, resolution_mm=6, normalization="zscore_brain", mask=mask)[3][0][0].numpy()
    assert np.all(volume[~mask] == 0)
    assert volume[mask].mean() == pytest.approx(0.0, abs=1e-4)
    assert volume[mask].std() == pytest.approx(1.0, abs=1e-3)


def test_dataset_loads_each_file_once(manifest, count_loads):
    dataset = BrainAgeDataset(manifest, resolution_mm=6)
    first = [dataset[i][0] for i in range(len(dataset))]
    first[0].add_(1.0)  # modifying a returned tensor must not touch the cache
    second = [dataset[i][0] for i in (0, 1, 2, 3, -1)]
    assert sorted(count_loads) == sorted(manifest["path"])
    np.testing.assert_array_equal((second[0] + 1.0).numpy(), first[0].numpy())
    np.testing.assert_array_equal(second[4].numpy(), second[3].numpy())


def test_dataset_disk_cache_round_trip(manifest, tmp_path, count_loads):
    # Prepare / Execute: the first dataset builds the cache, the second only reads it
    cache = tmp_path / "cache"
    built = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False)
    loads_to_build = len(count_loads)
    reused = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False)
    # Assert
    assert loads_to_build == 4 and len(count_loads) == 4
    assert reused.cache_path == built.cache_path and built.cache_path.exists()
    assert os.listdir(cache) == [built.cache_path.name]  # no temporary file left behind
    assert np.load(built.cache_path).shape == (4, 30, 36, 30)
    in_memory = BrainAgeDataset(manifest, resolution_mm=6)
    for i in range(4):
        np.testing.assert_array_equal(reused[i][0].numpy(), in_memory[i][0].numpy())
        np.testing.assert_array_equal(reused[i][1].numpy(), in_memory[i][1].numpy())


def test_dataset_disk_cache_key_changes_with_options_and_files(manifest, tmp_path):
    cache = tmp_path / "cache"
    base = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False).cache_path
    other_norm = BrainAgeDataset(
        manifest, resolution_mm=6, normalization="zscore_brain", cache_dir=cache, progress=False
    ).cache_path
    path = manifest["path"][0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False).cache_path
    assert len({base, other_norm, touched}) == 3


def test_dataset_disk_cache_rebuilds_a_damaged_file(manifest, tmp_path):
    cache = tmp_path / "cache"
    path = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False).cache_path
    path.write_bytes(b"not a npy file")
    rebuilt = BrainAgeDataset(manifest, resolution_mm=6, cache_dir=cache, progress=False)
    assert rebuilt[0][0].shape == (1, 30, 36, 30)


def test_dataset_works_with_a_dataloader(manifest):
    loader = torch.utils.data.DataLoader(BrainAgeDataset(manifest, resolution_mm=6), batch_size=3)
    volumes, ages = next(iter(loader))
    assert volumes.shape == (3, 1, 30, 36, 30) and ages.tolist() == [45.0, 55.5, 70.0]


def test_dataset_index_out_of_range(manifest):
    with pytest.raises(IndexError, match="out of range"):
        BrainAgeDataset(manifest, resolution_mm=6)[4]


@pytest.mark.parametrize(
    ("change", "options", "fragment"),
    [
        (None, {"resolution_mm": 3}, "resolution_mm"),
        (None, {"normalization": "minmax"}, "normalization"),
        (None, {"mask": np.ones((30, 36, 30), bool)}, "only used with"),
        (None, {"normalization": "zscore_brain", "mask": np.ones((3, 3, 3), bool)}, "mask shape"),
        ("drop_path", {}, "lacks column"),
        ("bad_age", {}, "non-numeric ages"),
        ("empty", {}, "empty"),
    ],
)
def test_dataset_rejects_bad_options(manifest, change, options, fragment):
    table = manifest.copy()
    options = dict(options)
    if change == "drop_path":
        table = table.drop(columns="path")
    elif change == "bad_age":
        table["age"] = ["x", 1, 2, 3]
    elif change == "empty":
        table = table.iloc[:0]
    with pytest.raises(ValueError, match=fragment):
        BrainAgeDataset(table, resolution_mm=options.pop("resolution_mm", 6), **options)


# --------------------------------------------------------------------------------------------
# split_train_test
# --------------------------------------------------------------------------------------------
@pytest.fixture
def cohort(rng):
    n = 100
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:04d}" for i in range(n)],
            "age": rng.uniform(45.0, 82.0, n).round(1),
            "site": rng.choice(["site1", "site2"], n, p=[0.7, 0.3]),
        },
        index=np.arange(1000, 1000 + n),
    )


def test_split_train_test_sizes_disjoint_covering(cohort):
    before = cohort.copy()
    train, test = split_train_test(cohort, test_fraction=0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert set(train.index).isdisjoint(test.index)
    assert set(train.index) | set(test.index) == set(cohort.index)
    assert list(train.index) == sorted(train.index)  # original order kept
    pd.testing.assert_frame_equal(cohort, before)  # pure function


def test_split_train_test_is_deterministic_per_seed(cohort):
    a = split_train_test(cohort, seed=1)[1].index
    b = split_train_test(cohort, seed=1)[1].index
    c = split_train_test(cohort, seed=2)[1].index
    assert list(a) == list(b) and set(a) != set(c)


def test_split_train_test_is_stratified_by_age(cohort):
    # Without sites: 5 equal-count age bins of 20 each hold exactly 4 test participants
    table = cohort.drop(columns="site")
    _, test = split_train_test(table, test_fraction=0.2, seed=0)
    ranks = table["age"].rank(method="first").astype(int) - 1
    bins = ranks * 5 // 100
    assert bins.loc[test.index].value_counts().sort_index().tolist() == [4, 4, 4, 4, 4]


def test_split_train_test_is_stratified_by_site(cohort):
    _, test = split_train_test(cohort, test_fraction=0.2, seed=0)
    for site, count in cohort["site"].value_counts().items():
        assert abs((test["site"] == site).sum() - 0.2 * count) <= 1.5


@pytest.mark.parametrize(
    ("table", "options", "fragment"),
    [
        (pd.DataFrame({"age": [50.0]}), {}, "at least 2"),
        (pd.DataFrame({"age": [50.0, 60.0]}), {"test_fraction": 1.0}, "test_fraction"),
        (pd.DataFrame({"age": [50.0, None]}), {}, "ages"),
        (pd.DataFrame({"years": [50.0, 60.0]}), {}, "'age'"),
    ],
)
def test_split_train_test_rejects_bad_input(table, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        split_train_test(table, seed=0, **options)

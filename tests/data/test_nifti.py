"""Tests of fedsparse_lib.data.nifti: validated loading of images, participants and datasets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.data.nifti import (
    DataError,
    check_dataset,
    image_path,
    load_img,
    load_participants,
    load_volume,
)

AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def _write_with_sform(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write an image whose header holds ``affine`` as is (nibabel refuses singular affines)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


def _truncate(path: Path, keep_fraction: float | None = None, keep_bytes: int | None = None) -> Path:
    content = path.read_bytes()
    keep = keep_bytes if keep_bytes is not None else int(len(content) * keep_fraction)
    path.write_bytes(content[:keep])
    return path


# --------------------------------------------------------------------------------------------
# image_path
# --------------------------------------------------------------------------------------------
def test_image_path_follows_the_bids_layout(tmp_path):
    # Execute
    path = image_path(tmp_path, "sub-0007")
    # Assert
    assert path == tmp_path / "sub-0007" / "anat" / "sub-0007_T1w.nii.gz"


@pytest.mark.parametrize("bad_id", ["0007", "sub-", "sub-00/7", "../sub-1", "sub-0_1", "", None])
def test_image_path_rejects_non_bids_ids(tmp_path, bad_id):
    with pytest.raises(ValueError, match="sub-"):
        image_path(tmp_path, bad_id)


# --------------------------------------------------------------------------------------------
# load_img / load_volume: valid input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_load_img_returns_data_dtype_and_affine(write_img, rng, dtype):
    # Prepare
    data = (rng.random((5, 6, 7)) * 100).astype(dtype)
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    path = write_img(data, affine)
    # Execute
    img = load_img(path)
    # Assert
    assert isinstance(img, nib.Nifti1Image)
    assert img.shape == (5, 6, 7)
    assert np.asarray(img.dataobj).dtype == dtype
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)


def test_load_img_squeezes_a_singleton_fourth_dimension(write_img, rng):
    data = rng.random((4, 5, 6, 1)).astype(np.float32)
    img = load_img(write_img(data, AFFINE_2MM))
    assert img.shape == (4, 5, 6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data[..., 0])


def test_load_img_converts_nifti2_to_nifti1(tmp_path, rng):
    data = rng.random((4, 5, 6)).astype(np.float32)
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(data, AFFINE_2MM), path)
    img = load_img(path)
    assert type(img) is nib.Nifti1Image
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_load_volume_applies_scaling_and_dtype(tmp_path):
    # Prepare: int16 stored values 0..59 with slope 0.5 and intercept 10
    stored = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(stored, AFFINE_2MM)
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    # Execute
    data, affine = load_volume(path)
    data64, _ = load_volume(path, dtype=np.float64)
    # Assert
    assert data.dtype == np.float32 and data64.dtype == np.float64
    np.testing.assert_allclose(data, stored * 0.5 + 10.0)
    np.testing.assert_allclose(affine, AFFINE_2MM)


# --------------------------------------------------------------------------------------------
# load_img: every kind of bad image
# --------------------------------------------------------------------------------------------
def _missing(tmp_path, rng):
    return tmp_path / "nothere.nii.gz"


def _truncated_data(tmp_path, rng):
    data = rng.integers(-1000, 1000, size=(32, 32, 32)).astype(np.int16)  # barely compressible
    path = tmp_path / "cut.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE_2MM), path)
    return _truncate(path, keep_fraction=0.5)


def _truncated_header(tmp_path, rng):
    path = tmp_path / "cut_header.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), AFFINE_2MM), path)
    return _truncate(path, keep_bytes=40)


def _garbage(tmp_path, rng):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(rng.integers(0, 256, size=2000).astype(np.uint8).tobytes())
    return path


def _not_gzip(tmp_path, rng):
    path = tmp_path / "plain_text.nii.gz"
    path.write_text("this is not an image\n" * 30)
    return path


def _real_4d(tmp_path, rng):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 3), np.float32), AFFINE_2MM), path)
    return path


def _two_d(tmp_path, rng):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5), np.float32), AFFINE_2MM), path)
    return path


def _with_nan(tmp_path, rng):
    data = np.ones((4, 5, 6), np.float32)
    data[0, 0, :3] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE_2MM), path)
    return path


def _with_inf(tmp_path, rng):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    path = tmp_path / "inf.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE_2MM), path)
    return path


def _singular_affine(tmp_path, rng):
    return _write_with_sform(tmp_path / "singular.nii.gz", np.ones((4, 5, 6), np.int16), np.diag([2.0, 2.0, 0.0, 1.0]))


def _nan_affine(tmp_path, rng):
    affine = AFFINE_2MM.copy()
    affine[0, 3] = np.nan
    return _write_with_sform(tmp_path / "nan_affine.nii.gz", np.ones((4, 5, 6), np.int16), affine)


def _huge_voxels(tmp_path, rng):
    return _write_with_sform(tmp_path / "huge.nii.gz", np.ones((4, 5, 6), np.int16), np.diag([50.0, 2.0, 2.0, 1.0]))


def _tiny_voxels(tmp_path, rng):
    return _write_with_sform(tmp_path / "tiny.nii.gz", np.ones((4, 5, 6), np.int16), np.diag([1.0, 0.01, 1.0, 1.0]))


BAD_IMAGES = [
    # (case, writer, expected fragment of the message)
    ("missing", _missing, "file not found"),
    ("truncated data", _truncated_data, "cannot read"),
    ("truncated header", _truncated_header, "cannot read"),
    ("random bytes", _garbage, "cannot read"),
    ("text file", _not_gzip, "cannot read"),
    ("real 4D", _real_4d, r"expected a 3D image, got shape \(4, 5, 6, 3\)"),
    ("2D", _two_d, r"expected a 3D image, got shape \(4, 5\)"),
    ("NaN voxels", _with_nan, "3 NaN and 0 infinite voxels"),
    ("Inf voxels", _with_inf, "0 NaN and 2 infinite voxels"),
    ("singular affine", _singular_affine, "affine is singular"),
    ("NaN in affine", _nan_affine, "not a finite"),
    ("50 mm voxels", _huge_voxels, r"implausible voxel sizes \[50\.0, 2\.0, 2\.0\]"),
    ("0.01 mm voxels", _tiny_voxels, r"implausible voxel sizes \[1\.0, 0\.01, 1\.0\]"),
]


@pytest.mark.parametrize(("case", "writer", "fragment"), BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_load_img_rejects_bad_images_naming_file_and_problem(tmp_path, rng, case, writer, fragment):
    # Prepare
    path = writer(tmp_path, rng)
    # Execute / Assert
    with pytest.raises(DataError, match=fragment) as info:
        load_img(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_readable_as_header_only(tmp_path, rng):
    """The truncated case really has an intact header: only reading the data can detect it."""
    path = _truncated_data(tmp_path, rng)
    assert nib.load(path).shape == (32, 32, 32)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------
# load_participants
# --------------------------------------------------------------------------------------------
def _write_tsv(path: Path, text: str) -> Path:
    path.write_text(text.replace("|", "\t"))
    return path


def test_load_participants_reads_types(tmp_path):
    # Prepare: site "01" must stay a string, an extra column is kept
    path = _write_tsv(
        tmp_path / "participants.tsv",
        "participant_id|age|sex|site|handedness\nsub-01|45.5|F|01|R\nsub-02|81|M|02|L\nsub-03|60|n/a|01|R\n",
    )
    # Execute
    table = load_participants(path)
    # Assert
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert table["age"].dtype == np.float64
    assert table["age"].tolist() == [45.5, 81.0, 60.0]
    assert table["site"].tolist() == ["01", "02", "01"]
    assert table["sex"].tolist() == ["F", "M", "n/a"]
    assert table["handedness"].tolist() == ["R", "L", "R"]


def test_load_participants_needs_only_id_and_age(tmp_path):
    path = _write_tsv(tmp_path / "participants.tsv", "participant_id|age\nsub-01|45\n")
    table = load_participants(path)
    assert list(table.columns) == ["participant_id", "age"]


BAD_TABLES = [
    # (case, file content or None for no file, fragments expected in the message)
    ("missing file", None, ["participants.tsv not found"]),
    ("no age column", "participant_id|sex\nsub-01|F\n", ["required column(s) ['age']"]),
    ("no id column", "subject|age\nsub-01|40\n", ["required column(s) ['participant_id']"]),
    ("empty table", "participant_id|age\n", ["no participants"]),
    ("empty file", "", ["cannot read"]),
    (
        "missing ages",
        "participant_id|age\nsub-01|n/a\nsub-02|\nsub-03|50\n",
        ["sub-01: line 2: missing age", "sub-02: line 3: missing age"],
    ),
    ("non-numeric age", "participant_id|age\nsub-01|fifty\nsub-02|50\n", ["sub-01: line 2: non-numeric age 'fifty'"]),
    ("infinite age", "participant_id|age\nsub-01|inf\n", ["sub-01: line 2: non-finite age 'inf'"]),
    (
        "implausible ages",
        "participant_id|age\nsub-01|150\nsub-02|-3\nsub-03|0\n",
        ["sub-01: line 2: implausible age 150", "sub-02: line 3: implausible age -3"],
    ),
    (
        "duplicate ids",
        "participant_id|age\nsub-01|40\nsub-02|50\nsub-01|60\n",
        ["sub-01: duplicate participant_id on lines [2, 4]"],
    ),
    ("missing id", "participant_id|age\n|40\nsub-02|50\n", ["line 2: missing participant_id"]),
    ("bad id", "participant_id|age\n0001|40\n", ["participant_id '0001' is not 'sub-'"]),
]


@pytest.mark.parametrize(("case", "content", "fragments"), BAD_TABLES, ids=[c[0] for c in BAD_TABLES])
def test_load_participants_rejects_bad_tables(tmp_path, case, content, fragments):
    # Prepare
    path = tmp_path / "participants.tsv"
    if content is not None:
        _write_tsv(path, content)
    # Execute
    with pytest.raises(DataError) as info:
        load_participants(path)
    # Assert
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_load_participants_lists_every_bad_row_at_once(tmp_path):
    path = _write_tsv(
        tmp_path / "participants.tsv", "participant_id|age\nsub-01|x\nsub-02|50\nsub-03|n/a\nsub-04|200\n"
    )
    with pytest.raises(DataError, match="3 problem") as info:
        load_participants(path)
    assert all(pid in str(info.value) for pid in ("sub-01", "sub-03", "sub-04"))
    assert "sub-02" not in str(info.value)


# --------------------------------------------------------------------------------------------
# check_dataset
# --------------------------------------------------------------------------------------------
def test_check_dataset_of_a_valid_dataset_is_empty(make_bids_dataset):
    root = make_bids_dataset((45.0, 60.0, 81.0))
    report = check_dataset(root)
    assert list(report.columns) == ["path", "participant_id", "problem"]
    assert report.empty


def test_check_dataset_reports_every_problem_at_once(make_bids_dataset, rng):
    # Prepare: a valid dataset of 8, then break it in every way at once
    root = make_bids_dataset((50, 51, 52, 53, 54, 55, 56, 57))
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    table.loc[6, "age"] = "n/a"  # sub-0007: missing age
    table.loc[7, "age"] = "old"  # sub-0008: non-numeric age
    table = pd.concat([table, table.iloc[[0]]])  # sub-0001 twice
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    image_path(root, "sub-0002").unlink()  # participant without image
    _truncate(image_path(root, "sub-0003"), keep_fraction=0.5)  # truncated image
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), AFFINE_2MM), image_path(root, "sub-0004"))  # 4D
    nan_data = np.ones((4, 4, 4), np.float32)
    nan_data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan_data, AFFINE_2MM), image_path(root, "sub-0005"))  # NaN voxel
    _write_with_sform(image_path(root, "sub-0006"), np.ones((4, 4, 4), np.int16), np.diag([2.0, 0.0, 2.0, 1.0]))
    unmatched = image_path(root, "sub-0099")  # image without participant
    unmatched.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), AFFINE_2MM), unmatched)
    misnamed = root / "sub-0001" / "anat" / "sub-0001_run-2_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), AFFINE_2MM), misnamed)
    # Execute
    report = check_dataset(root)
    # Assert: exactly one row per problem, each naming its participant and file
    found = sorted(zip(report["participant_id"], report["problem"], strict=True))
    expected = [
        ("sub-0001", "duplicate participant_id on lines [2, 10]"),
        ("sub-0001", "unexpected image name (expected sub-0001_T1w.nii.gz)"),
        ("sub-0002", "participant has no image (file not found)"),
        ("sub-0003", "cannot read"),
        ("sub-0004", "expected a 3D image, got shape (4, 4, 4, 2)"),
        ("sub-0005", "1 NaN and 0 infinite voxels"),
        ("sub-0006", "affine is singular"),
        ("sub-0007", "line 8: missing age"),
        ("sub-0008", "line 9: non-numeric age 'old'"),
        ("sub-0099", "image has no row in participants.tsv (unmatched)"),
    ]
    assert len(found) == len(expected)
    for (pid, problem), (want_pid, want_fragment) in zip(found, expected, strict=True):
        assert pid == want_pid
        assert want_fragment in problem
    paths = dict(zip(report["problem"], report["path"], strict=True))
    assert paths[next(p for p in paths if "unmatched" in p)] == str(unmatched)
    assert paths[next(p for p in paths if "no image" in p)] == str(image_path(root, "sub-0002"))
    assert paths[next(p for p in paths if "duplicate" in p)] == str(root / "participants.tsv")


def test_check_dataset_without_participants_file_still_checks_images(make_bids_dataset):
    root = make_bids_dataset((50, 60))
    (root / "participants.tsv").unlink()
    _truncate(image_path(root, "sub-0002"), keep_fraction=0.3)
    report = check_dataset(root)
    assert report["problem"].tolist()[0] == "participants.tsv not found"
    assert len(report) == 2 and report["participant_id"].tolist()[1] == "sub-0002"


def test_check_dataset_without_image_checks_skips_loading(make_bids_dataset):
    root = make_bids_dataset((50, 60))
    _truncate(image_path(root, "sub-0002"), keep_fraction=0.3)
    assert check_dataset(root, check_images=False).empty
    assert len(check_dataset(root)) == 1


@pytest.mark.parametrize(
    ("content", "fragment"), [("{not json", "invalid dataset_description.json"), ("[1, 2]", "not a JSON object")]
)
def test_check_dataset_reports_a_bad_description(make_bids_dataset, content, fragment):
    root = make_bids_dataset((50,))
    (root / "dataset_description.json").write_text(content)
    report = check_dataset(root)
    assert len(report) == 1 and fragment in report["problem"].iloc[0]


def test_check_dataset_accepts_a_missing_description(make_bids_dataset):
    root = make_bids_dataset((50,))
    (root / "dataset_description.json").unlink()
    assert check_dataset(root).empty


def test_check_dataset_of_a_missing_folder(tmp_path):
    report = check_dataset(tmp_path / "nope")
    assert report.to_dict("records") == [
        {"path": str(tmp_path / "nope"), "participant_id": "", "problem": "dataset folder not found"}
    ]


def test_check_dataset_description_is_json_written_by_builder(make_bids_dataset):
    """The fixture writes what the layout asks for (guards the fixture itself)."""
    root = make_bids_dataset((50,))
    assert json.loads((root / "dataset_description.json").read_text())["Name"] == "tiny"
    assert image_path(root, "sub-0001").exists()

"""Tests of fedsparse_lib.data.convert: IXI, OASIS-1 and BIDS sources to the BIDS-like layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.data import convert as convert_module
from fedsparse_lib.data.convert import (
    EXCLUDED_FILE,
    convert_bids,
    convert_ixi,
    convert_oasis1,
    parse_ixi_filename,
    read_ixi_demographics,
    read_oasis1_clinical,
)
from fedsparse_lib.data.nifti import DataError, check_dataset, load_participants

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _volume(seed: int, shape: tuple[int, ...] = (8, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)


def _save_nifti(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_volume(seed), AFFINE), path)
    return path


def _read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------------------------
# IXI
# --------------------------------------------------------------------------------------------
IXI_DEMOGRAPHICS = (
    "IXI_ID,\"SEX_ID (1=m, 2=f)\",HEIGHT,AGE\n"
    "2,2,164,35.8\n"
    "12,1,175,38.78\n"
    "13,1,180,\n"          # missing age: excluded
    "14,2,160,\n"          # duplicate of 14: the row without age is ignored
    "14,2,160,46.71\n"
    "15,1,170,60.5\n"      # conflicting duplicate: excluded
    "15,1,170,61.5\n"
    "99,2,150,70.0\n"      # no image: not a participant
)


def _ixi_source(root: Path) -> tuple[Path, Path]:
    images = root / "IXI-T1"
    for i, name in enumerate(["IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz", "IXI013-HH-1212-T1.nii.gz",
                              "IXI014-HH-1236-T1.nii.gz", "IXI015-HH-1258-T1.nii.gz", "IXI016-IOP-0889-T1.nii.gz"]):
        _save_nifti(images / name, seed=i)
    csv = root / "IXI.csv"
    csv.write_text(IXI_DEMOGRAPHICS)
    return images, csv


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IXI002-Guys-0828-T1.nii.gz", (2, "IXI002", "Guys")),
        ("IXI012-HH-1211-T1.nii.gz", (12, "IXI012", "HH")),
        ("IXI646-IOP-1208-T1.nii", (646, "IXI646", "IOP")),
    ],
)
def test_parse_ixi_filename(name: str, expected: tuple[int, str, str]) -> None:
    assert parse_ixi_filename(name) == expected


@pytest.mark.parametrize("name", ["IXI002-Guys-0828-T2.nii.gz", "sub-01_T1w.nii.gz", "IXI-Guys-0828-T1.nii.gz"])
def test_parse_ixi_filename_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError, match="not an IXI T1 file name"):
        parse_ixi_filename(name)


def test_read_ixi_demographics_merges_duplicates_and_flags_problems(tmp_path: Path) -> None:
    csv = tmp_path / "IXI.csv"
    csv.write_text(IXI_DEMOGRAPHICS)

    table = read_ixi_demographics(csv).set_index("ixi_id")

    assert list(table.index) == [2, 12, 13, 14, 15, 99]
    assert table.loc[2, "age"] == pytest.approx(35.8) and table.loc[2, "sex"] == "F"
    assert table.loc[12, "sex"] == "M" and table.loc[12, "problem"] == ""
    assert table.loc[13, "problem"] == "missing age" and np.isnan(table.loc[13, "age"])
    assert table.loc[14, "age"] == pytest.approx(46.71) and table.loc[14, "problem"] == ""
    assert "conflicting ages" in table.loc[15, "problem"]


def test_read_ixi_demographics_accepts_float_codes_of_a_spreadsheet_export(tmp_path: Path) -> None:
    csv = tmp_path / "IXI.csv"
    csv.write_text("IXI_ID,SEX_ID (1=m; 2=f),AGE\n2.0,2.0,35.8\n12.0,1.0,38.78\n17,3,40\n")

    table = read_ixi_demographics(csv)

    assert table[["ixi_id", "sex"]].values.tolist() == [[2, "F"], [12, "M"], [17, "n/a"]]


def test_read_ixi_xls_without_xlrd_says_how_to_export_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xls = tmp_path / "IXI.xls"
    xls.write_bytes(b"\xd0\xcf\x11\xe0 not really a spreadsheet")
    monkeypatch.setattr(convert_module.importlib.util, "find_spec", lambda name, *a: None)

    with pytest.raises(DataError, match=r"IXI\.xls.*'xlrd'.*export it as CSV"):
        read_ixi_demographics(xls)


def test_convert_ixi_writes_hand_checked_participants_and_reports_exclusions(tmp_path: Path) -> None:
    images, csv = _ixi_source(tmp_path / "src")
    out = tmp_path / "ixi"

    result = convert_ixi(images, csv, out, progress=False)

    table = _read_tsv(out / "participants.tsv")
    assert table.to_dict("list") == {
        "participant_id": ["sub-IXI002", "sub-IXI012", "sub-IXI014"],
        "age": ["35.8", "38.78", "46.71"],
        "sex": ["F", "M", "F"],
        "site": ["Guys", "HH", "HH"],
    }
    excluded = _read_tsv(out / EXCLUDED_FILE).set_index("participant_id")
    assert sorted(excluded.index) == ["sub-IXI013", "sub-IXI015", "sub-IXI016"]
    assert excluded.loc["sub-IXI013", "reason"] == "missing age"
    assert "conflicting ages" in excluded.loc["sub-IXI015", "reason"]
    assert "no row with IXI_ID 16" in excluded.loc["sub-IXI016", "reason"]
    assert len(result.excluded) == 3 and list(result.participants["participant_id"]) == list(table["participant_id"])
    assert check_dataset(out).empty
    converted = nib.load(out / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(converted.dataobj), _volume(1))
    assert not list(out.glob(".convert-*"))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["License"] == "CC BY-SA 3.0"


def test_convert_ixi_excludes_an_unreadable_image(tmp_path: Path) -> None:
    images, csv = _ixi_source(tmp_path / "src")
    broken = images / "IXI012-HH-1211-T1.nii.gz"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated

    result = convert_ixi(images, csv, tmp_path / "ixi", progress=False)

    assert list(result.participants["participant_id"]) == ["sub-IXI002", "sub-IXI014"]
    reason = result.excluded.set_index("participant_id").loc["sub-IXI012", "reason"]
    assert reason.startswith("unreadable image")
    assert not (tmp_path / "ixi" / "sub-IXI012").exists()
    assert check_dataset(tmp_path / "ixi").empty


def test_conversion_failing_midway_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, csv = _ixi_source(tmp_path / "src")
    out = tmp_path / "ixi"
    calls = []
    real = convert_module._link_or_copy

    def failing(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(src, dst)

    monkeypatch.setattr(convert_module, "_link_or_copy", failing)

    with pytest.raises(OSError, match="simulated"):
        convert_ixi(images, csv, out, progress=False)

    assert sorted(p.name for p in out.iterdir()) == []  # no table, no subject, no staging folder


def test_convert_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    images, csv = _ixi_source(tmp_path / "src")
    out = tmp_path / "ixi"
    convert_ixi(images, csv, out, progress=False)
    (images / "IXI002-Guys-0828-T1.nii.gz").unlink()

    with pytest.raises(FileExistsError, match="overwrite"):
        convert_ixi(images, csv, out, progress=False)
    result = convert_ixi(images, csv, out, progress=False, overwrite=True)

    assert list(result.participants["participant_id"]) == ["sub-IXI012", "sub-IXI014"]
    assert not (out / "sub-IXI002").exists()  # the old subject is gone with the old table
    assert check_dataset(out).empty


# --------------------------------------------------------------------------------------------
# OASIS-1
# --------------------------------------------------------------------------------------------
OASIS_CSV = (
    "ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay\n"
    "OAS1_0001_MR1,F,R,74,2,3,29,0,1344,0.743,1.306,N/A\n"
    "OAS1_0002_MR1,F,R,55,4,1,29,0,1147,0.81,1.531,N/A\n"
    "OAS1_0003_MR1,F,R,,4,3,27,0.5,1454,0.708,1.207,N/A\n"   # missing age: excluded
    "OAS1_0004_MR1,M,R,28,,,,,1588,0.803,1.105,N/A\n"
    "OAS1_0002_MR2,F,R,55,4,1,29,0,1147,0.81,1.531,17\n"     # reliability rescan: not a participant
)


def _analyze_pair(session_dir: Path, session: str, seed: int, kind: str) -> None:
    if kind == "processed":
        folder, stem = session_dir / "PROCESSED" / "MPRAGE" / "T88_111", f"{session}_mpr_n4_anon_111_t88_masked_gfc"
    else:
        folder, stem = session_dir / "RAW", f"{session}_mpr-1_anon"
    folder.mkdir(parents=True, exist_ok=True)
    data = _volume(seed, (8, 8, 8, 1))  # OASIS Analyze images are 4D with one volume
    nib.save(nib.AnalyzeImage(data, np.diag([1.0, 1.0, 1.0, 1.0])), folder / f"{stem}.img")


def _oasis_source(root: Path, kinds: tuple[str, ...] = ("processed", "raw")) -> tuple[list[Path], Path]:
    discs = [root / "disc1", root / "disc2"]
    layout = {"OAS1_0001_MR1": discs[0], "OAS1_0002_MR1": discs[0], "OAS1_0003_MR1": discs[1],
              "OAS1_0004_MR1": discs[1], "OAS1_0002_MR2": discs[1]}
    for seed, (session, disc) in enumerate(layout.items()):
        for kind in kinds:
            _analyze_pair(disc / "disc" / session, session, seed, kind)
    csv = root / "oasis_cross-sectional.csv"
    csv.write_text(OASIS_CSV)
    return discs, csv


def test_read_oasis1_clinical_keeps_first_visits(tmp_path: Path) -> None:
    csv = tmp_path / "oasis.csv"
    csv.write_text(OASIS_CSV)

    table = read_oasis1_clinical(csv)

    assert list(table.index) == ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0003_MR1", "OAS1_0004_MR1"]
    assert table.loc["OAS1_0003_MR1", "age_problem"] == "missing age"
    assert table.loc["OAS1_0001_MR1", "cdr"] == 0 and np.isnan(table.loc["OAS1_0004_MR1", "mmse"])


@pytest.mark.parametrize(("image", "sform_code"), [("processed", 3), ("raw", 1)])
def test_convert_oasis1(tmp_path: Path, image: str, sform_code: int) -> None:
    discs, csv = _oasis_source(tmp_path / "src")
    out = tmp_path / "oasis"

    result = convert_oasis1(discs, csv, out, image=image, progress=False)

    table = _read_tsv(out / "participants.tsv")
    assert table.to_dict("list") == {
        "participant_id": ["sub-OAS10001", "sub-OAS10002", "sub-OAS10004"],
        "age": ["74", "55", "28"],
        "sex": ["F", "F", "M"],
        "site": ["WUSTL", "WUSTL", "WUSTL"],
        "cdr": ["0", "0", "n/a"],
        "mmse": ["29", "29", "n/a"],
    }
    assert result.excluded.to_dict("records") == [
        {"source_id": "OAS1_0003_MR1", "participant_id": "sub-OAS10003", "reason": "missing age"}]
    converted = nib.load(out / "sub-OAS10002" / "anat" / "sub-OAS10002_T1w.nii.gz")
    assert converted.shape == (8, 8, 8)
    np.testing.assert_array_equal(np.asanyarray(converted.dataobj), _volume(1, (8, 8, 8, 1))[..., 0])
    assert int(converted.header["sform_code"]) == sform_code
    assert check_dataset(out).empty
    assert load_participants(out / "participants.tsv")["age"].tolist() == [74.0, 55.0, 28.0]


def test_convert_oasis1_reports_a_session_without_the_image(tmp_path: Path) -> None:
    discs, csv = _oasis_source(tmp_path / "src")
    processed = discs[0] / "disc" / "OAS1_0001_MR1" / "PROCESSED"
    for path in processed.rglob("*.*"):
        path.unlink()

    result = convert_oasis1(discs, csv, tmp_path / "oasis", progress=False)

    assert list(result.participants["participant_id"]) == ["sub-OAS10002", "sub-OAS10004"]
    reasons = dict(zip(result.excluded["participant_id"], result.excluded["reason"], strict=True))
    assert set(reasons) == {"sub-OAS10001", "sub-OAS10003"}
    assert reasons["sub-OAS10001"].startswith("no processed image")


def test_convert_oasis1_without_any_usable_image_fails_clearly(tmp_path: Path) -> None:
    discs, csv = _oasis_source(tmp_path / "src", kinds=("processed",))

    with pytest.raises(DataError, match=r"no subject could be converted.*no raw image"):
        convert_oasis1(discs, csv, tmp_path / "oasis", image="raw", progress=False)
    assert not (tmp_path / "oasis" / "participants.tsv").exists()


# --------------------------------------------------------------------------------------------
# BIDS (ds000030-like)
# --------------------------------------------------------------------------------------------
def _bids_source(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "participants.tsv").write_text(
        "participant_id\tdiagnosis\tage\tgender\tT1w\n"
        "sub-10159\tCONTROL\t30\tF\t1\n"
        "sub-10171\tSCHZ\t24\tM\t1\n"
        "sub-10189\tCONTROL\tn/a\tM\t1\n"     # missing age: excluded
        "sub-10206\tBIPOLAR\t45\tF\t1\n"      # no image: excluded
    )
    (root / "dataset_description.json").write_text(json.dumps({"Name": "LA5c", "License": "CC0"}))
    for seed, pid in enumerate(["sub-10159", "sub-10171", "sub-10189"]):
        _save_nifti(root / pid / "anat" / f"{pid}_T1w.nii.gz", seed)
    return root


def test_convert_bids(tmp_path: Path) -> None:
    source = _bids_source(tmp_path / "src")
    out = tmp_path / "ds"

    result = convert_bids(source, out, site="UCLA", sex_column="gender", keep_columns=("diagnosis",),
                          progress=False)

    table = _read_tsv(out / "participants.tsv")
    assert table.to_dict("list") == {
        "participant_id": ["sub-10159", "sub-10171"],
        "age": ["30", "24"],
        "sex": ["F", "M"],
        "site": ["UCLA", "UCLA"],
        "diagnosis": ["CONTROL", "SCHZ"],
    }
    reasons = dict(zip(result.excluded["participant_id"], result.excluded["reason"], strict=True))
    assert reasons == {"sub-10189": "missing age", "sub-10206": "no T1w image in the source dataset"}
    assert json.loads((out / "dataset_description.json").read_text())["License"] == "CC0"
    assert check_dataset(out).empty

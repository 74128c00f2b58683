"""Tests of fedsparse_lib.data.preprocess: whole subjects and datasets, QC, resume, failures.

One raw synthetic cohort of 3 subjects (known brain masks and raw -> MNI affines) plus three bad
inputs (a truncated file, a 4D image, pure noise whose registration diverges) is preprocessed
once per module with two workers; the tests read that run. Scores are checked against the
issue's targets (mean mask Dice >= 0.95, mean registration error <= 2 mm); output files against
the grid of :mod:`fedsparse_lib.data.grids` and numpy's own mean / std.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.data import pipeline
from fedsparse_lib.data import preprocess as pp
from fedsparse_lib.data.datasets import build_manifest
from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from fedsparse_lib.data.preprocess import (
    QC_COLUMNS,
    STEPS,
    PreprocessError,
    StepError,
    preprocess_dataset,
    preprocess_subject,
)
from fedsparse_lib.data.synthetic import synthesize_cohort

GOOD = ["sub-0001", "sub-0002", "sub-0003"]
BAD = {"sub-0004": ("load", "truncated"), "sub-0005": ("load", "expected a 3D image"),
       "sub-0006": ("register", "diverged")}
TARGET_DICE, TARGET_ERROR_MM = 0.95, 2.0


def t1_path(root: Path, pid: str) -> Path:
    return root / pid / "anat" / f"{pid}_T1w.nii.gz"


def add_bad_subjects(root: Path, template: nib.Nifti1Image) -> None:
    """Write the three bad inputs of BAD under root and list them in participants.tsv."""
    data = np.asarray(template.dataobj)
    for pid in BAD:
        t1_path(root, pid).parent.mkdir(parents=True)
    nib.save(template, t1_path(root, "sub-0004"))
    raw = t1_path(root, "sub-0004").read_bytes()
    t1_path(root, "sub-0004").write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), template.affine), t1_path(root, "sub-0005"))
    noise = np.random.default_rng(11).normal(300.0, 80.0, size=data.shape).clip(0).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, template.affine), t1_path(root, "sub-0006"))
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    extra = pd.DataFrame({"participant_id": list(BAD), "age": ["60.0"] * 3, "sex": ["F"] * 3, "site": ["site1"] * 3})
    pd.concat([table, extra]).to_csv(root / "participants.tsv", sep="\t", index=False)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep") / "raw"
    synthesize_cohort(root, n_subjects=3, seed=0, raw=True, n_jobs=1, progress=False)
    add_bad_subjects(root, nib.load(t1_path(root, "sub-0001")))
    return root


@pytest.fixture(scope="module")
def run(raw_root) -> tuple[Path, pd.DataFrame]:
    """The default pipeline (deepbet, z-score) over the raw cohort, two worker processes."""
    out = raw_root.parent / "out"
    qc = preprocess_dataset(raw_root, out, n_jobs=2, progress=False)
    return out, qc


def row(qc: pd.DataFrame, pid: str) -> pd.Series:
    return qc.set_index("participant_id").loc[pid]


# --------------------------------------------------------------------------------------------
# scores and QC
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_meets_the_scoring_targets_on_raw_synthetic_subjects(run):
    # Execute (fixture)
    _, qc = run
    good = qc[qc["participant_id"].isin(GOOD)]
    # Assert: the targets, means over the subjects
    assert (good["status"] == "ok").all()
    assert good["dice"].mean() >= TARGET_DICE
    assert good["registration_error_mm"].mean() <= TARGET_ERROR_MM


@pytest.mark.slow
def test_qc_table_is_tidy_and_written(run):
    out, qc = run
    assert list(qc.columns) == list(QC_COLUMNS)
    assert list(qc["participant_id"]) == GOOD + list(BAD)
    written = pd.read_csv(out / "derivatives" / "preprocess" / "qc.tsv", sep="\t", keep_default_na=False,
                          na_values=[""])
    assert list(written["participant_id"]) == list(qc["participant_id"])
    np.testing.assert_allclose(written["dice"], qc["dice"].astype(float), rtol=1e-5)
    good = qc[qc["participant_id"].isin(GOOD)]
    for step in STEPS:
        assert (good[f"runtime_{step}_s"] >= 0).all()
    assert (good["runtime_total_s"] >= good[[f"runtime_{s}_s" for s in STEPS]].sum(axis=1) - 1e-6).all()
    assert good["similarity"].between(0.3, 3.0).all() and good["correlation"].between(0.7, 1.0).all()
    assert good["brain_volume_ml"].between(1200, 2600).all()  # the template brain (with CSF) is ~1900 ml
    assert good["skull_strip"].eq("deepbet").all() and not good["cached"].any()


@pytest.mark.slow
@pytest.mark.parametrize("pid", list(BAD))
def test_bad_input_is_recorded_with_step_and_reason(run, pid):
    # Execute (fixture)
    _, qc = run
    # Assert: recorded, while the good subjects finished (previous tests)
    step, reason = BAD[pid]
    record = row(qc, pid)
    assert record["status"] == "failed"
    assert record["step"] == step
    assert reason in record["reason"]
    assert not t1_path(run[0], pid).exists()


@pytest.mark.slow
def test_the_diverged_subject_keeps_the_runtimes_of_the_steps_it_ran(run):
    record = row(run[1], "sub-0006")
    assert record["runtime_n4_s"] > 0 and record["runtime_register_s"] > 0
    assert np.isnan(record["runtime_resample_s"])


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_outputs_are_on_the_mni_grid_in_the_bids_like_layout(run, raw_root):
    out, qc = run
    for pid in GOOD:
        img = nib.load(t1_path(out, pid))
        mask = nib.load(out / pid / "anat" / f"{pid}_desc-brain_mask.nii.gz")
        assert img.shape == mask.shape == MNI_2MM_SHAPE
        np.testing.assert_array_equal(img.affine, MNI_2MM_AFFINE)
        assert img.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        data = np.asarray(img.dataobj, dtype=np.float64)
        assert data.mean() == pytest.approx(0.0, abs=1e-4) and data.std() == pytest.approx(1.0, abs=1e-4)
        xfm = json.loads((out / pid / "anat" / f"{pid}_from-T1w_to-MNI152_xfm.json").read_text())
        assert np.asarray(xfm["world_to_mni"]).shape == (4, 4)
        assert xfm["similarity"] == pytest.approx(row(qc, pid)["similarity"])
    # participants.tsv: the input's rows of the subjects that succeeded, unchanged
    source = pd.read_csv(raw_root / "participants.tsv", sep="\t", dtype=str)
    written = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str)
    pd.testing.assert_frame_equal(written, source[source["participant_id"].isin(GOOD)].reset_index(drop=True))
    # ... so the output is a dataset the rest of the package reads
    assert list(build_manifest(out)["participant_id"]) == GOOD


@pytest.mark.slow
def test_the_saved_transform_maps_the_brain_onto_the_template(run, raw_root, nilearn_mask):
    # Prepare: the true brain mask of one subject, mapped through the saved transform
    out, _ = run
    pid = "sub-0002"
    world_to_mni = np.asarray(json.loads((out / pid / "anat" / f"{pid}_from-T1w_to-MNI152_xfm.json").read_text())
                              ["world_to_mni"])
    truth = nib.load(raw_root / "derivatives" / "truth" / pid / f"{pid}_desc-brain_mask.nii.gz")
    points = truth.affine[:3, :3] @ np.argwhere(np.asarray(truth.dataobj) > 0).T + truth.affine[:3, 3:4]
    # Execute
    mni = world_to_mni[:3, :3] @ points + world_to_mni[:3, 3:4]
    # Assert: nearly every brain point lands in nilearn's MNI brain mask
    ijk = np.rint(np.linalg.solve(MNI_2MM_AFFINE, np.vstack([mni, np.ones(mni.shape[1])]))[:3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(MNI_2MM_SHAPE)[:, None]), axis=0)
    assert nilearn_mask[tuple(ijk[:, inside])].mean() > 0.9 and inside.mean() > 0.99


# --------------------------------------------------------------------------------------------
# resume, strict mode, all failed
# --------------------------------------------------------------------------------------------
def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("sub-*/**/*") if p.is_file()}


@pytest.mark.slow
def test_a_second_run_skips_finished_subjects(run, raw_root, tmp_path):
    # Prepare: a copy of the output, and an input with the good subjects only
    out = tmp_path / "out"
    shutil.copytree(run[0], out)
    source = tmp_path / "raw"
    for pid in GOOD:
        shutil.copytree(raw_root / pid, source / pid)
    table = pd.read_csv(raw_root / "participants.tsv", sep="\t", dtype=str)
    table[table["participant_id"].isin(GOOD)].to_csv(source / "participants.tsv", sep="\t", index=False)
    before = mtimes(out)
    # Execute
    qc = preprocess_dataset(source, out, n_jobs=1, progress=False)
    # Assert: nothing recomputed, the cached records are the first run's
    assert qc["cached"].all()
    assert mtimes(out) == before
    first = run[1].set_index("participant_id").loc[GOOD]
    np.testing.assert_allclose(qc.set_index("participant_id")["dice"], first["dice"].astype(float))
    assert qc["dice"].dtype == float and qc["cached"].dtype == bool


def test_a_changed_input_file_is_not_taken_from_the_cache(run, raw_root, tmp_path):
    # Prepare: the same scan with a new modification time
    out, pid = run[0], "sub-0001"
    options = pipeline._options("deepbet", "zscore", 0)
    source = tmp_path / f"{pid}_T1w.nii.gz"
    shutil.copy2(t1_path(raw_root, pid), source)
    assert pipeline._cached_record(out, pid, options, source) is not None  # same name, size and time
    # Execute
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    # Assert
    assert pipeline._cached_record(out, pid, options, source) is None
    assert pipeline._cached_record(out, pid, pipeline._options("deepbet", "zscore_brain", 0),
                                   t1_path(raw_root, pid)) is None


def small_bad_dataset(root: Path) -> Path:
    """Two subjects, both unreadable: sub-0001 truncated, sub-0002 4D."""
    data = np.ones((30, 30, 30), np.int16)
    for pid in ("sub-0001", "sub-0002"):
        t1_path(root, pid).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), t1_path(root, "sub-0001"))
    raw = t1_path(root, "sub-0001").read_bytes()
    t1_path(root, "sub-0001").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), np.eye(4)), t1_path(root, "sub-0002"))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-0001\t50\nsub-0002\t60\n")
    return root


def test_strict_mode_raises_the_first_failure(tmp_path):
    root = small_bad_dataset(tmp_path / "raw")
    with pytest.raises(StepError) as info:
        preprocess_dataset(root, tmp_path / "out", n_jobs=1, strict=True, progress=False)
    assert (info.value.participant_id, info.value.step) == ("sub-0001", "load")
    assert "sub-0001_T1w.nii.gz" in str(info.value)


def test_every_subject_failing_raises_an_error_naming_them(tmp_path):
    root = small_bad_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="every subject failed") as info:
        preprocess_dataset(root, out, n_jobs=1, progress=False)
    assert not isinstance(info.value, StepError)
    assert "sub-0001 (load" in str(info.value) and "sub-0002 (load" in str(info.value)
    qc = pd.read_csv(out / "derivatives" / "preprocess" / "qc.tsv", sep="\t")
    assert list(qc["status"]) == ["failed", "failed"]


def test_a_listed_participant_without_image_is_recorded(tmp_path):
    root = small_bad_dataset(tmp_path / "raw")
    (root / "participants.tsv").write_text("participant_id\tage\nsub-0001\t50\nsub-0002\t60\nsub-0003\t70\n")
    with pytest.raises(PreprocessError):
        preprocess_dataset(root, tmp_path / "out", n_jobs=1, progress=False)
    qc = pd.read_csv(tmp_path / "out" / "derivatives" / "preprocess" / "qc.tsv", sep="\t")
    assert "no T1 image" in qc.set_index("participant_id").loc["sub-0003", "reason"]


# --------------------------------------------------------------------------------------------
# argument checks and single subjects
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [({"skull_strip": "bet"}, "skull_strip"),
                                                 ({"normalization": "minmax"}, "normalization"),
                                                 ({"n_jobs": 0}, "n_jobs")])
def test_preprocess_dataset_rejects_bad_options(tmp_path, kwargs, message):
    root = small_bad_dataset(tmp_path / "raw")
    with pytest.raises(ValueError, match=message):
        preprocess_dataset(root, tmp_path / "out", progress=False, **kwargs)


def test_preprocess_dataset_refuses_to_write_over_its_input(tmp_path):
    root = small_bad_dataset(tmp_path / "raw")
    with pytest.raises(ValueError, match="must differ"):
        preprocess_dataset(root, root, progress=False)


def test_preprocess_dataset_needs_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(pp.DataError, match="no T1 image"):
        preprocess_dataset(tmp_path / "empty", tmp_path / "out", progress=False)


def test_a_failing_subject_raises_and_leaves_no_output(tmp_path):
    root = small_bad_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    with pytest.raises(StepError, match="step 'load' failed"):
        preprocess_subject(t1_path(root, "sub-0001"), out)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_participant_id_comes_from_the_file_name_or_must_be_given(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), path)
    with pytest.raises(ValueError, match="participant_id"):
        preprocess_subject(path, tmp_path / "out")
    with pytest.raises(StepError) as info:  # a blank 4 mm cube: stops at the bias correction
        preprocess_subject(path, tmp_path / "out", participant_id="sub-X1", skull_strip="template")
    assert (info.value.participant_id, info.value.step) == ("sub-X1", "n4")


def test_missing_deepbet_falls_back_to_the_template_mask(tmp_path, monkeypatch, caplog):
    # Prepare: deepbet reported missing; a truncated input stops the run right after the choice
    root = small_bad_dataset(tmp_path / "raw")
    monkeypatch.setattr(pipeline, "deepbet_available", lambda: False)
    pipeline._warn_no_deepbet.cache_clear()  # warned once per process
    # Execute
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__), pytest.raises(StepError):
        preprocess_subject(t1_path(root, "sub-0001"), tmp_path / "out", skull_strip="deepbet")
    # Assert
    assert "template mask instead" in caplog.text

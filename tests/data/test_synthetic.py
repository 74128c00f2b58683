"""Tests of fedsparse_lib.data.synthetic: sampling a cohort and writing it as a BIDS-like dataset.

Small cohorts (2-4 subjects) are generated once per module and shared. Expected values come from
hand calculations (``E|N(0, s)| = s sqrt(2/pi)``, the documented site formulas), from scipy
(truncated normal moments, resampling with ``ndimage.affine_transform``) and from nilearn's own
MNI152 brain mask; determinism tests compare runs because determinism is the property.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy import stats

from fedsparse_lib.data import synthetic
from fedsparse_lib.data.anatomy import load_template_anatomy
from fedsparse_lib.data.grids import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from fedsparse_lib.data.nifti import check_dataset, load_participants
from fedsparse_lib.data.synthetic import (
    mae_floor,
    sample_sites,
    sample_subjects,
    save_img_atomic,
    synthesize_cohort,
    write_atomic,
)

SEED = 7
N_SUBJECTS = 4
RAW_SEED = 1  # its two subjects fall on two sites with different raw grids (LPS 1.5 mm, ASL 1.4 mm)
PARTICIPANT_COLUMNS = ["participant_id", "age", "sex", "site"]
HIDDEN_COLUMNS = ["biological_age", "brain_age_gap"]
VOLUME_COLUMNS = ["gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "lesion_ml", "brain_ml"]
RAW_FOV_MM = {"R": 224.0, "L": 224.0, "A": 256.0, "P": 256.0, "S": 240.0, "I": 240.0}
FAST = {"n_jobs": 1, "progress": False}


# --------------------------------------------------------------------------------------------
# helpers and shared cohorts
# --------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def t1_path(root: Path, pid: str) -> Path:
    return root / pid / "anat" / f"{pid}_T1w.nii.gz"


def truth_dir(root: Path, pid: str | None = None) -> Path:
    base = root / "derivatives" / "truth"
    return base if pid is None else base / pid


def read_array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def mtimes(root: Path) -> dict[str, int]:
    """Modification time (ns) of every file under root, by relative path."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def leftover_temporaries(root: Path) -> list[str]:
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.join(folder, f) for f in files if ".tmp" in f]
    return found


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A standard-mode cohort of 4 subjects (seed 7), generated in this process."""
    root = tmp_path_factory.mktemp("standard") / "cohort"
    participants = synthesize_cohort(root, n_subjects=N_SUBJECTS, seed=SEED, **FAST)
    return root, participants


@pytest.fixture(scope="module")
def raw_cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A raw-mode cohort of 2 subjects (skull, misplacement, site grids)."""
    root = tmp_path_factory.mktemp("raw") / "cohort"
    participants = synthesize_cohort(root, n_subjects=2, seed=RAW_SEED, raw=True, **FAST)
    return root, participants


@pytest.fixture(scope="module")
def many_subjects():
    """4000 sampled subjects (no images) over 3 sites, for Monte-Carlo checks."""
    sites = sample_sites(3, seed=11, age_range=(45.0, 82.0))
    subjects = sample_subjects(4000, sites, seed=11, age_range=(45.0, 82.0), sigma_gap=3.0)
    table = pd.DataFrame([vars(s) for s in subjects])
    return sites, table


# --------------------------------------------------------------------------------------------
# the accuracy floor and the sampled population
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma_gap", "expected"), [(3.0, 2.3936536824085963), (1.0, 0.7978845608028654),
                                                     (0.0, 0.0)])
def test_mae_floor_by_hand(sigma_gap, expected):
    # expected: sigma * sqrt(2 / pi), with sqrt(2 / pi) = 0.7978845608...
    assert mae_floor(sigma_gap) == pytest.approx(expected, rel=1e-12)


def test_brain_age_gap_is_normal_with_sigma_gap(many_subjects):
    # Prepare
    _, table = many_subjects
    # Execute
    gap = table["biological_age"] - table["age"]
    # Assert: Monte-Carlo tolerances of about 4 standard errors for n = 4000
    assert gap.mean() == pytest.approx(0.0, abs=0.2)  # se 3 / sqrt(4000) = 0.047
    assert gap.std() == pytest.approx(3.0, abs=0.15)  # se 3 / sqrt(8000) = 0.034
    assert gap.abs().mean() == pytest.approx(3.0 * math.sqrt(2.0 / math.pi), abs=0.12)  # se 0.029


def test_ages_lie_in_the_age_range(many_subjects):
    _, table = many_subjects
    assert table["age"].between(45.0, 82.0).all()
    # ages are given to 0.1 year
    np.testing.assert_allclose(table["age"], table["age"].round(1), atol=1e-9)


def test_narrow_age_range_is_respected():
    sites = sample_sites(2, seed=0, age_range=(30.0, 33.0))
    table = pd.DataFrame([vars(s) for s in sample_subjects(300, sites, seed=0, age_range=(30.0, 33.0))])
    assert table["age"].between(30.0, 33.0).all()


# (n_sites, age_range, documented recruitment means lo + (hi - lo) (0.3 + 0.4 k / (K - 1)), sd)
SITE_AGES = [
    (3, (45.0, 82.0), [56.1, 63.5, 70.9], 7.4),  # (hi - lo) / 5 = 7.4
    (2, (20.0, 80.0), [38.0, 62.0], 12.0),
    (5, (40.0, 90.0), [55.0, 60.0, 65.0, 70.0, 75.0], 10.0),
]


@pytest.mark.parametrize(("n_sites", "age_range", "means", "sd"), SITE_AGES)
def test_site_recruitment_ages_follow_the_documented_formula(n_sites, age_range, means, sd):
    # Execute
    sites = sample_sites(n_sites, seed=5, age_range=age_range)
    # Assert
    assert [s.name for s in sites] == [f"site{k + 1}" for k in range(n_sites)]
    np.testing.assert_allclose([s.age_mean for s in sites], means, atol=1e-9)
    np.testing.assert_allclose([s.age_sd for s in sites], sd, atol=1e-9)


def test_site_scanner_draws_lie_in_the_documented_ranges():
    # Execute
    sites = sample_sites(12, seed=3)
    # Assert
    for s in sites:
        assert 500.0 <= s.gain <= 1100.0
        assert 0.9 <= s.gamma <= 1.1
        assert 0.01 <= s.noise <= 0.035
        assert 0.0 <= s.blur_mm <= 1.0
        assert 0.03 <= s.bias <= 0.10
        assert 0.94 <= s.gm_contrast <= 1.06
    # scanners differ
    assert len({round(s.gain, 6) for s in sites}) == len(sites)


def test_subject_ages_per_site_follow_a_truncated_normal(many_subjects):
    # Prepare
    sites, table = many_subjects
    for site in sites:
        ages = table.loc[table["site"] == site.name, "age"]
        a, b = (45.0 - site.age_mean) / site.age_sd, (82.0 - site.age_mean) / site.age_sd
        expected = stats.truncnorm(a, b, loc=site.age_mean, scale=site.age_sd)
        # Assert: mean within 4 standard errors (plus the 0.05-year rounding of ages)
        se = expected.std() / math.sqrt(len(ages))
        assert ages.mean() == pytest.approx(expected.mean(), abs=4 * se + 0.05)
        assert ages.std() == pytest.approx(expected.std(), rel=0.1)
    site_means = [table.loc[table["site"] == s.name, "age"].mean() for s in sites]
    assert site_means == sorted(site_means)


def test_sex_is_balanced_and_every_site_recruits(many_subjects):
    sites, table = many_subjects
    assert set(table["sex"]) == {"F", "M"}
    assert (table["sex"] == "F").mean() == pytest.approx(0.5, abs=0.04)  # se 0.008
    shares = table["site"].value_counts(normalize=True)
    assert set(shares.index) == {s.name for s in sites}
    assert shares.min() > 0.1  # weights U(0.5, 1.5): no site below 0.5 / 3.5 = 14 %


def test_subject_ids_and_seeds_are_unique(many_subjects):
    _, table = many_subjects
    assert list(table["participant_id"][:3]) == ["sub-0001", "sub-0002", "sub-0003"]
    assert table["participant_id"].iloc[-1] == "sub-4000"
    assert table["participant_id"].is_unique
    assert table["seed"].map(tuple).is_unique


def test_sampled_subjects_are_a_prefix_of_a_larger_cohort():
    sites = sample_sites(3, seed=4)
    assert sample_subjects(20, sites, seed=4) == sample_subjects(50, sites, seed=4)[:20]


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def assert_same_subjects(root_a: Path, root_b: Path, pids: list[str], *, volume_atol: float = 0.0) -> None:
    """Byte-identical image arrays and affines, identical truth records (volumes within volume_atol ml)."""
    for pid in pids:
        img_a, img_b = nib.load(t1_path(root_a, pid)), nib.load(t1_path(root_b, pid))
        np.testing.assert_array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj), err_msg=pid)
        np.testing.assert_array_equal(img_a.affine, img_b.affine)
        truth_a = json.loads((truth_dir(root_a, pid) / f"{pid}_truth.json").read_text())
        truth_b = json.loads((truth_dir(root_b, pid) / f"{pid}_truth.json").read_text())
        assert truth_a.keys() == truth_b.keys()
        for key in VOLUME_COLUMNS:
            assert truth_a.pop(key) == pytest.approx(truth_b.pop(key), abs=volume_atol), (pid, key)
        assert truth_a == truth_b


@pytest.mark.slow
def test_parallel_run_gives_the_same_cohort(cohort, tmp_path):
    # Prepare
    root, participants = cohort
    # Execute: the same seed in two worker processes
    parallel = synthesize_cohort(tmp_path / "parallel", n_subjects=N_SUBJECTS, seed=SEED, n_jobs=2, progress=False)
    # Assert: byte-identical arrays and identical tables; the truth volumes may differ by the last
    # rounding digit (see test_simulate.py::test_truth_volumes_do_not_depend_on_the_number_of_threads)
    pd.testing.assert_frame_equal(parallel, participants)
    assert_same_subjects(root, tmp_path / "parallel", list(participants["participant_id"]), volume_atol=0.0015)
    for table in ("participants.tsv", "derivatives/truth/sites.tsv"):
        assert (tmp_path / "parallel" / table).read_bytes() == (root / table).read_bytes()
    truth_serial, truth_parallel = (pd.read_csv(r / "derivatives/truth/truth.tsv", sep="\t")
                                    for r in (root, tmp_path / "parallel"))
    pd.testing.assert_frame_equal(truth_parallel, truth_serial, check_exact=False, rtol=0, atol=0.0015)


def test_smaller_cohort_is_a_prefix_of_a_larger_one(cohort, tmp_path):
    # Prepare
    root, participants = cohort
    # Execute
    small = synthesize_cohort(tmp_path / "small", n_subjects=2, seed=SEED, **FAST)
    # Assert
    pd.testing.assert_frame_equal(small, participants.iloc[:2])
    assert_same_subjects(root, tmp_path / "small", ["sub-0001", "sub-0002"])


def test_another_seed_gives_another_cohort(cohort, tmp_path):
    # Prepare
    root, participants = cohort
    # Execute
    other = synthesize_cohort(tmp_path / "other", n_subjects=2, seed=SEED + 1, **FAST)
    # Assert
    assert not other["age"].equals(participants["age"].iloc[:2])
    for pid in ("sub-0001", "sub-0002"):
        a, b = read_array(t1_path(root, pid)), read_array(t1_path(tmp_path / "other", pid))
        brain = (a > 0) | (b > 0)
        assert (a[brain] != b[brain]).mean() > 0.5


# --------------------------------------------------------------------------------------------
# standard mode: what is written
# --------------------------------------------------------------------------------------------
def test_standard_images_are_int16_on_the_mni_grid_with_mni_sform(cohort):
    root, participants = cohort
    for pid in participants["participant_id"]:
        img = nib.load(t1_path(root, pid))
        assert img.shape == MNI_2MM_SHAPE
        assert img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(img.affine, MNI_2MM_AFFINE)
        affine, code = img.header.get_sform(coded=True)
        assert int(code) == 4  # MNI152
        np.testing.assert_array_equal(affine, MNI_2MM_AFFINE)
        assert int(img.header.get_qform(coded=True)[1]) == 4
        assert img.header.get_xyzt_units()[0] == "mm"


def test_standard_images_are_skull_stripped_brains_in_mni_space(cohort, nilearn_mask):
    root, participants = cohort
    for pid in participants["participant_id"]:
        # Execute: the brain is where the image is not zero
        brain = read_array(t1_path(root, pid)) > 0
        # Assert: it is nilearn's MNI152 brain (up to the individual deformation), and nothing else
        assert dice(brain, nilearn_mask) > 0.85
        assert not (brain & ~ndi.binary_dilation(nilearn_mask, iterations=4)).any()


def test_standard_cohort_passes_check_dataset(cohort):
    root, _ = cohort
    report = check_dataset(root)
    assert report.empty, report.to_string()


def test_nothing_temporary_is_left_behind(cohort, raw_cohort):
    for root, _ in (cohort, raw_cohort):
        assert leftover_temporaries(root) == []


def test_participants_table_holds_only_the_public_columns(cohort):
    # Prepare
    root, participants = cohort
    # Execute
    on_disk = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"participant_id": str})
    loaded = load_participants(root / "participants.tsv")
    # Assert
    assert list(on_disk.columns) == PARTICIPANT_COLUMNS
    assert list(participants.columns) == PARTICIPANT_COLUMNS
    pd.testing.assert_frame_equal(on_disk, participants, check_dtype=False)
    assert list(loaded["participant_id"]) == [f"sub-{i:04d}" for i in range(1, N_SUBJECTS + 1)]
    sidecar = json.loads((root / "participants.json").read_text())
    assert set(sidecar) == set(PARTICIPANT_COLUMNS)


def test_hidden_truth_is_only_in_derivatives(cohort):
    # Prepare
    root, participants = cohort
    # Execute
    truth = pd.read_csv(truth_dir(root) / "truth.tsv", sep="\t", dtype={"participant_id": str})
    # Assert: truth.tsv holds the hidden columns, consistent with the public table
    for column in HIDDEN_COLUMNS + VOLUME_COLUMNS:
        assert column in truth.columns
    pd.testing.assert_frame_equal(truth[PARTICIPANT_COLUMNS], participants, check_dtype=False)
    np.testing.assert_allclose(truth["brain_age_gap"], truth["biological_age"] - truth["age"], atol=2e-3)
    # ... and nothing outside derivatives/ mentions them
    public = [p for p in root.rglob("*") if p.is_file() and "derivatives" not in p.parts
              and p.suffix in {".tsv", ".json"}]
    assert {p.name for p in public} == {"participants.tsv", "participants.json", "dataset_description.json"}
    for path in public:
        text = path.read_text()
        for column in HIDDEN_COLUMNS:
            assert column not in text, path


def test_sites_table_and_description(cohort):
    root, participants = cohort
    sites = pd.read_csv(truth_dir(root) / "sites.tsv", sep="\t")
    assert list(sites["name"]) == ["site1", "site2", "site3"]
    np.testing.assert_allclose(sites["age_mean"], [56.1, 63.5, 70.9], atol=1e-6)
    assert set(participants["site"]) <= set(sites["name"])
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["Name"]
    config = json.loads((truth_dir(root) / "synth_config.json").read_text())
    assert (config["n_subjects"], config["seed"], config["raw"]) == (N_SUBJECTS, SEED, False)


# --------------------------------------------------------------------------------------------
# reuse, resume, overwrite
# --------------------------------------------------------------------------------------------
def refuse_to_simulate(*args, **kwargs):
    raise AssertionError("simulate_subject must not be called")


def test_same_parameters_reuse_the_cohort_untouched(cohort, monkeypatch):
    # Prepare
    root, participants = cohort
    before = mtimes(root)
    monkeypatch.setattr(synthetic, "simulate_subject", refuse_to_simulate)
    # Execute
    again = synthesize_cohort(root, n_subjects=N_SUBJECTS, seed=SEED, **FAST)
    # Assert
    pd.testing.assert_frame_equal(again, participants)
    assert mtimes(root) == before


def test_interrupted_run_resumes_where_it_stopped(cohort, tmp_path, monkeypatch):
    # Prepare: a run of 3 subjects that dies while simulating the third
    root, _ = cohort
    real = synthetic.simulate_subject
    simulated: list[str] = []

    def dies_on_third(anatomy, subject, site, **kwargs):
        if subject.participant_id == "sub-0003":
            raise RuntimeError("killed")
        return real(anatomy, subject, site, **kwargs)

    def recording(anatomy, subject, site, **kwargs):
        simulated.append(subject.participant_id)
        return real(anatomy, subject, site, **kwargs)

    target = tmp_path / "resumed"
    monkeypatch.setattr(synthetic, "simulate_subject", dies_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        synthesize_cohort(target, n_subjects=3, seed=SEED, **FAST)
    assert not (target / "participants.tsv").exists()  # the tables are written last
    assert leftover_temporaries(target) == []
    done = mtimes(target)
    # Execute
    monkeypatch.setattr(synthetic, "simulate_subject", recording)
    participants = synthesize_cohort(target, n_subjects=3, seed=SEED, **FAST)
    # Assert: only the missing subject was simulated, the others were left alone
    assert simulated == ["sub-0003"]
    assert {k: v for k, v in mtimes(target).items() if k in done and "sub-000" in k} == \
        {k: v for k, v in done.items() if "sub-000" in k}
    assert list(participants["participant_id"]) == ["sub-0001", "sub-0002", "sub-0003"]
    assert_same_subjects(root, target, ["sub-0001", "sub-0002", "sub-0003"])
    assert check_dataset(target).empty


def copy_cohort(root: Path, target: Path) -> Path:
    shutil.copytree(root, target)  # copy2: modification times are kept
    return target


def test_deleted_subject_is_regenerated_identically(cohort, tmp_path):
    # Prepare: delete one subject's image and truth record, as an interrupted run leaves them
    root, participants = cohort
    target = copy_cohort(root, tmp_path / "copy")
    t1_path(target, "sub-0002").unlink()
    (truth_dir(target, "sub-0002") / "sub-0002_truth.json").unlink()
    (target / "participants.tsv").unlink()
    others = {k: v for k, v in mtimes(target).items() if "sub-0002" not in k and "sub-" in k}
    # Execute
    again = synthesize_cohort(target, n_subjects=N_SUBJECTS, seed=SEED, **FAST)
    # Assert
    pd.testing.assert_frame_equal(again, participants)
    assert_same_subjects(root, target, ["sub-0002"])
    assert {k: v for k, v in mtimes(target).items() if k in others} == others
    assert check_dataset(target).empty


def test_deleted_subject_is_regenerated_even_when_the_tables_exist(cohort, tmp_path):
    # Prepare
    root, _ = cohort
    target = copy_cohort(root, tmp_path / "copy")
    t1_path(target, "sub-0002").unlink()
    (truth_dir(target, "sub-0002") / "sub-0002_truth.json").unlink()
    # Execute
    synthesize_cohort(target, n_subjects=N_SUBJECTS, seed=SEED, **FAST)
    # Assert
    assert t1_path(target, "sub-0002").exists()
    assert check_dataset(target).empty


CHANGED_PARAMETERS = [
    {"seed": SEED + 1},
    {"n_subjects": N_SUBJECTS + 1},
    {"n_sites": 2},
    {"age_range": (40.0, 82.0)},
    {"sigma_gap": 2.0},
    {"raw": True},
]


@pytest.mark.parametrize("change", CHANGED_PARAMETERS, ids=[next(iter(c)) for c in CHANGED_PARAMETERS])
def test_other_parameters_in_an_existing_cohort_are_refused(cohort, change):
    # Prepare
    root, _ = cohort
    before = mtimes(root)
    options = {"n_subjects": N_SUBJECTS, "seed": SEED, **FAST, **change}
    # Execute / Assert
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_cohort(root, **options)
    assert mtimes(root) == before


def test_overwrite_replaces_the_cohort_and_keeps_other_files(cohort, tmp_path):
    # Prepare
    root, _ = cohort
    target = copy_cohort(root, tmp_path / "copy")
    (target / "README.md").write_text("my notes")
    # Execute
    participants = synthesize_cohort(target, n_subjects=2, seed=SEED + 1, overwrite=True, **FAST)
    # Assert
    assert sorted(p.name for p in target.glob("sub-*")) == ["sub-0001", "sub-0002"]
    assert sorted(p.name for p in truth_dir(target).glob("sub-*")) == ["sub-0001", "sub-0002"]
    assert json.loads((truth_dir(target) / "synth_config.json").read_text())["seed"] == SEED + 1
    assert len(participants) == 2
    assert (target / "README.md").read_text() == "my notes"
    assert check_dataset(target).empty


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_not_written_by_fedsparse_is_never_touched(tmp_path, overwrite):
    # Prepare: someone's own dataset
    target = tmp_path / "mine"
    (target / "sub-01" / "anat").mkdir(parents=True)
    (target / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"precious")
    (target / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\n")
    before = mtimes(target)
    # Execute / Assert
    with pytest.raises(FileExistsError, match="not written by fedsparse"):
        synthesize_cohort(target, n_subjects=2, seed=0, overwrite=overwrite, **FAST)
    assert mtimes(target) == before
    assert (target / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes() == b"precious"


def test_a_foreign_synth_config_does_not_make_a_folder_ours(tmp_path):
    # Prepare: another tool happens to keep a synth_config.json in derivatives/truth
    target = tmp_path / "theirs"
    (target / "sub-01" / "anat").mkdir(parents=True)
    (target / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"precious")
    (target / "derivatives" / "truth").mkdir(parents=True)
    (target / "derivatives" / "truth" / "synth_config.json").write_text('{"tool": "someone else"}')
    # Execute / Assert
    with pytest.raises(FileExistsError):
        synthesize_cohort(target, n_subjects=2, seed=0, overwrite=True, **FAST)
    assert (target / "sub-01" / "anat" / "sub-01_T1w.nii.gz").exists()


# (parameter named in the message, options)
BAD_PARAMETERS = [
    ("n_subjects", {"n_subjects": 0}),
    ("n_subjects", {"n_subjects": -3}),
    ("n_subjects", {"n_subjects": True}),
    ("n_subjects", {"n_subjects": 2.0}),
    ("n_sites", {"n_sites": 0}),
    ("n_sites", {"n_sites": 1.5}),
    ("age_range", {"age_range": (80.0, 40.0)}),
    ("age_range", {"age_range": (-5.0, 50.0)}),
    ("age_range", {"age_range": (50.0, 50.0)}),
    ("age_range", {"age_range": (40.0, 130.0)}),
    ("age_range", {"age_range": (40.0,)}),
    ("age_range", {"age_range": (40.0, float("nan"))}),
    ("sigma_gap", {"sigma_gap": -1.0}),
    ("sigma_gap", {"sigma_gap": float("inf")}),
    ("n_jobs", {"n_jobs": 0}),
    ("n_jobs", {"n_jobs": 1.5}),
]


@pytest.mark.parametrize(("name", "change"), BAD_PARAMETERS,
                         ids=[f"{name}={next(iter(c.values()))!r}" for name, c in BAD_PARAMETERS])
def test_bad_parameters_are_refused_with_their_name(tmp_path, name, change):
    options = {"n_subjects": 2, "seed": 0, "n_jobs": 1, "progress": False, **change}
    with pytest.raises(ValueError, match=name):
        synthesize_cohort(tmp_path / "new", **options)


@pytest.mark.parametrize("change", [{"sigma_gap": -1.0}, {"seed": -1}], ids=["sigma_gap", "seed"])
def test_a_refused_call_writes_nothing(tmp_path, change):
    # Prepare
    target = tmp_path / "new"
    with pytest.raises(ValueError):
        synthesize_cohort(target, **{"n_subjects": 2, "seed": 0, **FAST, **change})
    # Execute / Assert
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.parametrize("seed", [-1, 1.5], ids=["negative", "float"])
def test_bad_seed_is_refused_with_its_name(tmp_path, seed):
    with pytest.raises(ValueError, match="seed"):
        synthesize_cohort(tmp_path / "new", n_subjects=2, seed=seed, **FAST)


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["text é\n", b"\x00bytes\xff"], ids=["str", "bytes"])
def test_write_atomic_writes_the_content_creating_folders(tmp_path, content):
    # Prepare
    path = tmp_path / "a" / "b" / "file.txt"
    # Execute
    write_atomic(path, content)
    # Assert
    expected = content.encode() if isinstance(content, str) else content
    assert path.read_bytes() == expected
    assert leftover_temporaries(tmp_path) == []


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "file.txt"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.os, "replace", broken_replace)
    # Execute / Assert
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert leftover_temporaries(tmp_path) == []


def test_save_img_atomic_round_trips_and_cleans_up_on_failure(tmp_path, monkeypatch):
    # Prepare
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    path = tmp_path / "x" / "img.nii.gz"
    # Execute
    save_img_atomic(img, path)
    # Assert
    np.testing.assert_array_equal(read_array(path), data)
    assert leftover_temporaries(tmp_path) == []

    # a failure leaves the saved image as it was
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_img_atomic(nib.Nifti1Image(data * 2, np.eye(4)), path)
    np.testing.assert_array_equal(read_array(path), data)
    assert leftover_temporaries(tmp_path) == []


# --------------------------------------------------------------------------------------------
# raw mode
# --------------------------------------------------------------------------------------------
def site_rows(root: Path) -> dict[str, dict]:
    sites = pd.read_csv(truth_dir(root) / "sites.tsv", sep="\t")
    return {row["name"]: row for row in sites.to_dict("records")}


def raw_subject(root: Path, pid: str):
    img = nib.load(t1_path(root, pid))
    mask_img = nib.load(truth_dir(root, pid) / f"{pid}_desc-brain_mask.nii.gz")
    record = json.loads((truth_dir(root, pid) / f"{pid}_truth.json").read_text())
    return img, mask_img, record


def test_raw_images_are_on_their_site_grid(raw_cohort):
    root, participants = raw_cohort
    sites = site_rows(root)
    assert participants["site"].nunique() == 2  # two different grids are exercised
    for pid, site in zip(participants["participant_id"], participants["site"]):
        # Prepare: the grid worked out by hand from the site's voxel size and axis codes
        voxel_mm = json.loads(sites[site]["raw_voxel_mm"])
        codes = sites[site]["raw_orientation"]
        shape = tuple(int(round(RAW_FOV_MM[c] / v)) for c, v in zip(codes, voxel_mm))
        # Execute
        img, mask_img, _ = raw_subject(root, pid)
        # Assert
        assert img.shape == shape
        assert img.get_data_dtype() == np.int16
        assert "".join(nib.aff2axcodes(img.affine)) == codes
        np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), voxel_mm)
        centre = img.affine @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0]
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-4)  # float32 in the header
        assert int(img.header.get_sform(coded=True)[1]) == 1  # scanner
        # the truth mask lies on the same grid
        assert mask_img.shape == shape
        np.testing.assert_allclose(mask_img.affine, img.affine)
        assert set(np.unique(np.asarray(mask_img.dataobj))) == {0, 1}


def test_raw_images_show_noise_and_scalp_outside_the_brain(raw_cohort):
    root, participants = raw_cohort
    for pid in participants["participant_id"]:
        # Prepare: distance in mm outside the true brain mask
        img, mask_img, _ = raw_subject(root, pid)
        data = np.asarray(img.dataobj).astype(float)
        brain = np.asarray(mask_img.dataobj) > 0
        outside_mm = ndi.distance_transform_edt(~brain, sampling=nib.affines.voxel_sizes(img.affine))
        # Execute
        background = data[outside_mm > 25.0]
        scalp = data[(outside_mm > 9.0) & (outside_mm < 12.0)]  # the bright scalp-fat layer
        # Assert: not skull-stripped; noise everywhere, a bright scalp around the brain
        assert (background > 0).mean() > 0.9
        assert scalp.mean() > 10.0 * background.mean()
        assert np.median(data[brain]) > 10.0 * background.mean()


def test_raw_to_mni_takes_the_brain_centre_to_the_template_centre(raw_cohort):
    # Prepare
    root, participants = raw_cohort
    centre_mm = load_template_anatomy().centre_mm
    for pid in participants["participant_id"]:
        img, mask_img, record = raw_subject(root, pid)
        raw_to_mni = np.asarray(record["raw_to_mni"])
        # Execute: brain centroid, voxel -> scanner mm -> MNI mm
        centroid_vox = ndi.center_of_mass(np.asarray(mask_img.dataobj) > 0)
        centroid_mni = raw_to_mni @ img.affine @ np.r_[centroid_vox, 1.0]
        # Assert
        np.testing.assert_allclose(centroid_mni[:3], centre_mm, atol=3.0)


def test_raw_to_mni_is_a_rotation_scaled_by_the_head_size(raw_cohort):
    root, participants = raw_cohort
    for pid in participants["participant_id"]:
        _, _, record = raw_subject(root, pid)
        raw_to_mni = np.asarray(record["raw_to_mni"])
        s = record["head_scale"]
        np.testing.assert_allclose(raw_to_mni[3], [0.0, 0.0, 0.0, 1.0])
        rotation = raw_to_mni[:3, :3] * s
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
        assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-5)  # proper rotation, no flip


def test_raw_mask_brought_to_mni_with_raw_to_mni_is_the_mni_brain(raw_cohort, nilearn_mask):
    root, participants = raw_cohort
    for pid in participants["participant_id"]:
        # Prepare
        img, mask_img, record = raw_subject(root, pid)
        mask = (np.asarray(mask_img.dataobj) > 0).astype(np.float32)
        raw_to_mni = np.asarray(record["raw_to_mni"])

        def to_mni(world_to_mni: np.ndarray) -> np.ndarray:
            # MNI voxel -> MNI mm -> scanner mm -> raw voxel, resampled by scipy
            pull = np.linalg.inv(img.affine) @ np.linalg.inv(world_to_mni) @ MNI_2MM_AFFINE
            return ndi.affine_transform(mask, pull[:3, :3], pull[:3, 3], output_shape=MNI_2MM_SHAPE,
                                        order=1) > 0.5

        # Execute
        registered = to_mni(raw_to_mni)
        unregistered = to_mni(np.eye(4))
        # Assert: the transform registers the brain; without it the brain is misplaced
        assert dice(registered, nilearn_mask) > 0.85
        assert dice(unregistered, nilearn_mask) < dice(registered, nilearn_mask) - 0.1


def test_raw_mask_volume_matches_truth_and_head_size(raw_cohort):
    root, participants = raw_cohort
    template_ml = float(load_template_anatomy().channel("brain").sum()) * 8e-3  # 2 mm voxels
    for pid in participants["participant_id"]:
        _, mask_img, record = raw_subject(root, pid)
        mask_ml = float((np.asarray(mask_img.dataobj) > 0).sum()) * np.prod(mask_img.header.get_zooms()) / 1000.0
        assert mask_ml == pytest.approx(record["brain_ml"], rel=0.02)
        assert mask_ml == pytest.approx(template_ml * record["head_scale"] ** 3, rel=0.03)


def test_raw_truth_files(raw_cohort):
    root, participants = raw_cohort
    truth = pd.read_csv(truth_dir(root) / "truth.tsv", sep="\t")
    assert "raw_to_mni" not in truth.columns
    assert set(HIDDEN_COLUMNS + VOLUME_COLUMNS) <= set(truth.columns)
    assert json.loads((truth_dir(root) / "synth_config.json").read_text())["raw"] is True
    for pid in participants["participant_id"]:
        assert np.asarray(json.loads((truth_dir(root, pid) / f"{pid}_truth.json").read_text())
                          ["raw_to_mni"]).shape == (4, 4)
    report = check_dataset(root)
    assert report.empty, report.to_string()


def test_raw_and_standard_truth_volumes_agree(raw_cohort):
    # Prepare: the same subject, simulated in standard mode (MNI grid, head size normalised away)
    from fedsparse_lib.data.simulate import simulate_subject

    root, _ = raw_cohort
    sites = {s.name: s for s in sample_sites(3, seed=RAW_SEED)}
    subject = sample_subjects(1, list(sites.values()), seed=RAW_SEED)[0]
    _, _, record = raw_subject(root, subject.participant_id)
    # Execute
    standard = simulate_subject(load_template_anatomy(), subject, sites[subject.site])
    # Assert: two different grids and geometries, the same native-space volumes
    for key in ("brain_ml", "gm_ml", "wm_ml", "csf_ml"):
        assert standard.truth[key] == pytest.approx(record[key], rel=0.03), key

"""Tests of fedsparse_lib.runner: profiles, notebook discovery and the papermill suite runner.

One real end-to-end run (module-scoped, about half a minute) executes the repository's notebook 01
on a 24-subject synthetic cohort, beside a tiny notebook that fails on purpose and runs first; the
other tests use tiny hand-written notebooks on a 4-subject dataset, or no kernel at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from fedsparse_lib.runner import find_notebooks, load_profile, run_suite

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
COHORT_NOTEBOOK = "01_mri_preprocessing"
FAILING_NOTEBOOK = "00_fails"  # sorts before the cohort notebook: the suite must go on after it
KERNEL = "python3"  # the virtualenv's own ipykernel
TINY_PROFILE = {
    "description": "test profile: a 24-subject cohort, everything small",
    "cohort": {"n_subjects": 24, "seed": 0, "n_sites": 3, "age_range": [45, 82], "sigma_gap": 3.0, "n_jobs": 1},
    "parameters": {"seed": 0, "resolution_mm": 6, "device": "cpu"},
    "notebooks": {COHORT_NOTEBOOK: {"n_show": 2, "n_subjects": 1, "n_jobs": 1}},
}
FIGURES = ["raw_scan.png", "n4_bias_field.png", "brain_mask.png", "registration_overlay.png",
           "intensity_normalisation.png", "ages_by_site.png", "gallery_by_age.png", "mean_image_per_decade.png",
           "volumes_vs_age.png", "brain_age_gap.png", "intensity_by_site.png"]
TABLES = ["cohort_summary.csv", "learnability.csv", "qc.csv", "step_seconds.csv", "volume_trends.csv"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """A notebook with a ``parameters``-tagged cell followed by plain code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def write_profile(notebook_dir: Path, name: str, profile: dict) -> Path:
    path = notebook_dir / "params" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile))
    return path


def write_failing_notebook(path: Path) -> Path:
    """Writes ``reached.txt`` into its output_dir, then raises unless ``fail`` is False."""
    return write_notebook(
        path,
        'output_dir: str = "unset"  # where the marker goes\nfail: bool = True  # raise in the last cell',
        "from pathlib import Path\nPath(output_dir).mkdir(parents=True, exist_ok=True)\n"
        "(Path(output_dir) / 'reached.txt').write_text('yes')",
        "if fail:\n    raise RuntimeError('planted failure 4711')",
    )


def code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------
# load_profile
# --------------------------------------------------------------------------------------------
def test_load_profile_reads_the_repository_profiles():
    # Execute
    quick = load_profile("quick", notebook_dir=REPO_NOTEBOOKS)
    paper = load_profile("paper", notebook_dir=REPO_NOTEBOOKS)
    # Assert
    assert quick["parameters"]["device"] == "cpu"
    assert quick["cohort"]["n_subjects"] == 300
    assert paper["parameters"]["resolution_mm"] == 2
    assert set(quick) >= {"cohort", "parameters", "notebooks"}


def test_load_profile_by_path_and_fills_missing_sections(tmp_path):
    # Prepare
    path = tmp_path / "mine.yml"
    path.write_text("parameters: {seed: 3}\n")
    # Execute
    profile = load_profile(path, notebook_dir=tmp_path / "elsewhere")
    # Assert
    assert profile == {"parameters": {"seed": 3}, "cohort": {}, "notebooks": {}}


def test_load_profile_of_an_empty_file_is_all_defaults(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "empty.yaml").write_text("")
    assert load_profile("empty", notebook_dir=tmp_path) == {"cohort": {}, "parameters": {}, "notebooks": {}}


def test_unknown_profile_lists_the_available_ones(tmp_path):
    # Prepare
    write_profile(tmp_path, "beta", {"parameters": {}})
    write_profile(tmp_path, "alpha", {"parameters": {}})
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"'gamma' not found.*available: \['alpha', 'beta'\]"):
        load_profile("gamma", notebook_dir=tmp_path)


def test_missing_profile_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_profile(tmp_path / "nope.yaml", notebook_dir=tmp_path)


BAD_PROFILES = [
    ("unknown key", "parameters: {}\nparams: {seed: 1}\n", "'params'"),
    ("typo in cohort key", "cohorts: {n_subjects: 3}\n", "'cohorts'"),
    ("a list", "- cohort\n- parameters\n", "list"),
    ("a scalar", "quick\n", "str"),
]


@pytest.mark.parametrize(("case", "text", "fragment"), BAD_PROFILES, ids=[c[0] for c in BAD_PROFILES])
def test_bad_profile_content_is_a_value_error_naming_what_was_found(tmp_path, case, text, fragment):
    # Prepare
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "bad.yaml").write_text(text)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"bad\.yaml.*keys") as info:
        load_profile("bad", notebook_dir=tmp_path)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------
# find_notebooks
# --------------------------------------------------------------------------------------------
@pytest.fixture
def notebook_folder(tmp_path) -> Path:
    for name in ["10_later.ipynb", "02_b.ipynb", "01_z.ipynb", "notes.ipynb", "1_short.ipynb", "ab_x.ipynb",
                 "03_draft.txt"]:
        (tmp_path / name).write_text("{}")
    return tmp_path


def test_find_notebooks_lists_numbered_notebooks_in_order(notebook_folder):
    found = find_notebooks(notebook_folder)
    assert [p.name for p in found] == ["01_z.ipynb", "02_b.ipynb", "10_later.ipynb"]


def test_find_notebooks_selects_by_stem_or_file_name_in_the_order_asked(notebook_folder):
    found = find_notebooks(notebook_folder, ["10_later", "01_z.ipynb"])
    assert found == [notebook_folder / "10_later.ipynb", notebook_folder / "01_z.ipynb"]


def test_find_notebooks_rejects_an_unknown_name_listing_the_available(notebook_folder):
    with pytest.raises(FileNotFoundError, match=r"'99_none'.*\['01_z', '02_b', '10_later'\]"):
        find_notebooks(notebook_folder, ["01_z", "99_none"])


def test_find_notebooks_in_the_repository_starts_with_the_cohort_notebook():
    assert find_notebooks(REPO_NOTEBOOKS)[0].name == f"{COHORT_NOTEBOOK}.ipynb"


# --------------------------------------------------------------------------------------------
# run_suite: one real run of notebook 01 beside a failing notebook
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Notebook 01 (real) and 00_fails executed with a tiny profile; returns (out_dir, summary)."""
    base = tmp_path_factory.mktemp("suite")
    nb_dir = base / "notebooks"
    nb_dir.mkdir()
    shutil.copy(REPO_NOTEBOOKS / f"{COHORT_NOTEBOOK}.ipynb", nb_dir)
    write_failing_notebook(nb_dir / f"{FAILING_NOTEBOOK}.ipynb")
    write_profile(nb_dir, "tiny", TINY_PROFILE)
    out = base / "results"
    summary = run_suite(profile="tiny", out_dir=out, notebook_dir=nb_dir, kernel_name=KERNEL, progress=False)
    return out, summary


@pytest.mark.slow
def test_suite_runs_in_order_and_records_each_status(suite):
    # Prepare
    out, summary = suite
    # Assert
    assert list(summary.columns) == ["notebook", "status", "seconds", "output", "error"]
    assert summary["notebook"].tolist() == [FAILING_NOTEBOOK, COHORT_NOTEBOOK]
    assert summary["status"].tolist() == ["failed", "ok"]
    assert (summary["seconds"] > 0).all()
    on_disk = pd.read_csv(out / "run_summary.csv", keep_default_na=False)
    assert on_disk["status"].tolist() == ["failed", "ok"]
    assert on_disk.loc[1, "error"] == ""


@pytest.mark.slow
def test_suite_executes_the_cohort_notebook_with_the_profile_parameters(suite):
    # Prepare
    out, summary = suite
    executed = out / "notebooks" / f"{COHORT_NOTEBOOK}.ipynb"
    # Assert
    assert summary.loc[1, "output"] == str(executed)
    cells = code_cells(executed)
    injected = [c for c in cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    source = injected[0].source
    assert "n_show = 2" in source and "n_subjects = 1" in source and "seed = 0" in source
    assert f'output_dir = "{out / COHORT_NOTEBOOK}"' in source
    assert "device" not in source  # a profile parameter the notebook does not declare is not passed
    assert all(c.execution_count is not None for c in cells)
    assert sum(len(c.outputs) for c in cells) >= 5
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FIGURES)
def test_suite_writes_every_promised_figure(suite, name):
    out, _ = suite
    figure = out / COHORT_NOTEBOOK / "figures" / name
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_suite_writes_the_notebook_tables(suite):
    # Prepare
    out, _ = suite
    tables = out / COHORT_NOTEBOOK / "tables"
    # Execute
    cohort = pd.read_csv(tables / "cohort_summary.csv")
    learn = pd.read_csv(tables / "learnability.csv").set_index("measure")["value"]
    trends = pd.read_csv(tables / "volume_trends.csv")
    # Assert
    assert sorted(p.name for p in tables.iterdir()) == TABLES
    assert cohort.set_index("site").loc["all", "num_subjects"] == 24
    assert (float(learn["n_train"]), float(learn["n_test"])) == (19.0, 5.0)  # 80 % / 20 % of 24
    assert trends["measure"].tolist() == ["gm_ml", "wm_ml", "ventricle_ml", "lesion_ml"]


@pytest.mark.slow
def test_suite_generates_the_profile_cohort_and_summarises_it(suite):
    # Prepare
    out, _ = suite
    data = out / "data" / "synthetic"
    # Execute
    participants = pd.read_csv(data / "participants.tsv", sep="\t")
    summary = pd.read_csv(out / "tables" / "cohort_summary.csv").set_index("site")
    config = json.loads((out / "run_config.json").read_text())
    # Assert
    assert len(participants) == 24
    assert summary.loc["all", "num_subjects"] == 24
    assert summary.drop(index="all")["num_subjects"].sum() == 24
    assert summary.loc["all", "age_mean"] == pytest.approx(participants["age"].mean())
    assert config["kernel"] == KERNEL and config["data_dir"] == str(data) and config["profile"] == "tiny"


@pytest.mark.slow
def test_failing_notebook_is_kept_as_failed_with_its_error(suite):
    # Prepare
    out, summary = suite
    failed = out / "notebooks" / f"{FAILING_NOTEBOOK}.FAILED.ipynb"
    # Assert
    assert summary.loc[0, "output"] == str(failed)
    assert not (out / "notebooks" / f"{FAILING_NOTEBOOK}.ipynb").exists()
    assert (out / FAILING_NOTEBOOK / "reached.txt").read_text() == "yes"  # cells before the error ran
    errors = [o for c in code_cells(failed) for o in c.outputs if o.output_type == "error"]
    assert [(e.ename, e.evalue) for e in errors] == [("RuntimeError", "planted failure 4711")]
    assert temporaries(out / "notebooks") == []


@pytest.mark.slow
def test_failed_row_says_what_the_notebook_raised(suite):
    _, summary = suite
    assert "planted failure 4711" in summary.loc[0, "error"]


# --------------------------------------------------------------------------------------------
# run_suite: tiny notebooks on a given dataset
# --------------------------------------------------------------------------------------------
def test_rerun_that_succeeds_replaces_the_failed_notebook(tmp_path, make_bids_dataset):
    # Prepare
    data = make_bids_dataset()
    nb_dir = tmp_path / "nbs"
    write_failing_notebook(nb_dir / "01_flaky.ipynb")
    write_profile(nb_dir, "fail", {"notebooks": {"01_flaky": {"fail": True}}})
    write_profile(nb_dir, "pass", {"notebooks": {"01_flaky": {"fail": False}}})
    out = tmp_path / "out"
    run_suite(profile="fail", out_dir=out, data_dir=data, notebook_dir=nb_dir, kernel_name=KERNEL, progress=False)
    assert (out / "notebooks" / "01_flaky.FAILED.ipynb").exists()
    # Execute
    summary = run_suite(profile="pass", out_dir=out, data_dir=data, notebook_dir=nb_dir, kernel_name=KERNEL,
                        progress=False)
    # Assert
    assert summary["status"].tolist() == ["ok"]
    assert (out / "notebooks" / "01_flaky.ipynb").exists()
    assert not (out / "notebooks" / "01_flaky.FAILED.ipynb").exists()
    assert temporaries(out / "notebooks") == []
    assert json.loads((out / "run_config.json").read_text())["data_dir"] == str(data.resolve())
    cohort = pd.read_csv(out / "tables" / "cohort_summary.csv").set_index("site")
    assert cohort.loc["all", "num_subjects"] == 4  # the given dataset, no synthetic cohort
    assert not (out / "data").exists()


def test_profile_setting_an_undeclared_parameter_is_a_value_error(tmp_path, make_bids_dataset):
    # Prepare
    data = make_bids_dataset()
    nb_dir = tmp_path / "nbs"
    write_notebook(nb_dir / "01_small.ipynb", "n_show: int = 4  # images")
    write_profile(nb_dir, "typo", {"notebooks": {"01_small": {"n_shwo": 2}}})
    # Execute / Assert
    with pytest.raises(ValueError, match=r"\['n_shwo'\] for 01_small, which declares only .*'n_show'"):
        run_suite(profile="typo", out_dir=tmp_path / "out", data_dir=data, notebook_dir=nb_dir,
                  kernel_name=KERNEL, progress=False)
    assert not (tmp_path / "out" / "notebooks" / "01_small.ipynb").exists()


def test_run_suite_rejects_an_unknown_notebook_before_doing_anything(tmp_path, make_bids_dataset):
    # Prepare
    nb_dir = tmp_path / "nbs"
    write_notebook(nb_dir / "01_small.ipynb", "n_show: int = 4")
    write_profile(nb_dir, "p", {})
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="02_missing"):
        run_suite(profile="p", out_dir=tmp_path / "out", data_dir=make_bids_dataset(), notebooks=["02_missing"],
                  notebook_dir=nb_dir, kernel_name=KERNEL, progress=False)
    assert not (tmp_path / "out").exists()


def test_undeclared_parameter_of_a_later_notebook_is_rejected_before_running_any(tmp_path, make_bids_dataset):
    # Prepare
    nb_dir = tmp_path / "nbs"
    write_notebook(nb_dir / "01_first.ipynb", "x: int = 1")
    write_notebook(nb_dir / "02_second.ipynb", "y: int = 1")
    write_profile(nb_dir, "typo", {"notebooks": {"02_second": {"z": 3}}})
    # Execute
    with pytest.raises(ValueError, match="'z'"):
        run_suite(profile="typo", out_dir=tmp_path / "out", data_dir=make_bids_dataset(), notebook_dir=nb_dir,
                  kernel_name=KERNEL, progress=False)
    # Assert
    assert not (tmp_path / "out" / "notebooks" / "01_first.ipynb").exists()


def test_a_missing_kernel_is_recorded_as_a_failure(tmp_path, make_bids_dataset):
    # Prepare
    nb_dir = tmp_path / "nbs"
    write_notebook(nb_dir / "01_small.ipynb", "x: int = 1", "print(x)")
    write_profile(nb_dir, "p", {})
    # Execute
    summary = run_suite(profile="p", out_dir=tmp_path / "out", data_dir=make_bids_dataset(), notebook_dir=nb_dir,
                        kernel_name="no-such-kernel-4711", progress=False)
    # Assert
    assert summary[["notebook", "status"]].values.tolist() == [["01_small", "failed"]]
    assert summary.loc[0, "error"] == "NoSuchKernel: No such kernel named no-such-kernel-4711"
    failed = tmp_path / "out" / "notebooks" / "01_small.FAILED.ipynb"
    assert nbformat.read(failed, as_version=4).cells[0].source.startswith("x: int = 1")

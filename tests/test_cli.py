"""Tests of fedsparse_lib.cli: the ``fedsparse`` command (synth, check-data, run).

``main`` is called in-process (its exit status is the return value); the installed console script
is exercised once through a subprocess. The ``run`` tests use tiny notebooks on a 4-subject dataset.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import nibabel as nib
import pandas as pd
import pytest
import yaml

from fedsparse_lib import cli, runner
from fedsparse_lib.data import synthetic

FEDSPARSE = Path(sys.executable).parent / "fedsparse"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def broken_dataset(make_bids_dataset) -> Path:
    """A 4-subject dataset with three problems: an implausible age, a missing and a truncated image."""
    root = make_bids_dataset()
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    table.loc[0, "age"] = 150.0
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz").unlink()
    image = root / "sub-0003" / "anat" / "sub-0003_T1w.nii.gz"
    image.write_bytes(image.read_bytes()[:200])
    return root


BROKEN_PROBLEMS = ["implausible age 150", "participant has no image", "cannot read the image"]


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def record_synth(monkeypatch) -> list[dict]:
    """Replace synthesize_cohort by a recorder returning a 2-row participants table."""
    calls: list[dict] = []

    def fake(out_dir, **kwargs):
        calls.append({"out_dir": out_dir, **kwargs})
        return pd.DataFrame({"participant_id": ["sub-0001", "sub-0002"], "age": [50.0, 70.0], "sex": ["F", "M"],
                             "site": ["site1", "site2"]})

    monkeypatch.setattr(synthetic, "synthesize_cohort", fake)
    return calls


# --------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["check-data"],
        ["synth", "--n-subjects", "2", "--seed", "1"],
        ["synth", "--out", "x", "--n-subjects", "two", "--seed", "1"],
        ["synth", "--out", "x", "--n-subjects", "2", "--seed", "1", "--age-range", "50"],
    ],
    ids=["no command", "unknown command", "check-data without root", "synth without out", "non-integer",
         "one age"],
)
def test_argparse_errors_exit_2_with_usage_on_stderr(capsys, argv):
    # Execute
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    # Assert
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "usage: fedsparse" in captured.err and "error:" in captured.err
    assert captured.out == ""


BAD_SYNTH = [
    ("zero subjects", ["--n-subjects", "0"], "n_subjects must be an integer >= 1, got 0"),
    ("reversed ages", ["--age-range", "80", "40"], "age_range must satisfy 0 <= min < max <= 120"),
    ("negative gap", ["--sigma-gap", "-1"], "sigma_gap must be a finite number >= 0"),
    ("zero sites", ["--sites", "0"], "n_sites must be an integer >= 1, got 0"),
    ("zero jobs", ["--jobs", "0"], "n_jobs must be an integer >= 1, got 0"),
    ("negative seed", ["--seed", "-3"], "seed must be an integer >= 0, got -3"),
]


@pytest.mark.parametrize(("case", "extra", "message"), BAD_SYNTH, ids=[c[0] for c in BAD_SYNTH])
def test_synth_bad_values_return_2_with_the_message_on_stderr(tmp_path, capsys, case, extra, message):
    # Prepare
    out = tmp_path / "cohort"
    argv = ["synth", "--out", str(out), "--n-subjects", "3", "--seed", "1", "--no-progress", *extra]
    # Execute
    status = cli.main(argv)
    # Assert
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("fedsparse synth: error: ")
    assert message in captured.err
    assert captured.out == ""
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# synth
# --------------------------------------------------------------------------------------------
def test_synth_passes_every_option_to_the_generator(tmp_path, record_synth, capsys):
    # Execute
    status = cli.main(["synth", "--out", str(tmp_path / "c"), "--n-subjects", "2", "--seed", "5", "--sites", "4",
                       "--age-range", "50", "70", "--sigma-gap", "1.5", "--raw", "--jobs", "2", "--overwrite",
                       "--no-progress"])
    # Assert
    assert status == 0
    assert record_synth == [{"out_dir": str(tmp_path / "c"), "n_subjects": 2, "seed": 5, "n_sites": 4,
                             "age_range": (50.0, 70.0), "sigma_gap": 1.5, "raw": True, "n_jobs": 2,
                             "overwrite": True, "progress": False}]
    assert "site1: 1, site2: 1" in capsys.readouterr().out


def test_synth_defaults(tmp_path, record_synth):
    cli.main(["synth", "--out", str(tmp_path / "c"), "--n-subjects", "2", "--seed", "0"])
    (call,) = record_synth
    assert {k: call[k] for k in ("n_sites", "age_range", "sigma_gap", "raw", "n_jobs", "overwrite", "progress")} == {
        "n_sites": 3, "age_range": (45.0, 82.0), "sigma_gap": 3.0, "raw": False, "n_jobs": None,
        "overwrite": False, "progress": True}


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory) -> tuple[Path, int, str]:
    """A real ``fedsparse synth`` of 2 subjects; returns (out, status, stdout)."""
    out = tmp_path_factory.mktemp("synth") / "cohort"
    argv = ["synth", "--out", str(out), "--n-subjects", "2", "--seed", "3", "--sites", "2", "--age-range", "50", "60",
            "--sigma-gap", "1.5", "--jobs", "1", "--no-progress"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is function-scoped
        status = cli.main(argv)
    return out, status, stdout.getvalue()


def test_synth_writes_the_cohort_it_was_asked_for(synth_run):
    # Prepare
    out, status, _ = synth_run
    # Execute
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    config = json.loads((out / "derivatives" / "truth" / "synth_config.json").read_text())
    # Assert
    assert status == 0
    assert len(participants) == 2
    assert participants["age"].between(50, 60).all()
    assert set(participants["site"]) <= {"site1", "site2"}
    assert {k: config[k] for k in ("n_subjects", "seed", "n_sites", "age_range", "sigma_gap", "raw")} == {
        "n_subjects": 2, "seed": 3, "n_sites": 2, "age_range": [50.0, 60.0], "sigma_gap": 1.5, "raw": False}


def test_synth_reports_subjects_ages_and_the_mae_floor(synth_run):
    # Prepare
    out, _, stdout = synth_run
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    floor = 1.5 * math.sqrt(2 / math.pi)  # 1.197 years
    # Assert
    assert stdout.startswith(f"2 subjects in {out} (")
    assert f"ages {participants['age'].min():.1f}-{participants['age'].max():.1f}" in stdout
    assert stdout.rstrip().endswith(f"best achievable MAE {floor:.2f} years")


def test_synth_refuses_to_replace_a_cohort_with_other_parameters(synth_run, capsys):
    # Prepare
    out, _, _ = synth_run
    before = (out / "participants.tsv").read_text()
    # Execute
    status = cli.main(["synth", "--out", str(out), "--n-subjects", "2", "--seed", "4", "--no-progress"])
    # Assert
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "participants.tsv").read_text() == before


def test_synth_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    # Prepare
    (tmp_path / "thesis.tex").write_text("precious")
    # Execute
    status = cli.main(["synth", "--out", str(tmp_path), "--n-subjects", "1", "--seed", "0", "--no-progress"])
    # Assert
    assert status == 2
    assert "not written by fedsparse synth" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------------------------
# check-data
# --------------------------------------------------------------------------------------------
def test_check_data_of_a_valid_dataset_returns_0(make_bids_dataset, capsys):
    root = make_bids_dataset()
    assert cli.main(["check-data", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"{root}: no problems found"


def test_check_data_lists_every_problem_and_returns_1(broken_dataset, capsys):
    # Execute
    status = cli.main(["check-data", str(broken_dataset)])
    # Assert
    captured = capsys.readouterr()
    assert status == 1
    for problem in BROKEN_PROBLEMS:
        assert problem in captured.out
    assert "sub-0001" in captured.out and "sub-0002" in captured.out and "sub-0003" in captured.out
    assert captured.out.splitlines()[0].split() == ["path", "participant_id", "problem"]
    assert f"{broken_dataset}: 3 problem(s)" in captured.err


def test_check_data_without_images_skips_reading_them(broken_dataset, capsys):
    # Execute
    status = cli.main(["check-data", str(broken_dataset), "--no-images"])
    # Assert
    captured = capsys.readouterr()
    assert status == 1
    assert "implausible age 150" in captured.out and "participant has no image" in captured.out
    assert "cannot read the image" not in captured.out
    assert "2 problem(s)" in captured.err


def test_check_data_of_a_missing_folder_returns_1(tmp_path, capsys):
    assert cli.main(["check-data", str(tmp_path / "nowhere")]) == 1
    assert "dataset folder not found" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def test_run_with_an_unknown_profile_returns_2_listing_the_available(tmp_path, capsys):
    # Prepare
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "small.yaml").write_text("parameters: {}\n")
    # Execute
    status = cli.main(["run", "--profile", "huge", "--out", str(tmp_path / "out"), "--notebook-dir", str(tmp_path)])
    # Assert
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsparse run: error: ") and "available: ['small']" in err


@pytest.fixture
def run_setup(tmp_path, make_bids_dataset, monkeypatch) -> tuple[Path, Path, Path]:
    """(notebook_dir, profile path, data_dir): 00_ok succeeds, 01_fails raises; the venv's python3 kernel."""
    monkeypatch.setattr(runner, "_kernel_name", lambda: "python3")
    nb_dir = tmp_path / "nbs"
    write_notebook(nb_dir / "00_ok.ipynb", 'output_dir: str = "unset"',
                   "import pathlib\npathlib.Path(output_dir).mkdir(parents=True)")
    write_notebook(nb_dir / "01_fails.ipynb", "x: int = 1", "raise ValueError('no')")
    profile = tmp_path / "test.yaml"
    profile.write_text(yaml.safe_dump({"parameters": {"x": 2}}))
    return nb_dir, profile, make_bids_dataset()


def _run_argv(run_setup, out: Path, *extra: str) -> list[str]:
    nb_dir, profile, data = run_setup
    return ["run", "--profile", str(profile), "--out", str(out), "--data-dir", str(data), "--notebook-dir",
            str(nb_dir), *extra]


def test_run_returns_1_when_a_notebook_fails(run_setup, tmp_path, capsys):
    # Execute
    status = cli.main(_run_argv(run_setup, tmp_path / "out"))
    # Assert
    out = capsys.readouterr().out
    assert status == 1
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert lines == {"00_ok": "ok", "01_fails": "failed"}
    assert (tmp_path / "out" / "00_ok").is_dir()
    assert (tmp_path / "out" / "notebooks" / "01_fails.FAILED.ipynb").exists()


def test_run_of_selected_notebooks_that_succeed_returns_0(run_setup, tmp_path, capsys):
    # Execute
    status = cli.main(_run_argv(run_setup, tmp_path / "out", "--notebooks", "00_ok"))
    # Assert
    assert status == 0
    summary = pd.read_csv(tmp_path / "out" / "run_summary.csv")
    assert summary[["notebook", "status"]].values.tolist() == [["00_ok", "ok"]]
    assert " ok " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the installed console script
# --------------------------------------------------------------------------------------------
def test_console_script_help_lists_the_subcommands():
    # Execute
    result = subprocess.run([str(FEDSPARSE), "--help"], capture_output=True, text=True, timeout=60)
    # Assert
    assert result.returncode == 0
    assert result.stdout.startswith("usage: fedsparse")
    for command in ("synth", "check-data", "run"):
        assert command in result.stdout


def test_console_script_check_data_exits_1_listing_the_problems(broken_dataset):
    # Execute
    result = subprocess.run([str(FEDSPARSE), "check-data", str(broken_dataset)], capture_output=True, text=True,
                            timeout=60)
    # Assert
    assert result.returncode == 1
    for problem in BROKEN_PROBLEMS:
        assert problem in result.stdout
    assert "3 problem(s)" in result.stderr


def test_preprocess_command_writes_model_input_and_reports_qc(tmp_path, capsys):
    # Prepare: two raw synthetic scans (the template skull strip keeps this fast)
    from fedsparse_lib.cli import main as cli_main
    from fedsparse_lib.data.synthetic import synthesize_cohort

    synthesize_cohort(tmp_path / "raw", n_subjects=2, seed=4, raw=True, n_jobs=1, progress=False)
    # Execute
    code = cli_main(["preprocess", str(tmp_path / "raw"), str(tmp_path / "mni"), "--skull-strip", "template",
                     "--jobs", "1", "--no-progress"])
    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "2 of 2 subjects preprocessed" in out
    qc = pd.read_csv(tmp_path / "mni" / "derivatives" / "preprocess" / "qc.tsv", sep="\t")
    assert (qc["status"] == "ok").all() and (qc["dice"] > 0.95).all() and (qc["registration_error_mm"] < 2).all()
    assert nib.load(tmp_path / "mni" / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz").shape == (91, 109, 91)


def test_download_dry_run_fetches_nothing_and_names_the_licence(tmp_path, capsys):
    from fedsparse_lib.cli import main as cli_main

    code = cli_main(["download", "ixi", "--out", str(tmp_path / "ixi"), "--dry-run", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "CC BY-SA 3.0" in out and "Dry run" in out
    assert not (tmp_path / "ixi" / "sourcedata" / "IXI-T1.tar").exists()

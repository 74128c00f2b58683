"""Notebook 02 executes headlessly with tiny parameters and writes what it promises.

(Notebook 01 runs end to end through the suite runner in test_runner.py.)
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from fedsparse_lib.data.synthetic import synthesize_cohort

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "synthetic"
    synthesize_cohort(root, n_subjects=24, seed=1, n_jobs=1, progress=False)
    return root


@pytest.mark.slow
def test_notebook_02_runs_with_tiny_parameters(cohort, tmp_path):
    # Prepare
    out = tmp_path / "02"
    params = {"data_dir": str(cohort), "output_dir": str(out), "resolution_mm": 6, "width": 0.125, "epochs": 3,
              "target_sparsities": [0.9], "lr": 0.001, "batch_size": 4, "seed": 0}
    # Execute
    pm.execute_notebook(str(NOTEBOOKS / "02_centralized_pruning.ipynb"), str(tmp_path / "02.ipynb"),
                        parameters=params, kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS))
    # Assert
    executed = nbformat.read(tmp_path / "02.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["layer_sparsity_and_weights.png", "mae_vs_sparsity.png", "predicted_vs_true.png",
                       "saliency.png", "schedule.png"]
    summary = pd.read_csv(out / "tables" / "summary.csv").set_index("model")
    assert summary.loc["dense", "sparsity"] == 0.0
    assert summary.loc["90% sparse", "sparsity"] == pytest.approx(0.9, abs=1e-4)  # floor(0.9 N) / N
    sizes = pd.read_csv(out / "tables" / "model_sizes.csv")
    assert set(sizes["model"]) == {"dense", "90% sparse"}
    assert sorted(p.name for p in (out / "models").glob("*.safetensors")) == ["90pct_sparse.safetensors",
                                                                             "dense.safetensors"]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_parameter_of_every_notebook_is_visible_to_papermill(path):
    # The runner passes only the parameters papermill's inspector finds; a comment it cannot parse
    # would hide a parameter from every profile.
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    declared = [line.split(":")[0].strip() for line in cell.source.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert sorted(pm.inspect_notebook(str(path))) == sorted(declared)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs

"""Notebooks 02 and 03 execute headlessly with tiny parameters and write what they promise.

(Notebook 01 runs end to end through the suite runner in test_runner.py.)
"""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_notebook_03_runs_with_tiny_parameters(cohort, tmp_path):
    # Prepare: two environments and two targets exercise the list forms of both parameters
    out = tmp_path / "03"
    params = {"data_dir": str(cohort), "output_dir": str(out), "environment": ["iid", "skewed_noniid"],
              "num_clients": 3, "num_rounds": 3, "local_epochs": 1, "target_sparsity": [0.8, 0.9],
              "methods": ["fedavg", "fedsparsify_global", "fedsparsify_local"], "resolution_mm": 6,
              "width": 0.125, "lr": 0.001, "batch_size": 4, "seed": 0}
    # Execute
    pm.execute_notebook(str(NOTEBOOKS / "03_federated_pruning.ipynb"), str(tmp_path / "03.ipynb"),
                        parameters=params, kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOKS))
    # Assert
    executed = nbformat.read(tmp_path / "03.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "client_mae.png", "communication.png", "environments.png", "mae_and_sparsity_per_round.png",
        "majority_vote.png"]
    runs = ["fedavg", "fedsparsify_global 80%", "fedsparsify_global 90%", "fedsparsify_local 80%",
            "fedsparsify_local 90%"]
    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert sorted(zip(summary["environment"], summary["run"])) == sorted(
        (env, run) for env in ("iid", "skewed_noniid") for run in runs)
    final = summary.set_index(["environment", "run"])["sparsity"]
    assert final["iid", "fedavg"] == 0.0
    assert final["skewed_noniid", "fedsparsify_global 90%"] == pytest.approx(0.9, abs=1e-4)
    assert final["skewed_noniid", "fedsparsify_local 80%"] == pytest.approx(0.8, abs=1e-4)  # re-pruned after the vote
    rounds = pd.read_csv(out / "tables" / "rounds.csv")
    assert len(rounds) == 2 * len(runs) * (3 + 1)  # rounds 0..3 of every run
    totals = rounds.groupby(["environment", "run"])[["bytes_down", "bytes_up"]].sum().sum(axis=1)
    assert (totals.xs("fedavg", level="run") > totals.xs("fedsparsify_global 90%", level="run")).all()
    agreement = pd.read_csv(out / "tables" / "agreement.csv")
    assert set(agreement["method"]) == {"fedsparsify_local"} and set(agreement["server_round"]) == {2, 3}
    votes = pd.read_csv(out / "tables" / "votes.csv")
    assert (votes.groupby(["environment", "run", "server_round"])["votes"].max() == 3).all()
    client_mae = pd.read_csv(out / "tables" / "client_mae.csv")
    assert len(client_mae) == 2 * len(runs) * 3
    membership = pd.read_csv(out / "tables" / "membership.csv")
    assert set(membership["split"]) == {"train", "test"}
    assert (membership.query("split == 'train'").groupby("environment").size() == 19).all()
    models = sorted(p.name for p in (out / "models").glob("*.safetensors"))
    assert len(models) == 10 and "skewed_noniid__fedsparsify_local_80pct.safetensors" in models
    config = json.loads((out / "run_config.json").read_text())
    assert config["parameters"]["num_rounds"] == 3 and len(config["runs"]) == 10
    assert all((out / run["model"]).exists() for run in config["runs"])


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

"""Is age learnable from a cohort, and does it leak trivially? A linear reference model.

A ridge regression on z-scored, 6 mm-resampled voxels is the simplest honest brain-age model: if
it cannot beat predicting the mean, a CNN result means little; if one voxel or one global intensity
statistic already reads out age, the task is a trick. :func:`learnability_report` measures both,
beside the theoretical floor of the synthetic cohort (``sigma_gap * sqrt(2 / pi)``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = ["LearnabilityReport", "learnability_report", "global_statistics", "single_feature_correlations",
           "ridge_reference"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnabilityReport:
    """Ridge baseline against the trivial predictor, the floor, and single-feature read-outs.

    All MAEs in years, on the held-out test subjects.
    """

    n_train: int
    n_test: int
    resolution_mm: float
    ridge_mae: float
    ridge_alpha: float
    mean_predictor_mae: float
    ratio: float
    floor_mae: float | None
    best_voxel_abs_r: float
    best_voxel_test_mae: float
    best_global_statistic: str
    best_global_abs_r: float
    best_global_test_mae: float

    def to_frame(self) -> pd.DataFrame:
        """Tidy two-column table (measure, value)."""
        return pd.DataFrame({"measure": list(asdict(self)), "value": list(asdict(self).values())})


def global_statistics(volume: np.ndarray) -> dict[str, float]:
    """Whole-image intensity statistics of a raw (un-normalised) volume.

    Returns mean, standard deviation, non-zero fraction, and mean / median / 90th percentile of
    the non-zero voxels.
    """
    v = np.asarray(volume, dtype=np.float32)
    nz = v[v != 0]
    if nz.size == 0:
        nz = np.zeros(1, dtype=np.float32)
    return {
        "mean": float(v.mean()), "std": float(v.std()), "nonzero_fraction": float((v != 0).mean()),
        "nonzero_mean": float(nz.mean()), "nonzero_median": float(np.median(nz)),
        "nonzero_p90": float(np.percentile(nz, 90)),
    }


def single_feature_correlations(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``features`` (n, p) with ``target`` (n,); 0 for constant columns."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    xc = x - x.mean(axis=0)
    yc = y - y.mean()
    sx = np.sqrt((xc**2).mean(axis=0))
    sy = np.sqrt((yc**2).mean())
    r = np.zeros(x.shape[1])
    ok = sx > 1e-12
    r[ok] = (xc[:, ok] * yc[:, None]).mean(axis=0) / (sx[ok] * sy)
    return np.clip(r, -1.0, 1.0)


def ridge_reference(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Ridge regression (penalty by leave-one-out CV over 1e-1..1e5) on flattened volumes.

    Parameters
    ----------
    x_train, x_test : numpy.ndarray of shape (n, ...)
        Volumes (flattened internally).
    y_train, y_test : numpy.ndarray of shape (n,)
        Ages in years.

    Returns
    -------
    mae : float
        Test mean absolute error in years.
    alpha : float
        The chosen penalty.
    predicted : numpy.ndarray of shape (n_test,)
    """
    from sklearn.linear_model import RidgeCV

    xt = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    xs = np.asarray(x_test, dtype=np.float64).reshape(len(x_test), -1)
    ridge = RidgeCV(alphas=np.logspace(-1, 5, 25)).fit(xt, np.asarray(y_train, dtype=float))
    predicted = ridge.predict(xs)
    return float(np.abs(predicted - np.asarray(y_test, dtype=float)).mean()), float(ridge.alpha_), predicted


def learnability_report(manifest: pd.DataFrame, *, n_train: int, n_test: int, seed: int,
                        resolution_mm: float = 6.0, sigma_gap: float | None = None,
                        progress: bool = True) -> LearnabilityReport:
    """Fit the ridge reference model and the single-feature read-outs on a dataset.

    Parameters
    ----------
    manifest : pandas.DataFrame
        From :func:`fedsparse_lib.data.datasets.build_manifest` (participant_id, age, path).
    n_train, n_test : int
        Subjects drawn (without replacement, from ``seed``) for training and testing.
    seed : int
    resolution_mm : float, default 6
        Voxel size of the features (proper resampling, then per-volume z-score as in the paper).
    sigma_gap : float, optional
        The cohort's brain-age-gap sd, to report the floor ``sigma_gap * sqrt(2 / pi)``.
    progress : bool

    Returns
    -------
    LearnabilityReport
    """
    from sklearn.linear_model import LinearRegression
    from tqdm.auto import tqdm

    from .datasets import resample_volume, zscore
    from .nifti import load_volume
    from .synthetic import mae_floor

    if n_train < 2 or n_test < 1 or n_train + n_test > len(manifest):
        raise ValueError(f"need 2 <= n_train and 1 <= n_test with n_train + n_test <= {len(manifest)} subjects, "
                         f"got n_train={n_train}, n_test={n_test}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(manifest))[: n_train + n_test]
    rows = manifest.iloc[order].reset_index(drop=True)
    feats, stats = [], []
    for path in tqdm(rows["path"], desc="loading volumes", disable=not progress):
        data, affine = load_volume(path)
        stats.append(global_statistics(data))
        feats.append(zscore(resample_volume(data, affine, resolution_mm)).ravel())
    x = np.stack(feats)
    g = pd.DataFrame(stats)
    y = rows["age"].to_numpy(dtype=float)
    tr, te = np.arange(n_train), np.arange(n_train, n_train + n_test)

    ridge_mae, ridge_alpha, _ = ridge_reference(x[tr], y[tr], x[te], y[te])
    mean_mae = float(np.abs(y[tr].mean() - y[te]).mean())

    def single_mae(column: np.ndarray) -> float:
        lr = LinearRegression().fit(column[tr, None], y[tr])
        return float(np.abs(lr.predict(column[te, None]) - y[te]).mean())

    r_vox = single_feature_correlations(x[tr], y[tr])
    k = int(np.argmax(np.abs(r_vox)))
    r_glob = single_feature_correlations(g.to_numpy()[tr], y[tr])
    j = int(np.argmax(np.abs(r_glob)))
    return LearnabilityReport(
        n_train=n_train, n_test=n_test, resolution_mm=float(resolution_mm),
        ridge_mae=ridge_mae, ridge_alpha=ridge_alpha, mean_predictor_mae=mean_mae,
        ratio=ridge_mae / mean_mae,
        floor_mae=None if sigma_gap is None else mae_floor(sigma_gap),
        best_voxel_abs_r=float(abs(r_vox[k])), best_voxel_test_mae=single_mae(x[:, k]),
        best_global_statistic=str(g.columns[j]), best_global_abs_r=float(abs(r_glob[j])),
        best_global_test_mae=single_mae(g.to_numpy()[:, j]),
    )

"""Tidy summaries of a cohort: per-site counts and ages, tissue volumes against age."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["cohort_summary", "volume_trends"]


def cohort_summary(participants: pd.DataFrame) -> pd.DataFrame:
    """One row per site plus an ``all`` row: site, num_subjects, num_female, age_mean, age_sd, age_min, age_max.

    Parameters
    ----------
    participants : pandas.DataFrame
        Columns participant_id and age (years); site and sex optional.
    """
    if "age" not in participants or participants.empty:
        raise ValueError("cohort_summary needs a non-empty table with an 'age' column")
    frame = participants.copy()
    if "site" not in frame:
        frame["site"] = "n/a"
    if "sex" not in frame:
        frame["sex"] = "n/a"

    def describe(group: pd.DataFrame) -> dict:
        ages = group["age"].astype(float)
        return {"num_subjects": len(group), "num_female": int((group["sex"] == "F").sum()),
                "age_mean": ages.mean(), "age_sd": ages.std(ddof=1) if len(ages) > 1 else np.nan,
                "age_min": ages.min(), "age_max": ages.max()}

    rows = [{"site": str(site), **describe(g)} for site, g in frame.groupby("site", sort=True)]
    rows.append({"site": "all", **describe(frame)})
    return pd.DataFrame(rows)


def volume_trends(truth: pd.DataFrame, *, columns: tuple[str, ...] = ("gm_ml", "wm_ml", "ventricle_ml", "lesion_ml"),
                  age_column: str = "biological_age") -> pd.DataFrame:
    """Linear trend of each tissue volume against age: slope in ml/year and in % of the mean per year.

    Returns a tidy frame (measure, slope_ml_per_year, percent_per_year, r) with the Pearson
    correlation ``r`` between the volume and ``age_column``.
    """
    age = truth[age_column].to_numpy(dtype=float)
    rows = []
    for col in columns:
        vol = truth[col].to_numpy(dtype=float)
        slope, _ = np.polyfit(age, vol, 1)
        rows.append({"measure": col, "slope_ml_per_year": slope, "percent_per_year": 100.0 * slope / vol.mean(),
                     "r": float(np.corrcoef(age, vol)[0, 1])})
    return pd.DataFrame(rows)

"""Ageing model of the synthetic cohort: pure functions of (biological) age.

Rates are chosen to follow the shape of the ageing literature, expressed in the MNI space the
cohort lives in (brain volume there is about 1.9 l, larger than a native brain):

* Lateral-ventricle enlargement: the ventricular boundary moves outward by
  ``3.0 * u**1.6`` mm with ``u = (age - 20) / 60``, i.e. accelerating after mid-life. In the
  template this takes the lateral + third ventricles from about 33 ml at 20 to about 60 ml at
  65 and over 90 ml at 85 (2-4 % per year in old age, as in longitudinal studies:
  Kaye et al. 1992; Fjell et al. 2009; Scahill et al. 2003).
* Cortical grey-matter loss and sulcal widening: grey matter within ``2.4 * u**1.2`` mm of sulcal
  CSF turns into CSF, weighted by a regional map in which frontal and lateral temporal cortex age
  faster (Raz et al. 2005; Fjell et al. 2009). Measured on the cohort, total grey matter falls by
  about 0.3 % per year (Giorgio et al. 2010; Bethlehem et al. 2022 report 0.2-0.5 %/year).
* White-matter change: the T1 white/grey contrast shrinks by 0.25 % of the white-matter intensity
  per year (Salat et al. 2009), and periventricular T1-hypointense lesions (white-matter
  hyperintensities on FLAIR) become common after 60 (de Leeuw et al. 2001).

Every subject also carries individual factors (ventricle size, cortical reserve) that make two
people of the same age differ, as they do in real cohorts.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ageing_progress",
    "ventricle_expansion_mm",
    "cortical_atrophy_mm",
    "wm_intensity_factor",
    "lesion_threshold_shift",
]


def ageing_progress(age: float | np.ndarray) -> float | np.ndarray:
    """Normalised ageing progress ``u = (age - 20) / 60``, 0 before 20 (the template's age)."""
    return np.clip((np.asarray(age, dtype=float) - 20.0) / 60.0, 0.0, None)


def ventricle_expansion_mm(age: float | np.ndarray) -> float | np.ndarray:
    """Outward shift of the ventricular boundary in mm at ``age`` (0 at 20, 3.0 at 80)."""
    return 3.0 * ageing_progress(age) ** 1.6


def cortical_atrophy_mm(age: float | np.ndarray) -> float | np.ndarray:
    """Depth in mm of cortex next to sulcal CSF that has turned into CSF (0 at 20, 2.4 at 80)."""
    return 2.4 * ageing_progress(age) ** 1.2


def wm_intensity_factor(age: float | np.ndarray) -> float | np.ndarray:
    """Multiplier of the white-matter T1 intensity: 1 at 20, falling by 0.25 % per year."""
    return 1.0 - 0.0025 * 60.0 * ageing_progress(age)


def lesion_threshold_shift(age: float | np.ndarray) -> float | np.ndarray:
    """How far (in standard deviations of the lesion field) the lesion threshold has dropped.

    0 before 50, then ``1.6 * ((age - 50) / 35) ** 1.5``: lesions are rare in mid-life and
    common, periventricular, by 80-85.
    """
    return 1.6 * np.clip((np.asarray(age, dtype=float) - 50.0) / 35.0, 0.0, None) ** 1.5

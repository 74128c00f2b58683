"""fedsparse: sparsified federated learning on brain MRI, for teaching and analysis.

Subpackages
-----------
data
    Synthetic cohort generator, NIfTI / participants loading and validation, torch datasets,
    federated partitions.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

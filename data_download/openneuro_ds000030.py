#!/usr/bin/env python3
"""Download the T1w scans of OpenNeuro ds000030 (CC0) and convert them to the BIDS-like layout.

    python data_download/openneuro_ds000030.py --out data/ds000030 --dry-run
    python data_download/openneuro_ds000030.py --out data/ds000030

Fetches participants.tsv and dataset_description.json, then one T1w scan per participant with an
age and a T1w scan (~262 files, ~2.6 GB) from OpenNeuro's public S3 bucket into OUT/sourcedata/,
and writes OUT/participants.tsv (age, sex, site = UCLA, diagnosis). No checksums are published:
each file's sha256 is recorded in OUT/sourcedata/checksums.lock.json on first download and
checked on later runs. See data_download/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedsparse_lib.data.download import script_main

DATASET = "ds000030"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, download and convert; return the exit status."""
    return script_main(DATASET, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())

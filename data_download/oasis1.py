#!/usr/bin/env python3
"""Download OASIS-1 cross-sectional (data-use agreement) and convert it to the BIDS-like layout.

    python data_download/oasis1.py --out data/oasis1 --dry-run          # terms, URLs, sizes
    python data_download/oasis1.py --out data/oasis1 --accept-terms     # agree and download

Fetches the 12 disc archives (~18 GB) and oasis_cross-sectional.csv into OUT/sourcedata/, extracts
only the chosen image of each first-visit session (--image processed: skull-stripped, gain-field
corrected, Talairach-registered 1 mm image; --image raw: first raw MPRAGE) and writes
OUT/participants.tsv (sub-OAS10001 ..., age, sex, site = WUSTL, cdr, mmse). Nothing is fetched
until the agreement is accepted. See data_download/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedsparse_lib.data.download import script_main

DATASET = "oasis1"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, download and convert; return the exit status."""
    return script_main(DATASET, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Download IXI T1 scans (CC BY-SA 3.0) and convert them to the BIDS-like layout.

    python data_download/ixi.py --out data/ixi --dry-run        # terms, URLs, sizes; fetch nothing
    python data_download/ixi.py --out data/ixi --demographics IXI.csv

Fetches IXI-T1.tar (~4.8 GB, md5 published by TorchIO) and IXI.xls into OUT/sourcedata/, then
writes OUT/participants.tsv (sub-IXI002 ..., age, sex, site = Guys / HH / IOP) and the images.
Reading IXI.xls needs the ``xlrd`` package; without it, export the sheet as CSV and pass
``--demographics``. See data_download/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedsparse_lib.data.download import script_main

DATASET = "ixi"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, download and convert; return the exit status."""
    return script_main(DATASET, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())

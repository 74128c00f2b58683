"""Download real brain-MRI datasets: registry, resumable HTTP, checksums, safe extraction.

``download_dataset(name, out_dir)`` (``fedsparse download NAME``, ``data_download/<name>.py``)
shows the licence / data-use terms and the sizes, fetches the files into ``OUT/sourcedata/``
(the BIDS place for source data), verifies them, unpacks archives safely and converts the
dataset to the package's BIDS-like layout in ``OUT`` (:mod:`.convert`).

Downloads
    Resumable: bytes arrive in ``FILE.part``; an interrupted transfer continues from there with an
    HTTP ``Range`` request (within a call, up to ``max_attempts`` tries, and on the next call); a
    server that ignores ``Range`` (answers 200) restarts the file cleanly. A file is renamed to its
    final name only once complete and verified.
Checksums
    A digest published for a file (see :data:`DATASETS`) is checked. Every file's sha256 and size
    are recorded on first download in ``OUT/sourcedata/checksums.lock.json`` and checked on every
    later use, so a file that changes (on disk or upstream) is detected even where the provider
    publishes no checksum (trust on first use). A fresh download that does not match is deleted;
    a file already on disk that does not match is refused and left for inspection; both raise
    :class:`ChecksumError`, naming the file and the expected and actual digests.
Archives
    Every member is checked before anything is written; an archive with an absolute path, a
    ``..`` component, a link leaving the target, a path through a link, or a device / FIFO member
    is refused as a whole (:class:`UnsafeArchiveError`). Extraction goes to a temporary folder
    renamed when complete, and uses tarfile's ``data`` filter as a second line of defence.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.util
import json
import logging
import sys
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path

from .. import __version__

# The conversion (nibabel, pandas) is imported when needed, so that building a command-line parser
# with add_download_arguments stays fast.

__all__ = [
    "script_main",
    "DATASETS",
    "LOCKFILE_NAME",
    "ChecksumError",
    "DatasetInfo",
    "DownloadError",
    "PlannedFile",
    "RemoteFile",
    "TermsNotAcceptedError",
    "UnsafeArchiveError",
    "add_download_arguments",
    "describe_dataset",
    "download_dataset",
    "extract_archive",
    "fetch_url",
    "file_digests",
    "plan_download",
    "run_download",
    "unsafe_members",
]

logger = logging.getLogger(__name__)

StrPath = str | PathLike[str]

#: Name of the lockfile of recorded digests, in ``OUT/sourcedata/``.
LOCKFILE_NAME = "checksums.lock.json"
SOURCEDATA = "sourcedata"
PARTICIPANTS_FILE = "participants.tsv"
#: OASIS-1 image choices (same as :data:`fedsparse_lib.data.convert.OASIS1_IMAGES`).
OASIS1_IMAGES: tuple[str, ...] = ("processed", "raw")
_USER_AGENT = f"fedsparse/{__version__} (dataset downloader)"
_CHUNK_BYTES = 1 << 20
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_FILTER_ERROR = getattr(tarfile, "FilterError", tarfile.TarError)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class DownloadError(RuntimeError):
    """A file could not be fetched, verified or unpacked; the message names it."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ChecksumError(DownloadError):
    """A file's size or digest differs from the published or recorded one."""


class UnsafeArchiveError(DownloadError):
    """An archive has members that would land outside the target folder (or are devices)."""


class TermsNotAcceptedError(DownloadError):
    """The dataset's data-use agreement must be accepted (``accept_terms=True``) first."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    Attributes
    ----------
    path : str
        POSIX path relative to the dataset's base URL; also where it is stored under
        ``OUT/sourcedata/``.
    url : str or None
        Absolute URL when the file is not under the base URL (ignored when ``base_url`` is
        overridden: a mirror serves every file under its base).
    approx_bytes : int or None
        Approximate size, for display.
    size_bytes : int or None
        Exact size in bytes, checked when given.
    md5, sha256 : str or None
        Published hex digests, checked when given.
    checksum_source : str
        Who publishes the digest.
    """

    path: str
    url: str | None = None
    approx_bytes: int | None = None
    size_bytes: int | None = None
    md5: str | None = None
    sha256: str | None = None
    checksum_source: str = ""

    def url_from(self, base_url: str | None, default_base: str) -> str:
        """The file's URL, under ``base_url`` when given."""
        if base_url is None and self.url:
            return self.url
        base = (base_url or default_base).rstrip("/")
        return f"{base}/{urllib.parse.quote(self.path)}"


@dataclass(frozen=True)
class DatasetInfo:
    """A downloadable dataset.

    Attributes
    ----------
    name : str
        Registry key (``fedsparse download NAME``).
    title, licence, terms, homepage, citation : str
        What is shown before anything is fetched; ``terms`` is the licence or data-use text.
    base_url : str
        Default base URL of ``files`` (overridable, e.g. a mirror or a test server).
    files : tuple of RemoteFile
        Files fetched first.
    requires_acceptance : bool
        Whether the terms are an agreement that must be accepted (``accept_terms=True``).
    per_subject : str or None
        For BIDS sources: the path pattern of the per-participant file fetched for each row of
        the fetched ``participants.tsv``, with ``{participant_id}``.
    per_subject_count, per_subject_approx_bytes : int or None
        Approximate number and size of the per-participant files, for display.
    archives : tuple of str
        Paths in ``files`` that are archives to unpack.
    """

    name: str
    title: str
    licence: str
    terms: str
    homepage: str
    citation: str
    base_url: str
    files: tuple[RemoteFile, ...]
    requires_acceptance: bool = False
    per_subject: str | None = None
    per_subject_count: int | None = None
    per_subject_approx_bytes: int | None = None
    archives: tuple[str, ...] = ()

    @property
    def approx_total_bytes(self) -> int:
        """Approximate total download size in bytes."""
        total = sum(f.size_bytes or f.approx_bytes or 0 for f in self.files)
        if self.per_subject_count and self.per_subject_approx_bytes:
            total += self.per_subject_count * self.per_subject_approx_bytes
        return total


_GB, _MB, _KB = 1_000_000_000, 1_000_000, 1_000
_OASIS_DISCS = tuple(f"oasis_cross-sectional_disc{i}.tar.gz" for i in range(1, 13))

#: The datasets ``download_dataset`` knows. Sizes are approximate unless ``size_bytes`` is given;
#: only the IXI T1 archive has a published digest (an md5, published by TorchIO); every other
#: file is verified against the lockfile written on its first download.
DATASETS: dict[str, DatasetInfo] = {
    "ixi": DatasetInfo(
        name="ixi",
        title="IXI (Information eXtraction from Images), T1 scans",
        licence="CC BY-SA 3.0",
        terms=(
            "The IXI dataset (Imperial College London, EPSRC GR/S21533/02) holds about 600 MR sessions of "
            "healthy adults aged 20-86 from three London hospitals: Guy's (Philips 1.5 T), Hammersmith "
            "(Philips 3 T) and the Institute of Psychiatry (GE 1.5 T); 581 have a T1 scan.\n"
            "Licence: Creative Commons Attribution-ShareAlike 3.0 Unported (CC BY-SA 3.0), "
            "https://creativecommons.org/licenses/by-sa/3.0/ . You may share and adapt the data for any "
            "purpose if you credit the IXI dataset and share what you derive from it under the same licence."
        ),
        homepage="https://brain-development.org/ixi-dataset/",
        citation="IXI dataset, https://brain-development.org/ixi-dataset/",
        base_url="http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI",
        files=(
            RemoteFile("IXI-T1.tar", approx_bytes=4_800 * _MB, md5="34901a0593b41dd19c1a1f746eac2d58",
                       checksum_source="md5 published by TorchIO (torchio.datasets.IXI)"),
            RemoteFile("IXI.xls", approx_bytes=300 * _KB),
        ),
        archives=("IXI-T1.tar",),
    ),
    "oasis1": DatasetInfo(
        name="oasis1",
        title="OASIS-1: cross-sectional MRI data in young, middle aged, nondemented and demented older adults",
        licence="OASIS data use agreement",
        terms=(
            "OASIS-1 holds 416 subjects aged 18-96 (100 of those over 60 with very mild to moderate "
            "Alzheimer's disease), 3-4 T1 MPRAGE scans each (Siemens Vision 1.5 T, Washington University), "
            "plus 20 nondemented subjects rescanned within 90 days.\n"
            "Data use agreement (summary; the text at https://www.oasis-brains.org is authoritative). By "
            "downloading you agree:\n"
            "  1. not to use the data, alone or with other information, to try to identify or contact any "
            "participant, nor to generate face or head renderings that could allow re-identification;\n"
            "  2. not to share or redistribute the data, in whole or in part, to third parties without "
            "permission from OASIS;\n"
            "  3. to acknowledge OASIS in any presentation or publication: 'Data were provided by OASIS-1: "
            "Cross-Sectional: Principal Investigators: D. Marcus, R. Buckner, J. Csernansky, J. Morris; "
            "P50 AG05681, P01 AG03991, P01 AG026276, R01 AG021910, P20 MH071616, U24 RR021382', and to "
            "cite Marcus et al. (2007);\n"
            "  4. that failing to abide by these terms ends your access to OASIS data."
        ),
        homepage="https://www.oasis-brains.org",
        citation="Marcus DS, Wang TH, Parker J, Csernansky JG, Morris JC, Buckner RL (2007). Open Access Series "
                 "of Imaging Studies (OASIS): cross-sectional MRI data in young, middle aged, nondemented, and "
                 "demented older adults. J Cogn Neurosci 19(9):1498-1507. doi:10.1162/jocn.2007.19.9.1498",
        base_url="https://download.nrg.wustl.edu/data",
        files=(
            RemoteFile("oasis_cross-sectional.csv", url="https://www.oasis-brains.org/files/oasis_cross-sectional.csv",
                       approx_bytes=30 * _KB),
            *(RemoteFile(disc, approx_bytes=1_500 * _MB) for disc in _OASIS_DISCS),
        ),
        requires_acceptance=True,
        archives=_OASIS_DISCS,
    ),
    "ds000030": DatasetInfo(
        name="ds000030",
        title="UCLA Consortium for Neuropsychiatric Phenomics LA5c study (OpenNeuro ds000030), T1w scans",
        licence="CC0",
        terms=(
            "OpenNeuro ds000030: 272 adults aged 21-50 (healthy controls and patients with schizophrenia, "
            "bipolar disorder or ADHD; see the 'diagnosis' column), scanned on 3 T Siemens Trio scanners at "
            "UCLA; about 262 have a T1w scan. Only participants.tsv and the T1w scans are fetched.\n"
            "Licence: CC0 1.0 (public domain dedication), https://creativecommons.org/publicdomain/zero/1.0/ . "
            "No conditions; please cite the data papers."
        ),
        homepage="https://openneuro.org/datasets/ds000030",
        citation="Poldrack RA et al. (2016). A phenome-wide examination of neural and cognitive function. "
                 "Sci Data 3:160110. Gorgolewski KJ, Durnez J, Poldrack RA (2017). Preprocessed Consortium for "
                 "Neuropsychiatric Phenomics dataset. F1000Research 6:1262.",
        base_url="https://s3.amazonaws.com/openneuro.org/ds000030",
        files=(
            RemoteFile("participants.tsv", approx_bytes=25 * _KB),
            RemoteFile("dataset_description.json", approx_bytes=2 * _KB),
        ),
        per_subject="{participant_id}/anat/{participant_id}_T1w.nii.gz",
        per_subject_count=262,
        per_subject_approx_bytes=10 * _MB,
    ),
}


def _get(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------------
# Digests and the lockfile
# --------------------------------------------------------------------------------------------
def file_digests(path: StrPath, algorithms: Iterable[str] = ("md5", "sha256")) -> dict[str, str]:
    """Hex digests of a file, read once in 1 MiB blocks.

    Returns
    -------
    dict
        ``{algorithm: hexdigest}`` for each requested hashlib algorithm.
    """
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK_BYTES):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _verify(path: Path, expected: Mapping[str, tuple[str, str]], size: tuple[int, str] | None) -> dict[str, str]:
    """Check a file's size and digests; return its digests or raise ChecksumError listing every mismatch.

    ``expected`` maps an algorithm to (hex digest, where it comes from); ``size`` is (bytes, source).
    """
    actual_size = path.stat().st_size
    digests = file_digests(path, {"md5", "sha256", *expected})
    problems = []
    if size is not None and size[0] != actual_size:
        problems.append(f"size: expected {size[0]} bytes ({size[1]}), got {actual_size} bytes")
    for algorithm, (digest, source) in expected.items():
        if digest.lower() != digests[algorithm]:
            problems.append(f"{algorithm}: expected {digest.lower()} ({source}), got {digests[algorithm]}")
    if problems:
        raise ChecksumError(f"{path}: checksum verification failed: " + "; ".join(problems))
    return digests


def _load_lock(path: Path) -> dict:
    if not path.exists():
        return {"format": 1, "files": {}}
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(lock, dict) or not isinstance(lock.get("files"), dict):
            raise ValueError("no 'files' object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DownloadError(f"{path}: unreadable lockfile ({err}); fix or delete it (its digests are then "
                            "recorded again on the next download)") from err
    return lock


def _save_lock(path: Path, lock: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(lock, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Resumable HTTP
# --------------------------------------------------------------------------------------------
class _Retry(Exception):
    """A transient failure: try again (resuming from the .part file)."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a ``Content-Range`` header such as ``bytes 100-199/200`` or ``bytes */200``."""
    match = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value or "")
    if match is None:
        return None, None
    start = int(match[1]) if match[1] is not None else None
    total = int(match[2]) if match[2] != "*" else None
    return start, total


def _fetch_once(opener: urllib.request.OpenerDirector, url: str, part: Path, *, timeout_s: float,
                progress_fn: Callable[[int, int | None, int], None]) -> None:
    """One HTTP request appending to (or restarting) ``part``; raise _Retry when it must go on."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:
                return  # the .part file already holds the whole file
            logger.info("%s: the partial file (%d bytes) does not fit the server's file; restarting", part, offset)
            part.unlink()
            raise _Retry("range not satisfiable") from err
        if err.code in _RETRY_STATUSES:
            raise _Retry(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}", status=err.code) from err
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused connections
        raise _Retry(f"{type(err).__name__}: {err}") from err

    with response:
        status = response.status or 200  # file:// URLs have no status
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retry(f"server answered bytes from {start} to a request from {offset}")
            mode = "ab"
        elif status == 200:
            if offset:
                logger.info("%s: the server ignored the Range request; restarting from byte 0", url)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}", status=status)
        received = offset
        progress_fn(offset, total, 0)
        with open(part, mode) as fh:
            while True:
                try:
                    chunk = response.read(_CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as err:
                    raise _Retry(f"connection lost after {received} bytes: {err}") from err
                if not chunk:
                    break
                fh.write(chunk)
                received += len(chunk)
                progress_fn(offset, total, len(chunk))
    if total is not None and received < total:
        raise _Retry(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.unlink()
        raise DownloadError(f"{url}: received {received} bytes, more than the announced {total}")


def _download(url: str, part: Path, *, progress: bool, timeout_s: float, max_attempts: int,
              retry_wait_s: float) -> None:
    """Fill ``part`` with the whole file at ``url``, resuming it; bounded in attempts."""
    from tqdm.auto import tqdm

    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    part.parent.mkdir(parents=True, exist_ok=True)
    opener = urllib.request.build_opener()  # reads the proxy settings of the environment now
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")],
               disable=not progress, leave=False)

    def progress_fn(offset: int, total: int | None, n: int) -> None:
        if n == 0:
            bar.reset(total=total)
            bar.update(offset)
        else:
            bar.update(n)

    try:
        for attempt in range(1, max_attempts + 1):
            try:
                _fetch_once(opener, url, part, timeout_s=timeout_s, progress_fn=progress_fn)
                return
            except _Retry as err:
                size = part.stat().st_size if part.exists() else 0
                if attempt == max_attempts:
                    raise DownloadError(
                        f"{url}: download incomplete after {max_attempts} attempt(s) ({err}); {size} bytes kept "
                        f"in {part}: run again to resume") from err
                wait = min(retry_wait_s * 2 ** (attempt - 1), 60.0)
                logger.warning("%s: %s; retrying from byte %d in %.1f s (attempt %d of %d)", url, err, size, wait,
                               attempt + 1, max_attempts)
                time.sleep(wait)
    finally:
        bar.close()


def fetch_url(
    url: str,
    dest: StrPath,
    *,
    size_bytes: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout_s: float = 60.0,
    max_attempts: int = 8,
    retry_wait_s: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest``, resumably, and verify it.

    Bytes go to ``dest + ".part"``. A lost connection is retried with ``Range: bytes=N-`` (N the
    bytes already there), waiting ``retry_wait_s * 2**k`` seconds (at most 60) between attempts;
    a server that ignores ``Range`` sends the whole file again, which replaces the part. A
    ``.part`` left by an earlier call is resumed the same way. The file is renamed to ``dest``
    only when complete and verified.

    Parameters
    ----------
    url : str
        HTTP(S) URL.
    dest : str or path-like
        Final path; an existing ``dest`` is verified, not fetched again.
    size_bytes : int, optional
        Expected size in bytes.
    md5, sha256 : str, optional
        Expected hex digests.
    progress : bool, default True
        Show a progress bar (tqdm).
    timeout_s : float, default 60
        Socket timeout of each request, in seconds.
    max_attempts : int, default 8
        Requests made before giving up (the ``.part`` file is kept for a later call).
    retry_wait_s : float, default 1
        First wait between attempts, in seconds.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    DownloadError
        HTTP error (``status`` attribute), or still incomplete after ``max_attempts``.
    ChecksumError
        The size or a digest differs: a fresh download is deleted; an existing ``dest`` is left
        in place and refused.
    """
    dest = Path(dest)
    expected = {a: (d, "expected") for a, d in (("md5", md5), ("sha256", sha256)) if d}
    size = (size_bytes, "expected") if size_bytes is not None else None
    if dest.exists():
        _verify_existing(dest, expected, size)
        return dest
    _fetch_verified(url, dest, expected, size, progress=progress, timeout_s=timeout_s, max_attempts=max_attempts,
                    retry_wait_s=retry_wait_s)
    return dest


def _verify_existing(dest: Path, expected: Mapping[str, tuple[str, str]], size: tuple[int, str] | None) -> dict:
    try:
        return _verify(dest, expected, size)
    except ChecksumError as err:
        raise ChecksumError(f"{err}. The file already on disk was not modified; delete it to download it again") \
            from None


def _fetch_verified(url: str, dest: Path, expected: Mapping[str, tuple[str, str]], size: tuple[int, str] | None,
                    **options: object) -> dict[str, str]:
    part = dest.with_name(dest.name + ".part")
    _download(url, part, **options)  # type: ignore[arg-type]
    try:
        digests = _verify(part, expected, size)
    except ChecksumError as err:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{str(err).replace(str(part), str(dest), 1)}. The corrupt download was deleted; "
                            "run again to download it afresh") from None
    os.replace(part, dest)
    return digests


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------
def _path_problem(name: str) -> str | None:
    if not name or name in (".", "./"):
        return None if name else "empty member name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' component (path traversal)"
    return None


def _inside(target: str) -> bool:
    """Whether a relative POSIX path, normalised, stays inside the extraction folder."""
    norm = posixpath.normpath(target)
    return not (norm == ".." or norm.startswith("../") or posixpath.isabs(norm))


def unsafe_members(archive: StrPath) -> list[tuple[str, str]]:
    """Members of a tar or zip archive that would not be extracted safely.

    Parameters
    ----------
    archive : str or path-like
        A ``.tar``, ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar.xz`` or ``.zip`` file.

    Returns
    -------
    list of (member name, problem)
        Absolute paths, ``..`` components, paths through a symbolic link of the archive, links
        (symbolic or hard) whose target is absolute or leaves the folder, device files, FIFOs and
        zip symbolic links. Empty when the archive is safe.

    Raises
    ------
    DownloadError
        If the file is not a readable tar or zip archive.
    """
    archive = Path(archive)
    problems: list[tuple[str, str]] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    problem = _path_problem(info.filename)
                    if problem is None and stat.S_ISLNK(info.external_attr >> 16):
                        problem = "symbolic link (not allowed in zip archives)"
                    if problem:
                        problems.append((info.filename, problem))
            return problems
        with tarfile.open(archive) as tf:
            links: set[str] = set()
            for member in tf:
                name = member.name
                problem = _path_problem(name)
                norm = posixpath.normpath(name)
                parents = [posixpath.join(*norm.split("/")[:i]) for i in range(1, norm.count("/") + 1)]
                if problem is None and any(p in links for p in parents):
                    problem = "path goes through a symbolic link of the archive"
                if problem is None and (member.isdev() or member.isfifo()):
                    problem = "device file or FIFO"
                if problem is None and member.issym():
                    target = member.linkname
                    if posixpath.isabs(target) or not _inside(posixpath.join(posixpath.dirname(norm), target)):
                        problem = f"symbolic link pointing outside the target ({target})"
                    links.add(norm)
                if problem is None and member.islnk():
                    if posixpath.isabs(member.linkname) or not _inside(member.linkname):
                        problem = f"hard link pointing outside the target ({member.linkname})"
                if problem:
                    problems.append((name, problem))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise DownloadError(f"{archive}: not a readable tar or zip archive: {err}") from err
    return problems


def extract_archive(archive: StrPath, dest: StrPath, *, select_fn: Callable[[str], bool] | None = None) -> Path:
    """Extract an archive safely into a new folder.

    Parameters
    ----------
    archive : str or path-like
        Tar (optionally compressed) or zip file.
    dest : str or path-like
        Folder to create; it must not exist. The members are extracted into a temporary sibling
        folder, renamed to ``dest`` when all are written, so ``dest`` is complete or absent.
    select_fn : callable, optional
        ``select_fn(member_name) -> bool``: extract only these members (every member is still
        checked for safety).

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    UnsafeArchiveError
        If any member is unsafe (see :func:`unsafe_members`); nothing is written.
    FileExistsError
        If ``dest`` exists.
    """
    archive, dest = Path(archive), Path(dest)
    problems = unsafe_members(archive)
    if problems:
        shown = "; ".join(f"{name!r}: {why}" for name, why in problems[:10])
        more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise UnsafeArchiveError(f"{archive}: refusing to extract an unsafe archive, {len(problems)} unsafe "
                                 f"member(s): {shown}{more}")
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if select_fn is None or select_fn(n)]
                zf.extractall(tmp, members=names)
        else:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if select_fn is None or select_fn(m.name)]
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters; members checked above
                    tf.extractall(tmp, members=members)
        os.replace(tmp, dest)
    except _FILTER_ERROR as err:
        raise UnsafeArchiveError(f"{archive}: refusing to extract: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFile:
    """A file ``download_dataset`` would fetch.

    Attributes
    ----------
    url : str
    dest : pathlib.Path
        Where it is stored.
    approx_bytes : int or None
        Size (exact when known, else approximate).
    verification : str
        How it is checked (published digest, lockfile, or recorded on first download).
    state : str
        ``"to fetch"``, ``"partial (N bytes)"`` (resumed) or ``"present"`` (verified, not fetched).
    """

    url: str
    dest: Path
    approx_bytes: int | None
    verification: str
    state: str


def _human(n: int | None) -> str:
    if not n:
        return "size unknown"
    for unit, scale in (("GB", _GB), ("MB", _MB), ("kB", _KB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _state(dest: Path) -> str:
    if dest.exists():
        return "present"
    part = dest.with_name(dest.name + ".part")
    return f"partial ({part.stat().st_size} bytes)" if part.exists() else "to fetch"


def _verification(file: RemoteFile, lock: Mapping) -> str:
    ways = []
    if file.md5 or file.sha256:
        ways.append(file.checksum_source or "published digest")
    if file.path in lock.get("files", {}):
        ways.append(f"sha256 in {LOCKFILE_NAME}")
    return " + ".join(ways) or f"sha256 recorded in {LOCKFILE_NAME} on first download"


def _subject_files(info: DatasetInfo, sourcedata: Path) -> list[RemoteFile] | None:
    """Per-participant files listed by a fetched participants.tsv (None until it is fetched)."""
    if info.per_subject is None:
        return []
    tsv = sourcedata / PARTICIPANTS_FILE
    if not tsv.exists():
        return None
    import pandas as pd

    table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    files = []
    for _, row in table.iterrows():
        pid = str(row.get("participant_id", "")).strip()
        if not re.fullmatch(r"sub-[A-Za-z0-9]+", pid):
            continue
        if "T1w" in table.columns and str(row["T1w"]).strip() not in ("1", "1.0", "True", "true"):
            continue  # the dataset says there is no T1w scan; convert reports the subject excluded
        if str(row.get("age", "x")).strip().lower() in ("", "n/a", "nan"):
            continue  # no age: excluded by the conversion, no need to fetch its scan
        files.append(RemoteFile(info.per_subject.format(participant_id=pid),
                                approx_bytes=info.per_subject_approx_bytes))
    return files


def plan_download(name: str, out_dir: StrPath, *, base_url: str | None = None) -> list[PlannedFile]:
    """What :func:`download_dataset` would fetch, from local state only (no network).

    For a BIDS source whose ``participants.tsv`` has not been fetched yet, the per-participant
    files are not listed (:func:`describe_dataset` gives their approximate number and size).
    """
    info = _get(name)
    sourcedata = Path(out_dir) / SOURCEDATA
    lock = _load_lock(sourcedata / LOCKFILE_NAME)
    files = list(info.files) + (_subject_files(info, sourcedata) or [])
    return [PlannedFile(url=f.url_from(base_url, info.base_url), dest=sourcedata / f.path,
                        approx_bytes=f.size_bytes or f.approx_bytes, verification=_verification(f, lock),
                        state=_state(sourcedata / f.path)) for f in files]


def describe_dataset(name: str) -> str:
    """The notice shown before fetching: title, licence / data-use terms, citation, total size."""
    info = _get(name)
    lines = [f"{info.title}", f"Licence: {info.licence}   Home page: {info.homepage}", "", info.terms, "",
             f"Please cite: {info.citation}"]
    size = f"about {_human(info.approx_total_bytes)} in total"
    if info.per_subject:
        size += (f" (metadata, then one file per participant, ~{info.per_subject_count} x "
                 f"{_human(info.per_subject_approx_bytes)})")
    lines.append(f"Download size: {size}.")
    if info.requires_acceptance:
        lines.append("This is a data-use AGREEMENT: pass --accept-terms (accept_terms=True) to agree and download.")
    return "\n".join(lines)


def _format_plan(plan: list[PlannedFile], out_dir: Path, *, dry_run: bool) -> str:
    head = "Dry run, nothing is fetched. Would fetch" if dry_run else "Fetching"
    total = sum(p.approx_bytes or 0 for p in plan if p.state != "present")
    lines = [f"{head} {sum(p.state != 'present' for p in plan)} of {len(plan)} file(s), about {_human(total)}, "
             f"into {out_dir / SOURCEDATA}:"]
    for p in plan:
        lines.append(f"  {p.url}\n      {_human(p.approx_bytes)} -> {p.dest}  [{p.state}; {p.verification}]")
    lines.append(f"then convert into {out_dir} (participants.tsv, sub-*/anat/sub-*_T1w.nii.gz).")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def _obtain(file: RemoteFile, url: str, sourcedata: Path, lock: dict, **options: object) -> Path:
    """Fetch (or verify the existing copy of) one file; record its sha256 in the lock on first sight."""
    dest = sourcedata / file.path
    lock_path = sourcedata / LOCKFILE_NAME
    expected = {a: (d, file.checksum_source or "published") for a, d in (("md5", file.md5), ("sha256", file.sha256))
                if d}
    entry = lock["files"].get(file.path)
    size = (file.size_bytes, "published") if file.size_bytes is not None else None
    if entry:
        if "sha256" in expected and expected["sha256"][0].lower() != entry["sha256"]:
            raise ChecksumError(f"{lock_path}: records sha256 {entry['sha256']} for {file.path} but the registry "
                                f"publishes {expected['sha256'][0]}; delete the lockfile entry")
        expected.setdefault("sha256", (entry["sha256"], f"recorded in {lock_path} on {entry.get('recorded', '?')}"))
        size = size or (int(entry["size"]), f"recorded in {lock_path}")
    if dest.exists():
        logger.info("verifying %s", dest)
        digests = _verify_existing(dest, expected, size)
    else:
        logger.info("fetching %s -> %s", url, dest)
        digests = _fetch_verified(url, dest, expected, size, **options)
    if not entry:
        lock["files"][file.path] = {
            "url": url, "size": dest.stat().st_size, "sha256": digests["sha256"], "md5": digests["md5"],
            "verified_against": sorted(f"{a} ({s})" for a, (_, s) in expected.items()) or ["nothing published"],
            "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _save_lock(lock_path, lock)
        if not expected:
            logger.info("%s: no published checksum; recorded sha256 %s in %s (checked on every later run)",
                        dest, digests["sha256"], lock_path)
    return dest


def download_dataset(
    name: str,
    out_dir: StrPath,
    *,
    dry_run: bool = False,
    base_url: str | None = None,
    progress: bool = True,
    accept_terms: bool = False,
    notice_fn: Callable[[str], None] | None = None,
    demographics: StrPath | None = None,
    image: str = "processed",
    keep_extracted: bool = False,
    overwrite: bool = False,
    timeout_s: float = 60.0,
    max_attempts: int = 8,
    retry_wait_s: float = 1.0,
) -> Path:
    """Fetch a real dataset, verify it, and convert it to the package's BIDS-like layout.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`: ``"ixi"``, ``"oasis1"`` or ``"ds000030"``.
    out_dir : str or path-like
        Dataset folder. Downloads, the lockfile and (temporarily) extracted archives live in
        ``out_dir/sourcedata/``; the converted dataset in ``out_dir``.
    dry_run : bool, default False
        Show the terms and the files that would be fetched (URLs, sizes, destinations); fetch
        nothing, write nothing.
    base_url : str, optional
        Fetch every file from this base URL instead (a mirror; the tests' local server).
    progress : bool, default True
        Progress bars.
    accept_terms : bool, default False
        Agree to a data-use agreement (OASIS-1); required to fetch such a dataset.
    notice_fn : callable, optional
        ``notice_fn(text)`` shows the terms and the plan before fetching; default ``logger.info``
        (command-line front ends pass their print function).
    demographics : str or path-like, optional
        IXI only: the demographics as a CSV export of ``IXI.xls`` (or any sheet
        :func:`~fedsparse_lib.data.convert.read_ixi_demographics` reads). Default: the fetched
        ``IXI.xls``, which needs the ``xlrd`` package.
    image : {"processed", "raw"}, default "processed"
        OASIS-1 only: which image of each session, see
        :func:`~fedsparse_lib.data.convert.convert_oasis1`.
    keep_extracted : bool, default False
        Keep the extracted archives in ``sourcedata/`` after conversion.
    overwrite : bool, default False
        Convert again over an already converted dataset (otherwise it is returned as is, without
        any network access).
    timeout_s, max_attempts, retry_wait_s
        Per-file download options, see :func:`fetch_url`.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    TermsNotAcceptedError
        The dataset has a data-use agreement and ``accept_terms`` is False (nothing fetched).
    DownloadError, ChecksumError, UnsafeArchiveError
        See :func:`fetch_url` and :func:`extract_archive`.
    """
    info = _get(name)
    if demographics is not None and name != "ixi":
        raise ValueError(f"demographics applies to the IXI dataset only, not {name!r}")
    if image not in OASIS1_IMAGES:
        raise ValueError(f"image must be one of {OASIS1_IMAGES}, got {image!r}")
    notice = notice_fn or logger.info
    out_dir = Path(out_dir)
    notice(describe_dataset(name))
    complete = (out_dir / PARTICIPANTS_FILE).exists()
    if complete and not overwrite:
        notice(f"{out_dir} already holds the converted dataset; nothing to do (overwrite=True / --overwrite "
               "converts again)")
        return out_dir
    notice(_format_plan(plan_download(name, out_dir, base_url=base_url), out_dir, dry_run=dry_run))
    if name == "ixi" and demographics is None and importlib.util.find_spec("xlrd") is None:
        notice("Note: reading IXI.xls needs the 'xlrd' package, which is not installed. Install it (pip install "
               "xlrd), or export OUT/sourcedata/IXI.xls as CSV once downloaded and pass --demographics FILE.csv "
               "(demographics=...); without either the conversion stops after the download.")
    if dry_run:
        return out_dir
    if info.requires_acceptance and not accept_terms:
        raise TermsNotAcceptedError(
            f"{info.title} is distributed under a data-use agreement (shown above, authoritative text at "
            f"{info.homepage}); read it, then pass --accept-terms (accept_terms=True) to agree and download")

    sourcedata = out_dir / SOURCEDATA
    sourcedata.mkdir(parents=True, exist_ok=True)
    lock = _load_lock(sourcedata / LOCKFILE_NAME)
    options = {"progress": progress, "timeout_s": timeout_s, "max_attempts": max_attempts,
               "retry_wait_s": retry_wait_s}
    for file in info.files:
        _obtain(file, file.url_from(base_url, info.base_url), sourcedata, lock, **options)
    for file in _subject_files(info, sourcedata) or []:
        try:
            _obtain(file, file.url_from(base_url, info.base_url), sourcedata, lock, **options)
        except DownloadError as err:
            if err.status != 404:
                raise
            logger.warning("%s: not on the server (HTTP 404); the participant will be excluded", file.path)

    from .convert import convert_bids, convert_ixi, convert_oasis1

    extracted: list[Path] = []
    if name == "ixi":
        folder = _extracted(sourcedata, "IXI-T1.tar", extracted)
        convert_ixi(folder, demographics if demographics is not None else sourcedata / "IXI.xls", out_dir,
                    progress=progress, overwrite=overwrite)
    elif name == "oasis1":
        pattern = {"processed": "/PROCESSED/MPRAGE/T88_111/", "raw": "/RAW/"}[image]
        suffix = {"processed": "_t88_masked_gfc.", "raw": "_mpr-1_anon."}[image]

        def select_fn(member: str) -> bool:
            return pattern in f"/{member}" and suffix in member.rsplit("/", 1)[-1]

        folders = [_extracted(sourcedata, disc, extracted, select_fn=select_fn, tag=image) for disc in info.archives]
        convert_oasis1(folders, sourcedata / "oasis_cross-sectional.csv", out_dir, image=image,
                       progress=progress, overwrite=overwrite)
    else:
        convert_bids(sourcedata, out_dir, site="UCLA", sex_column="gender", keep_columns=("diagnosis",),
                     progress=progress, overwrite=overwrite)
    # Extracted archives are removed only after a successful conversion: a failed one (e.g. IXI.xls
    # without xlrd) is retried without extracting again.
    if not keep_extracted:
        for folder in extracted:
            shutil.rmtree(folder, ignore_errors=True)
    return out_dir


def _extracted(sourcedata: Path, archive: str, made: list[Path], *, select_fn: Callable[[str], bool] | None = None,
               tag: str = "") -> Path:
    """The folder an archive is extracted to (extracting it unless a complete one is there)."""
    stem = re.sub(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz|zip)$", "", archive)
    folder = sourcedata / (f"{stem}.{tag}" if tag else stem)
    if not folder.exists():
        logger.info("extracting %s", sourcedata / archive)
        extract_archive(sourcedata / archive, folder, select_fn=select_fn)
    made.append(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Command-line front end (shared by data_download/*.py and ``fedsparse download``)
# --------------------------------------------------------------------------------------------
def add_download_arguments(parser: argparse.ArgumentParser, *, dataset: str | None = None) -> None:
    """Add the download options to a parser; a ``name`` argument too unless ``dataset`` is fixed."""
    if dataset is None:
        parser.add_argument("name", choices=sorted(DATASETS), help="dataset to download")
    parser.add_argument("--out", required=True, help="dataset folder (downloads go to OUT/sourcedata/)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be fetched; fetch nothing")
    parser.add_argument("--accept-terms", action="store_true", help="agree to the dataset's data-use agreement")
    parser.add_argument("--base-url", default=None, help="fetch from this mirror instead of the provider")
    parser.add_argument("--overwrite", action="store_true", help="convert again over a converted dataset")
    parser.add_argument("--keep-extracted", action="store_true", help="keep extracted archives in OUT/sourcedata")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if dataset in (None, "ixi"):
        parser.add_argument("--demographics", default=None,
                            help="IXI: CSV export of IXI.xls (default: the fetched IXI.xls, which needs xlrd)")
    if dataset in (None, "oasis1"):
        parser.add_argument("--image", choices=OASIS1_IMAGES, default="processed",
                            help="OASIS-1: skull-stripped atlas-registered image (processed) or first raw MPRAGE")


def run_download(args: argparse.Namespace, *, echo_fn: Callable[[str], None], dataset: str | None = None) -> int:
    """Run :func:`download_dataset` from parsed arguments; return the exit status (0, or 2 on error)."""
    name = dataset or args.name
    try:
        out = download_dataset(
            name, args.out, dry_run=args.dry_run, base_url=args.base_url, progress=not args.no_progress,
            accept_terms=args.accept_terms, notice_fn=echo_fn, demographics=getattr(args, "demographics", None),
            image=getattr(args, "image", "processed"), keep_extracted=args.keep_extracted, overwrite=args.overwrite,
        )
    except (DownloadError, ValueError, OSError) as err:
        echo_fn(f"error: {err}")
        return 2
    if not args.dry_run:
        echo_fn(f"done: {out} (check it with: fedsparse check-data {out})")
    return 0


def script_main(dataset: str, argv: Sequence[str] | None = None, *, description: str | None = None) -> int:
    """Entry point of the ``data_download/<dataset>.py`` scripts: parse, download, convert; exit status."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    add_download_arguments(parser, dataset=dataset)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_download(args, echo_fn=_stdout_line, dataset=dataset)


def _stdout_line(text: str) -> None:
    sys.stdout.write(f"{text}\n")

"""Tests of fedsparse_lib.data.download against a local HTTP server on 127.0.0.1.

The server (a SimpleHTTPRequestHandler subclass that honours ``Range``) serves small archives the
tests build under tmp_path; it records every request, can drop the connection part-way through a
file, and can ignore ``Range`` like some real servers do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import io
import json
import re
import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.data import download as dl
from fedsparse_lib.data.download import (
    DATASETS,
    LOCKFILE_NAME,
    ChecksumError,
    DownloadError,
    RemoteFile,
    TermsNotAcceptedError,
    UnsafeArchiveError,
    download_dataset,
    extract_archive,
    fetch_url,
    plan_download,
    unsafe_members,
)
from fedsparse_lib.data.nifti import check_dataset

REPO = Path(__file__).resolve().parents[2]
FAST = {"timeout_s": 5.0, "max_attempts": 3, "retry_wait_s": 0.0}


# --------------------------------------------------------------------------------------------
# The local server
# --------------------------------------------------------------------------------------------
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support, request log, dropped connections."""

    def log_message(self, format: str, *args: object) -> None:  # silence the default stderr log
        pass

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:  # type: ignore[attr-defined]
            start, status = int(match[1]), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        drops = server.drops.get(self.path)  # type: ignore[attr-defined]
        if drops:
            body = body[: drops.pop(0)]  # send part of the body, then close the connection
            self.close_connection = True
        # Counted before writing: the client may have read everything before this thread's write returns.
        server.sent[self.path] += len(body)  # type: ignore[attr-defined]
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) serving tmp_path/www."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    httpd.daemon_threads = True
    httpd.requests, httpd.drops, httpd.ignore_range, httpd.sent = [], {}, False, Counter()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}", httpd=httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _nifti_bytes(seed: int) -> bytes:
    img = nib.Nifti1Image(np.random.default_rng(seed).integers(0, 1000, (8, 8, 8)).astype(np.int16),
                          np.diag([2.0, 2.0, 2.0, 1.0]))
    return img.to_bytes()  # uncompressed NIfTI-1 single file


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# fetch_url: resumable, verified
# --------------------------------------------------------------------------------------------
PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


def test_fetch_url_downloads_and_verifies(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "file.bin"

    fetch_url(f"{server.url}/file.bin", dest, sha256=_sha256(PAYLOAD), size_bytes=len(PAYLOAD), progress=False, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("file.bin.part").exists()
    assert server.httpd.requests == [("/file.bin", None)]


def test_dropped_connection_is_resumed_with_range_in_the_same_call(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    server.httpd.drops["/file.bin"] = [30_000]
    dest = tmp_path / "file.bin"

    fetch_url(f"{server.url}/file.bin", dest, sha256=_sha256(PAYLOAD), progress=False, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.httpd.requests == [("/file.bin", None), ("/file.bin", "bytes=30000-")]
    assert server.httpd.sent["/file.bin"] == len(PAYLOAD)  # nothing was sent twice


def test_interrupted_download_resumes_from_the_part_file_on_the_next_call(server: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    server.httpd.drops["/file.bin"] = [40_000]
    dest = tmp_path / "file.bin"
    url = f"{server.url}/file.bin"

    with pytest.raises(DownloadError, match=r"incomplete after 1 attempt.*40000 bytes kept.*run again to resume"):
        fetch_url(url, dest, progress=False, timeout_s=5.0, max_attempts=1)
    assert not dest.exists() and dest.with_name("file.bin.part").stat().st_size == 40_000

    fetch_url(url, dest, sha256=_sha256(PAYLOAD), progress=False, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.httpd.requests[-1] == ("/file.bin", "bytes=40000-")
    assert server.httpd.sent["/file.bin"] == len(PAYLOAD)


def test_server_ignoring_range_restarts_the_file_cleanly(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    server.httpd.ignore_range = True
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(b"\xff" * 5_000)  # stale bytes that do not match

    fetch_url(f"{server.url}/file.bin", dest, sha256=_sha256(PAYLOAD), progress=False, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.httpd.requests == [("/file.bin", "bytes=5000-")]


def test_complete_part_file_is_finished_without_refetching(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)

    fetch_url(f"{server.url}/file.bin", dest, sha256=_sha256(PAYLOAD), progress=False, **FAST)

    assert dest.read_bytes() == PAYLOAD
    assert server.httpd.sent["/file.bin"] == 0  # answered 416 with the total size


def test_connection_dropped_on_every_attempt_gives_up(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    server.httpd.drops["/file.bin"] = [10_000, 10_000, 10_000]

    with pytest.raises(DownloadError, match="incomplete after 3 attempt"):
        fetch_url(f"{server.url}/file.bin", tmp_path / "file.bin", progress=False, **FAST)

    assert len(server.httpd.requests) == 3
    assert (tmp_path / "file.bin.part").stat().st_size == 30_000  # kept for the next call


def test_checksum_mismatch_deletes_the_download_and_names_file_and_digests(server: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "file.bin"
    wrong = "0" * 64

    with pytest.raises(ChecksumError) as info:
        fetch_url(f"{server.url}/file.bin", dest, sha256=wrong, progress=False, **FAST)

    message = str(info.value)
    assert str(dest) in message and wrong in message and _sha256(PAYLOAD) in message and "deleted" in message
    assert not dest.exists() and not dest.with_name("file.bin.part").exists()


def test_truncated_file_is_detected_by_its_size(server: SimpleNamespace, tmp_path: Path) -> None:
    (server.root / "file.bin").write_bytes(PAYLOAD[:50_000])  # the server itself has a short file

    with pytest.raises(ChecksumError, match=rf"size: expected {len(PAYLOAD)} bytes.*got 50000 bytes"):
        fetch_url(f"{server.url}/file.bin", tmp_path / "file.bin", size_bytes=len(PAYLOAD), progress=False, **FAST)
    assert not (tmp_path / "file.bin").exists()


def test_http_404_is_an_error_naming_the_url(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404") as info:
        fetch_url(f"{server.url}/missing.bin", tmp_path / "missing.bin", progress=False, **FAST)
    assert info.value.status == 404
    assert len(server.httpd.requests) == 1  # not retried


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------
def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"evil") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info


def _malicious_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tf:
        tf.addfile(_member("ok/readme.txt", data=b"fine"), io.BytesIO(b"fine"))
        for info in members:
            tf.addfile(info, io.BytesIO(b"evil") if info.type == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([_member("../evil.txt")], "'..' component"),
        ([_member("ok/../../evil.txt")], "'..' component"),
        ([_member("/tmp/fedsparse-test-evil-absolute.txt")], "absolute path"),
        ([_member("etc", tarfile.SYMTYPE, "/etc")], "symbolic link pointing outside the target (/etc)"),
        ([_member("up", tarfile.SYMTYPE, "../..")], "symbolic link pointing outside"),
        ([_member("ok/link", tarfile.SYMTYPE, "."), _member("ok/link/evil.txt")], "through a symbolic link"),
        ([_member("hard", tarfile.LNKTYPE, "../outside.txt")], "hard link pointing outside"),
        ([_member("dev/null", tarfile.CHRTYPE)], "device file"),
        ([_member("fifo", tarfile.FIFOTYPE)], "device file or FIFO"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-etc", "symlink-up", "through-link", "hardlink", "chardev",
         "fifo"],
)
def test_unsafe_tar_is_refused_and_nothing_is_written(tmp_path: Path, members: list[tarfile.TarInfo],
                                                      problem: str) -> None:
    archive = _malicious_tar(tmp_path / "evil.tar", members)
    before = sorted(tmp_path.rglob("*"))
    target = tmp_path / "work" / "extracted"

    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, target)

    assert problem in str(info.value) and str(archive) in str(info.value)
    assert members[-1].name in str(info.value)
    assert sorted(tmp_path.rglob("*")) == before  # not the target, not a temporary folder, nothing outside
    assert not Path("/tmp/fedsparse-test-evil-absolute.txt").exists()


def test_unsafe_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../evil.txt", b"evil")

    assert unsafe_members(archive) == [("../evil.txt", "'..' component (path traversal)")]
    with pytest.raises(UnsafeArchiveError, match="evil.txt"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_safe_archive_with_an_internal_link_is_extracted(tmp_path: Path) -> None:
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.addfile(_member("data/a.txt", data=b"hello"), io.BytesIO(b"hello"))
        tf.addfile(_member("data/alias.txt", tarfile.SYMTYPE, "a.txt"))

    out = extract_archive(archive, tmp_path / "out", select_fn=lambda name: name.startswith("data/"))

    assert (out / "data" / "alias.txt").is_symlink() and (out / "data" / "alias.txt").read_bytes() == b"hello"
    assert unsafe_members(archive) == []
    assert not list(tmp_path.glob(".out.extract-*"))


def test_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not an archive at all" * 50)

    with pytest.raises(DownloadError, match=r"junk\.tar: not a readable tar or zip archive"):
        extract_archive(junk, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Whole datasets against the server
# --------------------------------------------------------------------------------------------
def _ixi_site(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *,
              publish_sha256: bool = True) -> Path:
    """Serve an IXI-like tar (4 tiny T1s) + IXI.xls; register its digest; return a demographics CSV."""
    members = {f"IXI{n:03d}-{site}-{scan}-T1.nii.gz": _gz(_nifti_bytes(n))
               for n, site, scan in [(2, "Guys", "0828"), (12, "HH", "1211"), (13, "HH", "1212"), (16, "IOP", "0889")]}
    tar = _tar(members)
    (server.root / "IXI-T1.tar").write_bytes(tar)
    (server.root / "IXI.xls").write_bytes(b"\xd0\xcf\x11\xe0 stand-in for the spreadsheet")
    info = DATASETS["ixi"]
    files = (RemoteFile("IXI-T1.tar", size_bytes=len(tar), sha256=_sha256(tar) if publish_sha256 else None,
                        checksum_source="test registry"), RemoteFile("IXI.xls"))
    monkeypatch.setitem(DATASETS, "ixi", dataclasses.replace(info, files=files))
    csv = tmp_path / "IXI.csv"
    csv.write_text("IXI_ID,\"SEX_ID (1=m, 2=f)\",AGE\n2,2,35.8\n12,1,38.78\n13,1,\n16,2,58.66\n16,2,58.66\n")
    return csv


def test_ixi_end_to_end(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    csv = _ixi_site(server, monkeypatch, tmp_path)
    out = tmp_path / "ixi"
    notices: list[str] = []

    result = download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv,
                              notice_fn=notices.append, **FAST)

    assert result == out
    assert "CC BY-SA 3.0" in notices[0] and "Download size" in notices[0]
    assert f"{server.url}/IXI-T1.tar" in notices[1]
    table = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str)
    assert table.to_dict("list") == {"participant_id": ["sub-IXI002", "sub-IXI012", "sub-IXI016"],
                                     "age": ["35.8", "38.78", "58.66"], "sex": ["F", "M", "F"],
                                     "site": ["Guys", "HH", "IOP"]}
    excluded = pd.read_csv(out / "excluded_participants.tsv", sep="\t", dtype=str)
    assert excluded[["participant_id", "reason"]].values.tolist() == [["sub-IXI013", "missing age"]]
    assert check_dataset(out).empty
    lock = json.loads((out / "sourcedata" / LOCKFILE_NAME).read_text())
    assert lock["files"]["IXI-T1.tar"]["sha256"] == _sha256((server.root / "IXI-T1.tar").read_bytes())
    assert lock["files"]["IXI.xls"]["verified_against"] == ["nothing published"]
    assert not (out / "sourcedata" / "IXI-T1").exists()  # extracted folder removed after conversion

    # A second run does nothing (no request); with overwrite it verifies the files on disk, fetches nothing.
    n_requests = len(server.httpd.requests)
    download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, notice_fn=notices.append)
    download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, notice_fn=notices.append,
                     overwrite=True)
    assert len(server.httpd.requests) == n_requests
    assert check_dataset(out).empty


def test_file_changed_on_disk_is_refused_by_the_lockfile(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    csv = _ixi_site(server, monkeypatch, tmp_path)
    out = tmp_path / "ixi"
    download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, **FAST)
    xls = out / "sourcedata" / "IXI.xls"
    recorded = json.loads((out / "sourcedata" / LOCKFILE_NAME).read_text())["files"]["IXI.xls"]["sha256"]
    xls.write_bytes(b"tampered")

    with pytest.raises(ChecksumError) as info:
        download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, overwrite=True, **FAST)

    message = str(info.value)
    assert str(xls) in message and recorded in message and _sha256(b"tampered") in message
    assert LOCKFILE_NAME in message and "not modified" in message
    assert xls.read_bytes() == b"tampered"  # refused, left for inspection


def test_upstream_change_is_detected_by_the_lockfile(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    csv = _ixi_site(server, monkeypatch, tmp_path, publish_sha256=False)
    out = tmp_path / "ixi"
    download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, **FAST)
    (out / "sourcedata" / "IXI-T1.tar").unlink()  # e.g. removed to save space
    (server.root / "IXI-T1.tar").write_bytes(_tar({"IXI002-Guys-0828-T1.nii.gz": _gz(_nifti_bytes(99))}))
    files = (RemoteFile("IXI-T1.tar"), RemoteFile("IXI.xls"))
    monkeypatch.setitem(DATASETS, "ixi", dataclasses.replace(DATASETS["ixi"], files=files))

    with pytest.raises(ChecksumError, match=r"IXI-T1\.tar: checksum verification failed.*recorded in"):
        download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, overwrite=True, **FAST)
    assert not (out / "sourcedata" / "IXI-T1.tar").exists() and not (out / "sourcedata" / "IXI-T1.tar.part").exists()


def test_published_checksum_mismatch_is_refused(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    csv = _ixi_site(server, monkeypatch, tmp_path)
    files = (RemoteFile("IXI-T1.tar", md5="0" * 32, checksum_source="test registry"), RemoteFile("IXI.xls"))
    monkeypatch.setitem(DATASETS, "ixi", dataclasses.replace(DATASETS["ixi"], files=files))
    out = tmp_path / "ixi"

    with pytest.raises(ChecksumError, match=r"IXI-T1\.tar: .*md5: expected 0{32} \(test registry\), got [0-9a-f]{32}"):
        download_dataset("ixi", out, base_url=server.url, progress=False, demographics=csv, **FAST)
    assert not (out / "sourcedata" / "IXI-T1.tar").exists()
    assert not (out / "participants.tsv").exists()


def test_ixi_dry_run_fetches_and_writes_nothing(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    _ixi_site(server, monkeypatch, tmp_path)
    out = tmp_path / "ixi"
    notices: list[str] = []

    download_dataset("ixi", out, dry_run=True, base_url=server.url, notice_fn=notices.append)

    text = "\n".join(notices)
    assert server.httpd.requests == [] and not out.exists()
    assert "Dry run" in text and f"{server.url}/IXI-T1.tar" in text and str(out / "sourcedata" / "IXI-T1.tar") in text
    assert "CC BY-SA 3.0" in text


def test_real_registry_dry_run_lists_provider_urls(tmp_path: Path) -> None:
    plan = plan_download("oasis1", tmp_path / "oasis")

    assert len(plan) == 13 and not (tmp_path / "oasis").exists()
    assert plan[0].url == "https://www.oasis-brains.org/files/oasis_cross-sectional.csv"
    assert plan[1].url == "https://download.nrg.wustl.edu/data/oasis_cross-sectional_disc1.tar.gz"
    assert all(p.state == "to fetch" for p in plan)
    ixi = plan_download("ixi", tmp_path / "ixi")
    assert ixi[0].verification.startswith("md5 published by TorchIO")


def _oasis_site(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve two OASIS-like disc archives (Analyze pairs, processed + raw) and the clinical CSV."""
    def analyze(seed: int) -> tuple[bytes, bytes]:
        scratch = server.root.parent / "analyze"
        scratch.mkdir(exist_ok=True)
        data = np.random.default_rng(seed).integers(0, 900, (8, 8, 8, 1)).astype(np.int16)
        nib.save(nib.AnalyzeImage(data, np.eye(4)), scratch / f"{seed}.img")
        return (scratch / f"{seed}.hdr").read_bytes(), (scratch / f"{seed}.img").read_bytes()

    discs = {1: ["OAS1_0001_MR1", "OAS1_0002_MR1"], 2: ["OAS1_0003_MR1"]}
    for disc, sessions in discs.items():
        members = {}
        for session in sessions:
            hdr, img = analyze(int(session[5:9]))
            base = f"disc{disc}/{session}"
            for folder, stem in ((f"{base}/PROCESSED/MPRAGE/T88_111", f"{session}_mpr_n4_anon_111_t88_masked_gfc"),
                                 (f"{base}/RAW", f"{session}_mpr-1_anon")):
                members[f"{folder}/{stem}.hdr"], members[f"{folder}/{stem}.img"] = hdr, img
            members[f"{base}/{session}.txt"] = b"session notes"
        (server.root / f"disc{disc}.tar.gz").write_bytes(_tar(members, mode="w:gz"))
    (server.root / "oasis_cross-sectional.csv").write_text(
        "ID,M/F,Hand,Age,Educ,SES,MMSE,CDR\nOAS1_0001_MR1,F,R,74,2,3,29,0\nOAS1_0002_MR1,M,R,21,,,,\n"
        "OAS1_0003_MR1,F,R,,4,3,27,0.5\n")
    files = (RemoteFile("oasis_cross-sectional.csv", url="https://example.invalid/never-used.csv"),
             RemoteFile("disc1.tar.gz"), RemoteFile("disc2.tar.gz"))
    info = dataclasses.replace(DATASETS["oasis1"], files=files, archives=("disc1.tar.gz", "disc2.tar.gz"))
    monkeypatch.setitem(DATASETS, "oasis1", info)


def test_oasis_requires_accepting_the_terms_before_any_request(server: SimpleNamespace,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    _oasis_site(server, monkeypatch)
    out = tmp_path / "oasis"
    notices: list[str] = []

    with pytest.raises(TermsNotAcceptedError, match="accept-terms"):
        download_dataset("oasis1", out, base_url=server.url, progress=False, notice_fn=notices.append, **FAST)

    assert server.httpd.requests == [] and not out.exists()
    assert "not to use the data" in notices[0] and "AGREEMENT" in notices[0]
    download_dataset("oasis1", out, dry_run=True, base_url=server.url, notice_fn=notices.append)  # no acceptance needed
    assert server.httpd.requests == []


def test_oasis_end_to_end_extracts_only_the_chosen_images(server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    _oasis_site(server, monkeypatch)
    out = tmp_path / "oasis"

    download_dataset("oasis1", out, base_url=server.url, progress=False, accept_terms=True, keep_extracted=True,
                     **FAST)

    table = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert table[["participant_id", "age", "sex", "site"]].values.tolist() == [
        ["sub-OAS10001", "74", "F", "WUSTL"], ["sub-OAS10002", "21", "M", "WUSTL"]]
    assert pd.read_csv(out / "excluded_participants.tsv", sep="\t")["reason"].tolist() == ["missing age"]
    assert check_dataset(out).empty
    kept = sorted(p.relative_to(out / "sourcedata").as_posix()
                  for p in (out / "sourcedata").rglob("*") if p.is_file() and ".processed" in p.as_posix())
    assert kept == sorted(f"disc{d}.processed/disc{d}/{s}/PROCESSED/MPRAGE/T88_111/{s}_mpr_n4_anon_111_t88_masked_gfc.{e}"
                          for d, s in [(1, "OAS1_0001_MR1"), (1, "OAS1_0002_MR1"), (2, "OAS1_0003_MR1")]
                          for e in ("hdr", "img"))


def _bids_site(server: SimpleNamespace) -> None:
    root = server.root
    (root / "participants.tsv").write_text(
        "participant_id\tdiagnosis\tage\tgender\tT1w\n"
        "sub-10159\tCONTROL\t30\tF\t1\n"
        "sub-10171\tSCHZ\t24\tM\t1\n"
        "sub-10189\tCONTROL\tn/a\tM\t1\n"      # missing age: not fetched, reported
        "sub-10206\tADHD\t41\tF\tn/a\n"        # no T1w scan in the dataset: not fetched, reported
        "sub-10217\tBIPOLAR\t45\tF\t1\n")      # listed, but the server has no file (404): reported
    (root / "dataset_description.json").write_text(json.dumps({"Name": "LA5c", "License": "CC0"}))
    for seed, pid in enumerate(["sub-10159", "sub-10171", "sub-10189"]):
        anat = root / pid / "anat"
        anat.mkdir(parents=True)
        (anat / f"{pid}_T1w.nii.gz").write_bytes(_gz(_nifti_bytes(seed)))


def test_ds000030_end_to_end_with_lockfile(server: SimpleNamespace, tmp_path: Path) -> None:
    _bids_site(server)
    out = tmp_path / "ds000030"

    download_dataset("ds000030", out, base_url=server.url, progress=False, **FAST)

    fetched = sorted(path for path, _ in server.httpd.requests)
    assert fetched == ["/dataset_description.json", "/participants.tsv", "/sub-10159/anat/sub-10159_T1w.nii.gz",
                       "/sub-10171/anat/sub-10171_T1w.nii.gz", "/sub-10217/anat/sub-10217_T1w.nii.gz"]
    table = pd.read_csv(out / "participants.tsv", sep="\t", dtype=str)
    assert table.values.tolist() == [["sub-10159", "30", "F", "UCLA", "CONTROL"],
                                     ["sub-10171", "24", "M", "UCLA", "SCHZ"]]
    reasons = pd.read_csv(out / "excluded_participants.tsv", sep="\t").set_index("participant_id")["reason"]
    assert reasons.to_dict() == {"sub-10189": "missing age", "sub-10206": "no T1w image in the source dataset",
                                 "sub-10217": "no T1w image in the source dataset"}
    assert check_dataset(out).empty
    lock = json.loads((out / "sourcedata" / LOCKFILE_NAME).read_text())["files"]
    image = "sub-10159/anat/sub-10159_T1w.nii.gz"
    assert lock[image]["sha256"] == _sha256((server.root / image).read_bytes())

    plan = plan_download("ds000030", out, base_url=server.url)  # now lists the per-participant files
    assert [p.state for p in plan if "sub-10159" in p.url] == ["present"]
    assert any("sub-10217" in p.url and p.state == "to fetch" for p in plan)


# --------------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------------
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"data_download_{name}", REPO / "data_download" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(("script", "licence"), [("ixi", "CC BY-SA 3.0"), ("oasis1", "OASIS data use agreement"),
                                                 ("openneuro_ds000030", "CC0")])
def test_scripts_dry_run(server: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], script: str,
                         licence: str) -> None:
    out = tmp_path / "out"

    status = _script(script).main(["--out", str(out), "--dry-run", "--base-url", server.url, "--no-progress"])

    printed = capsys.readouterr().out
    assert status == 0 and server.httpd.requests == [] and not out.exists()
    assert licence in printed and "Download size" in printed and server.url in printed


def test_oasis_script_without_accept_terms_exits_with_an_error(server: SimpleNamespace, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    status = _script("oasis1").main(["--out", str(tmp_path / "o"), "--base-url", server.url, "--no-progress"])

    assert status == 2 and "--accept-terms" in capsys.readouterr().out
    assert server.httpd.requests == []


def test_image_choices_agree_with_the_converter() -> None:
    from fedsparse_lib.data.convert import OASIS1_IMAGES

    assert dl.OASIS1_IMAGES == OASIS1_IMAGES


def test_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'adni'.*ds000030.*ixi.*oasis1"):
        download_dataset("adni", tmp_path)
    assert dl.describe_dataset("ds000030").startswith("UCLA")

"""Convert real datasets from their native layout to the package's BIDS-like layout.

Every converter writes the layout :mod:`.nifti` reads::

    OUT/participants.tsv                    participant_id, age (years), sex (F/M), site, [extras]
    OUT/participants.json                   column descriptions
    OUT/dataset_description.json            name, licence, how to acknowledge, provenance
    OUT/excluded_participants.tsv           every source subject left out, and why
    OUT/sub-<label>/anat/sub-<label>_T1w.nii.gz

Subjects are never dropped silently: one without an age (or with an implausible or conflicting
one), without an image, or whose image cannot be read is listed in ``excluded_participants.tsv``
and in a warning, and returned in :attr:`Conversion.excluded`.

The dataset is first built in a hidden staging folder inside ``OUT`` (``.convert-*``), then
published by renames, ``participants.tsv`` last: a folder with ``participants.tsv`` is complete,
and an interrupted conversion leaves no half-written dataset behind (the next run removes the
stale staging folder). Images that are already NIfTI are hard-linked when the file system allows
it (no extra disk space), copied otherwise.

Converters
----------
:func:`convert_ixi`     IXI: ``IXI002-Guys-0828-T1.nii.gz`` files + the demographics sheet.
:func:`convert_oasis1`  OASIS-1 cross-sectional: Analyze ``.hdr/.img`` pairs + the clinical CSV.
:func:`convert_bids`    a BIDS dataset with ``participants.tsv`` (OpenNeuro ds000030).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .. import __version__
from .nifti import AGE_RANGE_YEARS, DESCRIPTION_FILE, PARTICIPANT_ID_PATTERN, PARTICIPANTS_FILE, DataError, load_img

__all__ = [
    "EXCLUDED_FILE",
    "OASIS1_IMAGES",
    "Conversion",
    "convert_bids",
    "convert_ixi",
    "convert_oasis1",
    "parse_ixi_filename",
    "read_ixi_demographics",
    "read_oasis1_clinical",
]

logger = logging.getLogger(__name__)

StrPath = str | PathLike[str]

#: Table of the source subjects left out of a converted dataset (source_id, participant_id, reason).
EXCLUDED_FILE = "excluded_participants.tsv"
#: OASIS-1 image choices: the processed (skull-stripped, gain-field corrected, atlas-registered
#: 1 mm) image, or the first raw MPRAGE of the session.
OASIS1_IMAGES: tuple[str, ...] = ("processed", "raw")
_OASIS1_GLOBS: dict[str, str] = {
    "processed": "PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc.hdr",
    "raw": "RAW/*_mpr-1_anon.hdr",
}
_STAGING_PREFIX = ".convert-"
_EXCLUDED_COLUMNS = ["source_id", "participant_id", "reason"]
_IXI_NAME = re.compile(r"^IXI(?P<number>\d+)-(?P<site>[A-Za-z]+)-(?P<scan>\d+)-T1\.nii(?:\.gz)?$")
_IXI_SITES = {"Guys", "HH", "IOP"}
_OASIS1_SESSION = re.compile(r"^OAS1_(?P<number>\d{4})_MR(?P<visit>\d+)$")
_MISSING = {"", "n/a", "na", "nan", "none", "null"}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conversion:
    """Outcome of a conversion.

    Attributes
    ----------
    root : pathlib.Path
        The converted dataset folder.
    participants : pandas.DataFrame
        The rows of ``participants.tsv`` (participant_id, age, sex, site, extra columns).
    excluded : pandas.DataFrame
        Columns ``source_id``, ``participant_id`` (``""`` when none could be formed) and
        ``reason``: every source subject that is not in ``participants``.
    """

    root: Path
    participants: pd.DataFrame
    excluded: pd.DataFrame


@dataclass
class _Subject:
    """One subject to write: its row of participants.tsv and how to write its image."""

    participant_id: str
    source_id: str
    age: float
    sex: str
    site: str
    write_fn: Callable[[Path], None]
    extra: dict[str, object] = field(default_factory=dict)


class _Excluded(list):
    """The excluded subjects, as (source_id, participant_id, reason) rows."""

    def add(self, source_id: object, participant_id: str, reason: str) -> None:
        self.append((str(source_id), participant_id, reason))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _age_problem(value: object) -> tuple[float | None, str | None]:
    """Parse an age in years; return (age, None) or (None, reason)."""
    if _is_missing(value):
        return None, "missing age"
    try:
        age = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, f"non-numeric age {value!r}"
    low, high = AGE_RANGE_YEARS
    if not math.isfinite(age) or not low <= age <= high:
        return None, f"implausible age {value!r} (expected years in [{low:g}, {high:g}])"
    return age, None


def _sex(value: object, mapping: Mapping[str, str]) -> str:
    """Map a source sex code to F / M ("n/a" when missing or unknown)."""
    if _is_missing(value):
        return "n/a"
    key = str(value).strip()
    try:  # spreadsheets give numeric codes as floats: 1.0 -> "1"
        number = float(key)
        if number.is_integer():
            key = str(int(number))
    except ValueError:
        pass
    return mapping.get(key, mapping.get(key.upper(), "n/a"))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), else copy it; through a temporary name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_table(path: Path) -> pd.DataFrame:
    """Read a CSV / TSV / spreadsheet as strings (the demographics of IXI, OASIS, BIDS)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if suffix in (".xls", ".xlsx"):
        engine = "xlrd" if suffix == ".xls" else "openpyxl"
        if importlib.util.find_spec(engine) is None:
            raise DataError(
                f"{path}: reading a {suffix} spreadsheet needs the '{engine}' package, which is not installed. "
                f"Either install it (pip install {engine}) or open the sheet in a spreadsheet program, "
                "export it as CSV, and pass the CSV instead (--demographics FILE.csv)"
            )
        return pd.read_excel(path, engine=engine, dtype=str)
    sep = "\t" if suffix in (".tsv", ".tab") else None
    try:
        return pd.read_csv(path, sep=sep, engine="python", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: cannot read the table: {err}") from err


def _column(table: pd.DataFrame, path: Path, *candidates: str, prefix: bool = False) -> str:
    """Name of the first column matching a candidate (case-insensitive; optionally by prefix)."""
    normal = {str(c).strip().lower(): str(c) for c in table.columns}
    for cand in candidates:
        if cand.lower() in normal:
            return normal[cand.lower()]
        if prefix:
            for low, name in normal.items():
                if low.startswith(cand.lower()):
                    return name
    raise DataError(f"{path}: no column {' / '.join(candidates)} (found columns {list(table.columns)})")


# --------------------------------------------------------------------------------------------
# Writing and publishing a dataset
# --------------------------------------------------------------------------------------------
_COLUMN_DESCRIPTIONS = {
    "participant_id": {"Description": "BIDS subject label, sub-<label>"},
    "age": {"Description": "age at scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male", "n/a": "not recorded"}},
    "site": {"Description": "acquisition site (scanner), a natural federated client"},
}


def _write_dataset(
    out_dir: Path,
    subjects: Sequence[_Subject],
    excluded: _Excluded,
    description: Mapping[str, object],
    *,
    column_descriptions: Mapping[str, Mapping[str, object]] | None = None,
    validate: bool,
    progress: bool,
    overwrite: bool,
) -> Conversion:
    """Write subjects into a staging folder inside ``out_dir``, then publish by renames."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    final_table = out_dir / PARTICIPANTS_FILE
    if final_table.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a converted dataset ({PARTICIPANTS_FILE}); "
                              "pass overwrite=True (--overwrite) to convert again")
    for stale in out_dir.glob(f"{_STAGING_PREFIX}*"):
        logger.info("removing the staging folder of an interrupted conversion: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)

    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=_STAGING_PREFIX))
    try:
        rows = []
        for subject in tqdm(subjects, desc="converting", unit="subject", disable=not progress):
            target = staging / subject.participant_id / "anat" / f"{subject.participant_id}_T1w.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                subject.write_fn(target)
                if validate:
                    load_img(target)
            except (DataError, nib.filebasedimages.ImageFileError) as err:
                shutil.rmtree(staging / subject.participant_id, ignore_errors=True)
                excluded.add(subject.source_id, subject.participant_id, f"unreadable image: {err}")
                continue
            rows.append({"participant_id": subject.participant_id, "age": subject.age, "sex": subject.sex,
                         "site": subject.site, **subject.extra})
        if not rows:
            raise DataError(f"{out_dir}: no subject could be converted; excluded: "
                            + "; ".join(f"{s}: {r}" for s, _, r in excluded[:10]))

        table = pd.DataFrame(rows).sort_values("participant_id", kind="stable").reset_index(drop=True)
        excluded_table = pd.DataFrame(list(excluded), columns=_EXCLUDED_COLUMNS)
        columns = dict(_COLUMN_DESCRIPTIONS)
        columns.update(column_descriptions or {})
        tables = {
            "participants.json": json.dumps({c: columns[c] for c in table.columns if c in columns}, indent=2) + "\n",
            DESCRIPTION_FILE: json.dumps(dict(description), indent=2) + "\n",
            EXCLUDED_FILE: excluded_table.to_csv(sep="\t", index=False, na_rep="n/a"),
            PARTICIPANTS_FILE: table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.4g"),
        }
        for name, text in tables.items():
            _write_text_atomic(staging / name, text)
        _publish(staging, out_dir, list(table["participant_id"]), list(tables))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if len(excluded_table):
        shown = "; ".join(f"{s} ({r})" for s, _, r in excluded[:10])
        more = f"; ... and {len(excluded) - 10} more" if len(excluded) > 10 else ""
        logger.warning("%s: %d source subject(s) excluded, listed in %s: %s%s", out_dir, len(excluded),
                       EXCLUDED_FILE, shown, more)
    logger.info("%s: %d subjects converted", out_dir, len(table))
    return Conversion(root=out_dir, participants=table, excluded=excluded_table)


def _publish(staging: Path, out_dir: Path, participant_ids: list[str], table_names: list[str]) -> None:
    """Move the staged dataset into ``out_dir``; ``participants.tsv`` (the completion mark) last."""
    old_table = out_dir / PARTICIPANTS_FILE
    old_ids: list[str] = []
    if old_table.exists():  # overwrite: the old dataset stops being complete first
        try:
            old_ids = [str(p) for p in pd.read_csv(old_table, sep="\t", dtype=str)["participant_id"]]
        except (OSError, ValueError, KeyError, pd.errors.ParserError):
            old_ids = []
        old_table.unlink()
    for pid in old_ids:
        if PARTICIPANT_ID_PATTERN.match(pid) and pid not in participant_ids:
            shutil.rmtree(out_dir / pid, ignore_errors=True)
    for pid in participant_ids:
        target = out_dir / pid
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / pid, target)
    for name in table_names:  # participants.tsv is the last name
        os.replace(staging / name, out_dir / name)


def _description(name: str, **fields: object) -> dict[str, object]:
    desc: dict[str, object] = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw"}
    desc.update({k: v for k, v in fields.items() if v})
    desc["GeneratedBy"] = [{"Name": "fedsparse", "Version": __version__,
                            "Description": "converted by fedsparse_lib.data.convert"}]
    return desc


# --------------------------------------------------------------------------------------------
# IXI
# --------------------------------------------------------------------------------------------
def parse_ixi_filename(name: str) -> tuple[int, str, str]:
    """Subject number, label and site of an IXI T1 file name.

    Parameters
    ----------
    name : str
        File name such as ``"IXI002-Guys-0828-T1.nii.gz"``.

    Returns
    -------
    number : int
        The IXI_ID of the demographics sheet (2).
    label : str
        Alphanumeric subject label, the id as written in the name (``"IXI002"``).
    site : str
        Hospital: ``"Guys"`` (Guy's, Philips 1.5 T), ``"HH"`` (Hammersmith, Philips 3 T) or
        ``"IOP"`` (Institute of Psychiatry, GE 1.5 T).

    Raises
    ------
    ValueError
        If the name is not ``IXI<digits>-<site>-<digits>-T1.nii[.gz]``.
    """
    match = _IXI_NAME.match(name)
    if match is None:
        raise ValueError(f"not an IXI T1 file name: {name!r} (expected e.g. 'IXI002-Guys-0828-T1.nii.gz')")
    return int(match["number"]), f"IXI{match['number']}", match["site"]


def read_ixi_demographics(path: StrPath) -> pd.DataFrame:
    """Read the IXI demographics sheet, one row per IXI_ID.

    Parameters
    ----------
    path : str or path-like
        ``IXI.xls`` as published (needs the ``xlrd`` package), or a CSV / TSV export of it.
        Columns used: ``IXI_ID``, ``SEX_ID (1=m, 2=f)`` (any column starting with ``SEX_ID``) and
        ``AGE`` (years, computed by IXI from date of birth and study date; empty for some rows).

    Returns
    -------
    pandas.DataFrame
        Columns ``ixi_id`` (int), ``age`` (float years, NaN when missing), ``sex`` (F / M / n/a)
        and ``problem`` (str, ``""`` when the row is usable). Duplicate IXI_IDs are merged: rows
        without an age are ignored when another row has one; rows that disagree on age (by more
        than 0.01 year) or sex leave the subject with a ``problem``.

    Raises
    ------
    DataError
        If the file cannot be read (``.xls`` without ``xlrd``: the message says how to export a
        CSV) or lacks a required column.
    """
    path = Path(path)
    raw = _read_table(path)
    id_col = _column(raw, path, "IXI_ID")
    sex_col = _column(raw, path, "SEX_ID", prefix=True)
    age_col = _column(raw, path, "AGE")
    records: dict[int, list[tuple[float | None, str, str | None]]] = {}
    for value, sex, age in zip(raw[id_col], raw[sex_col], raw[age_col], strict=True):
        if _is_missing(value):
            continue
        try:
            ixi_id = int(float(value))
        except ValueError:
            logger.warning("%s: ignoring a row with IXI_ID %r", path, value)
            continue
        parsed, problem = _age_problem(age)
        records.setdefault(ixi_id, []).append((parsed, _sex(sex, {"1": "M", "2": "F"}), problem))

    rows = []
    for ixi_id, entries in sorted(records.items()):
        aged = [e for e in entries if e[0] is not None]
        sexes = sorted({e[1] for e in entries if e[1] != "n/a"})
        problem = ""
        age = math.nan
        if not aged:
            problem = entries[0][2] or "missing age"
        elif max(e[0] for e in aged) - min(e[0] for e in aged) > 0.01:  # type: ignore[operator]
            problem = "conflicting ages in duplicate demographics rows: " + ", ".join(f"{e[0]:.2f}" for e in aged)
        elif len(sexes) > 1:
            problem = "conflicting sex in duplicate demographics rows"
        else:
            age = float(aged[0][0])  # type: ignore[arg-type]
        rows.append({"ixi_id": ixi_id, "age": age, "sex": sexes[0] if len(sexes) == 1 else "n/a",
                     "problem": problem})
    return pd.DataFrame(rows, columns=["ixi_id", "age", "sex", "problem"])


def convert_ixi(
    image_dir: StrPath,
    demographics: StrPath,
    out_dir: StrPath,
    *,
    validate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> Conversion:
    """Convert IXI T1 scans and demographics to the BIDS-like layout.

    Parameters
    ----------
    image_dir : str or path-like
        Folder holding the ``IXI*-T1.nii.gz`` files (the extracted ``IXI-T1.tar``; searched
        recursively).
    demographics : str or path-like
        ``IXI.xls`` or a CSV export of it, see :func:`read_ixi_demographics`.
    out_dir : str or path-like
        Dataset folder to write. Participants are ``sub-IXI002`` etc., ``site`` is the hospital
        from the file name (Guys, HH, IOP).
    validate : bool, default True
        Load every image (:func:`~fedsparse_lib.data.nifti.load_img`) and exclude unreadable ones.
    progress : bool, default True
        Show a progress bar.
    overwrite : bool, default False
        Replace a dataset already converted in ``out_dir``.

    Returns
    -------
    Conversion
        Participants written and subjects excluded (missing / conflicting demographics, no
        demographics row, several images, unreadable image).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: IXI image folder not found")
    table = read_ixi_demographics(demographics).set_index("ixi_id")
    excluded = _Excluded()
    found: dict[int, list[tuple[Path, str, str]]] = {}
    for path in sorted(image_dir.rglob("IXI*-T1.nii*")):
        try:
            number, label, site = parse_ixi_filename(path.name)
        except ValueError:
            excluded.add(path.name, "", "file name does not follow IXI<id>-<site>-<scan>-T1.nii.gz")
            continue
        if site not in _IXI_SITES:
            logger.warning("%s: unknown IXI site %r (expected one of %s)", path, site, sorted(_IXI_SITES))
        found.setdefault(number, []).append((path, label, site))

    subjects = []
    for number, images in sorted(found.items()):
        path, label, site = images[0]
        pid = f"sub-{label}"
        if len(images) > 1:
            excluded.add(label, pid, "several T1 images: " + ", ".join(p.name for p, _, _ in images))
            continue
        if number not in table.index:
            excluded.add(path.name, pid, f"no row with IXI_ID {number} in the demographics sheet")
            continue
        row = table.loc[number]
        if row["problem"]:
            excluded.add(path.name, pid, str(row["problem"]))
            continue
        subjects.append(_Subject(pid, path.name, float(row["age"]), str(row["sex"]), site,
                                 write_fn=lambda target, src=path: _link_or_copy(src, target)))
    if not found:
        raise DataError(f"{image_dir}: no IXI T1 image (IXI*-T1.nii.gz) found")
    unused = len(set(table.index) - set(found))
    if unused:
        logger.info("%d demographics rows have no T1 image (IXI has fewer T1 scans than subjects)", unused)
    description = _description(
        "IXI (Information eXtraction from Images), T1",
        License="CC BY-SA 3.0",
        HowToAcknowledge="Cite the IXI dataset, https://brain-development.org/ixi-dataset/",
        ReferencesAndLinks=["https://brain-development.org/ixi-dataset/"],
    )
    return _write_dataset(out_dir, subjects, excluded, description, validate=validate, progress=progress,
                          overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# OASIS-1 cross-sectional
# --------------------------------------------------------------------------------------------
def read_oasis1_clinical(path: StrPath) -> pd.DataFrame:
    """Read ``oasis_cross-sectional.csv``, one row per first-visit (``_MR1``) session.

    Parameters
    ----------
    path : str or path-like
        The OASIS-1 clinical CSV (columns ``ID``, ``M/F``, ``Age``, ``MMSE``, ``CDR``, ...).

    Returns
    -------
    pandas.DataFrame
        Indexed by session id (``OAS1_0001_MR1``), columns ``label`` (``OAS10001``), ``age``
        (float, NaN when missing), ``age_problem`` (str), ``sex`` (F / M / n/a), ``cdr`` and
        ``mmse`` (float, NaN when missing). The ``_MR2`` reliability rescans are left out: they
        are second scans of ``_MR1`` subjects, not new participants.
    """
    path = Path(path)
    raw = _read_table(path)
    id_col = _column(raw, path, "ID")
    sex_col = _column(raw, path, "M/F", "Sex")
    age_col = _column(raw, path, "Age")
    optional = {name: next((c for c in raw.columns if str(c).strip().upper() == name.upper()), None)
                for name in ("CDR", "MMSE")}
    rows = []
    for _, record in raw.iterrows():
        session = str(record[id_col]).strip()
        match = _OASIS1_SESSION.match(session)
        if match is None or match["visit"] != "1":
            continue
        age, problem = _age_problem(record[age_col])
        row = {"session_id": session, "label": f"OAS1{match['number']}", "age": math.nan if age is None else age,
               "age_problem": problem or "", "sex": _sex(record[sex_col], {"F": "F", "M": "M"})}
        for name, col in optional.items():
            value = None if col is None else record[col]
            row[name.lower()] = math.nan if _is_missing(value) else pd.to_numeric(value, errors="coerce")
        rows.append(row)
    table = pd.DataFrame(rows, columns=["session_id", "label", "age", "age_problem", "sex", "cdr", "mmse"])
    if table["session_id"].duplicated().any():
        dups = sorted(set(table.loc[table["session_id"].duplicated(), "session_id"]))
        raise DataError(f"{path}: duplicate session ids {dups}")
    return table.set_index("session_id")


def _oasis1_sessions(roots: Iterable[Path]) -> dict[str, Path]:
    """Session folders ``OAS1_xxxx_MR1`` found at most two levels below each root (``discN/``)."""
    sessions: dict[str, Path] = {}
    for root in roots:
        for candidate in sorted([*root.glob("OAS1_*_MR*"), *root.glob("*/OAS1_*_MR*")]):
            if candidate.is_dir() and _OASIS1_SESSION.match(candidate.name):
                sessions.setdefault(candidate.name, candidate)
    return sessions


def _analyze_to_nifti(hdr: Path, target: Path, *, talairach: bool) -> None:
    """Convert an Analyze 7.5 pair to a 3D NIfTI-1 file, keeping nibabel's affine.

    Analyze has no orientation field: nibabel assumes radiological storage (x flipped), the
    OASIS convention. The processed images are in Talairach (T88) space, the raw ones in scanner
    space; the NIfTI codes say so.
    """
    img = nib.load(hdr)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    nifti = nib.Nifti1Image(data, img.affine)
    code = "talairach" if talairach else "scanner"
    nifti.set_sform(img.affine, code=code)
    nifti.set_qform(img.affine, code=code)
    nifti.header.set_xyzt_units("mm")
    nib.save(nifti, target)


def convert_oasis1(
    roots: StrPath | Sequence[StrPath],
    clinical: StrPath,
    out_dir: StrPath,
    *,
    image: str = "processed",
    validate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> Conversion:
    """Convert OASIS-1 cross-sectional sessions to the BIDS-like layout.

    Parameters
    ----------
    roots : path or sequence of paths
        Extracted disc archives: folders holding ``discN/OAS1_xxxx_MR1/`` (or the session folders
        directly).
    clinical : str or path-like
        ``oasis_cross-sectional.csv`` (:func:`read_oasis1_clinical`).
    out_dir : str or path-like
        Dataset folder to write. Participants are ``sub-OAS10001`` etc., site ``WUSTL``; ``cdr``
        (Clinical Dementia Rating, 0 = nondemented) and ``mmse`` columns are kept so that the
        demented subjects can be filtered out for brain-age work.
    image : {"processed", "raw"}, default "processed"
        ``processed``: ``PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc`` -- the average of the
        session's MPRAGEs, gain-field corrected, registered to the Talairach (T88) atlas and
        skull-stripped, 176 x 208 x 176 at 1 mm. ``raw``: ``RAW/*_mpr-1_anon``, the first
        unprocessed MPRAGE (with skull, scanner space).
    validate, progress, overwrite
        As :func:`convert_ixi`.

    Returns
    -------
    Conversion
    """
    if image not in OASIS1_IMAGES:
        raise ValueError(f"image must be one of {OASIS1_IMAGES}, got {image!r}")
    root_list = [Path(roots)] if isinstance(roots, (str, PathLike)) else [Path(r) for r in roots]
    missing = [str(r) for r in root_list if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"OASIS-1 folder(s) not found: {missing}")
    table = read_oasis1_clinical(clinical)
    sessions = _oasis1_sessions(root_list)
    if not sessions:
        raise DataError(f"no OASIS-1 session folder (OAS1_xxxx_MR1) found under {[str(r) for r in root_list]}")
    excluded = _Excluded()
    subjects = []
    for session, folder in sorted(sessions.items()):
        match = _OASIS1_SESSION.match(session)
        assert match is not None
        pid = f"sub-OAS1{match['number']}"
        if match["visit"] != "1":
            logger.debug("%s: reliability rescan, not a new participant; skipped", session)
            continue
        headers = sorted(folder.glob(_OASIS1_GLOBS[image]))
        if not headers:
            excluded.add(session, pid, f"no {image} image ({_OASIS1_GLOBS[image]}) in {folder}")
            continue
        if session not in table.index:
            excluded.add(session, pid, "no row in the clinical CSV")
            continue
        row = table.loc[session]
        if row["age_problem"]:
            excluded.add(session, pid, str(row["age_problem"]))
            continue
        subjects.append(_Subject(
            pid, session, float(row["age"]), str(row["sex"]), "WUSTL",
            write_fn=lambda target, hdr=headers[0]: _analyze_to_nifti(hdr, target, talairach=image == "processed"),
            extra={"cdr": row["cdr"], "mmse": row["mmse"]},
        ))
    description = _description(
        f"OASIS-1 cross-sectional ({image} T1)",
        License="OASIS data use agreement, https://www.oasis-brains.org",
        Acknowledgements="Data were provided by OASIS-1: Cross-Sectional: Principal Investigators: D. Marcus, "
                         "R. Buckner, J. Csernansky, J. Morris; P50 AG05681, P01 AG03991, P01 AG026276, "
                         "R01 AG021910, P20 MH071616, U24 RR021382",
        ReferencesAndLinks=["https://www.oasis-brains.org", "https://doi.org/10.1162/jocn.2007.19.9.1498"],
    )
    extra_columns = {"cdr": {"Description": "Clinical Dementia Rating (0 nondemented, 0.5 very mild, 1 mild, "
                                            "2 moderate dementia)"},
                     "mmse": {"Description": "Mini-Mental State Examination score (0-30)"}}
    return _write_dataset(Path(out_dir), subjects, excluded, description, column_descriptions=extra_columns,
                          validate=validate, progress=progress, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# BIDS sources (OpenNeuro ds000030)
# --------------------------------------------------------------------------------------------
def convert_bids(
    source_root: StrPath,
    out_dir: StrPath,
    *,
    site: str,
    age_column: str = "age",
    sex_column: str = "sex",
    sex_codes: Mapping[str, str] | None = None,
    keep_columns: Sequence[str] = (),
    validate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> Conversion:
    """Convert a BIDS dataset (one T1w per participant) to the package's layout.

    Parameters
    ----------
    source_root : str or path-like
        BIDS folder with ``participants.tsv`` and ``sub-<label>/anat/sub-<label>_T1w.nii.gz``
        (the first ``*_T1w.nii.gz`` of the folder when there are several runs).
    out_dir : str or path-like
        Dataset folder to write.
    site : str
        Value of the ``site`` column (a single-site dataset).
    age_column, sex_column : str
        Columns of the source ``participants.tsv`` (ds000030: ``age`` and ``gender``).
    sex_codes : mapping, optional
        Source sex codes to F / M; default ``{"F": "F", "M": "M", "female": "F", "male": "M"}``.
    keep_columns : sequence of str
        Other source columns copied as they are (ds000030: ``diagnosis``).
    validate, progress, overwrite
        As :func:`convert_ixi`.

    Returns
    -------
    Conversion
    """
    source_root, out_dir = Path(source_root), Path(out_dir)
    tsv = source_root / PARTICIPANTS_FILE
    raw = _read_table(tsv)
    id_col = _column(raw, tsv, "participant_id")
    age_col = _column(raw, tsv, age_column)
    sex_col = _column(raw, tsv, sex_column)
    kept = {c: _column(raw, tsv, c) for c in keep_columns}
    codes = dict(sex_codes or {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M"})
    excluded = _Excluded()
    subjects = []
    seen: set[str] = set()
    for _, record in raw.iterrows():
        source_id = str(record[id_col]).strip()
        pid = source_id if source_id.startswith("sub-") else f"sub-{source_id}"
        if not PARTICIPANT_ID_PATTERN.match(pid):
            excluded.add(source_id, "", "participant_id is not sub-<letters and digits>")
            continue
        if pid in seen:
            excluded.add(source_id, pid, "duplicate participant_id in participants.tsv")
            continue
        seen.add(pid)
        age, problem = _age_problem(record[age_col])
        if problem:
            excluded.add(source_id, pid, problem)
            continue
        images = sorted((source_root / pid / "anat").glob(f"{pid}*_T1w.nii.gz"))
        if not images:
            excluded.add(source_id, pid, "no T1w image in the source dataset")
            continue
        extra = {c: (None if _is_missing(record[col]) else str(record[col]).strip()) for c, col in kept.items()}
        subjects.append(_Subject(pid, source_id, float(age), _sex(record[sex_col], codes), site,  # type: ignore[arg-type]
                                 write_fn=lambda target, src=images[0]: _link_or_copy(src, target), extra=extra))
    source_description: dict[str, object] = {}
    if (source_root / DESCRIPTION_FILE).is_file():
        try:
            source_description = json.loads((source_root / DESCRIPTION_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("%s: unreadable %s (%s); not copied", source_root, DESCRIPTION_FILE, err)
    fields = {k: v for k, v in source_description.items()
              if k in ("License", "Authors", "HowToAcknowledge", "ReferencesAndLinks", "DatasetDOI", "Funding")}
    description = _description(str(source_description.get("Name") or source_root.name), **fields)
    return _write_dataset(out_dir, subjects, excluded, description, validate=validate, progress=progress,
                          overwrite=overwrite)

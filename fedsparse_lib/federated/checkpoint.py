"""Round checkpoints of a federated run: safetensors for tensors, JSON for everything else.

After round ``t`` the engine writes ``round-000t.safetensors`` (the server's weights under
``weights/``, the mask as uint8 under ``mask/``, strategy extras under ``extras/``) and then
``round-000t.json`` (round number, run configuration, the records so far, the SHA-256 of the
tensor file, and the tensors' name order, which global ranking depends on). Both are written to a
temporary file and renamed, and the JSON is written last, so it is the commit marker: a run killed
at any moment leaves either a complete checkpoint or none.
:func:`load_latest` returns the newest checkpoint whose JSON parses and whose tensor file matches
its hash; older ones are deleted beyond ``keep_last``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.synthetic import write_atomic
from .strategies import ServerState

__all__ = ["Checkpoint", "latest_round", "load_latest", "save_round"]

logger = logging.getLogger(__name__)

_PREFIXES = ("weights/", "mask/", "extras/")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the round it ends, the server state, the records and the run config."""

    server_round: int
    state: ServerState
    records: dict[str, list[dict[str, Any]]]
    config: dict[str, Any]


def _paths(directory: Path, server_round: int) -> tuple[Path, Path]:
    stem = directory / f"round-{server_round:04d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_round(directory: str | os.PathLike, *, server_round: int, state: ServerState,
               records: dict[str, list[dict[str, Any]]], config: dict[str, Any], keep_last: int = 2) -> Path:
    """Write the checkpoint of ``server_round`` atomically and prune older ones.

    Parameters
    ----------
    directory : path
        Created if needed.
    server_round : int
        The round that just ended (>= 0).
    state : ServerState
    records : dict of str to list of dict
        JSON-able tables (lists of rows) to restore on resume.
    config : dict
        The run's configuration; :func:`load_latest` returns it so the engine can refuse to resume
        a different run.
    keep_last : int, default 2
        Number of most recent checkpoints kept (>= 1).

    Returns
    -------
    pathlib.Path
        The JSON file.
    """
    from safetensors.torch import save

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in state.weights.items()}
    tensors.update({f"mask/{k}": v.detach().cpu().to(torch.uint8).contiguous() for k, v in state.mask.items()})
    tensors.update({f"extras/{k}": v.detach().cpu().contiguous() for k, v in state.extras.items()})
    blob = save(tensors)
    tensor_path, json_path = _paths(folder, server_round)
    write_atomic(tensor_path, blob)
    meta = {"server_round": server_round, "sha256": hashlib.sha256(blob).hexdigest(), "config": config,
            "order": {p: list(d) for p, d in zip(_PREFIXES, (state.weights, state.mask, state.extras))},
            "records": records}
    write_atomic(json_path, json.dumps(meta).encode())
    for old in sorted(folder.glob("round-*.json"))[:-keep_last]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return json_path


def latest_round(directory: str | os.PathLike) -> int | None:
    """The newest round with a committed (JSON) checkpoint in ``directory``, or None."""
    rounds = [int(p.stem.split("-")[1]) for p in Path(directory).glob("round-*.json") if p.stem.split("-")[1].isdigit()]
    return max(rounds) if rounds else None


def load_latest(directory: str | os.PathLike) -> Checkpoint | None:
    """The newest valid checkpoint in ``directory`` (None if there is none).

    A checkpoint whose JSON does not parse or whose tensor file is missing or does not match the
    recorded hash is skipped with a warning, and the one before it is tried.
    """
    from safetensors.torch import load

    folder = Path(directory)
    if not folder.is_dir():
        return None
    for json_path in sorted(folder.glob("round-*.json"), reverse=True):
        tensor_path = json_path.with_suffix(".safetensors")
        try:
            meta = json.loads(json_path.read_text())
            blob = tensor_path.read_bytes()
        except (OSError, ValueError) as exc:
            logger.warning("skipping checkpoint %s: %s", json_path, exc)
            continue
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            logger.warning("skipping checkpoint %s: %s does not match its recorded hash", json_path, tensor_path.name)
            continue
        tensors = load(blob)
        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PREFIXES}
        for key, value in tensors.items():
            prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{tensor_path}: unexpected tensor {key!r}")
            parts[prefix][key[len(prefix):]] = value
        # restore the saved name order: masks are ranked over the concatenation in this order
        order = meta.get("order", {})
        parts = {p: {k: d[k] for k in order.get(p, d)} for p, d in parts.items()}
        state = ServerState(weights=parts["weights/"], mask={k: v.bool() for k, v in parts["mask/"].items()},
                            extras=parts["extras/"])
        return Checkpoint(server_round=int(meta["server_round"]), state=state, records=meta.get("records", {}),
                          config=meta.get("config", {}))
    return None

"""Federated threat models over plain inputs (model states), independent of the federated engine.

outsider
    Sees only the final global model: attack it like any model (:func:`outsider_scores`).
honest-but-curious server (``server_round_<t>``)
    Sees every model a client uploads. Given that client's uploads ``{server_round: state_dict}``
    (dense tensors with zeros at pruned weights; optionally the masks) and a model constructor, it
    attacks the upload of a chosen round (:func:`server_round_scores`). The members are that
    client's training subjects.
server, averaged over rounds (``server_rounds_mean``)
    Per example, the mean of a round's scores over the rounds (:func:`average_round_scores`): a
    subject that every upload fits well is more surely a member.

An *attack function* ``attack_fn(model, mask) -> {attack name: scores}`` does the attacking, e.g.
``lambda model, mask: attack_scores(model, batches, split, mask=mask)`` with
:func:`~fedsparse_lib.privacy.attacks.attack_scores`; every call must score the same examples in
the same order. :func:`threat_results` turns ``{threat model: {attack: scores}}`` into the tidy
results table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..pruning import apply_mask
from .metrics import DEFAULT_FPRS, attack_results, results_table

__all__ = [
    "OUTSIDER",
    "SERVER_ROUNDS_MEAN",
    "average_round_scores",
    "load_state",
    "outsider_scores",
    "server_round_scores",
    "server_threat_model",
    "threat_results",
]

logger = logging.getLogger(__name__)

OUTSIDER = "outsider"
SERVER_ROUNDS_MEAN = "server_rounds_mean"

Mask = Mapping[str, torch.Tensor]
AttackFn = Callable[[nn.Module, "Mask | None"], Mapping[str, np.ndarray]]
Scores = Mapping[str, np.ndarray]


def server_threat_model(server_round: int | None = None) -> str:
    """Name of the server threat model: ``server_round_<t>``, or ``server_rounds_mean`` for ``None``."""
    if server_round is None:
        return SERVER_ROUNDS_MEAN
    if int(server_round) != server_round or server_round < 0:
        raise ValueError(f"server_round must be an integer >= 0, got {server_round!r}")
    return f"server_round_{int(server_round)}"


def load_state(state: Mapping[str, torch.Tensor], model_fn: Callable[[], nn.Module], *,
               mask: Mask | None = None) -> nn.Module:
    """A fresh ``model_fn()`` holding ``state`` (strictly matching names), pruned by ``mask`` if given."""
    model = model_fn()
    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"state does not match the model ({str(exc).splitlines()[0]})") from exc
    if mask is not None:
        apply_mask(model, mask)
    model.eval()
    return model


def _as_scores(result: Scores, where: str) -> dict[str, np.ndarray]:
    if not isinstance(result, Mapping) or not result:
        raise TypeError(f"{where}: attack_fn must return a non-empty mapping of attack name to scores, "
                        f"got {type(result).__name__}")
    return {name: np.asarray(s, dtype=np.float64).reshape(-1) for name, s in result.items()}


def outsider_scores(model: nn.Module, attack_fn: AttackFn, *, mask: Mask | None = None) -> dict[str, np.ndarray]:
    """The outsider's attack on the final global model: ``attack_fn(model, mask)``.

    Returns
    -------
    dict of str to numpy.ndarray
        Scores per attack, higher = more likely a member.
    """
    return _as_scores(attack_fn(model, mask), OUTSIDER)


def server_round_scores(client_states: Mapping[int, Mapping[str, torch.Tensor]], model_fn: Callable[[], nn.Module],
                        attack_fn: AttackFn, *, masks: Mapping[int, Mask] | None = None,
                        rounds: Sequence[int] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """The honest-but-curious server attacks one client's uploads, round by round.

    Parameters
    ----------
    client_states : mapping of int to state_dict
        ``{server_round: state_dict}`` of the models this client uploaded.
    model_fn : callable ``() -> nn.Module``
        Builds a model with the same architecture (e.g. ``lambda: BrainAgeCNN(shape, width=0.5)``).
    attack_fn : callable ``(model, mask) -> {attack: scores}``
        See the module notes; must score the same examples every round.
    masks : mapping of int to mask, optional
        ``{server_round: mask}``; applied to the loaded state and passed on to ``attack_fn``.
    rounds : sequence of int, optional
        Rounds to attack; default every round of ``client_states``, ascending.

    Returns
    -------
    dict of int to dict of str to numpy.ndarray
        ``{server_round: {attack: scores}}``.
    """
    chosen = sorted(client_states) if rounds is None else list(rounds)
    missing = [r for r in chosen if r not in client_states]
    if missing or not chosen:
        raise KeyError(f"no uploaded state for rounds {missing or chosen}; uploads exist for {sorted(client_states)}")
    out: dict[int, dict[str, np.ndarray]] = {}
    for server_round in chosen:
        mask = None if masks is None else masks.get(server_round)
        model = load_state(client_states[server_round], model_fn, mask=mask)
        out[server_round] = _as_scores(attack_fn(model, mask), server_threat_model(server_round))
        logger.debug("server round %d: attacks %s", server_round, list(out[server_round]))
    _check_aligned(out)
    return out


def _check_aligned(round_scores: Mapping[int, Scores]) -> None:
    shapes = {(r, a): np.shape(s) for r, scores in round_scores.items() for a, s in scores.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"rounds score different numbers of examples: {shapes}")
    names = {r: sorted(scores) for r, scores in round_scores.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        raise ValueError(f"rounds ran different attacks: {names}")


def average_round_scores(round_scores: Mapping[int, Scores], *, rounds: Iterable[int] | None = None,
                         standardize: bool = False) -> dict[str, np.ndarray]:
    """Per example and attack, the mean score over rounds.

    Parameters
    ----------
    round_scores : mapping of int to mapping of str to array
        From :func:`server_round_scores`.
    rounds : iterable of int, optional
        Rounds to average; default all.
    standardize : bool, default False
        Z-score each round's scores (over the examples) first, so that rounds whose scores spread
        more (e.g. early rounds' larger errors) do not dominate.

    Returns
    -------
    dict of str to numpy.ndarray
        ``{attack: mean scores}``.
    """
    chosen = sorted(round_scores) if rounds is None else list(rounds)
    missing = [r for r in chosen if r not in round_scores]
    if missing or not chosen:
        raise KeyError(f"no scores for rounds {missing or chosen}; scores exist for {sorted(round_scores)}")
    subset = {r: _as_scores(round_scores[r], server_threat_model(r)) for r in chosen}
    _check_aligned(subset)
    out = {}
    for attack in subset[chosen[0]]:
        stack = np.stack([subset[r][attack] for r in chosen])
        if standardize:
            sd = stack.std(axis=1, keepdims=True)
            stack = (stack - stack.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
        out[attack] = stack.mean(axis=0)
    return out


def threat_results(scores: Mapping[str, Scores], labels: Sequence[int] | np.ndarray, *, target: str,
                   sparsity: float | Mapping[str, float], environment: str, fprs: Iterable[float] = DEFAULT_FPRS,
                   n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Tidy results for ``{threat model: {attack: scores}}`` on one evaluation set.

    Parameters
    ----------
    scores : mapping of str to mapping of str to array
        E.g. ``{"outsider": ..., "server_round_3": ..., "server_rounds_mean": ...}``; every array
        aligned with ``labels``.
    labels : array of shape (n,)
        1 for members, 0 for non-members.
    target, environment : str
        As in :func:`~fedsparse_lib.privacy.metrics.attack_results`.
    sparsity : float or mapping of str to float
        Sparsity of the attacked model, in [0, 1]; per threat model if it differs (a client's
        upload at round t is sparser than at round 1 under progressive pruning).
    fprs, n_boot, confidence, seed
        As in :func:`~fedsparse_lib.privacy.metrics.bootstrap_metrics`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`~fedsparse_lib.privacy.metrics.RESULT_COLUMNS`.
    """
    parts = []
    for threat_model, by_attack in scores.items():
        if isinstance(sparsity, Mapping):
            if threat_model not in sparsity:
                raise KeyError(f"no sparsity given for threat model {threat_model!r} (have {sorted(sparsity)})")
            value = sparsity[threat_model]
        else:
            value = sparsity
        for attack, s in by_attack.items():
            parts.append(attack_results(s, labels, target=target, sparsity=value, environment=environment,
                                        threat_model=threat_model, attack=attack, fprs=fprs, n_boot=n_boot,
                                        confidence=confidence, seed=seed))
    return results_table(parts)

"""Federated partitions of a participants table: which client holds which participant.

Every partition is a pure function of (participants table, seed) and returns a
``pandas.Series`` named ``client_id`` of integers ``0 .. num_clients - 1``, indexed like the
input table. :func:`client_indices` turns it into positional index arrays, one per client, and
:func:`partition_summary` into a tidy per-client table.

Environments of the paper (FedSparsify, brain age on UK Biobank, 8 clients):

- Uniform & IID: :func:`partition_iid`.
- Uniform & Non-IID: :func:`partition_by_age` with target means (50, 60, 70, 80, 50, ...).
- Skewed & Non-IID: :func:`partition_skewed_by_age`, sizes proportional to ``1.35**p`` and target
  means (80, 70, 60, 50, 80, 70, 60, 50).

Also: one client per site (:func:`partition_by_site`) and a Dirichlet split over age bins
(:func:`partition_dirichlet`), a common non-IID benchmark that is not in the paper.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "PAPER_NONIID_MEANS",
    "PAPER_SKEWED_MEANS",
    "PARTITIONS",
    "client_indices",
    "make_partition",
    "partition_by_age",
    "partition_by_site",
    "partition_dirichlet",
    "partition_iid",
    "partition_skewed_by_age",
    "partition_summary",
    "skewed_sizes",
]

logger = logging.getLogger(__name__)

#: Target mean ages of the paper's Uniform & Non-IID environment, cycled over the clients.
PAPER_NONIID_MEANS: tuple[float, ...] = (50.0, 60.0, 70.0, 80.0)
#: Target mean ages of the paper's Skewed & Non-IID environment, cycled over the clients.
PAPER_SKEWED_MEANS: tuple[float, ...] = (80.0, 70.0, 60.0, 50.0)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _ages(participants: pd.DataFrame) -> np.ndarray:
    if not isinstance(participants, pd.DataFrame):
        raise TypeError(f"participants must be a pandas DataFrame, got {type(participants).__name__}")
    if "age" not in participants.columns:
        raise ValueError(f"participants lacks an 'age' column (found {list(participants.columns)})")
    if len(participants) == 0:
        raise ValueError("participants is empty")
    ages = pd.to_numeric(participants["age"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(ages)):
        raise ValueError(f"participants has {int((~np.isfinite(ages)).sum())} missing or non-numeric ages")
    return ages


def _check_num_clients(num_clients: int, n: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be in [1, {n}] (the number of participants), got {num_clients}")
    return int(num_clients)


def _equal_sizes(n: int, num_clients: int) -> np.ndarray:
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    return sizes


def _as_client_ids(participants: pd.DataFrame, assigned: np.ndarray) -> pd.Series:
    return pd.Series(np.asarray(assigned, dtype=np.int64), index=participants.index, name="client_id")


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(text)) if part]


def _equal_count_bins(ages: np.ndarray, num_bins: int) -> np.ndarray:
    ranks = np.empty(len(ages), dtype=np.int64)
    ranks[np.argsort(ages, kind="stable")] = np.arange(len(ages))
    return ranks * num_bins // len(ages)


def _align(participants: pd.DataFrame, client_ids: pd.Series | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(client_ids, pd.Series):
        aligned = client_ids.reindex(participants.index)
        if aligned.isna().any():
            raise ValueError("client_ids has no entry for some rows of participants (index mismatch)")
        values = aligned.to_numpy()
    else:
        values = np.asarray(client_ids)
        if values.shape != (len(participants),):
            raise ValueError(
                f"client_ids must have one entry per participant ({len(participants)}), got shape {values.shape}"
            )
    if not np.all(np.equal(np.mod(values.astype(float), 1), 0)) or np.any(values.astype(float) < 0):
        raise ValueError("client_ids must be non-negative integers")
    return values.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------
def partition_iid(participants: pd.DataFrame, *, num_clients: int, seed: int) -> pd.Series:
    """Random assignment to clients of equal sizes (differing by at most one).

    Parameters
    ----------
    participants : pandas.DataFrame
        One row per participant (an ``age`` column is required for validation only).
    num_clients : int
        Number of clients, in [1, number of participants].
    seed : int
        Seed of the random permutation.

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
        Client ``p`` gets ``ceil`` or ``floor`` of ``n / num_clients`` participants, the larger
        sizes going to the first clients.
    """
    n = len(_ages(participants))
    k = _check_num_clients(num_clients, n)
    rng = np.random.default_rng(seed)
    assigned = np.empty(n, dtype=np.int64)
    assigned[rng.permutation(n)] = np.repeat(np.arange(k), _equal_sizes(n, k))
    return _as_client_ids(participants, assigned)


def skewed_sizes(n: int, num_clients: int, *, base: float = 1.35) -> np.ndarray:
    """Client sizes proportional to ``base**p``, largest first, summing exactly to ``n``.

    Client ``i`` (0-based) has the share ``base**(num_clients - 1 - i) / sum_p base**p``; the
    shares times ``n`` are rounded with the largest-remainder method, so each size is within 1 of
    its exact proportion and the sizes sum to ``n``. Should a size round to 0 (only when ``n`` is
    barely larger than ``num_clients``) one participant is moved to it from the largest client
    (and the sizes are sorted again, largest first).

    The paper reports 2401, 1765, 1303, 964, 714, 528, 391, 290 for 8,356 UK Biobank subjects
    over 8 clients with ``base = 1.35``. No rounding of exact ``1.35**p`` proportions gives those
    numbers (the exact proportions are 2382.3, 1764.7, 1307.2, 968.3, 717.2, 531.3, 393.6, 291.5;
    the paper's counts presumably came out of its sampling); this function returns 2382, 1765,
    1307, 968, 717, 531, 394, 292, within 19 subjects of the paper's counts.

    Parameters
    ----------
    n : int
        Number of participants, at least ``num_clients``.
    num_clients : int
        Number of clients, at least 1.
    base : float, default 1.35
        Ratio between the sizes of consecutive clients, at least 1.

    Returns
    -------
    numpy.ndarray of int64, shape (num_clients,)
        Non-increasing sizes, each at least 1, summing to ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    k = _check_num_clients(num_clients, int(n))
    if not np.isfinite(base) or base < 1.0:
        raise ValueError(f"base must be a finite number >= 1, got {base!r}")
    weights = float(base) ** np.arange(k - 1, -1, -1, dtype=np.float64)
    exact = int(n) * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    remainder = exact - sizes
    order = np.lexsort((np.arange(k), -remainder))  # largest remainder first, ties to larger clients
    sizes[order[: int(n) - int(sizes.sum())]] += 1
    while np.any(sizes == 0):
        sizes[int(np.argmax(sizes))] -= 1
        sizes[int(np.flatnonzero(sizes == 0)[0])] += 1
    return np.sort(sizes)[::-1].copy()


def partition_by_age(
    participants: pd.DataFrame,
    *,
    num_clients: int,
    seed: int,
    target_means: Sequence[float] | None = None,
    age_sd: float = 10.0,
    sizes: Sequence[int] | np.ndarray | None = None,
    max_redraws: int = 100,
) -> pd.Series:
    """The paper's age-targeted (non-IID) assignment.

    Clients take turns (round-robin) until each holds its quota. On its turn client ``p`` draws an
    age ``a ~ N(target_means[p], age_sd)`` and takes a random remaining participant whose integer
    age (completed years, ``floor(age)``) equals ``floor(a)``, redrawing while there is none. To
    guarantee termination (a target far from the remaining ages could need endless redraws), after
    ``max_redraws`` draws without a match the client takes a random remaining participant of the
    integer age nearest to its last draw. This fallback is not in the paper; with its ages (45-81)
    and ``age_sd = 10`` it acts only near the end, when few ages remain (10 of 8,356 assignments
    for 8 uniform clients, 52 for the skewed ones, on a UK Biobank-like synthetic age sample).

    Parameters
    ----------
    participants : pandas.DataFrame
        Needs an ``age`` column (years).
    num_clients : int
        Number of clients, in [1, number of participants].
    seed : int
        Seed of the draws.
    target_means : sequence of float, optional
        Target mean age of each client (length ``num_clients``). Default: the paper's
        (50, 60, 70, 80) cycled over the clients.
    age_sd : float, default 10.0
        Standard deviation of the drawn ages, in years, > 0.
    sizes : sequence of int, optional
        Number of participants of each client, each >= 1, summing to the number of participants.
        Default: equal sizes (differing by at most one).
    max_redraws : int, default 100
        Draws per turn before the nearest-age fallback.

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
    """
    ages = _ages(participants)
    n = len(ages)
    k = _check_num_clients(num_clients, n)
    if target_means is None:
        means = np.array(list(islice(cycle(PAPER_NONIID_MEANS), k)), dtype=np.float64)
    else:
        means = np.asarray(target_means, dtype=np.float64)
        if means.shape != (k,) or not np.all(np.isfinite(means)):
            raise ValueError(f"target_means must be {k} finite ages (one per client), got {list(target_means)!r}")
    if sizes is None:
        quota = _equal_sizes(n, k)
    else:
        quota = np.asarray(sizes)
        if quota.shape != (k,) or not np.issubdtype(quota.dtype, np.integer) or np.any(quota < 1) or quota.sum() != n:
            raise ValueError(
                f"sizes must be {k} integers >= 1 (one per client) summing to {n} participants, got {list(sizes)!r}"
            )
    if not np.isfinite(age_sd) or age_sd <= 0:
        raise ValueError(f"age_sd must be a positive number of years, got {age_sd!r}")
    if int(max_redraws) < 1:
        raise ValueError(f"max_redraws must be >= 1, got {max_redraws!r}")

    rng = np.random.default_rng(seed)
    integer_age = np.floor(ages).astype(np.int64)
    youngest = int(integer_age.min())
    offset = integer_age - youngest
    pools = [list(rng.permutation(np.flatnonzero(offset == a))) for a in range(int(offset.max()) + 1)]
    counts = np.array([len(pool) for pool in pools], dtype=np.int64)
    assigned = np.full(n, -1, dtype=np.int64)
    filled = np.zeros(k, dtype=np.int64)
    fallbacks = 0
    remaining = n
    while remaining:
        for p in range(k):
            if filled[p] >= quota[p]:
                continue
            draws = rng.normal(means[p], age_sd, size=int(max_redraws))
            keys = np.floor(draws).astype(np.int64) - youngest
            inside = (keys >= 0) & (keys < len(counts))
            hit = np.zeros(len(keys), dtype=bool)
            hit[inside] = counts[keys[inside]] > 0
            if hit.any():
                a = int(keys[int(np.argmax(hit))])
            else:
                available = np.flatnonzero(counts > 0)
                a = int(available[np.argmin(np.abs(available + youngest + 0.5 - draws[-1]))])
                fallbacks += 1
            assigned[pools[a].pop()] = p
            counts[a] -= 1
            filled[p] += 1
            remaining -= 1
    if fallbacks:
        logger.debug("partition_by_age: %d of %d assignments used the nearest-age fallback", fallbacks, n)
    return _as_client_ids(participants, assigned)


def partition_skewed_by_age(
    participants: pd.DataFrame,
    *,
    num_clients: int = 8,
    seed: int,
    target_means: Sequence[float] | None = None,
    age_sd: float = 10.0,
    base: float = 1.35,
    max_redraws: int = 100,
) -> pd.Series:
    """The paper's Skewed & Non-IID environment.

    Sizes from :func:`skewed_sizes` (largest first) and age-targeted assignment
    (:func:`partition_by_age`) with target means (80, 70, 60, 50) cycled over the clients by
    default. Parameters are those of the two functions.

    The realised client means follow the targets only roughly: the small clients fill their
    quota early, after which the largest clients (targets 80 and 70) keep drawing from whatever
    remains, so their means fall well below the targets (e.g. about 64 for the largest client with
    target 80 on a UK Biobank-like age distribution).

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
    """
    n = len(_ages(participants))
    k = _check_num_clients(num_clients, n)
    if target_means is None:
        target_means = list(islice(cycle(PAPER_SKEWED_MEANS), k))
    return partition_by_age(
        participants,
        num_clients=k,
        seed=seed,
        target_means=target_means,
        age_sd=age_sd,
        sizes=skewed_sizes(n, k, base=base),
        max_redraws=max_redraws,
    )


def partition_by_site(participants: pd.DataFrame, *, site_column: str = "site") -> pd.Series:
    """One client per site: client ``i`` holds the ``i``-th site in natural order (site2 < site10).

    Parameters
    ----------
    participants : pandas.DataFrame
        Needs the ``site_column`` column.
    site_column : str, default "site"
        Column naming each participant's site.

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
    """
    if site_column not in participants.columns:
        raise ValueError(f"participants lacks the site column {site_column!r} (found {list(participants.columns)})")
    if len(participants) == 0:
        raise ValueError("participants is empty")
    sites = participants[site_column]
    if sites.isna().any():
        raise ValueError(f"participants has {int(sites.isna().sum())} missing values in {site_column!r}")
    labels = sites.astype(str)
    order = sorted(labels.unique(), key=_natural_key)
    lookup = {site: i for i, site in enumerate(order)}
    return _as_client_ids(participants, labels.map(lookup).to_numpy())


def partition_dirichlet(
    participants: pd.DataFrame,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    num_age_bins: int = 5,
    min_size: int = 1,
    max_attempts: int = 100,
) -> pd.Series:
    """Label-skew split over age bins with Dirichlet proportions (not in the paper).

    Participants are put into ``num_age_bins`` equal-count age bins; for each bin, client shares
    ``q ~ Dirichlet(alpha, ..., alpha)`` are drawn and the bin's participants (shuffled) are cut
    accordingly. Small ``alpha`` (e.g. 0.1) gives clients dominated by few age bins, large
    ``alpha`` (e.g. 100) approaches IID. Draws are repeated (up to ``max_attempts``) until every
    client has at least ``min_size`` participants.

    Parameters
    ----------
    participants : pandas.DataFrame
        Needs an ``age`` column.
    num_clients : int
        Number of clients, in [1, number of participants / min_size].
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed of the draws.
    num_age_bins : int, default 5
        Number of equal-count age bins, >= 1.
    min_size : int, default 1
        Smallest acceptable client size.
    max_attempts : int, default 100
        Redraws before giving up with a ValueError.

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
    """
    ages = _ages(participants)
    n = len(ages)
    k = _check_num_clients(num_clients, n)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if int(num_age_bins) < 1:
        raise ValueError(f"num_age_bins must be >= 1, got {num_age_bins!r}")
    if int(min_size) < 0 or int(min_size) * k > n:
        raise ValueError(f"min_size must be in [0, {n // k}] for {n} participants and {k} clients, got {min_size!r}")
    rng = np.random.default_rng(seed)
    bins = _equal_count_bins(ages, int(num_age_bins))
    assigned = np.empty(n, dtype=np.int64)
    for _ in range(int(max_attempts)):
        for b in np.unique(bins):
            members = rng.permutation(np.flatnonzero(bins == b))
            shares = rng.dirichlet(np.full(k, float(alpha)))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for p, part in enumerate(np.split(members, cuts)):
                assigned[part] = p
        if np.bincount(assigned, minlength=k).min() >= int(min_size):
            return _as_client_ids(participants, assigned)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {k} clients at least {min_size} participants "
        f"in {max_attempts} attempts; use a larger alpha, fewer clients or a smaller min_size"
    )


# --------------------------------------------------------------------------------------------
# Dispatch and summaries
# --------------------------------------------------------------------------------------------
_PARTITION_FNS: dict[str, Callable[..., pd.Series]] = {
    "iid": partition_iid,
    "noniid_age": partition_by_age,
    "skewed_noniid": partition_skewed_by_age,
    "site": partition_by_site,
    "dirichlet": partition_dirichlet,
}
#: Names accepted by :func:`make_partition`.
PARTITIONS: tuple[str, ...] = tuple(_PARTITION_FNS)


def make_partition(
    name: str,
    participants: pd.DataFrame,
    *,
    num_clients: int | None = None,
    seed: int | None = None,
    **options: Any,
) -> pd.Series:
    """Partition by name: ``"iid"``, ``"noniid_age"``, ``"skewed_noniid"``, ``"site"``, ``"dirichlet"``.

    Parameters
    ----------
    name : str
        One of :data:`PARTITIONS`.
    participants : pandas.DataFrame
        Participants table (``age``; ``site`` for ``"site"``).
    num_clients : int, optional
        Number of clients; required except for ``"site"``, where it is checked against the
        number of sites when given.
    seed : int, optional
        Seed; required except for ``"site"``.
    **options
        Further keyword options of the partition function (e.g. ``alpha`` for ``"dirichlet"``,
        ``target_means`` for ``"noniid_age"``).

    Returns
    -------
    pandas.Series of int64 named ``client_id``, indexed like ``participants``
    """
    if name not in _PARTITION_FNS:
        raise ValueError(f"unknown partition {name!r}; expected one of {list(PARTITIONS)}")
    fn = _PARTITION_FNS[name]
    accepted = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    } - {"num_clients", "seed"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"partition {name!r} does not take option(s) {unknown}; it accepts {sorted(accepted)}")
    if name == "site":
        client_ids = fn(participants, **options)
        num_sites = int(client_ids.max()) + 1
        if num_clients is not None and num_clients != num_sites:
            raise ValueError(
                f"partition 'site' gives one client per site: {num_sites} sites, but num_clients={num_clients}"
            )
        return client_ids
    if num_clients is None:
        raise ValueError(f"partition {name!r} needs num_clients")
    if seed is None:
        raise ValueError(f"partition {name!r} needs a seed")
    return fn(participants, num_clients=num_clients, seed=seed, **options)


def client_indices(
    client_ids: pd.Series | Sequence[int] | np.ndarray, *, num_clients: int | None = None
) -> list[np.ndarray]:
    """Positional row indices of each client.

    Parameters
    ----------
    client_ids : pandas.Series or array-like of int
        Client of each participant, as returned by the partition functions.
    num_clients : int, optional
        Number of clients (clients without participants get an empty array); default
        ``max(client_ids) + 1``.

    Returns
    -------
    list of numpy.ndarray of int64
        ``result[p]`` holds the positions (``iloc``) of client ``p``'s participants, ascending.
    """
    values = np.asarray(client_ids, dtype=np.int64)
    count = int(values.max()) + 1 if num_clients is None else int(num_clients)
    if values.size and (values.min() < 0 or values.max() >= count):
        raise ValueError(f"client ids must be in [0, {count}), got range [{values.min()}, {values.max()}]")
    return [np.flatnonzero(values == p) for p in range(count)]


def partition_summary(participants: pd.DataFrame, client_ids: pd.Series | Sequence[int] | np.ndarray) -> pd.DataFrame:
    """Per-client sizes, ages and sites of a partition.

    Parameters
    ----------
    participants : pandas.DataFrame
        Needs ``age``; ``site`` is summarised when present.
    client_ids : pandas.Series or array-like of int
        Client of each participant (a Series is aligned on the index).

    Returns
    -------
    pandas.DataFrame
        One row per client holding participants, sorted by ``client_id``: ``client_id``,
        ``num_examples``, ``age_mean``, ``age_sd`` (sample standard deviation, ``ddof=1``; NaN for
        a single participant), ``age_min``, ``age_max`` (years) and ``sites``
        (``"site1:12,site2:3"``, sites in natural order; ``""`` without a site column).
    """
    ages = _ages(participants)
    ids = _align(participants, client_ids)
    sites = participants["site"].astype(str).to_numpy() if "site" in participants.columns else None
    rows = []
    for p in np.unique(ids):
        members = ids == p
        a = ages[members]
        if sites is None:
            site_text = ""
        else:
            labels, counts = np.unique(sites[members], return_counts=True)
            pairs = sorted(zip(labels.tolist(), counts.tolist(), strict=True), key=lambda pc: _natural_key(pc[0]))
            site_text = ",".join(f"{label}:{count}" for label, count in pairs)
        rows.append(
            {
                "client_id": int(p),
                "num_examples": int(members.sum()),
                "age_mean": float(a.mean()),
                "age_sd": float(a.std(ddof=1)) if len(a) > 1 else float("nan"),
                "age_min": float(a.min()),
                "age_max": float(a.max()),
                "sites": site_text,
            }
        )
    return pd.DataFrame(
        rows, columns=["client_id", "num_examples", "age_mean", "age_sd", "age_min", "age_max", "sites"]
    )

"""Retrieval protocols: which images become train, query and database.

Every format with no fixed split of its own uses the same seeded per-class sampling
(the deep-hashing convention, e.g. CIFAR-10's 100 query and 500 train images per class).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from dsah_rt.errors import DataError

from .core import Split

# Query = the dataset's own test set; train = database = its own train set.
OFFICIAL = "official"


@dataclass(frozen=True)
class Sampled:
    """Per class: `query_per_class` query images, then `train_per_class` train images from the
    rest (None: all the rest); the database is what is left, plus the train images if
    `train_in_database`."""

    query_per_class: int
    train_per_class: int | None
    train_in_database: bool


Protocol = Sampled | str


def resolve_protocol(
    name: str,
    table: Mapping[str, Protocol],
    where: str,
    *,
    query_per_class: int | None = None,
    train_per_class: int | None = None,
    train_in_database: bool | None = None,
) -> Protocol:
    """The protocol `name` from `table`, with any per-class option that is not None overriding it."""
    if name not in table:
        raise DataError(f"{where}: unknown protocol {name!r} (known: {', '.join(table)})")
    protocol = table[name]
    overrides = {
        k: v
        for k, v in dict(
            query_per_class=query_per_class,
            train_per_class=train_per_class,
            train_in_database=train_in_database,
        ).items()
        if v is not None
    }
    if not overrides:
        return protocol
    if protocol == OFFICIAL:
        raise DataError(
            f"{where}: protocol {name!r} uses the official split; "
            f"{', '.join(overrides)} only apply to a sampled protocol"
        )
    return replace(protocol, **overrides)


def sample_indices(
    labels: np.ndarray,
    protocol: Sampled,
    seed: int,
    where: str,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, query, database) row indices of `labels` under `protocol`.

    Query comes first so that changing `train_per_class` never changes the query set.
    """
    if labels.ndim != 1:
        raise DataError(f"{where}: per-class sampling needs one class per image, not multi-hot labels")
    q, t = protocol.query_per_class, protocol.train_per_class
    _check_count(q, "query_per_class", where)
    if t is not None:
        _check_count(t, "train_per_class", where)
    rng = np.random.default_rng(seed)
    train, query, rest = [], [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        need = q + (1 if t is None else t)
        if len(rows) < need:
            name = class_names[c] if class_names is not None else str(c)
            raise DataError(
                f"{where}: class {name} has {len(rows)} images; the protocol needs at least {need} "
                f"({q} query + {'the rest' if t is None else t} train)"
            )
        query.append(rows[:q])
        train.append(rows[q:] if t is None else rows[q : q + t])
        rest.append(rows[:0] if t is None else rows[q + t :])
    train_idx, query_idx, rest_idx = (np.sort(np.concatenate(p)) for p in (train, query, rest))
    database_idx = np.union1d(rest_idx, train_idx) if protocol.train_in_database else rest_idx
    if database_idx.size == 0:
        raise DataError(
            f"{where}: the database would be empty (train takes every non-query image); "
            "set train_per_class or train_in_database"
        )
    return train_idx, query_idx, database_idx


def apply_protocol(
    pool: Split,
    protocol: Protocol,
    seed: int,
    where: str,
    *,
    official_train: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Split, Split, Split]:
    """(train, query, database) cut from `pool`.

    For OFFICIAL the pool's first `official_train` rows are the official train set and the
    remaining rows the official test set.
    """
    if protocol == OFFICIAL:
        if official_train is None:
            raise DataError(f"{where}: this dataset has no official split")
        train = pool.subset(np.arange(official_train))
        return train, pool.subset(np.arange(official_train, len(pool))), train
    train_idx, query_idx, database_idx = sample_indices(
        pool.labels, protocol, seed, where, class_names
    )
    train = pool.subset(train_idx)
    if np.array_equal(database_idx, train_idx):
        return train, pool.subset(query_idx), train
    return train, pool.subset(query_idx), pool.subset(database_idx)


def _check_count(value: object, name: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{where}: {name} must be a positive whole number, got {value!r}")

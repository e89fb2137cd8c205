"""Codes and labels for the retrieval benchmarks, by name: every distribution a user's codes may have.

Distributions (packed uint8 codes, numpy packbits MSB-first):
  uniform         every bit a fair coin: distances pile up around bits/2, the kernels' worst case
                  for ties per distance and the friendliest for nobody
  clustered-P     P prototypes, 15% of bits flipped per item: what a trained hashing model gives
                  (P = 10: CIFAR-like; P = 1000: many small clusters, near ties everywhere)
  trained         the codes of a run of the main job (`--trained RUN_DIR`), tiled to the size asked

Labels:
  random          class ids drawn independently of the codes (MAP near the class prior)
  correlated      class id from the code itself (its prototype, or its first byte for uniform codes)
  multi-random    21 multi-hot labels, each on with probability 0.1, independent of the codes
  multi-correlated  21 multi-hot labels: 1-3 per prototype (or per first byte), plus one random one
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = 10
MULTI_LABELS = 21
NOISE = 0.15
LABELS = ("random", "correlated", "multi-random", "multi-correlated")


def _groups(kind: str, n: int, bits: int, rng: np.random.Generator, protos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(unpacked 0/1 codes, the group each item comes from) for a synthetic distribution."""
    if kind == "uniform":
        codes = rng.integers(0, 2, (n, bits), dtype=np.uint8)
        return codes, np.packbits(codes[:, :8], axis=1)[:, 0].astype(np.int64)
    group = rng.integers(0, len(protos), n)
    return protos[group] ^ (rng.random((n, bits)) < NOISE).astype(np.uint8), group


def _labels(kind: str, group: np.ndarray, rng: np.random.Generator, table: np.ndarray) -> np.ndarray:
    n = len(group)
    if kind == "random":
        return rng.integers(0, CLASSES, n)
    if kind == "correlated":
        return group % CLASSES
    if kind == "multi-random":
        return (rng.random((n, MULTI_LABELS)) < 0.1).astype(np.uint8)
    labels = table[group % len(table)].copy()
    labels[np.arange(n), rng.integers(0, MULTI_LABELS, n)] = 1
    return labels


def synthetic(distribution: str, labels: str, nq: int, ndb: int, bits: int, seed: int = 0):
    """(query codes, database codes, query labels, database labels), packed codes."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    rng = np.random.default_rng(seed)
    protos = None
    if distribution.startswith("clustered-"):
        protos = rng.integers(0, 2, (int(distribution.split("-", 1)[1]), bits), dtype=np.uint8)
    elif distribution != "uniform":
        raise ValueError(f"unknown distribution {distribution!r}")
    groups = 256 if protos is None else len(protos)
    table = np.zeros((groups, MULTI_LABELS), np.uint8)
    for g in range(groups):
        table[g, rng.choice(MULTI_LABELS, rng.integers(1, 4), replace=False)] = 1
    out = []
    for n in (nq, ndb):
        codes, group = _groups(distribution, n, bits, rng, protos)
        out.append((np.packbits(codes, axis=1), _labels(labels, group, rng, table)))
    (q, ql), (d, dl) = out
    return q, d, ql, dl


def trained(run_dir: Path, nq: int, ndb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """A trained run's query and database codes with their labels, tiled (repeated) to the sizes asked:
    its distribution of distances, duplicated items included. Returns (..., bits)."""
    from dsah_rt.codes import read_codes

    query, db = read_codes(run_dir / "query_codes.npy"), read_codes(run_dir / "db_codes.npy")
    ql, dl = np.load(run_dir / "query_labels.npy"), np.load(run_dir / "db_labels.npy")
    qi, di = np.arange(nq) % len(query), np.arange(ndb) % len(db)
    return query.packed[qi], db.packed[di], ql[qi], dl[di], db.bits

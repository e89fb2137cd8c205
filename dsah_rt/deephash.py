"""Codes and labels in DeepHash-pytorch's layout (github.com/swuxyj/DeepHash-pytorch), on request.

Its `validate` saves the query set as `tst_binary.npy` / `tst_label.npy` and the database (which it
calls trn) as `trn_binary.npy` / `trn_label.npy`: codes as the float32 output of `torch.sign` (±1),
CIFAR-10's labels one-hot int8 (`np.eye(10, dtype=np.int8)[label]`) and its list-file datasets'
labels as the multi-hot int64 rows it parsed. `export_deephash` writes ours the same way, so its
`CalcTopMap` and `pr_curve` read them as they are. The way back needs no converter: `read_codes`
takes ±1 floats, and `zeros_as` the exact zeros its `sign` leaves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsah_rt.atomic import atomic_write, check_parent
from dsah_rt.codes import read_codes, read_labels, unpack
from dsah_rt.errors import CodesError

# argument -> file name, in the order written
FILES = {
    "query_codes": "tst_binary.npy",
    "query_labels": "tst_label.npy",
    "db_codes": "trn_binary.npy",
    "db_labels": "trn_label.npy",
}


def sign_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes -> (N, bits) float32 ±1, bit 1 as +1."""
    return unpack(packed, bits).astype(np.float32) * 2 - 1


def label_rows(labels: np.ndarray, classes: int) -> np.ndarray:
    """Class ids -> one-hot int8 over `classes` (CIFAR-10's form there); multi-hot rows -> int64."""
    if labels.ndim == 2:
        return labels.astype(np.int64)
    return np.eye(classes, dtype=np.int8)[labels]


def _classes(labels: list[np.ndarray]) -> int:
    """One class count for every class-id file, so query and database one-hot rows line up."""
    ids = [lab for lab in labels if lab.ndim == 1 and len(lab)]
    return max(int(lab.max()) for lab in ids) + 1 if ids else 0


def export_deephash(
    out: str | os.PathLike[str],
    query_codes: str | os.PathLike[str] | None = None,
    db_codes: str | os.PathLike[str] | None = None,
    query_labels: str | os.PathLike[str] | None = None,
    db_labels: str | os.PathLike[str] | None = None,
    bits: int | None = None,
) -> dict[str, Path]:
    """Write each given file in DeepHash-pytorch's layout into the folder `out` (created if missing).

    Everything is read and checked before the first file is written (rows of labels against their
    codes, query against database), each file atomically. Returns {argument name: path written}.
    """
    sources = {"query_codes": query_codes, "db_codes": db_codes, "query_labels": query_labels, "db_labels": db_labels}
    given = {name: path for name, path in sources.items() if path is not None}
    if not given:
        raise CodesError("nothing to export: give at least one of --query-codes, --db-codes, --query-labels, --db-labels")
    out = Path(out)
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise CodesError(f"{out}: exists and is not a folder")
    codes = {name: read_codes(given[name], bits) for name in ("query_codes", "db_codes") if name in given}
    if len({c.bits for c in codes.values()}) > 1:
        raise CodesError(f"{query_codes} has {codes['query_codes'].bits}-bit codes but {db_codes} has {codes['db_codes'].bits}")
    labels = {}
    for name in ("query_labels", "db_labels"):
        if name in given:
            paired = codes.get(name.replace("labels", "codes"))
            labels[name] = read_labels(given[name], rows=None if paired is None else len(paired))
    if len({lab.shape[1:] for lab in labels.values()}) > 1:
        raise CodesError(f"{query_labels} and {db_labels} hold labels of different kinds (class ids, multi-hot widths)")
    classes = _classes(list(labels.values()))
    arrays = {
        **{name: sign_codes(c.packed, c.bits) for name, c in codes.items()},
        **{name: label_rows(lab, classes) for name, lab in labels.items()},
    }
    out.mkdir(exist_ok=True)
    return {
        name: atomic_write(out / filename, lambda fh, a=arrays[name]: np.save(fh, a, allow_pickle=False))
        for name, filename in FILES.items()
        if name in arrays
    }

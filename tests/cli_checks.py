"""Checks and input files shared by the command-line tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsah_rt.codes import pack, write_codes


def random_eval_files(
    folder: Path, seed: int, queries: int, database: int, bits: int, classes: tuple[int, int] = (3, 3)
) -> tuple[np.ndarray, np.ndarray]:
    """What `dsah-rt eval` reads, random: q.npy and db.npy (packed, with manifests; db rows named
    img<i>.jpg), and class ids ql.npy / dl.npy below `classes` (query, database). Returns the 0/1 bits."""
    rng = np.random.default_rng(seed)
    q01 = rng.integers(0, 2, (queries, bits), dtype=np.uint8)
    db01 = rng.integers(0, 2, (database, bits), dtype=np.uint8)
    write_codes(folder / "q.npy", pack(q01), bits)
    write_codes(folder / "db.npy", pack(db01), bits, rows=[f"img{i}.jpg" for i in range(database)])
    np.save(folder / "ql.npy", rng.integers(0, classes[0], queries))
    np.save(folder / "dl.npy", rng.integers(0, classes[1], database))
    return q01, db01


def assert_one_line_error(res, message: str, folder: Path, outputs: str) -> None:
    """A user error: non-zero exit, one line holding `message`, no traceback, and in `folder` neither
    an output matching `outputs` nor a temporary file left behind."""
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output
    assert not list(folder.glob(outputs)) and not list(folder.glob(".*tmp"))

"""Shared hypothesis strategies for the retrieval core."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile("dsah", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dsah")

CODE_LENGTHS = [8, 12, 24, 36, 48, 64, 96, 128, 256]


@st.composite
def code_sets(draw, max_q: int = 6, max_db: int = 60, bits=None, max_classes: int = 4, multilabel=None):
    """Queries, database (unpacked 0/1) and labels with many ties: few distinct codes, small k."""
    k = draw(st.sampled_from(CODE_LENGTHS if bits is None else [bits]))
    nq = draw(st.integers(1, max_q))
    ndb = draw(st.integers(1, max_db))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Codes drawn from a few prototypes with sparse flips: distances repeat a lot (ties).
    protos = rng.integers(0, 2, (draw(st.integers(1, 5)), k), dtype=np.uint8)
    flip = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5]))

    def sample(n: int) -> np.ndarray:
        base = protos[rng.integers(0, len(protos), n)]
        return base ^ (rng.random((n, k)) < flip).astype(np.uint8)

    q01, db01 = sample(nq), sample(ndb)
    classes = draw(st.integers(1, max_classes))
    multi = draw(st.booleans()) if multilabel is None else multilabel
    if multi:
        qlab = (rng.random((nq, classes)) < 0.4).astype(np.uint8)
        dblab = (rng.random((ndb, classes)) < 0.4).astype(np.uint8)
    else:
        # Labels may include a class no database item has: queries without any relevant item.
        qlab = rng.integers(0, classes + 1, nq)
        dblab = rng.integers(0, classes, ndb)
    return k, q01, db01, qlab, dblab


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """(run_dir, model.onnx): one tiny DSaH run, exported and verified once for the whole session."""
    from dsah_fixtures import exported

    return exported(tmp_path_factory.getbasetemp() / "models")

"""The OpenMP wait policy every torch-running command sets before torch starts."""

from __future__ import annotations

import os


def passive_openmp() -> str:
    """Make OpenMP threads sleep between calls instead of spinning; returns the policy in force.

    PyTorch's OpenMP threads otherwise spin between calls, as ONNX Runtime's would without
    allow_spinning=0: on the shared 2-core machine that took torch's batch-1 median from 3.3 ms
    to 38 ms (p99 4 ms to 220 ms), and slowed training 4x. Call before torch starts (libgomp reads
    it once); spawned children inherit it. A user's own setting wins.
    """
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

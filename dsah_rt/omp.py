"""The OpenMP wait policy every torch-running command sets before torch starts."""

from __future__ import annotations

import os


def passive_openmp() -> str:
    """Make OpenMP threads sleep between calls instead of spinning; returns the policy in force.

    PyTorch's OpenMP threads otherwise spin between calls, as ONNX Runtime's would without
    allow_spinning=0, taking the cores that decoders and other processes need (what that cost
    is measured in the README, "dsah-rt bench" and "Training"). Call before torch starts (libgomp
    reads it once); spawned children inherit it. A user's own setting wins.
    """
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

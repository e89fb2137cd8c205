"""The `torch` backend: the trained PyTorch model on a RUN_DIR, the reference exports are checked against.

It is implemented outside the runtime core (`dsah_rt.export.torch_runner`, since it runs the fused
export wrapper) and registered here by module path: torch loads only when a RUN_DIR is run.
"""

from __future__ import annotations

import importlib.util

from dsah_rt.runners.registry import Backend, register


def torch_unavailable_reason() -> str | None:
    """Whether PyTorch is installed, asked without importing it."""
    if importlib.util.find_spec("torch") is None:
        return "the torch backend needs PyTorch (pip install 'dsah-rt[train]')"
    return None


register(Backend("torch", "run", "dsah_rt.export.torch_runner:runner_for", torch_unavailable_reason))

"""The backend registry: every `--backend` name, the model kind it runs and why it cannot run here.

A runner module registers its backends when it is imported (`register(Backend(...))`); a backend
implemented outside the runtime core names its factory as "module:attribute", imported only when
that backend is built, so registering it costs nothing. `make_runner`, `--backend auto`, the
`--backend` choices and the benchmark's backend table all read this one table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsah_rt.runners.base import ModelError

if TYPE_CHECKING:
    from dsah_rt.runners.base import Runner

# model kind -> (what it is, how to make one): for the message when a backend is given the wrong kind.
KINDS: dict[str, tuple[str, str]] = {
    "run": ("a training RUN_DIR", ""),
    "onnx": ("an ONNX file", "export it first: 'dsah-rt export RUN_DIR --out model.onnx'"),
    "engine": ("a TensorRT engine", "build one: 'dsah-rt export model.onnx --trt model.engine'"),
}

# factory(path, threads=..., bits=...) -> an inactive runner whose loader has not run yet.
Factory = Callable[..., "Runner"]


@dataclass(frozen=True)
class Backend:
    """One `--backend` name. Backends of a kind are tried by `auto` in registration order, fastest first."""

    name: str
    kind: str  # a key of KINDS
    factory: Factory | str  # a callable, or "module:attribute" imported when first built
    unavailable: Callable[[], str | None]  # cheap (imports, devices; no model): None when usable here
    device: str = "cpu"  # where it computes: cpu | cuda

    def build(self, path: Path, threads: int | None = None, bits: int | None = None) -> Runner:
        """The runner for `path`, not yet activated (its loader runs on activate)."""
        factory = self.factory
        if isinstance(factory, str):
            module, attr = factory.split(":")
            try:
                factory = getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                reason = self.unavailable() or f"{exc.name} is not installed"
                raise ModelError(f"--backend {self.name}: {reason}") from None
        return factory(path, threads=threads, bits=bits)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    if backend.kind not in KINDS:
        raise ValueError(f"backend {backend.name}: unknown model kind {backend.kind!r} (known: {', '.join(KINDS)})")
    if backend.name in (*_REGISTRY, "auto"):
        raise ValueError(f"backend name {backend.name} is taken")
    _REGISTRY[backend.name] = backend


def backends(kind: str | None = None) -> list[Backend]:
    """Registered backends (of one model kind), in registration order."""
    return [b for b in _REGISTRY.values() if kind is None or b.kind == kind]


def backend_names() -> tuple[str, ...]:
    """What `--backend` accepts: auto, then every registered backend."""
    return ("auto", *_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ModelError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return _REGISTRY[name]

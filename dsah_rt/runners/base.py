"""The Runner interface (in the spirit of Polygraphy's runners) and the model metadata it reads.

A runner turns uint8 RGB images [N, 3, S, S] into packed codes uint8 [N, ceil(k/8)]:

    with make_runner("model.onnx") as runner:
        codes = runner.infer(images)

`activate()` acquires the session or engine, `deactivate()` releases it, `describe()` says what
actually runs (backend, providers in use, precision, bits, input size). Every backend checks its
input the same way here, so a wrong size or dtype fails with the same message everywhere.

The runner modules import numpy (and the codes module) only where arrays are handled: the
`--backend` choices in every command's `--help` come from registering them, which must stay fast.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from dsah_rt import __version__
from dsah_rt.errors import UserError

if TYPE_CHECKING:
    import numpy as np

MODEL_FORMAT = "dsah-rt-model/1"
META_PREFIX = "dsah_rt."


class ModelError(UserError):
    """A model file that is not a usable dsah-rt model, or that does not fit the request."""


@dataclass(frozen=True)
class ModelInfo:
    """What a dsah-rt model promises: stored as ONNX metadata and in an engine's sidecar."""

    method: str
    backbone: str
    bits: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    with_u: bool = False
    bit_order: str = "msb"
    bit_rule: str = "u >= 0"
    version: str = __version__
    format: str = MODEL_FORMAT

    @property
    def nbytes(self) -> int:
        from dsah_rt.codes import nbytes_for

        return nbytes_for(self.bits)

    def to_metadata(self) -> dict[str, str]:
        """Flat string properties (ONNX metadata_props): numbers and strings as text, lists as JSON."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, (list, tuple, bool)):
                value = json.dumps(value)
            out[META_PREFIX + key] = str(value)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], fingerprint: str, with_u: bool) -> ModelInfo:
        """What an export of a run with this config (`load_run`) and weight fingerprint carries."""
        return cls(
            method=config["method"],
            backbone=config["backbone"],
            bits=int(config["bits"]),
            input_size=int(config["input_size"]),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            fingerprint=fingerprint,
            with_u=with_u,
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ModelInfo:
        if meta.get(META_PREFIX + "format") != MODEL_FORMAT:
            found = meta.get(META_PREFIX + "format")
            raise ModelError(
                f"{where}: not a dsah-rt model (metadata format is {found!r}, expected {MODEL_FORMAT!r}); "
                "export one with 'dsah-rt export RUN_DIR --out model.onnx'"
            )
        from dsah_rt.codes import MAX_BITS

        try:
            values = {f.name: _parse(str(f.type), meta[META_PREFIX + f.name]) for f in fields(cls)}
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{where}: dsah-rt metadata is incomplete or malformed ({exc!r})") from None
        if not 1 <= values["bits"] <= MAX_BITS or values["input_size"] < 1:
            raise ModelError(
                f"{where}: metadata bits {values['bits']} or input size {values['input_size']} is out of range "
                f"(bits 1..{MAX_BITS}, input size >= 1)"
            )
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """What a codes manifest records about the model that made its codes."""
        return {k: v for k, v in asdict(self).items() if k not in ("with_u", "format")}


def check_output_contract(outputs: dict[str, tuple[str, list[Any]]], info: ModelInfo, where: str) -> None:
    """Refuse a model whose outputs are not what `info` promises: `codes` uint8 [batch, ceil(k/8)]
    (and `u` float32 [batch, k] when exported with it), the batch dynamic.

    `outputs` maps each output's name to its element type (a NumPy dtype name) and its dims, a
    dynamic one as a name or None. Runners check the graph they load with it, `verify` the shapes
    ONNX infers: a model that breaks it would otherwise fail inside `encode`, mid-way.
    """
    expected = {"codes": ("uint8", info.nbytes)}
    if info.with_u:
        expected["u"] = ("float32", info.bits)
    for name, (dtype, width) in expected.items():
        got = outputs.get(name)
        if got is None or got[0] != dtype or len(got[1]) != 2 or got[1][1] != width or isinstance(got[1][0], int):
            raise ModelError(f"{where}: output {name} is {got}, expected {dtype} [batch, {width}] with a dynamic batch")


def _parse(type_name: str, raw: str) -> Any:
    """Inverse of to_metadata, by the field's annotation (a string under postponed evaluation)."""
    if type_name == "int":
        return int(raw)
    if type_name == "bool":
        return json.loads(raw) is True
    if type_name.startswith("tuple"):
        return tuple(float(v) for v in json.loads(raw))
    return raw


class Runner(ABC):
    """activate / infer / deactivate over one model; a context manager activates and deactivates.

    A runner is built around a lazy loader and reads its `info` in `_activate`, from what the
    loader really loaded (session metadata, engine sidecar, checkpoint): nothing is read twice,
    and building a runner costs nothing. A wrapper may pass the `info` it already knows.
    """

    backend: ClassVar[str]

    def __init__(self, info: ModelInfo | None, source: str) -> None:
        self._info = info
        self.source = source
        self.is_active = False
        # Set by make_runner(backend="auto") to say why this backend was chosen.
        self.selection_note = ""

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} has loaded no model yet: call activate() or use it in a with block")
        return self._info

    @info.setter
    def info(self, info: ModelInfo) -> None:
        self._info = info

    # -- lifecycle --------------------------------------------------------------------------
    def activate(self) -> None:
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- inference --------------------------------------------------------------------------
    @property
    def max_batch(self) -> int | None:
        """The largest batch one call into the backend takes (None: any); infer splits larger ones."""
        return None

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, S, S] RGB -> packed codes uint8 [N, ceil(k/8)], MSB first, bit = u >= 0."""
        return self._batched(images, with_u=False)[0]

    def infer_with_u(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, u): u is the real-valued hash output, for diagnostics (needs a model with u)."""
        if not self.info.with_u:
            raise ModelError(f"{self.source}: exported without the diagnostic output u (export with --with-u)")
        codes, u = self._batched(images, with_u=True)
        assert u is not None
        return codes, u

    def _batched(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import numpy as np

        if not self.is_active:
            raise RuntimeError(f"{type(self).__name__} is not active: call activate() or use it in a with block")
        images = self.check_images(images)
        step = self.max_batch or len(images)
        parts = [self._run(images[i : i + step], with_u) for i in range(0, len(images), step)]
        codes = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        # A graph may declare the promised shape and compute another; a short or wide result would
        # only fail later, far from its cause (encode pairs codes with files in order).
        if codes.dtype != np.uint8 or codes.shape != (len(images), self.info.nbytes):
            raise ModelError(
                f"{self.source}: gave codes {codes.dtype} {list(codes.shape)} for {len(images)} images, "
                f"expected uint8 [{len(images)}, {self.info.nbytes}]"
            )
        u = None
        if with_u:
            u = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return codes, u

    def check_images(self, images: np.ndarray) -> np.ndarray:
        import numpy as np

        s = self.info.input_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ModelError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or len(images) == 0:
            raise ModelError(
                f"{self.source}: model takes images [N>=1, 3, {s}, {s}] (its input size is {s}), "
                f"got {list(images.shape)}"
            )
        return np.ascontiguousarray(images)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.source,
            "bits": self.info.bits,
            "input_size": self.info.input_size,
            "fingerprint": self.info.fingerprint,
            **({"selected": self.selection_note} if self.selection_note else {}),
            **self._describe(),
        }

    @abstractmethod
    def _activate(self) -> None:
        """Call the loader, keep what it loaded and set `self.info` from it."""

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def _run(self, images: np.ndarray, with_u: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One backend call on a checked, contiguous batch of at most max_batch images."""

    @abstractmethod
    def _describe(self) -> dict[str, Any]: ...

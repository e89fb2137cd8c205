"""Command-line options shared by commands of several stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from dsah_rt.errors import UserError


class BackendChoice(click.Choice):
    """The runner registry's backend names, read when first needed: importing the runners (numpy)
    at import time would slow every command's start, `dsah-rt --help` included."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> Sequence[str]:
        from dsah_rt.runners import backend_names

        return backend_names()

    @choices.setter
    def choices(self, _: Sequence[str]) -> None:
        """click.Choice assigns its choices in __init__; these come from the registry instead."""


def backend_option(model: str = "--model") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--backend: which registered runner runs `model` (the option or argument naming the model)."""
    help = f"Runner for {model}; auto: the fastest for its kind (onnx, engine, run) that starts here."
    return click.option("--backend", type=BackendChoice(), default="auto", show_default=True, help=help)


def _sign(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else int(value)


def zeros_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--zeros-as: read ±1 codes files holding exact zeros (DeepHash-pytorch saves `torch.sign`'s output)."""
    help = ("Read ±1 codes with exact zeros (torch.sign of a zero output, as DeepHash-pytorch saves them), "
            "each zero as +1 or -1; without it such files are refused.")  # fmt: skip
    return click.option("--zeros-as", type=click.Choice(["+1", "-1"]), default=None, callback=_sign, help=help)


class AtLeast(click.ParamType):
    """An integer option with a lower bound. Below it the command stops with one line (a UserError),
    where a clamp would have run with a value the user did not ask for (--threads 0 ran on one)."""

    name = "integer"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = click.INT.convert(value, param, ctx)
        if number < self.minimum:
            flag = param.opts[0] if param is not None else "value"
            raise UserError(f"{flag} must be at least {self.minimum}, got {number}")
        return number


def mixed_models_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--allow-mixed-models: compare codes whose manifests name different models."""
    help = "Compare codes made by different models (their manifests' fingerprints differ); refused without it."
    return click.option("--allow-mixed-models", is_flag=True, help=help)

"""Command-line options shared by commands of several stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click


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

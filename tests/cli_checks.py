"""Checks shared by the command-line tests."""

from __future__ import annotations

from pathlib import Path


def assert_one_line_error(res, message: str, folder: Path, outputs: str) -> None:
    """A user error: non-zero exit, one line holding `message`, no traceback, and in `folder` neither
    an output matching `outputs` nor a temporary file left behind."""
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output
    assert not list(folder.glob(outputs)) and not list(folder.glob(".*tmp"))

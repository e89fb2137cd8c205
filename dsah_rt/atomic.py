"""Atomic file output: write a temporary file in the target folder, then rename it into place.

A crash, a full disk or Ctrl-C leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from dsah_rt.errors import UserError


def check_parent(path: str | os.PathLike[str] | None) -> None:
    """Fail before any work is done when an output's folder is missing."""
    if path is not None and not Path(path).parent.is_dir():
        raise UserError(f"{path}: folder {Path(path).parent} does not exist")


PathArg = str | os.PathLike[str] | None


def check_outputs(outputs: Iterable[PathArg], inputs: Iterable[PathArg] = ()) -> None:
    """Fail before any work is done when an output's folder is missing or an output is one of the
    command's input files (symlinks resolved): replacing it would destroy what is being read."""
    sources = {Path(p).resolve() for p in inputs if p is not None and Path(p).is_file()}
    for out in outputs:
        check_parent(out)
        if out is not None and Path(out).resolve() in sources:
            raise UserError(f"{out}: is also an input of this command; choose another output path")


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], suffix: str = ".tmp") -> Path:
    """Call write(fh) on a temporary binary file beside `path`, fsync, and rename it to `path`."""
    check_parent(path)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1))


def write_report(report: Any, markdown: str, json_out: str | None, md_out: str | None) -> None:
    """A benchmark's outputs: everything as JSON, the tables as markdown, each only if asked for."""
    if json_out:
        write_json(json_out, report)
    if md_out:
        write_text(md_out, markdown)

"""Atomic file output: write a temporary file in the target folder, then rename it into place.

A crash, a full disk or Ctrl-C leaves either the old file or the new one, never a partial one;
`write_together` extends that to several files replaced as one unit (a codes file and its
manifest). Every OS error on an output becomes an `OutputError` naming the output and the cause.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from dsah_rt.errors import OutputError, UserError

PathArg = str | os.PathLike[str] | None
Writer = Callable[[IO[bytes]], Any]


def check_parent(path: PathArg) -> None:
    """Fail before any work is done when an output's folder is missing."""
    if path is not None and not Path(path).parent.is_dir():
        raise UserError(f"{path}: folder {Path(path).parent} does not exist")


def check_file_output(path: str | os.PathLike[str]) -> None:
    """check_parent, and fail when the output exists but is not a regular file: a device, a pipe
    such as /proc/self/fd/1 or /dev/stdout, or a folder would be replaced by the rename (as root,
    /dev/null too), not written into."""
    check_parent(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet (or a dangling symlink): the rename creates it
        return
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: not a regular file; outputs are written to a new file renamed into place")


def check_outputs(outputs: Iterable[PathArg], inputs: Iterable[PathArg] = ()) -> None:
    """Fail before any work is done when an output file cannot be written (check_file_output) or
    is one of the command's input files (symlinks resolved): replacing it would destroy what is
    being read."""
    sources = {Path(p).resolve() for p in inputs if p is not None and Path(p).is_file()}
    for out in outputs:
        if out is None:
            continue
        check_file_output(out)
        if Path(out).resolve() in sources:
            raise UserError(f"{out}: is also an input of this command; choose another output path")


@contextmanager
def output_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Report any OS error inside the block as one line naming the output `path` and the cause."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def atomic_write(path: str | os.PathLike[str], write: Writer, suffix: str = ".tmp") -> Path:
    """Call write(fh) on a temporary binary file beside `path`, fsync, and rename it to `path`."""
    return write_together([(path, write)], suffix)[0]


def write_together(files: Sequence[tuple[str | os.PathLike[str], Writer]], suffix: str = ".tmp") -> list[Path]:
    """Write several files, then switch them into place as one unit; return their paths.

    Guarantee: when this returns, every file holds its new content, fsynced, and so do the
    folders' entries. When it raises (full disk, read-only folder, Ctrl-C or SIGTERM, a failing
    `write`), every file holds its previous content or is still absent, and no temporary or
    backup file is left. Two exceptions: an I/O error syncing the folder after the switch is
    reported with the new files in place, and a previous version that cannot be put back stays
    beside its file as a hidden `.NAME.*.old`.

    How: every new file is written and fsynced under a temporary name first, so a full disk fails
    before anything is replaced; then they are renamed in the given order, each but the last
    after a hard link to its previous version is kept aside, which undoes the rename if a later
    one fails. Only a crash (SIGKILL, power loss) between two renames can leave a mixed set: the
    files listed first new, the rest old, and hidden `.NAME.*` files beside them. A caller that
    needs the set consistent orders it so that readers catch a mix (`codes.write_codes`: the
    manifest, holding the codes' hash, goes first).
    """
    targets = [Path(path) for path, _ in files]
    for target in targets:
        check_file_output(target)
    staged: list[Path] = []
    switched: list[tuple[Path, Path | None]] = []  # target, and its previous version kept aside
    try:
        for target, (_, write) in zip(targets, files):
            with output_errors(target):
                staged.append(_write_temp(target, write, suffix))
        for i, (target, temp) in enumerate(zip(targets, staged)):
            with output_errors(target):
                if i < len(targets) - 1:
                    switched.append((target, _keep_aside(target)))
                os.replace(temp, target)
    except BaseException:
        _undo(switched)
        for temp in staged:
            temp.unlink(missing_ok=True)
        raise
    for _, backup in switched:
        if backup is not None:
            backup.unlink(missing_ok=True)
    for folder in {target.parent for target in targets}:
        with output_errors(folder):
            _fsync_folder(folder)
    return targets


def _write_temp(path: Path, write: Writer, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    temp = Path(name)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc.__context__, KeyboardInterrupt) and not isinstance(exc, KeyboardInterrupt):
            # The writer's own cleanup failed while the interrupt unwound it (torch.save's zip writer
            # raises RuntimeError from its __exit__): the cause is still Ctrl-C or SIGTERM.
            raise exc.__context__ from None
        raise
    return temp


def _keep_aside(target: Path) -> Path | None:
    """A second name for `target`'s current file (None when there is none), to restore it from."""
    if not os.path.lexists(target):
        return None
    backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    try:
        os.link(target, backup)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        # A filesystem without hard links: move the file aside, and undo restores it the same way.
        os.replace(target, backup)
    return backup


def _undo(switched: list[tuple[Path, Path | None]]) -> None:
    """Put back what `switched` replaced, newest first. Best effort, since this runs on a failure:
    a backup that cannot be put back stays, as the one copy of the previous version."""
    for target, backup in reversed(switched):
        with suppress(OSError):
            if backup is None:
                target.unlink(missing_ok=True)
            elif os.path.lexists(target) and os.path.samestat(os.lstat(target), os.lstat(backup)):
                backup.unlink()  # the failed rename left the previous version in place
            else:
                os.replace(backup, target)


def _fsync_folder(folder: Path) -> None:
    """Make the renames into `folder` durable (a file's fsync does not cover its name)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a filesystem that cannot sync a folder has nothing to sync
            raise
    finally:
        os.close(fd)


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file `output_lock` holds for `path`: `.NAME.lock` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `path` (an flock on `lock_path(path)`) for the block, or refuse at
    once with an OutputError when another process holds it. The lock file is removed afterwards;
    one left by a killed process is harmless, since the kernel dropped its lock."""
    lock = lock_path(path)
    with output_errors(path):
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"{path}: another process is writing it (it holds {lock.name}); wait for it or choose another output"
                ) from None
            # The previous holder removes the file as it ends; a lock taken on the removed file
            # excludes nobody, so lock the file now under that name instead.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: nobody can lock the name's file in between
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def json_writer(obj: Any) -> Writer:
    """A `write` for atomic_write and write_together: `obj` as indented JSON."""
    return lambda fh: fh.write(json.dumps(obj, indent=1).encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write(path, json_writer(obj))


def write_report(report: Any, markdown: str, json_out: str | None, md_out: str | None) -> None:
    """A benchmark's outputs: everything as JSON, the tables as markdown, each only if asked for."""
    if json_out:
        write_json(json_out, report)
    if md_out:
        write_text(md_out, markdown)

"""User-facing errors: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import os
import re


class UserError(Exception):
    """Bad input from the user (file, shape, dtype, option). The message names the file and cause."""


class CodesError(UserError):
    """A codes or labels file that cannot be used."""


class DataError(UserError):
    """A dataset that is missing, malformed or inconsistent."""


class SearchIndexError(UserError):
    """An index spec, index file or index operation that cannot be used."""


class OutputError(UserError, OSError):
    """An output that cannot be written: read-only folder, full disk, not a regular file, or locked.

    Also an OSError, so that library callers catching the OS error of a failed write still do."""


# C0 and C1 controls and the Unicode line separators: each could start a forged line or move the
# cursor when printed, since a file name may hold any of them.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def display_path(path: str | os.PathLike[str] | bytes) -> str:
    """A file name safe to print on one line: undecodable bytes of non-UTF-8 names as \\xNN, and
    control characters (a newline, an escape sequence) as Python escapes such as \\n or \\x1b."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def os_error_message(exc: OSError) -> str:
    """'FILE: cause' for an OS error that names its file (the second one too, for a rename)."""
    where = display_path(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {display_path(exc.filename2)}"
    return f"{where}: {exc.strerror or exc}"

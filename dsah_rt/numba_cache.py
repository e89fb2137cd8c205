"""Where Numba keeps the compiled kernels: `cache=True` needs a writable folder, and without one
(a read-only install, another user's checkout, no home) the decorator raises at import time
("cannot cache function ...: no locator available"). `kernel_cache` asks Numba's own locators
first; if none can write, it points Numba at a per-user temporary folder, and if that cannot be
written either, kernels compile in memory: every process pays the compile, none fails. Either
fallback says so once on stderr.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path


def _probe() -> None:
    """A function for Numba's locators to place: they only read its file, line and name."""


@functools.cache
def kernel_cache(source_file: str, fallback: str | None = None) -> bool:
    """True if kernels defined in `source_file` can be cached on disk (pass as `njit(cache=...)`)."""
    from numba.core import caching, config

    locators = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)
    if any(cls.from_function(_probe, source_file) is not None for cls in locators):
        return True
    folder = fallback or os.path.join(tempfile.gettempdir(), f"dsah-rt-numba-{os.getuid()}")
    previous, config.CACHE_DIR = config.CACHE_DIR, folder
    if caching.UserProvidedCacheLocator.from_function(_probe, source_file) is not None:
        _say(f"no writable cache folder beside {Path(source_file).parent} or in the user's cache; "
             f"compiled kernels are cached in {folder}")
        return True
    config.CACHE_DIR = previous
    _say(f"no writable cache folder for compiled kernels (not beside {Path(source_file).parent}, not in the "
         f"user's cache, not {folder}); kernels compile in memory, so every new process compiles them again")
    return False


@functools.cache
def _say(message: str) -> None:
    print(f"dsah-rt: {message}", file=sys.stderr)

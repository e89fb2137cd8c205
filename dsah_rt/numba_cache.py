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


# True in a process the CLI started: see `skip_blas_probe`.
OWN_PROCESS = False


def skip_blas_probe() -> None:
    """In the CLI's own process, keep Numba from importing SciPy to see whether np.dot can use BLAS.

    Numba probes once per process, on its first compilation or cache load, by importing
    scipy.linalg: 0.3-0.4 s of every `search` and `eval`, measured, for a feature (np.dot and
    np.linalg inside kernels) no kernel here uses. With scipy.linalg hidden for that one import the
    probe fails fast; it imports normally afterwards. A library user's process is left as it is, since
    their own Numba code may want BLAS.
    """
    if not OWN_PROCESS or "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment] - None makes an import raise ImportError
    try:
        import numba.np.arraymath  # noqa: F401 - runs the probe
    finally:
        del sys.modules["scipy.linalg"]


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

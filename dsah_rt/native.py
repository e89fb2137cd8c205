"""The hot kernels of `dsah_rt.hamming` and `dsah_rt.mih_kernels` as machine code a process loads
without importing Numba.

A fresh process that imports Numba and loads its cached kernels spends ~0.45 s before the first
comparison (measured, issue 12): more than the whole 1,000 x 1,000,000 search takes. So Numba
compiles the kernels once, as C-callable functions (`native_build`), into a shared library kept
beside the package's bytecode; every later process opens it with ctypes in about a millisecond.
ctypes releases the GIL for each call, so Python threads run blocks of queries in parallel.

Where no library can be built (no C compiler or linker, no writable folder) the same C-callable
functions are compiled by Numba in the process and called the same way: slower to start, same
results. Either way, the kernels never allocate: each thread hands its block a scratch buffer.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

# Each entry: its C parameters in order; "name:type*" is a pointer to an array of that type,
# a bare name an int64. Every entry returns an int64: 0 when done, or minus the words of scratch
# (the `ws` of `nws` words, where it takes one) it needs when given fewer.
ENTRIES: dict[str, str] = {
    "topk": "qw:u64* nq nwords db:u64* n bits k q0 nb dist:i32* idx:i64* ws:i64* nws",
    "ranked": (
        "qw:u64* nq nwords db:u64* n qlab:u64* nlab dblab:u64* bits kmax grid:i64* ngrid q0 nb"
        " hist:i64* ap:f64* found:i64* at_grid:i64* ws:i64* nws"
    ),
    "tie_aware": "hist:i64* nq nbins q0 nb mean:f64* best:f64* worst:f64* ws:i64* nws",
    "mih_keys": "rows:u64* n nwords first length out:i64* q0 nb ws:i64* nws",
    "mih_sort": "digits:i64* order:u32* n nbuckets out:u32* offsets:i64*",
    "mih": (
        "qw:u64* nq nwords rows:u64* n perm:u32* low:u16* nlow offsets:i64* noffsets layout:i64* m k radius budget"
        " which:i64* nwhich lims:i64* out:i64* nout held:i64* q0 nb max_pairs counting_bits ws:i64* nws"
    ),
}
SOURCES = ("hamming.py", "mih_kernels.py", "mih_layout.py", "native.py", "native_build.py")
_HERE = Path(__file__).parent

_lock = threading.Lock()
_loaded: dict[str, Callable[..., int]] | None = None
_threads: int | None = None


def set_threads(n: int | None) -> int:
    """Use n threads for the kernels (None: every core this process may run on); returns the number.

    Numba's own kernels (the ones not built here) follow, now or when Numba is first imported.
    """
    global _threads
    _threads = None if n is None else max(1, n)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(threads(), numba.config.NUMBA_NUM_THREADS))
    return threads()


def threads() -> int:
    """The number of threads the kernels use."""
    if _threads:
        return _threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def library_key() -> str:
    """What the compiled library depends on: the kernels' source, this CPU's features and Python."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((_HERE / name).read_bytes())
    digest.update(_cpu_features().encode())
    digest.update(f"{sys.implementation.cache_tag} {platform.machine()}".encode())
    return digest.hexdigest()[:20]


def _cpu_features() -> str:
    # The library is built for this CPU's instruction set; a checkout shared with another machine
    # must not run it there. /proc/cpuinfo is cheap; elsewhere the processor name stands in.
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def library_folders() -> Iterator[Path]:
    """Where the library may live, in order: beside the package's bytecode, the user's cache, /tmp."""
    yield _HERE / "__pycache__"
    yield Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsah-rt"
    import tempfile  # imported here: most processes find the library in the first folder

    yield Path(tempfile.gettempdir()) / f"dsah-rt-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def library_path(folder: Path) -> Path:
    return folder / f"dsah_rt_kernels-{library_key()}.so"


def kernels() -> dict[str, Callable[..., int]]:
    """Every entry of ENTRIES as a ctypes function: from the built library (built now if missing)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def loaded() -> bool:
    """True once this process has loaded the kernels."""
    return _loaded is not None


def _load() -> dict[str, Callable[..., int]]:
    for path in map(library_path, library_folders()):
        if path.is_file():
            try:
                return _open(path)
            except OSError as exc:  # damaged, or not for this system: built again below
                print(f"dsah-rt: cannot load {path} ({exc}); building it again", file=sys.stderr)
                break
    from dsah_rt import native_build  # imports Numba: only the first process compiles

    built = native_build.build_library()
    return native_build.in_process() if built is None else _open(built)


def _open(path: Path) -> dict[str, Callable[..., int]]:
    lib = ctypes.CDLL(str(path))
    return {name: prototype(name)((f"dsah_rt_{name}", lib)) for name in ENTRIES}


def prototype(name: str) -> type:
    """The ctypes function type of an entry (pointers as void*, the rest int64)."""
    args = [ctypes.c_void_p if p.endswith("*") else ctypes.c_int64 for p in ENTRIES[name].split()]
    return ctypes.CFUNCTYPE(ctypes.c_int64, *args)


class ScratchLimit(Exception):
    """A kernel asked for more scratch than the caller allows."""


def run_blocks(fn: Callable[..., int], total: int, block: int, call: Callable[[int, int, np.ndarray], Sequence[int]],
               limit: int | None = None) -> None:  # fmt: skip
    """Run fn(*call(start, count, ws)) over blocks [start, start + count) of `total` items on the
    kernel threads, each thread with its own int64 scratch `ws`.

    A kernel given too little scratch returns minus what it needs, having written nothing; the
    thread grows its scratch and runs the block again. Scratch beyond `limit` words raises
    ScratchLimit (the caller may take another route).
    """
    if total <= 0:
        return
    starts = iter(range(0, total, block))  # next() on a range iterator is one C call: safe across threads
    errors: list[BaseException] = []

    def worker() -> None:
        ws = _NO_SCRATCH
        try:
            for start in starts:
                if errors:  # another thread failed: the result is lost anyway
                    return
                status = fn(*call(start, min(block, total - start), ws))
                if status < 0:
                    if limit is not None and -status > limit:
                        raise ScratchLimit(f"a block needs {-status} words of scratch, over the limit of {limit}")
                    ws = np.empty(-status + -status // 4, np.int64)  # room for the next blocks to need a little more
                    status = fn(*call(start, min(block, total - start), ws))
                if status:
                    raise RuntimeError(f"a kernel returned {status} with {len(ws)} words of scratch")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    n = min(threads(), -(-total // block))
    if n <= 1:
        worker()
    else:
        pool = [threading.Thread(target=worker) for _ in range(n)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if errors:
        raise errors[0]


_NO_SCRATCH = np.empty(0, np.int64)


def ptr(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first element, for a kernel argument."""
    if not a.flags.c_contiguous:
        raise ValueError("kernel arrays must be C-contiguous")
    return a.ctypes.data

"""Issue 9, class 3: eval and search must run where Numba cannot write its cache (a read-only
install, another user, no home): `dsah_rt.numba_cache.kernel_cache` falls back and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# A source file whose in-tree cache folder cannot be made (__pycache__ is a regular file), a user
# cache under a regular file, and a fallback folder given by the test: each run in a fresh
# interpreter, so Numba's global config of this process is never touched.
PROGRAM = """
import sys
from numba import njit
from numba.core import config
from dsah_rt.numba_cache import kernel_cache
cache = kernel_cache(sys.argv[1], sys.argv[2])
print(cache, config.CACHE_DIR)
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), {"njit": njit, "CACHE": cache})
"""
KERNEL = "@njit(cache=CACHE)\ndef add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ran')\n"


@pytest.mark.parametrize("fallback_writable", [True, False])
def test_kernels_run_without_a_writable_cache_folder(tmp_path: Path, fallback_writable: bool) -> None:
    source = tmp_path / "src" / "kernels.py"
    source.parent.mkdir()
    source.write_text(KERNEL)
    (source.parent / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created under it")
    fallback = tmp_path / "fallback" if fallback_writable else blocker / "fallback"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(blocker / "home"), "XDG_CACHE_HOME": str(blocker / "cache")}
    res = subprocess.run([sys.executable, "-c", PROGRAM, str(source), str(fallback)], capture_output=True,
                         text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    cached, folder = res.stdout.splitlines()[0].split(" ", 1)
    assert res.stdout.splitlines()[-1] == "ran"
    assert cached == str(fallback_writable) and (folder == str(fallback)) == fallback_writable
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("dsah-rt: no writable cache folder")
    if fallback_writable:  # the compiled kernel really went to the fallback folder
        assert any(fallback.rglob("*.nbi"))


def test_a_writable_package_folder_is_used_silently(tmp_path: Path) -> None:
    source = tmp_path / "kernels.py"
    source.write_text(KERNEL)
    res = subprocess.run([sys.executable, "-c", PROGRAM, str(source), str(tmp_path / "unused")], capture_output=True,
                         text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0 and res.stderr == "" and res.stdout.startswith("True ")
    assert any((tmp_path / "__pycache__").glob("*.nbi")) and not (tmp_path / "unused").exists()


# Issue 12: in the CLI's own process Numba's BLAS probe (an import of scipy.linalg) is skipped; in a
# library user's process it is not. Fresh interpreters, so this process's Numba state is untouched.
PROBE = """
import sys
import numpy as np
from dsah_rt import numba_cache
numba_cache.OWN_PROCESS = sys.argv[1] == "cli"
from dsah_rt import hamming
hamming.distance_histograms(np.zeros((2, 1), np.uint64), np.zeros((9, 1), np.uint64), 64)
import numba.np.arraymath as arraymath
print(arraymath._HAVE_BLAS, "scipy.linalg" in sys.modules)
import scipy.linalg  # importable as ever afterwards
print(scipy.linalg.norm(np.ones(4)))
"""


@pytest.mark.parametrize("process", ["cli", "library"])
def test_the_blas_probe_is_skipped_only_in_the_cli_process(process: str) -> None:
    res = subprocess.run([sys.executable, "-c", PROBE, process], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    probed, norm = res.stdout.splitlines()
    assert probed == ("False False" if process == "cli" else "True True") and norm == "2.0"

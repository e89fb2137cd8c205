"""Numba compiles the kernels' C entries (`native.ENTRIES`) into one shared library, in a process of
its own (`python -m dsah_rt.native_build [FOLDER ...]`), started by the first process that needs the
kernels (`make kernels` does so for `make test` and `make demo`).

Each entry is a Numba `cfunc` around a kernel of `dsah_rt.hamming` or `dsah_rt.mih_kernels`. Its
optimised LLVM module is emitted as position-independent object code for this CPU, with every
function but the entry made internal, so the entries link side by side. The kernels allocate nothing
and raise nothing, so the only parts of Numba's runtime the code still names (exception and
reference-count helpers on paths never taken) are linked as stubs that abort with a message instead
of running on wrongly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import llvmlite.binding as llvm
import numba
from numba import carray, cfunc, types

from dsah_rt import hamming, mih_kernels, native
from dsah_rt.numba_cache import kernel_cache

_TYPES = {"u64": types.uint64, "u32": types.uint32, "u16": types.uint16, "i64": types.int64, "i32": types.int32,
          "f64": types.float64}
# Numba runtime helpers the entries name only on paths they never take: raising an exception (the
# kernels raise none) and freeing an array the kernel allocated (they allocate none). Any other
# helper (a reshape, an allocation) would be reached: the build refuses it rather than stub it.
UNREACHED = frozenset({"NRT_Free", "NRT_MemInfo_call_dtor", "numba_do_raise", "numba_gil_ensure", "numba_gil_release",
                       "numba_runtime_build_excinfo_struct", "numba_unpickle"})  # fmt: skip


def _topk(qw, nq, nwords, db, n, bits, k, q0, nb, dist, idx, ws, nws):
    return hamming.topk_block(carray(qw, (nq, nwords)), carray(db, (n, nwords)), carray(db, (n * nwords,)), bits, k, q0, nb,
                              carray(dist, (nq, k)), carray(idx, (nq, k)), carray(ws, (nws,)))  # fmt: skip


def _ranked(qw, nq, nwords, db, n, qlab, nlab, dblab, bits, kmax, grid, ngrid, q0, nb, hist, ap, found, at_grid, ws, nws):  # fmt: skip
    return hamming.ranked_block(
        carray(qw, (nq, nwords)), carray(db, (n, nwords)), carray(qlab, (nq, nlab)), carray(dblab, (n, nlab)),
        kmax, carray(grid, (ngrid,)), q0, nb, carray(hist, (nq, bits + 1, 2)), carray(ap, (nq,)),
        carray(found, (nq,)), carray(at_grid, (nq, ngrid)), carray(ws, (nws,)),
    )


def _tie_aware(hist, nq, nbins, q0, nb, mean, best, worst, ws, nws):  # noqa: ARG001 - no scratch needed
    return hamming.tie_aware_block(carray(hist, (nq, nbins, 2)), q0, nb, carray(mean, (nq,)), carray(best, (nq,)),
                                   carray(worst, (nq,)))  # fmt: skip


def _mih(qw, nq, nwords, rows, n, perm, low, nlow, offsets, noffsets, layout, m, k, radius, budget, which, nwhich, lims, out,
         nout, held, q0, nb, max_pairs, counting_bits, ws, nws):  # fmt: skip
    return mih_kernels.probe_block(
        carray(qw, (nq, nwords)), carray(which, (nwhich,))[q0 : q0 + nb], carray(lims, (nq + 1,)),
        carray(rows, (m, n, nwords)), carray(rows, (m * n * nwords,)), carray(perm, (m, n)), carray(low, (m, nlow)),
        carray(offsets, (noffsets,)), carray(layout, (m, 4)), k, radius, budget, carray(out, (nout,)),
        carray(held, (nwhich,))[q0 : q0 + nb], max_pairs, counting_bits, carray(ws, (nws,)),
    )


def _mih_keys(rows, n, nwords, first, length, out, q0, nb, ws, nws):  # noqa: ARG001 - no scratch needed
    return mih_kernels.keys_block(carray(rows, (n, nwords)), first, length, q0, nb, carray(out, (n,)))


def _mih_sort(digits, order, n, nbuckets, out, offsets):
    return mih_kernels.counting_sort(carray(digits, (n,)), carray(order, (n,)), nbuckets, carray(out, (n,)),
                                     carray(offsets, (nbuckets + 1,)))  # fmt: skip


_BODIES: dict[str, Callable[..., int]] = {"topk": _topk, "ranked": _ranked, "tie_aware": _tie_aware, "mih": _mih,
                                          "mih_keys": _mih_keys, "mih_sort": _mih_sort}  # fmt: skip


def signature(name: str) -> types.Signature:
    """The Numba signature of an entry, from its parameters in `native.ENTRIES`."""
    params = [p.split(":")[1] if ":" in p else "i64" for p in native.ENTRIES[name].split()]
    return types.int64(*(types.CPointer(_TYPES[p[:-1]]) if p.endswith("*") else types.int64 for p in params))


def compile_entries(cache: bool) -> dict[str, object]:
    """Every entry compiled as a Numba cfunc (cache=False keeps the LLVM module readable for the build)."""
    return {name: cfunc(signature(name), cache=cache)(_BODIES[name]) for name in native.ENTRIES}


_compiled_here: list[dict[str, object]] = []  # the cfuncs behind in_process()'s pointers, kept alive


def in_process() -> dict[str, Callable[..., int]]:
    """The entries compiled in this process by Numba, as ctypes functions (no library could be built)."""
    _compiled_here.append(compile_entries(kernel_cache(__file__)))
    return {name: native.prototype(name)(entry.address) for name, entry in _compiled_here[-1].items()}


def _object(name: str, entry, machine: llvm.TargetMachine) -> tuple[bytes, set[str]]:
    """Object code of one entry, exporting only `dsah_rt_<name>`; and the Numba runtime symbols it names."""
    module = llvm.parse_assembly(entry._library.get_llvm_str())
    for fn in module.functions:
        if fn.name == entry.native_name:
            fn.name = f"dsah_rt_{name}"
        elif not fn.is_declaration:
            fn.linkage = "internal"
    for var in module.global_variables:
        if not var.is_declaration:
            var.linkage = "internal"
    runtime = {fn.name for fn in module.functions if fn.is_declaration and fn.name.startswith(("numba_", "NRT_"))}
    return machine.emit_object(module), runtime


def _stubs(symbols: set[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void unreachable(const char *name) {",
             '    fprintf(stderr, "dsah-rt: a compiled kernel reached Numba\'s %s, which its library does not carry\\n", name);',
             "    abort();", "}"]  # fmt: skip
    lines += [f'void {s}(void) {{ unreachable("{s}"); }}' for s in sorted(symbols)]
    return "\n".join(lines) + "\n"


class CannotBuild(Exception):
    """Why the library cannot be built here (no compiler, no writable folder, an unlisted helper)."""


def vector_features() -> str:
    """This CPU's features for the build, with 512-bit vectors where it has AVX-512 VPOPCNTDQ.

    LLVM keeps such CPUs to 256-bit vectors by default (some older AVX-512 parts slow their clock on
    512-bit code); on this family the 512-bit library measured 5-20% faster for top-k and 3-6% for MAP.
    """
    host = llvm.get_host_cpu_features()
    return host.flatten() + (",-prefer-256-bit" if host.get("avx512vpopcntdq") else "")


def build_library() -> Path | None:
    """Build the library in a fresh process (so the vector width is this module's choice, whatever
    this process has compiled) into the first writable folder of `native.library_folders()`.

    Returns its path, or None (after one line on stderr saying why) when it cannot be built here.
    """
    print("dsah-rt: compiling the kernels (once per install or change of them, ~20 s)", file=sys.stderr)
    child = subprocess.run([sys.executable, "-m", "dsah_rt.native_build", *map(str, native.library_folders())],
                           env={**os.environ, "NUMBA_CPU_FEATURES": vector_features()}, capture_output=True, text=True)  # fmt: skip
    said = (child.stdout.strip() or child.stderr.strip() or f"exit status {child.returncode}").splitlines()[-1]
    if child.returncode != 0:
        print(f"dsah-rt: cannot build the kernels' library ({said}); Numba compiles them in each process instead",
              file=sys.stderr)  # fmt: skip
        return None
    print(f"dsah-rt: compiled the kernels into {said}", file=sys.stderr)
    return Path(said)


def build(folders: list[Path]) -> Path:
    """Compile and link the library into the first writable folder of `folders`; returns its path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CannotBuild("no C compiler (cc) to link it")
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()  # what Numba vectorised for
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=features, opt=3, reloc="pic", codemodel="default"
    )
    with tempfile.TemporaryDirectory(prefix="dsah-rt-build-") as tmp:
        files, runtime = [], set()
        for name, entry in compile_entries(cache=False).items():
            obj, names = _object(name, entry, machine)
            files.append(Path(tmp, f"{name}.o"))
            files[-1].write_bytes(obj)
            runtime |= names
        if runtime - UNREACHED:
            raise CannotBuild(f"the kernels call Numba's {', '.join(sorted(runtime - UNREACHED))}, which it does not carry")
        files.append(Path(tmp, "stubs.c"))
        files[-1].write_text(_stubs(runtime))
        built = Path(tmp, "kernels.so")
        link = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), *map(str, files), "-lm"],
                              capture_output=True, text=True)  # fmt: skip
        if link.returncode != 0:
            raise CannotBuild(f"{compiler} failed: {link.stderr.strip().splitlines()[-1] if link.stderr.strip() else link.returncode}")
        for folder in folders:
            target = native.library_path(folder)
            part = folder / f".{target.name}.{os.getpid()}.tmp"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built, part)
                os.replace(part, target)  # atomic: a process running beside this one sees all or nothing
            except OSError:
                with suppress(OSError):
                    part.unlink(missing_ok=True)
                continue
            for stale in folder.glob("dsah_rt_kernels-*.so"):  # earlier kernels' libraries
                if stale != target:
                    with suppress(OSError):
                        stale.unlink()  # a process that has one open keeps its mapping
            return target
    raise CannotBuild("no writable folder for it")


if __name__ == "__main__":  # the build's own process: prints the library's path, or why there is none
    try:
        print(build([Path(f) for f in sys.argv[1:]] or list(native.library_folders())))
    except CannotBuild as exc:
        print(exc)
        sys.exit(1)

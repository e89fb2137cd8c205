"""Import direction: core <- train <- export <- bench, and no torch below train.

Read from the source (every import statement, at any depth: a lazy import inside a function is
still a dependency) and checked at run time (importing every core module in a fresh interpreter
loads no torch and no stage package).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("dsah_rt.train", "dsah_rt.export", "dsah_rt.bench")
TORCH = ("torch", "torchvision", "onnxscript")
# layer -> what its modules must not import (packages and their submodules)
FORBIDDEN = {
    "core": (*STAGES, *TORCH),
    "dsah_rt.train": ("dsah_rt.export", "dsah_rt.bench"),
    "dsah_rt.export": ("dsah_rt.bench",),
    "dsah_rt.bench": (),
}


def _package_roots() -> dict[str, Path]:
    """Package name -> folder, from pyproject's package-dir (the stages sit outside dsah_rt/)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def _modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file. A folder inside a package's
    folder that is mapped to its own package (dsah_rt.train.data) is listed once, under it."""
    roots = _package_roots()
    out = {}
    for package, folder in roots.items():
        nested = [other for other in roots.values() if folder in other.parents]
        for path in folder.rglob("*.py"):
            if any(other in path.parents for other in nested):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The absolute names `path` imports, relative imports resolved against module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _layer(name: str) -> str:
    return next((stage for stage in STAGES if name == stage or name.startswith(stage + ".")), "core")


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_module_list_covers_every_layer():
    layers = {_layer(name) for name in _modules()}
    assert layers == set(FORBIDDEN)
    assert "dsah_rt.runners.registry" in _modules() and "dsah_rt.export.torch_runner" in _modules()


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from . import sibling\nfrom ..other import thing\ndef f():\n    import torch.nn\n")
    assert _imports("dsah_rt.train.methods.mod", source) >= {
        "dsah_rt.train.methods.sibling", "dsah_rt.train.other.thing", "torch.nn",
    }  # fmt: skip


def test_imports_point_only_down():
    problems = [
        f"{name} ({path.relative_to(ROOT)}) imports {imported}"
        for name, path in sorted(_modules().items())
        for imported in sorted(_imports(name, path))
        if _within(imported, FORBIDDEN[_layer(name)])
    ]
    assert not problems, "\n".join(problems)


def test_importing_the_core_loads_no_torch_and_no_stage():
    core = sorted(name for name in _modules() if _layer(name) == "core")
    code = f"""
import importlib, sys
missing = []
for name in {core!r}:
    try:
        importlib.import_module(name)
    except ImportError as exc:  # an optional extra not installed here; what it drags in is still checked
        if (exc.name or "").startswith("dsah_rt"):
            raise
        missing.append((name, exc.name))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {TORCH!r} or m.startswith({STAGES!r}))
assert not leaked, leaked
print(len({core!r}) - len(missing), "core modules imported; skipped for missing extras:", missing)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]

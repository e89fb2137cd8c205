"""dsah-rt: Deep Saliency Hashing from training to exact Hamming retrieval.

The public API, loaded on first use so that `import dsah_rt` and `dsah-rt --help` stay fast (no
numpy, numba or onnxruntime until a name is touched):

    import dsah_rt
    result = dsah_rt.evaluate(query_codes, db_codes, query_labels, db_labels)   # an Evaluation
    index = dsah_rt.build_index(db_codes, "exact")                               # or index_factory / load_index
    with dsah_rt.make_runner("model.onnx") as runner:
        encoded = dsah_rt.encode_folder("photos/", "codes.npy", runner)

The runtime core (this package's top-level modules) needs only numpy, numba and click;
`dsah_rt.train` and `dsah_rt.export` need the `train` extra (PyTorch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "BinaryIndex": "dsah_rt.index",
    "Index": "dsah_rt.index",
    "build_index": "dsah_rt.index",
    "index_factory": "dsah_rt.index",
    "load_index": "dsah_rt.index",
    "Evaluation": "dsah_rt.metrics",
    "evaluate": "dsah_rt.metrics",
    "Codes": "dsah_rt.codes",
    "read_codes": "dsah_rt.codes",
    "write_codes": "dsah_rt.codes",
    "make_runner": "dsah_rt.runners",
    "encode_folder": "dsah_rt.encode",
    "search_codes": "dsah_rt.query",
    "search_images": "dsah_rt.query",
    "UserError": "dsah_rt.errors",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports on first use
    from dsah_rt.codes import Codes, read_codes, write_codes
    from dsah_rt.encode import encode_folder
    from dsah_rt.errors import UserError
    from dsah_rt.index import BinaryIndex, Index, build_index, index_factory, load_index
    from dsah_rt.metrics import Evaluation, evaluate
    from dsah_rt.query import search_codes, search_images
    from dsah_rt.runners import make_runner


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'dsah_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

"""Datasets in their published formats, built by name or path from a registry.

    data = load_dataset("cifar10:/data/cifar-10-batches-py", protocol="1000/5000/59000")
    data = load_dataset("/data/Flowers17")          # format detected from the folder
    data = load_dataset("synthetic-fg", seed=1)     # generated, no files needed

Each format is one module that registers its loader; `torch_dataset.TorchSplit` (the only
part that needs PyTorch) wraps a Split for training.
"""

from .core import RetrievalData, Split, read_image
from .registry import DATASETS, DatasetFormat, load_dataset, register_dataset

# Importing a format module registers it. Order does not matter for detection: the generic
# imagefolder is always tried last.
from . import (  # noqa: E402,F401
    cifar10, cub200, digits, flowers17, imagefolder, listfile, mnist, stanford_dogs, synthetic_fg,
)
from .imagefolder import save_as_imagefolder  # noqa: E402

__all__ = [
    "DATASETS",
    "DatasetFormat",
    "RetrievalData",
    "Split",
    "load_dataset",
    "read_image",
    "register_dataset",
    "save_as_imagefolder",
]

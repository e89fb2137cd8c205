"""A user's first run must not need a flag to survive: every method trains with the defaults on
every kind of data at 12-64 bits, and a diverging run names the term and keeps nothing partial."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsah_rt.errors import UserError
from dsah_rt.train.data import RetrievalData, load_dataset
from dsah_rt.train.methods import METHODS
from dsah_rt.train.options import TrainOptions
from dsah_rt.train.run_dir import CHECKPOINT, load_checkpoint, run_fingerprint
from dsah_rt.train.trainer import Trainer, train

from test_data_formats import idx_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 5  # the shipped SGD default went from max|u| 0.6 to 1e8 in four batches on digits
BATCH = 32


def _write_idx(root: Path) -> Path:
    """An MNIST-family folder holding scikit-learn's handwritten digits, upscaled to 28 x 28."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.zeros((len(digits.images), 28, 28), np.uint8)
    images[:, 2:26, 2:26] = np.kron(digits.images * 255 / 16, np.ones((3, 3))).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    root.mkdir(parents=True)
    for prefix, rows in (("train", slice(0, 1500)), ("t10k", slice(1500, None))):
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images[rows]))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels[rows]))
    return root


def _write_imagefolder(root: Path) -> Path:
    """Class folders of PNGs rendered by synthetic-fg (clutter, decoys: realistic pixel statistics)."""
    fg = load_dataset("synthetic-fg", seed=3, num_classes=4, train_per_class=45, query_per_class=5)
    for i in range(len(fg.train)):
        path = root / f"class{fg.train.labels[i]}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fg.train.image(i)).save(path)
    return root


DATA = {  # name -> (what a user passes as --data, its data options)
    "digits": lambda tmp: ("digits", {}),
    "synthetic-fg": lambda tmp: ("synthetic-fg", {}),
    "mnist-idx": lambda tmp: (str(_write_idx(tmp / "idx")), {"protocol": "10000/60000"}),  # the files' own split
    "imagefolder": lambda tmp: (str(_write_imagefolder(tmp / "folder")), {}),
}


@pytest.fixture(scope="module", params=sorted(DATA))
def dataset(request, tmp_path_factory) -> tuple[str, RetrievalData]:
    """(name as a user passes it, the data cut to STEPS full batches of training and a few queries)."""
    name, options = DATA[request.param](tmp_path_factory.mktemp(request.param))
    data = load_dataset(name, seed=0, **options)
    rng = np.random.default_rng(0)
    train_rows = rng.permutation(len(data.train))[: STEPS * BATCH]
    query_rows = rng.permutation(len(data.query))[:16]
    train_split = data.train.subset(np.sort(train_rows))
    return name, RetrievalData(data.name, train_split, data.query.subset(np.sort(query_rows)), train_split,
                               data.num_classes, data.multilabel)  # fmt: skip


@pytest.mark.parametrize("bits", [12, 24, 48, 64])
@pytest.mark.parametrize("method", METHODS)
def test_defaults_train_without_divergence(dataset, method: str, bits: int, tmp_path: Path) -> None:
    name, data = dataset
    opts = TrainOptions(data=name, method=method, bits=bits, epochs=1, device="cpu")
    metrics = train(opts, tmp_path / "run", data=data, echo=lambda line: None, progress=io.StringIO())
    entry = metrics[-1]
    assert np.isfinite(entry["map"])
    for phase, terms in entry["loss"].items():
        assert all(np.isfinite(v) for v in terms.values()), (phase, terms)
        diagnostics = entry["diagnostics"][phase]
        # bounded codes: the divergence this guards against took |u| to 1e8
        assert diagnostics["u_abs_max"] < 100, (phase, diagnostics)
        assert np.isfinite(diagnostics["grad_norm"])


def test_a_diverging_run_names_the_term_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=16, query_per_class=2)
    opts = TrainOptions(method="dpsh", bits=12, input_size=32, batch_size=16, epochs=2, device="cpu", optimizer="sgd")
    trainer = Trainer(opts, tmp_path, data=data, echo=lambda line: None, progress=io.StringIO())
    trainer._epoch()
    good = run_fingerprint(tmp_path)
    trainer.opts.lr = 1e12  # epoch 2 takes an absurd step
    with pytest.raises(UserError, match=r"epoch 2/2 hashing: the loss is not finite: dpsh = (nan|inf)") as err:
        trainer.fit()
    assert "\n" not in str(err.value) and f"the checkpoint of epoch 1 is kept in {tmp_path}" in str(err.value)
    assert run_fingerprint(tmp_path) == good and load_checkpoint(tmp_path)["epoch"] == 1


def test_a_run_diverging_in_its_first_epoch_writes_nothing(tmp_path: Path) -> None:
    data = load_dataset("synthetic-fg", seed=0, num_classes=2, image_size=32, train_per_class=16, query_per_class=2)
    opts = TrainOptions(method="dsah", bits=12, input_size=32, batch_size=16, epochs=1, device="cpu",
                        optimizer="sgd", lr=1e12)  # fmt: skip
    with pytest.raises(UserError, match="nothing was written"):
        train(opts, tmp_path / "run", data=data, echo=lambda line: None, progress=io.StringIO())
    assert not (tmp_path / "run" / CHECKPOINT).exists()

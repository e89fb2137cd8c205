"""Training and deployment see the same pixels: TorchSplit, encode and the exported model agree.

The end-to-end test trains on an ImageFolder whose images are not at the model's size (80 px for a
64 px model) and include 16-bit PNGs, an EXIF-rotated JPEG, a palette and a CMYK file, exports the
run, encodes the folder with ONNX Runtime and compares with the codes the trainer itself wrote.
With training's former pixels (torch's float resize, 16-bit PNGs clipped by Pillow's convert)
the same test measured 0.990 agreement: every disagreeing bit was on a 16-bit grey PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from image_fixtures import write_png16
from PIL import Image

from dsah_rt.codes import read_codes, unpack
from dsah_rt.encode import encode_folder
from dsah_rt.images import decode, resize
from dsah_rt.train.data import Split, load_dataset
from dsah_rt.train.data.torch_dataset import TorchSplit

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE, INPUT, BITS = 80, 64, 12
CLASSES, PER_CLASS, QUERY_PER_CLASS = 4, 24, 12


def _photo(rng: np.random.Generator, tint: np.ndarray) -> np.ndarray:
    """SIDE x SIDE float [0, 1] RGB: smooth random structure (upsampled noise) in a class tint."""
    coarse = rng.random((5, 5, 3))
    smooth = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    fine = rng.random((SIDE, SIDE, 3)) * 0.25
    return np.clip(0.55 * smooth / 255 + 0.3 * tint + fine, 0, 1)


def _write(path: Path, photo: np.ndarray, kind: str) -> None:
    """`photo` stored as `kind`: the file formats and modes a real folder mixes."""
    if kind == "png16-grey":
        Image.fromarray(np.round(photo.mean(2) * 65535).astype(np.uint16)).save(path)
    elif kind == "png16-rgb":
        write_png16(path, np.round(photo * 65535).astype(np.uint16))
    elif kind == "jpeg-exif":
        exif = Image.Exif()
        exif[0x0112] = 8  # "rotate 90 counter-clockwise to display"
        Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path, exif=exif, quality=90)
    elif kind == "palette":
        Image.fromarray(np.round(photo * 255).astype(np.uint8)).convert("P").save(path)
    elif kind == "cmyk":
        Image.fromarray(np.round(photo * 255).astype(np.uint8)).convert("CMYK").save(path, format="TIFF")
    else:
        Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path)


KINDS = [("png16-grey", ".png"), ("png16-rgb", ".png"), ("jpeg-exif", ".jpg"), ("palette", ".png"),
         ("cmyk", ".tif"), ("png", ".png")]  # fmt: skip


def write_folder(root: Path, seed: int = 0) -> Path:
    """root/<class>/<n>.<ext>, CLASSES x PER_CLASS images of SIDE px, a third of them 16-bit."""
    rng = np.random.default_rng(seed)
    tints = rng.random((CLASSES, 3))
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            kind, ext = KINDS[i % len(KINDS)]
            _write(root / f"class{c}" / f"{i:02d}{ext}", _photo(rng, tints[c]), kind)
    (root / "class0" / "README.txt").write_text("not an image: skipped by training and encode alike")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imagefolder") / "data")


def test_torch_split_pixels_are_the_deployed_pixels(folder: Path):
    paths = sorted(folder.rglob("*.*"))
    paths = [p for p in paths if p.suffix != ".txt"]
    split = Split(labels=np.zeros(len(paths), np.int64), paths=paths)
    ds = TorchSplit(split, INPUT)
    for i, path in enumerate(paths):
        expected = resize(decode(path), INPUT).astype(np.float32) / 255
        np.testing.assert_array_equal(ds[i][0].numpy(), expected.transpose(2, 0, 1), err_msg=str(path))


def test_torch_split_crops_before_the_shared_resize():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 50, 70, 3), dtype=np.uint8)
    torch.manual_seed(0)
    image, _, _, box = TorchSplit(Split(labels=np.zeros(1, np.int64), images=images,
                                        boxes=np.array([[0, 0, 70, 50]], np.float32)), 32,
                                  augment=True, with_boxes=True, flip=False)[0]  # fmt: skip
    crops = [resize(images[0, y : y + h, x : x + w], 32) for h in range(42, 51) for w in range(60, 71)
             for y in range(0, 51 - h) for x in range(0, 71 - w)]  # fmt: skip
    got = np.round(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    assert any(np.array_equal(got, c) for c in crops)  # an exact resize of one crop, not a smoothed one


def test_exported_codes_equal_the_trainers_query_codes(folder: Path, tmp_path: Path):
    """Train 3 epochs at 64 px on 80 px files, export, encode the files: the trainer's own codes back."""
    from dsah_rt.export.pipeline import export_run
    from dsah_rt.runners import make_runner
    from dsah_rt.train.options import TrainOptions
    from dsah_rt.train.trainer import train

    options = {"query_per_class": QUERY_PER_CLASS}
    opts = TrainOptions(data=f"imagefolder:{folder}", data_options=options, backbone="small", input_size=INPUT,
                        epochs=3, bits=BITS, batch_size=16, device="cpu")  # fmt: skip
    run = tmp_path / "run"
    train(opts, run, echo=lambda line: None, progress=io.StringIO())
    trained = read_codes(run / "query_codes.npy", BITS)
    data = load_dataset(f"imagefolder:{folder}", **options)
    assert [s.path for s in data.skipped] == ["class0/README.txt"]
    assert len(trained.packed) == len(data.query) == CLASSES * QUERY_PER_CLASS

    model = tmp_path / "model.onnx"
    export_run(run, model)
    with make_runner(model, "ort-cpu", threads=1) as runner:
        encoded = encode_folder(folder, None, runner, batch=32, workers=1)
    assert [s.path for s in encoded.skipped] == ["class0/README.txt"]
    row = {rel: i for i, rel in enumerate(encoded.rows)}
    mine = encoded.codes[[row[p.relative_to(folder).as_posix()] for p in data.query.paths]]

    agreement = (unpack(mine, BITS) == unpack(trained.packed, BITS)).mean()
    print(f"bit agreement, encode vs trainer: {agreement:.6f} over {mine.shape[0] * BITS} bits")
    assert agreement >= 0.9999
    assert len(np.unique(mine, axis=0)) > 1  # codes that tell images apart: a mixed-up row would show

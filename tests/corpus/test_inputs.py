"""Corpus of hostile inputs (issue 9, "never a silently wrong number"): one parametrised test per
class of defect. Every fixture is made here; each case either gives the number an independent
reference gives or is refused with exit code 1 and one `Error:` line naming the file, no traceback.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner
from PIL import Image

import reference as ref
from dsah_rt.cli import main
from dsah_rt.codes import pack, write_codes
from dsah_rt.errors import CodesError, DataError
from dsah_rt.metrics import evaluate
from dsah_rt.runners.base import ModelInfo

BITS = 24


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(res, *names: str, alone: bool = True) -> str:
    """Exit code 1 through the one-line error path (an uncaught exception would be a traceback),
    one `Error:` line, last on stderr, naming each of `names`; `alone`: the only stderr line."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert not alone or len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def command(name: str, d: Path, q: str = "q.npy", db: str = "db.npy", query: Path | None = None,
            model: Path | None = None) -> list[object]:
    """The command line of `name` over the files in `d`; search-query searches images `query` with `model`."""
    if name == "eval":
        return ["eval", "-q", d / q, "-d", d / db, "--query-labels", d / "ql.npy", "--db-labels", d / "dl.npy"]
    if name == "search":
        return ["search", "-q", d / q, "-d", d / db, "-k", 2, "--out", d / "r.npz"]
    if name == "index":
        return ["index", "build", d / db, "--out", d / "db.index"]
    assert name == "search-query"
    return ["search", "--query", query, "--model", model or toy_model(d / "m.onnx"), "-d", d / db, "-k", 2]


def toy_model(path: Path, bits: int = BITS, width: int = 3, output: str = "codes", batch: str | int = "n",
              dtype: int = onnx.TensorProto.UINT8, fingerprint: str = "a" * 64) -> Path:
    """A dsah-rt model built without torch: `output` = dtype of the means of image rows, [batch, width]."""
    nodes = [
        oh.make_node("Cast", ["images"], ["f"], to=onnx.TensorProto.FLOAT),
        oh.make_node("ReduceMean", ["f"], ["rows"], axes=[3], keepdims=0),  # [n, 3, 32]
        oh.make_node("Slice", ["rows", "start", "end", "axis"], ["some"]),
        oh.make_node("ReduceMean", ["some"], ["mean"], axes=[1], keepdims=0),  # [n, width]
        oh.make_node("Cast", ["mean"], [output], to=dtype),
    ]
    consts = [oh.make_tensor(n, onnx.TensorProto.INT64, [1], [v]) for n, v in (("start", 0), ("end", width), ("axis", 2))]
    graph = oh.make_graph(
        nodes, "toy", [oh.make_tensor_value_info("images", onnx.TensorProto.UINT8, [batch, 3, 32, 32])],
        [oh.make_tensor_value_info(output, dtype, [batch, width])], initializer=consts,
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    oh.set_model_props(model, ModelInfo("dsah", "small", bits, 32, (0.5,) * 3, (0.25,) * 3, fingerprint).to_metadata())
    onnx.save(model, path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def codes(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """q.npy / db.npy with manifests (db rows name 3 images, model fingerprint 'a'*64), labels ql / dl."""
    rng = np.random.default_rng(1)
    q01, db01 = rng.integers(0, 2, (4, BITS), dtype=np.uint8), rng.integers(0, 2, (3, BITS), dtype=np.uint8)
    model = {"fingerprint": "a" * 64}
    write_codes(tmp_path / "q.npy", pack(q01), BITS, model=model)
    write_codes(tmp_path / "db.npy", pack(db01), BITS, rows=[f"img{i}.png" for i in range(3)], model=model)
    np.save(tmp_path / "ql.npy", np.array([0, 1, 0, 1]))
    np.save(tmp_path / "dl.npy", np.array([1, 0, 1]))
    return tmp_path, q01, db01


def _expected_map(q01: np.ndarray, db01: np.ndarray, qlab, dblab) -> float:
    """The reference MAP@all, relevance by Python integer equality (no NumPy type promotion)."""
    dist = ref.distances(q01, db01)
    rel = np.array([[int(a) == int(b) for b in dblab] for a in qlab])
    return float(np.mean([ref.average_precision(rel[i][ref.ranking(dist[i])]) for i in range(len(q01))]))


# -- 1. manifests: one schema, every reader ---------------------------------------------------------

def _set(field: str, value: object):
    return lambda m: {**m, field: value}


def _drop(field: str):
    return lambda m: {k: v for k, v in m.items() if k != field}


MANIFESTS = [
    ("null", lambda m: None, "must be a JSON object"),
    ("list", lambda m: [m], "must be a JSON object"),
    ("bits-string", _set("bits", "24"), "'bits'"),
    ("bits-float", _set("bits", 24.0), "'bits'"),
    ("bits-bool", _set("bits", True), "'bits'"),
    ("bits-too-many", _set("bits", 4096), "'bits'"),
    ("rows-number", _set("rows", 5), "'rows'"),
    ("rows-integers", _set("rows", [0, 1, 2]), "'rows'"),
    ("rows-short", _set("rows", ["img0.png"]), "'rows'"),
    ("model-string", _set("model", "xyz"), "'model'"),
    ("fingerprint-number", _set("model", {"fingerprint": 7}), "'model'"),
    ("count-wrong", _set("count", 99), "'count'"),
    ("count-missing", _drop("count"), "'count'"),
    ("format-other", _set("format", "other/2"), "'format'"),
    ("format-missing", _drop("format"), "'format'"),
    ("sha256-missing", _drop("sha256"), "'sha256'"),
    ("skipped-string", _set("skipped", "x"), "'skipped'"),
    ("not-json", None, "unreadable manifest"),
]


@pytest.mark.parametrize("cmd", ["eval", "search", "index", "search-query"])
@pytest.mark.parametrize("name, edit, message", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_malformed_manifest_is_one_line(codes, images, cmd, name, edit, message):
    d = codes[0]
    manifest = d / "db.npy.json"
    if edit is None:
        manifest.write_text("{not json")
    else:
        manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    assert_refused(run(*command(cmd, d, query=images)), "db.npy.json", message)


# -- 2. codes of two models -------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["eval", "search", "search-query"])
@pytest.mark.parametrize("allow", [False, True])
def test_codes_of_two_models_are_refused_unless_allowed(codes, images, cmd, allow):
    d = codes[0]
    write_codes(d / "q.npy", pack(codes[1]), BITS, model={"fingerprint": "b" * 64})
    model = toy_model(d / "m.onnx", fingerprint="b" * 64)
    res = run(*command(cmd, d, query=images, model=model), *(["--allow-mixed-models"] if allow else []))
    if allow:
        assert res.exit_code == 0, res.output
    else:
        assert_refused(res, "db.npy", "another model", "--allow-mixed-models")


# -- 3. labels compared exactly ---------------------------------------------------------------------

BIG = 2**60
LABELS = [
    # uint64 and int64 meet in float64 under NumPy's promotion, where 2^60 + 1 == 2^60.
    ("uint64-vs-int64", np.full(4, BIG + 1, np.uint64), np.full(3, BIG, np.int64)),
    ("uint64-vs-int64-some-equal", np.array([BIG, BIG + 1, BIG, BIG + 1], np.uint64), np.array([BIG + 1, BIG, BIG], np.int64)),
    ("beyond-int64", np.array([2**63 + 1, 2**63, 5, 2**64 - 1], np.uint64), np.array([2**63, 2**63 + 1, 5], np.uint64)),
    ("small-vs-huge", np.array([1, 2, 1, 2], np.uint8), np.array([2**63 + 1, 1, 2], np.uint64)),
]


@pytest.mark.parametrize("name, qlab, dblab", LABELS, ids=[c[0] for c in LABELS])
def test_labels_are_compared_exactly(codes, name, qlab, dblab):
    d, q01, db01 = codes
    np.save(d / "ql.npy", qlab)
    np.save(d / "dl.npy", dblab)
    res = run(*command("eval", d), "--json", d / "m.json")
    assert res.exit_code == 0, res.output
    ref.assert_close(json.loads((d / "m.json").read_text())["map"], _expected_map(q01, db01, qlab, dblab))


def test_labels_no_integer_type_holds_are_refused():
    q = np.zeros((1, 1), np.uint8)
    with pytest.raises(CodesError, match="no integer type holds them all"):
        evaluate(q, np.zeros((2, 1), np.uint8), np.array([-1]), np.array([2**63, 1], np.uint64), bits=8)


@pytest.mark.parametrize("ids", [70, 200])
def test_many_class_ids_match_the_reference(ids):
    """More distinct query ids than one label word holds (64): the ids go in groups."""
    rng = np.random.default_rng(ids)
    q01, db01 = rng.integers(0, 2, (ids + 30, 16), dtype=np.uint8), rng.integers(0, 2, (400, 16), dtype=np.uint8)
    qlab = rng.permutation(np.concatenate([np.arange(ids), rng.integers(0, ids, 30)])) * 1000 + 7
    dblab = rng.integers(0, ids + 10, 400) * 1000 + 7
    res = evaluate(pack(q01), pack(db01), qlab, dblab, bits=16)
    ref.assert_close(res.map, _expected_map(q01, db01, qlab, dblab))


# -- 4. eval memory with one id per object ----------------------------------------------------------

def test_eval_memory_does_not_grow_with_the_number_of_classes():
    """Unique ids over 20,000 items: a one-hot class matrix alone would take 20,000 x 20,100 bytes."""
    rng = np.random.default_rng(0)
    n, q = 20_000, 100
    db = pack(rng.integers(0, 2, (n, 32), dtype=np.uint8))
    ids = rng.permutation(n + q)
    evaluate(db[:q], db, ids[:q], ids[q:], bits=32)  # compiles the kernels outside the measurement
    tracemalloc.start()
    try:
        evaluate(db[:q], db, ids[:q], ids[q:], bits=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * n * 8, peak  # a few arrays of one int64 per item


# -- 5. 0/1 uint8 codes without --bits --------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["eval", "search", "index"])
def test_unpacked_uint8_bits_need_bits(codes, cmd):
    d, q01, db01 = codes
    np.save(d / "q01.npy", q01)
    np.save(d / "db01.npy", db01)
    args = command(cmd, d, q="q01.npy", db="db01.npy")
    assert_refused(run(*args), "01.npy", f"--bits {BITS}")
    res = run(*args, "--bits", BITS, *(["--json", d / "m.json"] if cmd == "eval" else []))
    assert res.exit_code == 0, res.output
    if cmd == "eval":
        map_ = json.loads((d / "m.json").read_text())["map"]
        ref.assert_close(map_, _expected_map(q01, db01, np.load(d / "ql.npy"), np.load(d / "dl.npy")))


# -- 6. models outside the output contract ----------------------------------------------------------

MODELS = [
    ("width-not-bits", dict(bits=16)),  # 3 bytes per code for 16 bits
    ("fixed-batch", dict(batch=1)),
    ("no-codes-output", dict(output="out")),
    ("zero-bits", dict(bits=0)),
    ("float-codes", dict(dtype=onnx.TensorProto.FLOAT)),
]


@pytest.mark.parametrize("cmd", ["encode", "search-query"])
@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_model_outside_the_contract_is_refused_on_load(codes, images, cmd, name, kwargs):
    d = codes[0]
    model = toy_model(d / "bad.onnx", **kwargs)
    if cmd == "encode":
        res = run("encode", images, "--out", d / "c.npy", "--model", model)
    else:
        res = run(*command(cmd, d, query=images, model=model))
    assert_refused(res, "bad.onnx")
    assert not (d / "c.npy").exists()


@pytest.mark.parametrize("result", [lambda c: c[:-1], lambda c: c[:, :-1], lambda c: c.astype(np.int16)],
                         ids=["a-row-short", "a-byte-short", "not-uint8"])
def test_codes_unlike_the_declared_outputs_stop_the_runner(codes, images, monkeypatch, result):
    """A graph can declare the promised outputs and compute others; the runner checks what it got."""
    from dsah_rt.runners.ort import OrtRunner

    run_ = OrtRunner._run
    monkeypatch.setattr(OrtRunner, "_run", lambda self, x, with_u: (result(run_(self, x, with_u)[0]), None))
    d = codes[0]
    res = run("encode", images, "--out", d / "c.npy", "--model", toy_model(d / "liar.onnx"))
    assert_refused(res, "liar.onnx", "for 3 images", alone=False)  # after the line naming the model
    assert not (d / "c.npy").exists()


def test_model_within_the_contract_encodes(codes, images):
    d = codes[0]
    res = run("encode", images, "--out", d / "c.npy", "--model", toy_model(d / "good.onnx"))
    assert res.exit_code == 0, res.output
    assert np.load(d / "c.npy").shape == (3, 3)


# -- 7. one decoder allow-list ----------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def _read_image(path: Path) -> str:
    from dsah_rt.train.data import read_image

    with pytest.raises(DataError) as err:
        read_image(path)
    return str(err.value)


def _imagefolder(path: Path) -> str:
    from dsah_rt.train.data.imagefolder import _class_images

    tree, skipped = _class_images(path.parent.parent)
    assert not any(path in files for files in tree.values())
    return next(s.reason for s in skipped if s.path.endswith(path.name))


def _encode_skip(path: Path) -> str:
    from dsah_rt.images import skip_reason

    return skip_reason(path)


def _saliency_decode(path: Path) -> str:
    from dsah_rt.images import ImageSkip, decode

    with pytest.raises(ImageSkip) as err:
        decode(path)
    return str(err.value)


@pytest.mark.parametrize("reader", [_read_image, _imagefolder, _encode_skip, _saliency_decode])
def test_a_format_outside_the_allow_list_is_never_opened(tmp_path, monkeypatch, reader):
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    folder = tmp_path / "cls"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "ok.png")
    (folder / "page.eps").write_bytes(EPS)
    assert "not an image" in reader(folder / "page.eps")
    assert not opened  # Pillow's EPS plugin, which runs Ghostscript to decode, was not even asked


# -- 8. command-line values -------------------------------------------------------------------------

def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe")
    return d / "pipe"


@pytest.mark.parametrize("cmd", ["encode", "search-query"])
@pytest.mark.parametrize("source", [_fifo, lambda d: Path(os.devnull)], ids=["fifo", "devnull"])
def test_images_that_are_not_files_or_folders(codes, cmd, source):
    d = codes[0]
    target = source(d)
    if cmd == "encode":
        # encode names the model it loaded on stderr before it reads IMAGES
        res = run("encode", target, "--out", d / "c.npy", "--model", toy_model(d / "m.onnx"))
        assert_refused(res, str(target), alone=False)
    else:
        assert_refused(run(*command(cmd, d, query=target)), str(target))


@pytest.mark.parametrize("cmd, option, value", [
    ("eval", "--threads", 0), ("eval", "--threads", -3), ("search", "--threads", 0), ("train", "--workers", -1),
])  # fmt: skip
def test_counts_below_their_minimum_are_refused(codes, cmd, option, value):
    d = codes[0]
    args = ["train", "--data", "synthetic-fg", "--out", d / "run", "--epochs", 1] if cmd == "train" else command(cmd, d)
    name = "num_workers" if cmd == "train" else option
    assert_refused(run(*args, option, value), name, str(value))
    assert not (d / "run").exists()

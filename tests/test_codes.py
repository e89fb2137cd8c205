"""Bit convention, packing, code formats and the atomic codes file with its manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import CODE_LENGTHS
from hypothesis import given
from hypothesis import strategies as st

from dsah_rt import codes
from dsah_rt.errors import CodesError, UserError


def test_zero_maps_to_bit_one():
    np.testing.assert_array_equal(codes.binarize(np.array([[-1e-9, 0.0, -0.0, 2.0]])), [[0, 1, 1, 1]])


@given(st.sampled_from(CODE_LENGTHS + [1, 7, 1024]), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_pack_is_msb_first_and_roundtrips(bits, n, seed):
    b01 = np.random.default_rng(seed).integers(0, 2, (n, bits), dtype=np.uint8)
    packed = codes.pack(b01)
    assert packed.shape == (n, (bits + 7) // 8)
    for i in range(n):  # byte j bit 7-t holds code bit 8j+t
        for t in range(bits):
            assert (packed[i, t // 8] >> (7 - t % 8)) & 1 == b01[i, t]
    np.testing.assert_array_equal(codes.unpack(packed, bits), b01)


@given(st.sampled_from(CODE_LENGTHS), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_all_accepted_forms_give_the_same_packed_codes(bits, n, seed):
    b01 = np.random.default_rng(seed).integers(0, 2, (n, bits), dtype=np.uint8)
    expected = codes.pack(b01)
    pm1 = b01.astype(np.int8) * 2 - 1
    for arr, k in [(expected, bits), (b01.astype(bool), None), (b01.astype(np.int64), None),
                   (b01.astype(np.float32), None), (pm1, None), (pm1.astype(np.float64), None), (b01, bits)]:
        packed, got_bits = codes.to_packed(arr, k)
        assert got_bits == bits
        np.testing.assert_array_equal(packed, expected)


@pytest.mark.parametrize(
    "arr, bits, message",
    [
        (np.zeros(5, np.uint8), None, "2-D"),
        (np.array([[0, 1, 2]]), None, "0/1 or all ±1"),
        (np.array([[0, 1, -1]]), None, "0/1 or all ±1"),
        (np.array([[0.5, 1.0]]), None, "0/1 or all ±1"),
        (np.array([[np.nan, 1.0]]), None, "NaN"),
        (np.zeros((2, 3), np.uint8), 48, "need 6"),
        (np.array([[0x0F]], np.uint8), 4, "padding bits"),
        (np.zeros((1, 1025), np.int8), None, "outside 1..1024"),
        (np.array([["a"]]), None, "dtype"),
        (np.ones((2, 12)), 24, "24 bits were expected"),
    ],
)
def test_bad_codes_are_one_line_errors(arr, bits, message):
    with pytest.raises(CodesError, match=message) as err:
        codes.to_packed(arr, bits, where="x.npy")
    assert "\n" not in str(err.value) and "x.npy" in str(err.value)


def test_write_and_read_with_manifest(tmp_path):
    b01 = np.random.default_rng(0).integers(0, 2, (4, 12), dtype=np.uint8)
    path = codes.write_codes(tmp_path / "codes.npy", codes.pack(b01), 12, rows=list("abcd"),
                             skipped=[{"path": "e.jpg", "reason": "truncated"}], model={"fingerprint": "f"})
    manifest = json.loads((tmp_path / "codes.npy.json").read_text())
    assert manifest["bits"] == 12 and manifest["rows"] == list("abcd") and manifest["model"] == {"fingerprint": "f"}
    got = codes.read_codes(path)
    assert got.bits == 12 and got.rows == list("abcd") and got.skipped[0]["reason"] == "truncated"
    np.testing.assert_array_equal(got.packed, codes.pack(b01))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "codes.npy.json"]  # no temp files
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # readable like any file, not mkstemp's 0600


def test_manifest_from_another_array_is_refused(tmp_path):
    codes.write_codes(tmp_path / "a.npy", np.zeros((2, 2), np.uint8), 16)
    np.save(tmp_path / "a.npy", np.ones((2, 2), np.uint8))
    with pytest.raises(CodesError, match="does not belong"):
        codes.read_codes(tmp_path / "a.npy")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "codes.npy"

    def broken_save(fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError):
        codes.write_codes(target, np.zeros((2, 1), np.uint8), 8)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        codes.write_codes(tmp_path / "nope" / "c.npy", np.zeros((1, 1), np.uint8), 8)
    with pytest.raises(CodesError, match="no such file"):
        codes.read_codes(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(CodesError, match="not a readable .npy"):
        codes.read_codes(tmp_path / "junk.npy")


def test_labels_validation(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([0, 3, 1]))
    np.save(tmp_path / "multi.npy", np.array([[0, 1], [1, 1]], np.uint8))
    np.save(tmp_path / "float.npy", np.array([0.5, 1.0]))
    np.save(tmp_path / "bad_multi.npy", np.array([[0, 2]]))
    assert codes.read_labels(tmp_path / "ids.npy", rows=3).shape == (3,)
    assert codes.read_labels(tmp_path / "multi.npy", rows=2).dtype == np.uint8
    with pytest.raises(CodesError, match="3 label rows but the codes have 4"):
        codes.read_labels(tmp_path / "ids.npy", rows=4)
    with pytest.raises(CodesError, match="integers"):
        codes.read_labels(tmp_path / "float.npy")
    with pytest.raises(CodesError, match="0/1"):
        codes.read_labels(tmp_path / "bad_multi.npy")

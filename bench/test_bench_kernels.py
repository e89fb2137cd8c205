"""pytest-benchmark suite for the retrieval kernels: `pytest bench/ --benchmark-only`.

Each group times ours next to its anchor on the same data (faiss-cpu for search, the deep-hashing
NumPy MAP for evaluation), so the ratio comes from one run. Sizes are CIFAR-protocol sized so the
suite finishes in about a minute; `python -m dsah_rt.bench.retrieval` runs the 1M-code tables.
"""

from __future__ import annotations

import numpy as np
import pytest

from dsah_rt import native, ranking
from dsah_rt.bench.reference import numpy_map
from dsah_rt.bench.retrieval import labelled_codes
from dsah_rt.codes import pack
from dsah_rt.index import BinaryIndex
from dsah_rt.popcount_numpy import words


@pytest.fixture(scope="module")
def cifar_like():
    q01, db01, ql, dl = labelled_codes(1000, 59_000, 48, 10)
    return q01, db01, ql, dl


@pytest.mark.benchmark(group="map-48bit-1000x59000")
def test_map_ours(benchmark, cifar_like):
    q01, db01, ql, dl = cifar_like
    qw, dw = words(pack(q01)), words(pack(db01))
    qlw, dlw = ranking.label_words(ql, dl)
    grid = np.zeros(0, np.int64)

    def run():
        return ranking.index_order(qw, dw, qlw, dlw, 48, 0, grid)[1].mean()

    ours = benchmark(run)
    onehot = np.eye(10)
    ref = numpy_map(q01[:20] * 2.0 - 1, db01 * 2.0 - 1, onehot[ql[:20]], onehot[dl], kind="stable")
    sub = ranking.index_order(qw[:20], dw, qlw[:20], dlw, 48, 0, grid)[1]
    assert abs(sub.mean() - ref) <= 1e-12 and 0 < ours <= 1


@pytest.mark.benchmark(group="map-48bit-1000x59000")
def test_map_numpy_codebase_100_queries(benchmark, cifar_like):
    q01, db01, ql, dl = cifar_like
    onehot = np.eye(10)
    benchmark.pedantic(numpy_map, args=(q01[:100] * 2.0 - 1, db01 * 2.0 - 1, onehot[ql[:100]], onehot[dl]), rounds=1, iterations=1)


@pytest.mark.benchmark(group="topk-48bit-1000x59000-k100")
def test_topk_ours(benchmark, cifar_like):
    _, db01, _, _ = cifar_like
    q = pack(cifar_like[0])
    index = BinaryIndex(48)
    index.add(pack(db01))
    D, _ = benchmark(index.search, q, 100)
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is the anchor for search")
    findex = faiss.IndexBinaryFlat(48)
    findex.add(pack(db01))
    np.testing.assert_array_equal(findex.search(q, 100)[0], D)


@pytest.mark.benchmark(group="topk-48bit-1000x59000-k100")
def test_topk_faiss(benchmark, cifar_like):
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is the anchor for search")
    faiss.omp_set_num_threads(native.set_threads(None))
    findex = faiss.IndexBinaryFlat(48)
    findex.add(pack(cifar_like[1]))
    benchmark(findex.search, pack(cifar_like[0]), 100)

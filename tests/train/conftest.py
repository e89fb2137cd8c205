from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run torch on one thread for a module of small-tensor tests.

    On a busy 2-core machine torch's intra-op threads spin-wait on each other: an 8x48 matmul
    took ~20 ms with 2 threads and ~0.04 ms with 1. Opt-in (usefixtures), restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

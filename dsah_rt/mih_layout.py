"""The columns of an MIH substring layout row and the kernels' "no work limit", shared by the index
(dsah_rt/index/mih.py, which must open without starting Numba) and its kernels (dsah_rt/mih_kernels.py)."""

import numpy as np

FIRST, LENGTH, BUCKET_BITS, BASE = range(4)
NO_LIMIT = np.iinfo(np.int64).max

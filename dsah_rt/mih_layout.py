"""The columns of an MIH substring layout row, the kernels' "no work limit" and unit of work, shared
by the index (dsah_rt/index/mih.py, which must open without starting Numba) and its kernels
(dsah_rt/mih_kernels.py)."""

import numpy as np

FIRST, LENGTH, BUCKET_BITS, BASE = range(4)
NO_LIMIT = np.iinfo(np.int64).max
# Work is counted in candidates (a sequential read of a row); a probe (random reads of offsets and
# rows) weighs as PROBE_WEIGHT of them.
PROBE_WEIGHT = 16

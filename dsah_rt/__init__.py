"""dsah-rt: Deep Saliency Hashing from training to exact Hamming retrieval.

The runtime core (this package's top-level modules) needs only numpy, numba and click;
`dsah_rt.train` and `dsah_rt.export` need the `train` extra (PyTorch).
"""

__version__ = "0.1.0"

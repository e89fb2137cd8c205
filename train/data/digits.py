"""scikit-learn's bundled handwritten digits: 1797 real 8x8 images, 16 grey levels, 10 classes.

Shipped inside scikit-learn, so it is real data that needs no download; kept at 8x8 here
(TorchSplit resizes to the model's input).
"""

from __future__ import annotations

import numpy as np

from .core import RetrievalData, Split
from .protocol import Sampled, apply_protocol
from .registry import register_dataset


@register_dataset("digits", aliases=("sklearn-digits",))
def load_digits(
    *,
    seed: int,
    query_per_class: int = 30,
    train_per_class: int = 60,
    train_in_database: bool = False,
) -> RetrievalData:
    """Per class (about 180 images): `query_per_class` query, `train_per_class` train, the
    rest (about 90) database, plus the train images if `train_in_database`."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    pool = Split(labels=bunch.target.astype(np.int64), images=np.repeat(grey[..., None], 3, axis=-1))
    protocol = Sampled(query_per_class, train_per_class, train_in_database)
    train, query, database = apply_protocol(pool, protocol, seed, "digits")
    return RetrievalData("digits", train, query, database, 10, False, [str(d) for d in range(10)])

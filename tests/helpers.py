"""Helpers shared by the data tests (not a test module): flat test videos and batch comparisons.

Flat frames whose grey level encodes the frame index: H.264 keeps flat frames within a level or two,
so frame sampling can be checked through the codec.
"""

import numpy as np


def level(t):
    return 10 + 12 * t


def flat_video(values, h, w):
    return np.stack([np.full((h, w, 3), v, np.uint8) for v in values])


def take(ds, n, state=None):
    """The first n batches of a fresh iterator (set to `state` first when given), and the iterator."""
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    batches = [next(it) for _ in range(n)]
    return batches, it


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)

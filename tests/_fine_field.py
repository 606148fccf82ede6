"""A displacement field varying over a few hole spacings, for the kernel-order tests.

A test helper, not part of the package: an analytic field the order-3
kernel (``-r⁴ log r``) should follow better than the thin-plate spline, so
that the tests compare fits against values computed here, not by the code
under test.
"""

import numpy as np


def fine_field(p):
    """A field varying over 3.2-4.1 pitches, plus a quadratic: (dy, dx) px at ``p`` (pitches)."""
    return np.column_stack(
        [
            0.5 * np.sin(2 * np.pi * p[:, 0] / 3.2 + 0.3) * np.cos(2 * np.pi * p[:, 1] / 4.1)
            + 0.01 * p[:, 0] * p[:, 1],
            0.4 * np.cos(2 * np.pi * (p[:, 0] + p[:, 1]) / 3.7) - 0.02 * p[:, 1],
        ]
    )

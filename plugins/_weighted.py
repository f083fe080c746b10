"""Importance weights (ggml's `quant_weights`, an imatrix row) for the formats whose ggml quantizer takes them.

Owns `ImportanceWeighted`, a mixin giving a format `quantize_weighted(w, quant_weights)`:
the same checks and result shape as `quantize`, with one weight per column that the
format's quantize kernel reads through `current_weights()`. (The public API for
calibration comes later; this keeps the door open without changing Format's signature.)
The weights travel in a ContextVar, so concurrent quantize calls in other threads or tasks
never see them.
"""

from __future__ import annotations

import contextvars

import numba
import numpy as np

from quantfmt.errors import NonFiniteError, ShapeError

_QW: contextvars.ContextVar = contextvars.ContextVar("quant_weights", default=None)


def current_weights() -> np.ndarray | None:
    """The float32 (cols,) importance weights of the quantize call in progress, or None."""
    return _QW.get()


class ImportanceWeighted:
    """Mixin for a Format whose quantize kernel honours current_weights()."""

    def quantize_weighted(self, w, quant_weights) -> np.ndarray:
        """quantize with ggml's importance weights: `quant_weights` holds one finite float per
        column (an imatrix row), used for every row, as ggml_quantize_chunk takes them."""
        w = self._float_input(w, "weights")
        cols = self.matrix_shape(w.shape)[1]
        qw = np.ascontiguousarray(self._float_input(quant_weights, "quant_weights"), np.float32)
        if qw.shape != (cols,):
            raise ShapeError(
                f"{self.tag}: quant_weights of shape {qw.shape} do not fit weights of shape {w.shape}: "
                f"expected ({cols},), one per column"
            )
        if not np.isfinite(qw).all():
            c = int(np.flatnonzero(~np.isfinite(qw))[0])
            raise NonFiniteError(f"{self.tag}: quant_weights hold a non-finite value ({qw[c]}) at column {c}")
        token = _QW.set(qw)
        try:
            return self.quantize(w)
        finally:
            _QW.reset(token)


# ---- arithmetic shared by ggml's weighted quantizers ------------------------------------------

MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


def nearest_int_ref(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int on float32 v: the low mantissa bits of v + 1.5*2**23, i.e. round half
    to even for |v| <= 4194303 (ggml asserts that range; beyond it, and for inf/NaN, this is
    what a build without asserts computes)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = (np.asarray(v, np.float32) + MAGIC).astype(np.float32)
    return (s.view(np.int32) & 0x007FFFFF) - 0x00400000


@numba.njit(cache=True, inline="always")
def nearest_int(v):
    s = np.float32(v + MAGIC)
    return np.int64(s.view(np.int32) & 0x007FFFFF) - 0x00400000


def row_sigma2_ref(w: np.ndarray) -> np.ndarray:
    """Per row, (sum of x*x over the whole row, in order) / cols: Q5_0's and Q5_1's sigma2."""
    with np.errstate(over="ignore", under="ignore"):
        s = np.add.accumulate(w * w, axis=1, dtype=np.float32)[:, -1]
        return (s / np.float32(w.shape[1])).astype(np.float32)


@numba.njit(cache=True)
def row_sigma2(w, r):
    s = np.float32(0.0)
    for c in range(w.shape[1]):
        s += w[r, c] * w[r, c]
    return s / np.float32(w.shape[1])

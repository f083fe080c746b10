"""float32 GEMM for prefill tiles: register-blocked AVX-512 outer products, where the CPU has AVX-512.

Owns `use()` (whether this path runs here) and two products, each on the calling thread (nogil):
  rows_times(w, xt, ct)     ct (r, n16) = w (r, K) @ xt (K, n16)      W's rows (a tile, or F32's own rows)
  times_cols(xt, wt, out)   out (n, r) = xt.T (n, K) @ wt (K, r)      W.T (the tiled layouts' tiles)
with xt = x.T, C-contiguous, its columns padded with zeros to n16 (a multiple of 16).

Why not the single-threaded sgemm of numpy's OpenBLAS: with 128 activation rows its kernels run at
~55% of the FMA peak on the AVX-512 Xeon (measured 106-125 GFLOP/s on one core for 128 x 4096 x 256..2048,
against 208 for a loop of independent FMAs; 150 for a square 2048 product): it packs both operands
for each call, and a tile's call has only 128 rows to spread that over. These kernels read the operands
where the tile fill left them (in L2) and reach 140-170 GFLOP/s there.

The micro-kernel (`_micro(MR, NV)`, LLVM IR): MR x NV*16 results in MR*NV zmm accumulators; per step k
it loads NV vectors of B's row k and broadcasts MR values of A's column k (vfmadd231ps with a
vbroadcastss each). A's values are read through two strides (its row i, its column k), so the same
kernel broadcasts from W's rows (stride ldw per i) or from xt (stride 1 per i). K runs in blocks of
KC, each summed from zero and then added to C: the rounding error grows with KC + K/KC terms, not K
(BLAS sums alike: measured error on 4096 columns 1.1e-4 here against OpenBLAS's 1.2e-4).
Elsewhere (AVX2: 16 ymm registers, where 24 accumulators of 2 ymm each would spill; ARM) `use()` is
False and callers keep BLAS.
"""

from __future__ import annotations

import numpy as np

from . import cpu

#: K per block: a block of B's rows (KC x NV*16 floats) stays in L1/L2 while the kernel sweeps A.
KC = 256
#: Whether these kernels run (tests set it False to run BLAS's path on this machine too).
ENABLED = True


def use() -> bool:
    """True where the AVX-512 kernels run: 32 zmm registers hold the 24 accumulators."""
    return ENABLED and cpu.has("avx512f")


_kernels = None


def _k():
    """The numba module part, compiled on first use (importing numba costs start-up time)."""
    global _kernels
    if _kernels is None:
        from . import _gemm_kernels

        _kernels = _gemm_kernels
    return _kernels


def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """a itself where the kernels can read it (native float32, each row contiguous), else such a copy."""
    if a.dtype == np.float32 and a.dtype.isnative and a.strides[1] == 4:
        return a
    return np.ascontiguousarray(a, dtype=np.float32)


def blocks(xt: np.ndarray) -> np.ndarray:
    """xt (K, n16) as rows_times reads it: its columns in blocks of 64 (the last n16 % 64 in blocks of 16),
    the block starting at column m0 stored at m0*K as (K, b), C-order. Read from xt itself, a step k of a
    64-column block is 256 bytes out of every n16*4: with n = 512 a K-block of 256 steps spans 128 pages,
    more than the L1 TLB holds (one core, 128 W rows x 4096, n = 512: 109-125 GFLOP/s from xt)."""
    xb = np.empty(xt.size, np.float32)
    _k().pack_blocks(xt, xb)
    return xb


def rows_times(w: np.ndarray, xt: np.ndarray, ct: np.ndarray, xb: np.ndarray | None = None) -> None:
    """ct (r, n16) = w (r, K) @ xt (K, n16); w's rows contiguous (any row stride), xt and ct C-contiguous,
    n16 a multiple of 16; xb = blocks(xt), made once by a caller that multiplies many tiles (else here).
    Call only where use()."""
    r, k = w.shape
    if r == 0:
        return
    if k == 0:
        ct[...] = 0
        return
    _k().rows_times(_rows_contiguous(w), blocks(xt) if xb is None else xb, xt.shape[1], ct, KC)


def panels(xt: np.ndarray, n: int) -> np.ndarray:
    """The activations as times_cols reads them: rows in groups of 12 (the last n % 12 in groups of 8, 4, 1),
    each group of m rows starting at row i stored at i*K as (K, m), C-order. The kernel broadcasts a group's
    m values per step k, which then lie in one sequential stream instead of one or two cache lines of each
    row of xt (measured on one core, 256 W.T rows, n = 512: 123 -> 142 GFLOP/s)."""
    xp = np.empty(n * xt.shape[0], np.float32)
    _k().pack(xt, n, xp)
    return xp


def times_cols(xt: np.ndarray, wt: np.ndarray, out: np.ndarray, xp: np.ndarray | None = None) -> None:
    """out (n, r) = xt[:, :n].T @ wt (K, r): xt C-contiguous (K, n16), wt rows contiguous (K rows of at
    least r floats, any row stride), out a row-contiguous view (n, r) (any row stride); xp = panels(xt, n),
    made once by a caller that multiplies many tiles (else here). Call only where use()."""
    n, r = out.shape
    k = wt.shape[0]
    if n == 0 or r == 0:
        return
    if k == 0:
        out[...] = 0
        return
    r16 = r // 16 * 16
    if r16:
        _k().times_cols(panels(xt, n) if xp is None else xp, _rows_contiguous(wt), out, n, r16, KC)
    if r16 < r:  # the last r % 16 columns of out: BLAS (a masked kernel would gain nothing measurable)
        np.matmul(xt[:, :n].T, wt[:, r16:r], out=out[:, r16:r])

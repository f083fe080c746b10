"""qmatmul for ggml formats whose weights are small integers times a per-block scale.

Owns the first-version qmatmul of Q5_0, Q5_1, IQ4_NL, IQ4_XS and MXFP4 (the last three now take it
only for mode "f32" decode and on CPUs without AVX2: plugins/_i4dot.py): prepare() decodes each
block to its integer values (Q5_0: q - 16; Q5_1: q; IQ4_NL, IQ4_XS and MXFP4: the table value
of each 4-bit index) as int8, and its scale as float32 (IQ4_XS: each 32-block's d*(ls - 32),
the float32 its dequantize multiplies by), and repacks them into Q8_0's row
tiles (plugins/_qtiles.py); Q8_0's kernels (plugins/q8_0.py, "fast qmatmul") then do the
work unchanged, since they compute exactly sum over blocks of d * sum_j(q_j * x_j):
    mode "f32":  x as floats;
    mode "q8_0": x quantized to Q8_0 blocks as ggml-cpu does (plugins/_ggml.py), the int8
                 products summed exactly in float32, i.e. ggml's integer dot, times d_w*d_x;
    mode "q8_k": x quantized per 256 to Q8_K as ggml's quantize_row_q8_K_ref (plugins/_kquants.py),
                 each 32-block taking its super-block's float32 scale d_x: the same exact
                 integer dots, times d_w*d_x (ggml's ggml_vec_dot_iq4_xs_q8_K multiplies the
                 integer sum over the super-block by fp16(d)*d_x instead: float rounding only).
Batches in mode "q8_0" (n >= _i8gemm.MIN_ROWS["q8_0"], on CPUs with AVX2) go to plugins/_i8gemm.py
instead: Q5_0's values as Q8_0 blocks (kind "q8_0"), Q5_1's with Q4_1's offsets (kind "q8_1"), the
blocks made once from the tiles (int8_operands): n=128 on 11008x4096 ran 0.36-0.38x (Q5_0) and
0.44-0.48x (Q5_1) of float32 sgemm, where the sgemm on float products below ran 0.99x and 2.1x.
Q5_1's per-block offset m adds sum_b m_b * S_b, S_b being the block sum of x (mode "f32")
or ggml's fp16 s = d_x*sum(q_x) of the Q8_1 activation block (mode "q8_0", as
ggml_vec_dot_q5_1_q8_1 pairs it); that term is one small matrix product over blocks.

The cost: 1 byte per weight in the tiles where the file has 4.25-6 bits, i.e. memory
bandwidth of Q8_0 rather than of the format. Kernels that read the packed nibbles are
a later step.
"""

from __future__ import annotations

import numba
import numpy as np

from quantfmt.errors import NonFiniteError
from quantfmt.families import decode_threads, parallel_rows, prefill_path, prefill_threads, tiles_prefill

from . import _i8dot, _i8gemm
from ._ggml import QK, act_q8_1_row, act_row_work, fp16_table, quantize_activations
from ._qtiles import BLAS_MIN_ROWS, FASTMATH, Prepared, T, blas_matmul, pad_blocks, pad_cols, tile_units, to_tiles
from .q8_0 import dequant_tiles, tiles_dot


def prepare_int8(q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> Prepared:
    """q int8 (rows, nb, 32) block values, d float32 (rows, nb) scales, m float32 (rows, nb)
    offsets or None -> Q8_0 tiles. Here Prepared.m holds the offsets untiled, (rows, nb),
    or an empty array: only this module's qmatmul reads it."""
    rows, nb = d.shape
    qt = tile_units(np.ascontiguousarray(q).view(np.uint8), rows, 0, 1).view(np.int8)[..., 0]
    mm = np.zeros((0, 0), np.float32) if m is None else np.ascontiguousarray(m, np.float32)
    return Prepared(rows, nb * QK, qt, to_tiles(np.ascontiguousarray(d, np.float32), rows), mm)


def decode_tiles(prep: Prepared) -> np.ndarray:
    """plugins/_i8dot.py's decode tiles of these int8 tiles (tiles, nbp, 8, T, 4), q + 128, made on first
    use and kept in prep.dec (1 byte per weight more, held only by matrices decoded in mode "q8_0").
    Why: Q8_0's float tiles on float activation quants (the path before) decoded 11008x4096 Q5_0 in
    3.4 ms, 2.7x Q8_0's int8 decode of as many bytes per weight."""
    if prep.dec is None:
        q = prep.q  # (tiles, nbp, 32, T) int8
        tiles, nbp = q.shape[:2]
        shape = (tiles, nbp, 8, T, 4)
        size = tiles * nbp * 8 * T * 4
        raw = np.empty(size + 64, np.uint8)
        a = -raw.ctypes.data % 64  # as _i8dot.decode_tiles: no zmm load straddles two cache lines
        qn = raw[a : a + size].reshape(shape)
        qn[...] = q.view(np.uint8).reshape(tiles, nbp, 8, 4, T).transpose(0, 1, 2, 4, 3)
        np.bitwise_xor(qn, np.uint8(0x80), out=qn)
        prep.dec = qn
    return prep.dec


def int8_operands(prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """What plugins/_i8gemm.py's kernels read for these tiles, made on first use and kept in prep.i8:
    the block values as Q8_0 blocks (rows, nb * 34) uint8, each block's 32 int8 values after 2 unused
    bytes (the kernels take the scales from prep.d), and the offsets m tiled as prep.d (Q5_1; prep.d
    where there are none). 1.06 bytes per weight more, held only by matrices multiplied by batches in
    mode "q8_0"."""
    if prep.i8 is None:
        rows, nb = prep.rows, prep.cols // QK
        q = prep.q  # (tiles, nbp, 32, T): value j of block b of row tl*T + t at [tl, b, j, t]
        raw = np.zeros((rows, nb, QK + 2), np.uint8)
        raw[:, :, 2:] = np.moveaxis(q, 3, 1).reshape(-1, q.shape[1], QK)[:rows, :nb].view(np.uint8)
        mt = to_tiles(prep.m, rows) if prep.m.size else prep.d
        prep.i8 = (raw.reshape(rows, -1), mt)
    return prep.i8


def qmatmul_path(op: str, n: int, mode: str) -> str:
    """Format.kernel_path of the formats whose qmatmul is qmatmul_int8 (Q5_0, Q5_1)."""
    if op != "qmatmul":
        return "numba"
    if _i8dot.takes(n, mode):
        return _i8dot.kernel_path()
    if _i8gemm.takes("q8_0", n, mode):
        return f"int8-{_i8gemm.PATH}"
    return prefill_path() if n >= BLAS_MIN_ROWS else f"tiles-{mode}"


def qmatmul_int8(prep: Prepared, x: np.ndarray, mode: str, tag: str) -> np.ndarray:
    """x (n, cols) float32 @ W.T for a Prepared from prepare_int8."""
    n, cols = x.shape
    nbp = prep.nbp
    nb = cols // QK
    has_m = prep.m.size > 0
    lut = fp16_table()
    if mode == "q8_k":
        if has_m:
            raise ValueError("mode q8_k has no per-block offsets")  # pragma: no cover - no such format
        return _qmatmul_q8_k(prep, x, tag)
    if mode == "q8_0":
        if _i8dot.takes(n, mode):
            # a few rows (as Q8_0 takes them): Q8_0's int8 decode on these values, then Q5_1's offsets
            d16, s16, qx = quantize_activations(x, with_sum=has_m, tag=tag)
            out = _i8dot.qmatmul(decode_tiles(prep), prep.d, prep.rows, cols, x, tag, act=(d16, qx))
            if has_m:
                _add_offsets(out, lut[s16], prep.m)
            return out
        if _i8gemm.takes("q8_0", n, mode):
            # batches: the int8 GEMM of Q8_0 (Q5_0) or Q8_0 with Q4_1's offsets (Q5_1, kind "q8_1")
            raw, mt = int8_operands(prep)
            return _i8gemm.qmatmul_q8("q8_1" if has_m else "q8_0", prep, x, tag, raw=raw, m=mt)
        d16, s16, qx = quantize_activations(x, with_sum=has_m, tag=tag)
        dx = lut[d16]
        if n >= BLAS_MIN_ROWS:
            # sgemm on exact float products d_w*q_w and d_x*q_x
            out = blas_matmul(dequant_tiles, prep, (qx.astype(np.float32) * dx[:, :, None]).reshape(n, -1))
        else:
            out = _kernel(prep, pad_blocks(qx.astype(np.float32), nbp).reshape(n, -1), pad_blocks(dx, nbp))
        if has_m:
            _add_offsets(out, lut[s16], prep.m)
        return out
    if n >= BLAS_MIN_ROWS:
        if has_m and prefill_threads():
            # per-thread tiles with the offsets folded in (w = d*q + m): no _add_offsets pass, whose
            # n x nb x rows product (scalar sums) cost as much as the sgemm again
            def fill(r0: int, r1: int, wt: np.ndarray) -> None:
                _dequant_tiles_m(prep.q, prep.d, prep.m, r0 // T, -(-r1 // T), wt)

            return tiles_prefill(fill, prep.rows, cols, x, group=T, width=nbp * QK)
        out = blas_matmul(dequant_tiles, prep, x)
    else:
        out = _kernel(prep, pad_cols(x, nbp), np.ones((n, nbp), np.float32))
    if has_m:
        _add_offsets(out, x.reshape(n, nb, QK).sum(-1, dtype=np.float32), prep.m)
    return out


def matvec_fn(prep: Prepared, rows: int, cols: int, mode: str):
    """Format.matvec_fn of Q5_0 and Q5_1: one row as qmatmul_int8 takes it where _i8dot decodes (Q5_1:
    then its offsets times ggml's Q8_1 sums, in the same call), or None."""
    if not _i8dot.takes(1, mode):
        return None
    if not prep.m.size:
        return _i8dot.matvec_fn(decode_tiles(prep), prep.d, rows, cols)
    f, qn, d, m, lut = _MATVEC_M[_i8dot.PATH], decode_tiles(prep), prep.d, prep.m, fp16_table()
    width = d.shape[0] * T
    threads = decode_threads(rows, cols)
    if threads > 1:
        # the row (with its Q8_1 sums) made by one compiled call, _i8dot's driver and then the offsets'
        # term on parallel_rows' threads: qmatmul_int8's steps without its Python around them
        dec, unsigned = _i8dot._DECODE[_i8dot.PATH], _i8dot.PATH != "avx2"

        def run_threads(x):
            work = act_row_work(x.shape[1])
            if not act_q8_1_row(x, lut, work, unsigned):
                return None
            out = np.empty((1, width), np.float32)
            counter = work[8]
            counter[0] = 0
            parallel_rows(dec, threads, 1, qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter,
                          weights=1)
            _add_offsets(out, work[10], m)
            return out[:, :rows]

        return run_threads

    def run(x):
        out = np.empty((1, width), np.float32)
        return out[:, :rows] if f(qn, d, m, x, lut, out, act_row_work(x.shape[1])) else None

    return run


# One row of Q5_1, as _i8dot's _MATVEC (see why there) plus the offsets' term of qmatmul_int8, in one call.

@numba.njit(cache=True, nogil=True)
def _matvec_m_avx512vnni(qn, d, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _i8dot._decode_avx512vnni(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    _add_offsets_rows(out, work[10], m, 0, m.shape[0])
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_m_avxvnni(qn, d, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, True):
        return False
    counter = work[8]
    counter[0] = 0
    _i8dot._decode_avxvnni(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    _add_offsets_rows(out, work[10], m, 0, m.shape[0])
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_m_avx2(qn, d, m, x, lut, out, work):
    if not act_q8_1_row(x, lut, work, False):
        return False
    counter = work[8]
    counter[0] = 0
    _i8dot._decode_avx2(qn, d, work[1], work[2], work[3], out, x.shape[1] // QK, counter, 0, 1)
    _add_offsets_rows(out, work[10], m, 0, m.shape[0])
    return True


_MATVEC_M = {"avx512vnni": _matvec_m_avx512vnni, "avxvnni": _matvec_m_avxvnni, "avx2": _matvec_m_avx2}


def q8_k_blocks(x: np.ndarray, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """x (n, cols) quantized to Q8_K as ggml does, as 32-blocks: (quants int8 (n, cols/32, 32), float32
    scale d_x (n, cols/32): each 32-block its 256-super-block's). NonFiniteError for NaN/inf."""
    from ._kquants import QK_K, quantize_q8_K

    n, cols = x.shape
    if not np.isfinite(x).all():
        r, c = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
        raise NonFiniteError(
            f"{tag}: qmatmul mode 'q8_k': activations of shape {x.shape}: row {r}, column {c} is "
            f"{x[r, c]}; a non-finite activation cannot be quantized"
        )
    dx, qx, _ = quantize_q8_K(x)  # (n, cols/256), (n, cols/256, 256): Q8_K's scale cannot overflow
    return qx.reshape(n, cols // QK, QK), np.repeat(dx, QK_K // QK, axis=1)


def _qmatmul_q8_k(prep: Prepared, x: np.ndarray, tag: str) -> np.ndarray:
    n, cols = x.shape
    qx, cx = q8_k_blocks(x, tag)
    if n >= BLAS_MIN_ROWS:
        return blas_matmul(dequant_tiles, prep, (qx.astype(np.float32) * cx[..., None]).reshape(n, cols))
    xs = qx.astype(np.float32)
    return _kernel(prep, pad_blocks(xs, prep.nbp).reshape(n, -1), pad_blocks(cx, prep.nbp))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _dequant_tiles_m(q, d, m, t0, t1, wt):
    # Tiles t0..t1-1 as W.T into wt (nbp*32, (t1-t0)*T), offsets included: d*q + m[row, block] (m
    # untiled (rows, nb); padded rows and blocks get 0). On the calling thread (families.tiles_prefill).
    rows, nb = m.shape
    wt3 = wt.reshape(wt.shape[0], t1 - t0, T)
    TT = wt3.shape[2]  # a runtime bound: LLVM vectorizes the t loops instead of unrolling them
    mm = np.empty(TT, np.float32)
    for b in range(q.shape[1]):
        for i in range(t1 - t0):
            tl = t0 + i
            for t in range(TT):
                r = tl * TT + t
                mm[t] = m[r, b] if r < rows and b < nb else np.float32(0.0)
            for j in range(QK):
                for t in range(TT):
                    wt3[b * QK + j, i, t] = np.float32(q[tl, b, j, t]) * d[tl, b, t] + mm[t]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _add_offsets_rows(out, s, m, r0, r1):
    # Weight rows r0..r1-1 of _add_offsets (families.parallel_rows: a parallel=True driver compiled
    # ~2x slower cold). fastmath with `reassoc`: the sum over blocks vectorizes (one add chain ran
    # 1.5 ms on 11008 x 128 offsets, a Q5_1 decode's whole int8 dot took 1.6).
    n, nb = s.shape
    for r in range(r0, r1):
        for i in range(n):
            acc = np.float32(0.0)
            for b in range(nb):
                acc += s[i, b] * m[r, b]
            out[i, r] += acc


def _add_offsets(out, s, m):
    # out[i, r] += sum_b s[i, b] * m[r, b]. A small product (n x nb x rows), but through BLAS it
    # took ~14 ms where the tile kernel took 2-3 ms: on a loaded machine every BLAS call waits
    # at its thread barrier for a descheduled thread (see _qtiles.CHUNK_BYTES). Here it runs on
    # quantfmt's threads, as the tile kernel before it.
    parallel_rows(_add_offsets_rows, m.shape[0], out.shape[0] * s.shape[1], out, s, m, weights=1 << 18)


def _kernel(prep: Prepared, xs: np.ndarray, cx: np.ndarray) -> np.ndarray:
    n = xs.shape[0]
    out = np.empty((n, prep.tiles * T), np.float32)
    for i in range(n):
        tiles_dot(prep, xs[i], cx[i], out[i])
    return out[:, : prep.rows]

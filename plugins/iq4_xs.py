"""IQ4_XS (tag IQ4X): ggml's 4-bit non-linear format with 6-bit sub-block scales (4.25 bits per weight).

Owns the IQ4_XS layout, its numpy reference, its numba kernels and the Format class.

One super-block = 256 consecutive weights of a row, 136 bytes, eight sub-blocks of 32:

    bytes 0-1     d           fp16, little-endian: the scale of the sub-block scales
    bytes 2-3     scales_h    uint16, little-endian: bits 2k, 2k+1 = the high 2 bits of ls[k]
    bytes 4-7     scales_l[4] scales_l[k/2] >> 4*(k%2) & 15 = the low 4 bits of ls[k]
    bytes 8-135   qs[128]     sub-block k: qs[16k+j] = L[32k+j] | (L[32k+16+j] << 4), 4-bit
                              indices into the table V of IQ4_NL
    ls[k] in 0..63 is the 6-bit scale of sub-block k, stored with an offset of 32.

    V = kvalues_iq4nl = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
    weight (sub-block k, element j) = (d * (ls[k] - 32)) * V[L]     (float32, two roundings, in that order)

Quantize: ggml's `quantize_iq4_xs` (what ggml_quantize_chunk, quantize_row_iq4_xs_ref and
llama-quantize run), i.e. quantize_row_iq4_nl_impl with super_block_size 256, block_size 32 and
ntry 7. All arithmetic float32, one rounding per operation, sums accumulated in element order:
    weights    without importance weights: wt[j] = x[j]*x[j]
               with importance weights qw (one per column, as ggml's imatrix):
               sigma2 = (sum of x*x over the 256, in order) * 0.0078125 (2/256);
               wt[j] = qw[j] * sqrt(sigma2 + x[j]*x[j])
    scales     per sub-block k: s[k] = IQ4_NL's fitted block scale of its 32 values with those
               weights (plugins/iq4_nl.py: the first guess -max/127 and the 15 candidates
               (itry - 127)/max, itry = -7..7; s[k] = 0 when its max |x| < 1e-15)
    max_scale  the first s[k] of largest |s[k]| (strict >, from 0; NaN never wins)
    d          -max_scale / 32; stored as fp16(d) (round to nearest even); a block of zeros stores -0.0
    id         1/d with the float32 d (not the fp16 one); 0 if d == 0
    per sub-block k:
        l      clamp(nearest_int(id * s[k]), -32, 31)   (nearest_int: ggml's, the float32 bits of
               v + 1.5*2**23, round half to even)
        dl     d * l   (float32 d again);  idl = 1/dl, 0 if dl == 0
        L[j]   best(idl * x[j])  (best: the index of V nearest, a tie goes up, NaN gives 14; see
               plugins/iq4_nl.py)
        ls[k]  l + 32
    |d| >= 65520 (fp16 infinity) is a RangeError. |s[k]| <= max|x|/106.09 (IQ4_NL's bound), so any
    super-block with max |x| below 2.2e8 quantizes (with importance weights there is no such bound).
    A sub-block scale s[k] that is NaN (its sums overflowed float32: x*x is inf beyond |x| ~ 1.8e19)
    is a RangeError too: ggml's assert in nearest_int aborts there, and a build without asserts
    stores ls = 32, a sub-block of zeros.

qmatmul: ggml pairs IQ4_XS with Q8_K activations (ggml_vec_dot_iq4_xs_q8_K: per sub-block of 32 the
integer dot of V[L] with the activation quants times (ls - 32), summed over the super-block, times
fp16(d)*d_x). Both modes run on IQ4_NL's kernels (plugins/_i4dot.py), each 32-block with the
float32 scale d*(ls - 32): mode "q8_k" multiplies the same exact integer dots by that scale times
d_x (only float rounding differs from ggml's order); `int_parts` is the k-quants' integer form of
the weights, for the numpy reference of mode q8_k (plugins/_kquants.py's dot_q8k_ref).
"""

from __future__ import annotations

import threading

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, decode_threads, parallel_rows

from . import _i4dot, _iq4
from ._ggml import NONFINITE_ROW, f32_to_f16_bits, fp16_table, has_nonfinite
from ._i4dot import kernel_path as lut_kernel_path
from ._i4dot import prepare_lut, qmatmul
from ._iq4 import BRACKET, KVALUES, VF, best_index_ref, pack32, search_scales, search_scales_ref
from ._kquants import QK_K, _q8k_blocks
from ._weighted import ImportanceWeighted, current_weights, nearest_int, nearest_int_ref

BLOCK_BYTES = 136
F32 = np.float32
SAFE_ABS = 2.2e8
RULE = ("its scale d = max|sub-block scale|/32 must stay below 65520 in magnitude, and every sub-block's "
        "fitted scale must be finite (any block with max |w| below 2.2e8 fits)")

# ---- numpy reference ---------------------------------------------------------------------


def sub_block_scales_ref(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """The fitted float32 scales s (n, 8) of the sub-blocks of super-blocks x (n, 256); qw (n, 256) or None."""
    n = x.shape[0]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x2 = x * x
        if qw is None:
            wt = x2
        else:
            sigma2 = np.add.accumulate(x2, axis=1, dtype=np.float32)[:, -1] * F32(2.0 / QK_K)
            wt = qw * np.sqrt(sigma2[:, None] + x2)
    return search_scales_ref(x.reshape(-1, 32), wt.reshape(-1, 32)).reshape(n, 8)


def super_scale_ref(s: np.ndarray) -> np.ndarray:
    """d = -max_scale/32 (float32, before fp16 rounding) from the sub-block scales s (n, 8)."""
    a = np.abs(s)
    a = np.where(np.isnan(a), F32(-1), a)  # NaN never passes ggml's `abs_d > amax_scale`
    i = a.argmax(axis=1)  # the first of equal maxima
    rows = np.arange(s.shape[0])
    ms = np.where(a[rows, i] > 0, s[rows, i], F32(0))
    return (-ms / F32(32)).astype(np.float32)


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes; quant_weights (cols,) or None; raises RangeError like the kernel."""
    rows, cols = w.shape
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK_K)
    n = x.shape[0]
    qw = None
    if quant_weights is not None:
        qw = np.broadcast_to(np.asarray(quant_weights, np.float32).reshape(1, cols), (rows, cols)).reshape(-1, QK_K)
    s = sub_block_scales_ref(x, qw)
    d = super_scale_ref(s)
    bad = ~(np.abs(d) < F32(65520)) | np.isnan(s).any(axis=1)
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), cols // QK_K)
        raise IQ4X().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        idd = np.where(d != 0, F32(1) / d, F32(0)).astype(np.float32)
        l = np.clip(nearest_int_ref(idd[:, None] * s), -32, 31)
        dl = (d[:, None] * l.astype(np.float32)).astype(np.float32)
        idl = np.where(dl != 0, F32(1) / dl, F32(0)).astype(np.float32)
        L = best_index_ref(x.reshape(n, 8, 32) * idl[..., None])
    ls = (l + 32).astype(np.uint16)
    out = np.empty((n, BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    sh = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    out[:, 2:4] = sh[:, None].view(np.uint8)
    lo = (ls & 15).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:] = (L[..., :16] | (L[..., 16:] << 4)).reshape(n, 128)
    return out.reshape(-1)


def _scales(data: np.ndarray, rows: int, cols: int):
    """IQ4_XS bytes -> (blocks uint8 (rows, nb, 136), ls - 32 int16 (rows, nb, 8), d float32 (rows, nb))."""
    blk = np.asarray(data).reshape(rows, cols // QK_K, BLOCK_BYTES)
    d = fp16_table()[blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)]
    sh = blk[..., 2].astype(np.uint16) | (blk[..., 3].astype(np.uint16) << 8)
    k = np.arange(8)
    hi = (sh[..., None] >> (2 * k).astype(np.uint16)) & 3
    lo = (blk[..., 4 + k // 2] >> (4 * (k % 2)).astype(np.uint8)) & 15
    return blk, (lo.astype(np.int16) | (hi.astype(np.int16) << 4)) - 32, d


def unpack(data: np.ndarray, rows: int, cols: int):
    """IQ4_XS bytes -> (table values int8 (rows, nb, 8, 32), sub-block scales ls - 32 int16 (rows, nb, 8),
    d float32 (rows, nb))."""
    blk, sc, d = _scales(data, rows, cols)
    qs = blk[..., 8:].reshape(rows, cols // QK_K, 8, 16)
    L = np.concatenate([qs & 15, qs >> 4], axis=-1)
    return KVALUES[L], sc, d


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    v, sc, d = unpack(data, rows, cols)
    dl = d[..., None] * sc.astype(np.float32)
    return (dl[..., None] * v.astype(np.float32)).reshape(rows, cols)


def int_parts(data: np.ndarray, rows: int, cols: int):
    """The weights as ggml's dot product sees them, in the k-quants' form (qi, sc, mi, dw, mw):
    qi = V[L] int8 (rows, nb, 256), sc = ls - 32 per sub-block of 16 (each 32's twice), no minimums."""
    v, sc, d = unpack(data, rows, cols)
    nb = cols // QK_K
    zeros16 = np.zeros((rows, nb, 16), np.int16)
    return (v.reshape(rows, nb, QK_K), np.repeat(sc, 2, axis=2).astype(np.int16), zeros16, d,
            np.zeros((rows, nb), np.float32))


# ---- numba kernels ---------------------------------------------------------------------------
# Scalar code that follows the C statement by statement; no fastmath (byte-identity, and the
# IEEE comparisons of overflowing sums in the search).


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, qw, has_qw, out, bad, r0, r1, vf, bracket):
    nb = w.shape[1] // QK_K
    wts = np.empty((8 * nb, 32), np.float32)
    S = np.empty((8 * nb, 64), np.float32)
    s_all = np.empty(8 * nb, np.float32)
    wf = w.reshape(-1)  # the vector code reads blocks by offset (w is C-contiguous)
    of = out.reshape(-1)
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        if not has_qw:
            # one loop over the row, vectorized (block by block it cost ~8% of the quantize)
            xr = w[r]
            wtf = wts.reshape(-1)
            for j in range(xr.size):
                wtf[j] = xr[j] * xr[j]
        for b in range(nb if has_qw else 0):
            c = b * QK_K
            x = w[r, c : c + QK_K]
            sigma2 = np.float32(0.0)
            for j in range(QK_K):
                sigma2 += x[j] * x[j]
            sigma2 = sigma2 * np.float32(0.0078125)
            for k in range(8):
                xb = x[32 * k : 32 * k + 32]
                wt = wts[8 * b + k]
                for j in range(32):
                    wt[j] = qw[c + 32 * k + j] * np.sqrt(sigma2 + xb[j] * xb[j])
        search_scales(wf, r * w.shape[1], wts, S, s_all)  # all the row's blocks at once (choices overlap)
        for b in range(nb):
            c = b * QK_K
            s = s_all[8 * b : 8 * b + 8]
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            nan = False
            for k in range(8):
                sk = s[k]
                nan = nan or sk != sk
                if abs(sk) > amax:
                    amax = abs(sk)
                    mx = sk
            d = -mx / np.float32(32.0)
            if nan or not (abs(d) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            h = f32_to_f16_bits(d)
            o = out[r, b]
            o[0] = np.uint8(h & 0xFF)
            o[1] = np.uint8(h >> 8)
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            sh = 0
            for k in range(8):
                l = min(max(nearest_int(idd * s[k]), -32), 31)
                dl = d * np.float32(l)
                idl = np.float32(1.0) / dl if dl != 0 else np.float32(0.0)
                pack32(wf, r * w.shape[1] + c + 32 * k, idl, of, (r * nb + b) * BLOCK_BYTES + 8 + 16 * k)
                l += 32
                if k % 2 == 0:
                    o[4 + k // 2] = np.uint8(l & 15)
                else:
                    o[4 + k // 2] |= np.uint8((l & 15) << 4)
                sh |= (l >> 4) << (2 * k)
            o[2] = np.uint8(sh & 0xFF)
            o[3] = np.uint8(sh >> 8)


def _quantize_weighted_kernel(w, qw, has_qw, out, bad, vf, bracket):
    # Python threads over row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once (see families.parallel_rows).
    # ~32K weights per work item: this quantizer does ~16 passes over each block
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, qw, has_qw, out, bad, weights=32768, tail=(vf, bracket))


def _quantize_kernel(w, out, bad):
    qw = current_weights()
    has = qw is not None
    _quantize_weighted_kernel(w, qw if has else np.zeros(1, np.float32), has, out, bad, VF, BRACKET)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, vf, idx, out, k0, k1):
    nb = blocks.shape[1]
    for i in range(k0, k1):
        r = idx[i]
        for b in range(nb):
            d = lut[np.int64(blocks[r, b, 0]) | (np.int64(blocks[r, b, 1]) << 8)]
            sh = np.int64(blocks[r, b, 2]) | (np.int64(blocks[r, b, 3]) << 8)
            for k in range(8):
                ls = ((np.int64(blocks[r, b, 4 + k // 2]) >> (4 * (k % 2))) & 15) | (((sh >> (2 * k)) & 3) << 4)
                dl = d * np.float32(ls - 32)
                o = b * QK_K + 32 * k
                for j in range(16):
                    v = blocks[r, b, 8 + 16 * k + j]
                    out[i, o + j] = dl * vf[v & 15]
                    out[i, o + 16 + j] = dl * vf[v >> 4]


def _dequantize_kernel_v(blocks, lut, vf, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, vf, idx, out)


def _dequantize_kernel(blocks, lut, idx, out):
    _dequantize_kernel_v(blocks, lut, VF, idx, out)


# ---- one activation row in mode q8_k: Format.matvec_fn ------------------------------------------
# The runner's decode of a token: qmatmul quantizes the row to Q8_K (the Python path, its checks and
# thread bookkeeping) and then runs _i4dot's decode, ~0.02 ms a call around a kernel of that size
# on a small model's matrices. Here the row's Q8_K (the kernel quantize_q8_K runs) and the decode run
# in one compiled call: qmatmul's operations, so its bits. One function per int8 path, each calling
# its own driver (a dispatcher passed as an argument would not be cached across processes).


@numba.njit(cache=True, nogil=True)
def _act_q8_k_row(x, kd, kq, kb, dx, cx, unsigned):
    """x (1, cols) as q8_k_blocks gives it to _i4dot's decode: Q8_K super-blocks into kd, kq, kb
    (_kquants.quantize_q8_K's arrays), each 32-block's scale d_x into dx (1, cols/32) and the kernel's
    accumulator start -128 * sum(q) into cx (0 where the weights are not stored unsigned, AVX2).
    False, computing nothing, for a NaN/inf (qmatmul then raises)."""
    for c in range(x.shape[1]):
        if not (abs(x[0, c]) < np.inf):
            return False
    nbk = kd.shape[1]
    _q8k_blocks(x, kd, kq, kb, 0, nbk)
    for b in range(8 * nbk):
        dx[0, b] = kd[0, b // 8]
        sq = 0
        if unsigned:
            for j in range(32):
                sq += np.int32(kq[0, b // 8, 32 * (b % 8) + j])
        cx[0, b] = np.int32(-128) * sq
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avx512vnni(qn, d, tab, x, kd, kq, kb, xq, dx, cx, m, sx, counter, out):
    if not _act_q8_k_row(x, kd, kq, kb, dx, cx, True):
        return False
    counter[0] = 0
    _i4dot._decode_avx512vnni(qn, d, tab, xq, dx, cx, m, sx, out, dx.shape[1], counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avxvnni(qn, d, tab, x, kd, kq, kb, xq, dx, cx, m, sx, counter, out):
    if not _act_q8_k_row(x, kd, kq, kb, dx, cx, True):
        return False
    counter[0] = 0
    _i4dot._decode_avxvnni(qn, d, tab, xq, dx, cx, m, sx, out, dx.shape[1], counter, 0, 1)
    return True


@numba.njit(cache=True, nogil=True)
def _matvec_avx2(qn, d, tab, x, kd, kq, kb, xq, dx, cx, m, sx, counter, out):
    if not _act_q8_k_row(x, kd, kq, kb, dx, cx, False):
        return False
    counter[0] = 0
    _i4dot._decode_avx2(qn, d, tab, xq, dx, cx, m, sx, out, dx.shape[1], counter, 0, 1)
    return True


_MATVEC = {"avx512vnni": _matvec_avx512vnni, "avxvnni": _matvec_avxvnni, "avx2": _matvec_avx2}
_ROW_WORK = threading.local()


def _row_work(cols: int) -> tuple:
    """This thread's work space of the _matvec functions for rows of `cols` (kd, kq, kb, xq, dx, cx, m,
    sx, counter), one set per width, kept (a model's layers alternate widths)."""
    ws = getattr(_ROW_WORK, "by_cols", None)
    if ws is None:
        ws = _ROW_WORK.by_cols = {}
    if cols not in ws:
        nbk = cols // QK_K
        kq = np.empty((1, nbk, QK_K), np.int8)
        ws[cols] = (np.empty((1, nbk), np.float32), kq, np.empty((1, nbk, 16), np.int16), kq.reshape(1, cols),
                    np.empty((1, cols // 32), np.float32), np.empty((1, cols // 32), np.int32),
                    np.zeros(0, np.float32), np.zeros((1, 0), np.float32), np.zeros(1, np.int64))
    return ws[cols]


def matvec_fn(prep, path: str | None = None):
    """Format.matvec_fn in mode q8_k: the one-row kernel with its arguments bound, or None where one row
    does not run it (the portable path)."""
    path = path or _i4dot.PATH
    if path == "portable" or _i4dot.takes_prefill(1, path):
        return None
    f, qn, d, tab = _MATVEC[path], prep.qn(), prep.d, prep.kernel_table(path)
    rows, cols, width = prep.rows, prep.cols, prep.d.shape[0] * _i4dot.T
    threads = decode_threads(rows, cols)
    if threads > 1:
        # the row made by one compiled call, _i4dot's driver on parallel_rows' threads (as qmatmul)
        dec, unsigned = _i4dot._DECODE[path], path != "avx2"

        def run_threads(x):
            kd, kq, kb, xq, dx, cx, m, sx, counter = _row_work(cols)
            if not _act_q8_k_row(x, kd, kq, kb, dx, cx, unsigned):
                return None
            out = np.empty((1, width), np.float32)
            counter[0] = 0
            parallel_rows(dec, threads, 1, qn, d, tab, xq, dx, cx, m, sx, out, dx.shape[1], counter, weights=1)
            return out[:, :rows]

        return run_threads

    def run(x):
        out = np.empty((1, width), np.float32)
        return out[:, :rows] if f(qn, d, tab, x, *_row_work(cols), out) else None

    return run


# ---- the format ---------------------------------------------------------------------------


class IQ4X(ImportanceWeighted, GGMLFormat):
    tag = "IQ4X"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    aliases = ("IQ4_XS",)
    version = 1
    ggml_type = "IQ4_XS"
    vec_dot_type = "Q8_K"
    block_shape = (1, QK_K)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_k")
    # No exact refusal threshold (d depends on the fit): every super-block with max |w| below
    # SAFE_ABS fits (|d| <= max|x|/(32*106.09)), some above do not.
    max_abs = None
    safe_abs = SAFE_ABS
    range_rule = RULE
    summary = ("ggml IQ4_XS: per 256 weights an fp16 d and eight 6-bit sub-block scales, 4-bit indices "
               "into a 16-value table, w = d*(ls-32)*V[L]")
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def kernel_path(self, op, n=1, mode="f32"):
        # quantize: the scale search and index pass of plugins/_iq4.py, "simd16" (AVX-512 vpermi2ps)
        # or "portable" (generic vector IR), by the CPU numba compiles for
        return f"iq4-{_iq4.PATH}" if op == "quantize" else lut_kernel_path(op, n, mode)

    def prepare(self, data, rows, cols):
        # Each 32-block is IQ4_NL's: table values times one float32 scale d*(ls - 32), the very
        # product dequantize uses, so IQ4_NL's kernels (plugins/_i4dot.py) serve both modes; they
        # read the nibbles in place, 8 blocks of 16 bytes from byte 8 of each 136-byte super-block.
        def values():
            v, sc, d = unpack(data, rows, cols)
            return v.reshape(rows, -1, 32), (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)

        _, sc, d = _scales(data, rows, cols)
        dl = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
        return prepare_lut(data, rows, cols, block_bytes=BLOCK_BYTES, qoff=8, blocks_per=8, table=KVALUES, d=dl,
                           values=values)

    def _qmatmul(self, prep, rows, cols, x, mode):
        return qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        return matvec_fn(prep) if mode == "q8_k" else None


@quantfmt.hookimpl
def register_formats(register):
    register(IQ4X())

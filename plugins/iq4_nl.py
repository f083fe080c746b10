"""IQ4_NL (tag IQ4N): ggml's 4-bit non-linear format, one fp16 scale per 32 weights (4.5 bits per weight).

Owns the IQ4_NL layout, its numpy reference, its numba kernels and the Format class.

One block = 32 consecutive weights of a row, 18 bytes (Q4_0's layout, other meaning):

    bytes 0-1    d      fp16, little-endian: the scale
    bytes 2-17   qs[16] qs[j] = L[j] | (L[j+16] << 4): 4-bit indices into the table V

    V = kvalues_iq4nl = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
    weight w[j] = d * V[L[j]]           (one float32 product)

Quantize: ggml's `quantize_iq4_nl` (what ggml_quantize_chunk and llama-quantize run; the
gguf package has no IQ4_NL quantizer), i.e. quantize_row_iq4_nl_impl with one 32-block per
super-block and ntry = 7. (ggml's quantize_row_iq4_nl_ref calls it with ntry = -1, which
skips the search: not what model files hold.) All arithmetic float32, one rounding per operation, in this order,
sums accumulated j = 0, 1, ..., 31:
    weights    without importance weights: wt[j] = x[j]*x[j]
               with importance weights qw (one per column, as ggml's imatrix):
               sigma2 = (sum of x[j]*x[j]) * 0.0625;  wt[j] = qw[j] * sqrt(sigma2 + x[j]*x[j])
    amax, max  the first largest |x| and its signed value (strict >, from 0)
    amax < 1e-15f: d = 0 and every L = best(0) = 8 (the value 1): the block decodes to zeros
    best(a)    the index of V nearest to a: 0 if a <= -127, 15 if a >= 113, else with
               V[l] <= a < V[l+1]: l if (a - V[l]) < (V[l+1] - a) else l+1 (a tie goes up);
               NaN gives 14 (ggml's binary search)
    fit(id)    for j: L = best(id*x[j]); q = V[L]; sumqx += (wt*q)*x; sumq2 += (wt*q)*q
    first      d = max / 127 (i.e. -max / V[0]); id = 1/d; fit(id);
               d = sumqx/sumq2 if sumq2 > 0 else 0;  best = d*sumqx
    search     for itry = -7..7: id = (itry - 127) / max; fit(id);
               if sumq2 > 0 and sumqx*sumqx > best*sumq2: d = sumqx/sumq2; best = d*sumqx
               (products that overflow to inf, or underflow to 0, compare as IEEE says: for
               large or tiny blocks the search can keep the first d)
    store      fp16(d); id = 1/d (0 if d == 0); L[j] = best(id*x[j])
    |d| >= 65520 (fp16 infinity) is a RangeError. d is a weighted mean of x[j]/V[L[j]]; over
    all blocks |d| <= max|x|/106.09 (a bound found by maximizing that mean), so any block with
    max |x| below 6.9e6 quantizes (without importance weights: with them there is no such bound).

qmatmul: ggml pairs IQ4_NL with Q8_0 activations (ggml_vec_dot_iq4_nl_q8_0: per block the
integer dot of V[L] with the activation quants, times d_w*d_x). See plugins/_i4dot.py.
"""

from __future__ import annotations

import numba
import numpy as np

import quantfmt
from quantfmt.families import GGMLFormat, parallel_rows

from . import _i4dot, _iq4
from ._ggml import NONFINITE_ROW, QK, f32_to_f16_bits, fp16_table, has_nonfinite, vec_dot_ref
from ._i4dot import kernel_path as lut_kernel_path
from ._i4dot import prepare_lut, qmatmul
from ._iq4 import BRACKET, KVALUES, best_index_ref, pack32, search_scales, search_scales_ref
from ._iq4 import VF as _VF
from ._iq4 import best_index as _best  # noqa: F401  (the scalar best(a): tests check it against ggml)
from ._weighted import ImportanceWeighted, current_weights

BLOCK_BYTES = 18
RULE = "its fitted scale d must stay below 65520 in magnitude (any block with max |w| below 6.9e6 fits)"

# ---- numpy reference ----------------------------------------------------------------------


def block_scales_ref(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """The float32 scale d of each block of x (n, 32) before fp16 rounding; qw (n, 32) or None."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x2 = x * x
        if qw is None:
            wt = x2
        else:
            sigma2 = np.add.accumulate(x2, axis=1, dtype=np.float32)[:, -1] * np.float32(2.0 / 32)
            wt = qw * np.sqrt(sigma2[:, None] + x2)
    return search_scales_ref(x, wt)


def quantize_ref(w: np.ndarray, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> bytes; quant_weights (cols,) or None; raises RangeError like the kernel."""
    rows, cols = w.shape
    x = np.ascontiguousarray(w, np.float32).reshape(-1, QK)
    qw = None
    if quant_weights is not None:
        qw = np.broadcast_to(np.asarray(quant_weights, np.float32).reshape(1, cols), (rows, cols)).reshape(-1, QK)
    d = block_scales_ref(x, qw)
    bad = ~(np.abs(d) < np.float32(65520))
    if bad.any():
        r, b = divmod(int(np.flatnonzero(bad)[0]), cols // QK)
        raise IQ4N().range_error(w, r, b)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        L = best_index_ref(x * idd[:, None])
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint16)[:, None].view(np.uint8)
    out[:, 2:] = L[:, :16] | (L[:, 16:] << 4)
    return out.reshape(-1)


def unpack(data: np.ndarray, rows: int, cols: int):
    """IQ4_NL bytes -> (table values int8 (rows, nb, 32), d float32 (rows, nb))."""
    blk = data.reshape(rows, cols // QK, BLOCK_BYTES)
    d = fp16_table()[blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)]
    L = np.concatenate([blk[..., 2:] & 15, blk[..., 2:] >> 4], axis=-1)
    return KVALUES[L], d


def dequantize_ref(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    v, d = unpack(data, rows, cols)
    return (d[..., None] * v.astype(np.float32)).reshape(rows, cols)


def qmatmul_q8_ref(data: np.ndarray, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_iq4_nl_q8_0: per block sumi = sum(V[L_w] * q_x), then sum over blocks
    of sumi * (d_w * d_x)."""
    v, d = unpack(data, rows, cols)
    return vec_dot_ref(v, d, x)


# ---- numba kernels ------------------------------------------------------------------------
# No fastmath: FMA would change last bits, and `ninf`/`nnan` would break the IEEE
# comparisons of overflowing sums that the search relies on (see the docstring).


@numba.njit(cache=True, nogil=True)
def _quantize_rows(w, qw, has_qw, out, bad, r0, r1, vf, bracket):
    nb = w.shape[1] // 32
    wts = np.empty((nb, 32), np.float32)
    S = np.empty((nb, 64), np.float32)
    ds = np.empty(nb, np.float32)
    wf = w.reshape(-1)  # the vector code reads blocks by offset (w is C-contiguous)
    of = out.reshape(-1)
    for r in range(r0, r1):
        bad[r] = -1
        if has_nonfinite(w[r]):  # (checks_finite: quantize does not scan the tensor first)
            bad[r] = NONFINITE_ROW
            continue
        if has_qw:
            for b in range(nb):
                xb = w[r, b * 32 : b * 32 + 32]
                wt = wts[b]
                s = np.float32(0.0)
                for j in range(32):
                    s += xb[j] * xb[j]
                sigma2 = s * np.float32(0.0625)
                for j in range(32):
                    wt[j] = qw[b * 32 + j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            # one loop over the row, vectorized (block by block it cost ~8% of the quantize)
            xr = w[r]
            wtf = wts.reshape(-1)
            for j in range(xr.size):
                wtf[j] = xr[j] * xr[j]
        search_scales(wf, r * w.shape[1], wts, S, ds)  # the row's blocks at once (their choices overlap)
        for b in range(nb):
            d = ds[b]
            if not (abs(d) < np.float32(65520.0)):
                if bad[r] < 0:
                    bad[r] = b
                continue
            h = f32_to_f16_bits(d)
            out[r, b, 0] = np.uint8(h & 0xFF)
            out[r, b, 1] = np.uint8(h >> 8)
            idd = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            pack32(wf, r * w.shape[1] + b * 32, idd, of, (r * nb + b) * BLOCK_BYTES + 2)


def _quantize_weighted_kernel(w, qw, has_qw, out, bad, vf, bracket):
    # Python threads over row ranges, not a parallel=True driver: as fast, and a cold start
    # compiles the row kernel once (see families.parallel_rows).
    # ~32K weights per work item: this quantizer does ~16 passes over each block
    parallel_rows(_quantize_rows, w.shape[0], w.shape[1], w, qw, has_qw, out, bad, weights=32768, tail=(vf, bracket))


def _quantize_kernel(w, out, bad):
    qw = current_weights()
    has = qw is not None
    _quantize_weighted_kernel(w, qw if has else np.zeros(1, np.float32), has, out, bad, _VF, BRACKET)


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(blocks, lut, vf, idx, out, k0, k1):
    nb = blocks.shape[1]
    for k in range(k0, k1):
        r = idx[k]
        for b in range(nb):
            d = lut[np.int32(blocks[r, b, 0]) | (np.int32(blocks[r, b, 1]) << 8)]
            for j in range(16):
                v = blocks[r, b, 2 + j]
                out[k, b * 32 + j] = d * vf[v & 15]
                out[k, b * 32 + 16 + j] = d * vf[v >> 4]


def _dequantize_kernel_v(blocks, lut, vf, idx, out):
    # Python threads over row ranges (one range, in this thread, for a few rows), not a parallel=True
    # driver: as fast, and a cold start compiles _dequantize_rows once (see families.parallel_rows).
    parallel_rows(_dequantize_rows, idx.size, out.shape[1], blocks, lut, vf, idx, out)


def _dequantize_kernel(blocks, lut, idx, out):
    _dequantize_kernel_v(blocks, lut, _VF, idx, out)


# ---- the format ---------------------------------------------------------------------------


SAFE_ABS = 6.9e6


class IQ4N(ImportanceWeighted, GGMLFormat):
    tag = "IQ4N"
    rows_independent = True  # blocks along a row, nothing tensor-wide
    aliases = ("IQ4_NL",)
    version = 1
    ggml_type = "IQ4_NL"
    vec_dot_type = "Q8_0"
    block_shape = (1, QK)
    block_bytes = BLOCK_BYTES
    modes = ("f32", "q8_0")
    # No exact refusal threshold (the fitted scale depends on the block): every block with max |w|
    # below SAFE_ABS fits (|d| <= max|x|/106.09, found by maximising the fitted scale), some above do not.
    max_abs = None
    safe_abs = SAFE_ABS
    range_rule = RULE
    summary = "ggml IQ4_NL: per 32 weights an fp16 scale d and 4-bit indices into a 16-value table, w = d*V[L]"
    quantize_kernel = staticmethod(_quantize_kernel)
    checks_finite = True  # each row kernel flags a NaN/inf row (NONFINITE_ROW): quantize skips its scan
    dequantize_kernel = staticmethod(_dequantize_kernel)

    def kernel_path(self, op, n=1, mode="f32"):
        # quantize: the scale search and index pass of plugins/_iq4.py, "simd16" (AVX-512 vpermi2ps)
        # or "portable" (generic vector IR), by the CPU numba compiles for
        return f"iq4-{_iq4.PATH}" if op == "quantize" else lut_kernel_path(op, n, mode)

    def prepare(self, data, rows, cols):
        # the ggml bytes read in place by the int8 kernels (plugins/_i4dot.py), the fp16 d as float32
        blk = np.asarray(data).reshape(rows, cols // QK, BLOCK_BYTES)
        d = fp16_table()[blk[..., 0].astype(np.uint16) | (blk[..., 1].astype(np.uint16) << 8)]
        return prepare_lut(data, rows, cols, block_bytes=BLOCK_BYTES, qoff=2, blocks_per=1, table=KVALUES, d=d,
                           values=lambda: unpack(data, rows, cols))

    def _qmatmul(self, prep, rows, cols, x, mode):
        return qmatmul(prep, x, mode, self.tag)

    def matvec_fn(self, prep, rows, cols, mode):
        # one row as qmatmul takes it in mode q8_0 on the int8 paths: _i4dot's one-row kernel
        if mode != "q8_0" or _i4dot.PATH == "portable" or _i4dot.takes_prefill(1, _i4dot.PATH):
            return None
        return _i4dot.matvec_fn(prep)


@quantfmt.hookimpl
def register_formats(register):
    register(IQ4N())

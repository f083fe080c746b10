"""Write tests/golden/<TYPE>.npz: adversarial float32 inputs and the bytes ggml's C reference makes of them.

    .venv/bin/python scripts/make_golden.py [--out tests/golden] [--cache-dir DIR]

The expected bytes come from `quantfmt.oracle`: ggml as vendored in the sdist `ggml-python==0.0.45`
(SHA-256 pinned in quantfmt/oracle.py), `ggml.c`, `ggml-quants.c`, `ggml-threading.cpp` and ggml-cpu's `quants.c`
compiled by gcc with `-O2 -fPIC -ffp-contract=off` (no -march, so no SIMD and no FMA: contraction would round
some ties the other way). Weight types are quantized with `ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row,
imatrix)`, the path llama-quantize takes; Q8_K (the k-quants' activation type) with `quantize_row_q8_K_ref`.

Inputs recipe (ROWS x N_PER_ROW = 12 x 256 float32; "block" = 32 consecutive values, b = 0..7; g = the
rows of `np.random.default_rng(SEED).standard_normal((6, 256), dtype=np.float32)`):
  row 0  N(0,1): g[0].
  row 1  half-integer ties for 4/5-bit scales: x[i] = ((7*i) % 33 - 16) / 2, values -8..8 in steps of 0.5.
  row 2  ties for 8-bit scales: x[i] = ((13*i) % 253) - 125.5, and the first value of block b is
         127 * (-1)**b, so every block has max |x| = 127 and d = 1: x/d lands exactly on .5.
  row 3  signed zeros: +0.0 for i < 128, -0.0 for i >= 128, and block 7 alternates +0.0, -0.0.
  row 4  zero blocks inside a row: 4*g[1], with blocks 0 and 5 set to +0.0 and block 3 to -0.0.
  row 5  outliers: 0.01*g[2], with x[5] = 1000, x[77] = -1000, x[150] = 1e4; block 7 all zero but x[230] = 3.
  row 6  fp16-valued: 3*g[3] rounded to float16 and back.
  row 7  bf16-valued: 3*g[4] rounded to bfloat16 (nearest, ties to even on the bit pattern) and back.
  row 8  tiny values, one kind per block: b0 float32 subnormals k * 2**-149 (k = -16..15); b1 1e-39*g[5]
         (subnormal); b2 1e-38*g[5] (smallest normals); b3 1e-6*g[5] (scales fall into fp16 subnormals);
         b4 1e-8*g[5] (fp16 scales underflow to zero); b5 1.0 at even i, 1e-30 at odd i; b6 6.1e-5*g[5];
         b7 1e-4*g[5]   (g[5] taken at the same positions i).
  row 9  constant blocks: 0.7, -0.7, 1e-3, alternating +-0.25, 65504, -65504, 1.0, -2**-24.
  row 10 one-signed, offset: i < 128: 10 + 0.5*u, i >= 128: -10 - 0.5*u, with u[i] = ((11*i) % 32) / 31.
  row 11 near-overflow scales: p = g[0] reversed, each block divided by its own max |p| (so every block has
         one value of exactly +-1); x = A*p with A = 65519 * 2**k, k the largest integer in -1..110 for which
         ggml quantizes the row (without and, where used, with the imatrix) without aborting, to bytes whose
         dequantization is finite with max |value| >= A/2. (65519 rounds to the fp16 maximum 65504 rather than
         to infinity, so a scale computed as max/2**j stays at the edge.) A is stored as `amplitude`.
ggml aborts (assert) on some tiny blocks: its inverse scale overflows to inf for blocks of float32 subnormals
or ~1e-38 values in Q4_1/Q5_1 (weighted) and Q2_K/Q4_K/Q5_K. For each type, block b of row 8 is therefore
multiplied by 2**m_b, m_b the smallest m >= 0 for which that block alone in a zero row does not abort ggml
(with and without the imatrix); m is stored as `tiny_shift` (all 0 for types that take the raw tiny values).
Importance weights (for the types whose ggml quantizer uses them): imatrix[j] = 2**(((5*j) % 9) - 4), j < 256
(positive, exact powers of two from 1/16 to 16); stored as `imatrix` with the bytes as `q_imatrix`.

Each file holds: type (ggml name), ggml_type (id), x, q (uint8, rows x row bytes), amplitude, source, and for
the imatrix types imatrix and q_imatrix. Files are np.savez_compressed; load with allow_pickle=False.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SEED = 20240613
ROWS, N_PER_ROW = 12, 256
WEIGHT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ4_NL", "IQ4_XS", "MXFP4")
ACTIVATION_TYPES = ("Q8_K",)
# ggml's quantize_<type> switches to its weighted search when quant_weights is given for these (Q8_0 and MXFP4
# ignore it); main() checks that the weighted bytes differ, so a wrong entry here is caught.
IMATRIX_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                           "IQ4_NL", "IQ4_XS"})


def _bf16_round(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def base_rows() -> np.ndarray:
    """Rows 0..10 of the recipe, and row 11 as the unit pattern p (scaled per type by `with_amplitude`)."""
    g = np.random.default_rng(SEED).standard_normal((6, N_PER_ROW), dtype=np.float32)
    i = np.arange(N_PER_ROW)
    x = np.zeros((ROWS, N_PER_ROW), dtype=np.float32)
    x[0] = g[0]
    x[1] = ((7 * i) % 33 - 16) / 2
    x[2] = ((13 * i) % 253) - 125.5
    x[2, ::32] = 127.0 * (-1.0) ** np.arange(N_PER_ROW // 32)
    x[3, 128:] = -0.0
    x[3, 224:256:2] = 0.0
    x[3, 225:256:2] = -0.0
    x[4] = 4 * g[1]
    x[4, 0:32] = 0.0
    x[4, 160:192] = 0.0
    x[4, 96:128] = -0.0
    x[5] = 0.01 * g[2]
    x[5, [5, 77, 150]] = [1000.0, -1000.0, 1e4]
    x[5, 224:256] = 0.0
    x[5, 230] = 3.0
    x[6] = (3 * g[3]).astype(np.float16).astype(np.float32)
    x[7] = _bf16_round(3 * g[4])
    b = [slice(32 * k, 32 * k + 32) for k in range(8)]
    tiny = np.float32(2.0**-149)
    x[8, b[0]] = np.arange(-16, 16, dtype=np.float32) * tiny
    for k, s in ((1, 1e-39), (2, 1e-38), (3, 1e-6), (4, 1e-8), (6, 6.1e-5), (7, 1e-4)):
        x[8, b[k]] = np.float32(s) * g[5, b[k]]
    x[8, b[5]] = np.where(i[b[5]] % 2 == 0, 1.0, 1e-30)
    consts = (0.7, -0.7, 1e-3, None, 65504.0, -65504.0, 1.0, -(2.0**-24))
    for k, c in enumerate(consts):
        x[9, b[k]] = 0.25 * (-1.0) ** i[b[k]] if c is None else c
    u = ((11 * i) % 32) / 31
    x[10] = np.where(i < 128, 10 + 0.5 * u, -10 - 0.5 * u)
    p = g[0][::-1].reshape(8, 32)
    x[11] = (p / np.abs(p).max(axis=1, keepdims=True)).reshape(-1)
    return x


def imatrix() -> np.ndarray:
    j = np.arange(N_PER_ROW)
    return (2.0 ** (((5 * j) % 9) - 4)).astype(np.float32)


def _q8_K_values(q: np.ndarray) -> np.ndarray:
    """Decode Q8_K blocks (float32 d, int8 qs[256], int16 bsums[16]; 292 bytes) to d*qs."""
    blocks = q.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    return d * qs


def _quantize(ora, name: str, x: np.ndarray, w=None) -> np.ndarray:
    return ora.quantize_q8_K(x) if name == "Q8_K" else ora.quantize(name, x, w)


def _values(ora, name: str, q: np.ndarray, shape) -> np.ndarray:
    with np.errstate(all="ignore"):
        return _q8_K_values(q) if name == "Q8_K" else ora.dequantize(name, q, shape)


def _finite(ora, name: str, q: np.ndarray, shape) -> bool:
    return bool(np.isfinite(_values(ora, name, q, shape)).all())


def _keeps_scale(ora, name: str, row: np.ndarray, w=None) -> bool:
    """Dequantized row finite and its largest magnitude at least half the input's (ggml turns some huge
    blocks into all-zero blocks instead of overflowing; that is not the near-overflow case wanted here)."""
    vals = _values(ora, name, _quantize(ora, name, row, w), row.shape)
    return bool(np.isfinite(vals).all()) and float(np.abs(vals).max()) >= 0.5 * float(np.abs(row).max())


def near_overflow_amplitude(ora, name: str, pattern: np.ndarray) -> float:
    from quantfmt import oracle

    """Largest A = 65519 * 2**k (k = 110 down to -1) whose row A*pattern quantizes (with and without the
    imatrix where the type takes one) without ggml aborting, to bytes that dequantize to finite values of
    magnitude at least A/2."""
    w = imatrix() if name in IMATRIX_TYPES else None
    for k in range(110, -2, -1):
        a = np.float32(65519.0 * 2.0**k)
        row = (a * pattern).astype(np.float32)[None, :]
        if not np.isfinite(row).all():
            continue

        def ok(row=row):
            return _keeps_scale(ora, name, row) and (w is None or _keeps_scale(ora, name, row, w))

        if oracle.in_child(ok):
            return float(a)
    raise RuntimeError(f"{name}: no finite near-overflow amplitude")


def _aborts(ora, name: str, row: np.ndarray) -> bool:
    row = row[None, :]
    if name == "Q8_K":
        return False
    return ora.would_abort(name, row) or (name in IMATRIX_TYPES and ora.would_abort(name, row, imatrix()))


def tiny_shifts(ora, name: str, row8: np.ndarray) -> np.ndarray:
    """Per block of row 8: the smallest m >= 0 such that the block times 2**m, alone in a zero row, does not
    make ggml's quantizer of the type abort (with and without the imatrix)."""
    shifts = np.zeros(N_PER_ROW // 32, dtype=np.int32)
    for b in range(N_PER_ROW // 32):
        block = row8[32 * b: 32 * b + 32]
        for m in range(0, 200):
            trial = np.zeros(N_PER_ROW, dtype=np.float32)
            trial[32 * b: 32 * b + 32] = block * np.float32(2.0**m) if m < 128 else block * np.float32(2.0**127) \
                * np.float32(2.0 ** (m - 127))
            if not _aborts(ora, name, trial):
                shifts[b] = m
                break
        else:
            raise RuntimeError(f"{name}: block {b} of row 8 aborts ggml at every scale")
    return shifts


def golden_inputs(ora, name: str) -> tuple[np.ndarray, float, np.ndarray]:
    x = base_rows()
    shifts = tiny_shifts(ora, name, x[8].copy())
    for b, m in enumerate(shifts):
        x[8, 32 * b: 32 * b + 32] *= np.float32(2.0 ** min(int(m), 127)) * np.float32(2.0 ** max(int(m) - 127, 0))
    if _aborts(ora, name, x[8]):
        raise RuntimeError(f"{name}: row 8 still aborts ggml after the tiny shifts {shifts.tolist()}")
    a = near_overflow_amplitude(ora, name, x[11].copy())
    x[11] = (np.float32(a) * x[11]).astype(np.float32)
    return x, a, shifts


def make(ora, name: str) -> dict:
    from quantfmt import oracle

    x, a, shifts = golden_inputs(ora, name)
    q = _quantize(ora, name, x)
    if not _finite(ora, name, q, x.shape):
        raise RuntimeError(f"{name}: golden bytes dequantize to non-finite values")
    out = {"type": np.array(name), "ggml_type": np.array(ora.type_id(name)), "x": x, "q": q,
           "amplitude": np.array(a, dtype=np.float64), "tiny_shift": shifts,
           "source": np.array(f"{oracle.SDIST_NAME}=={oracle.SDIST_VERSION} "
                              f"{'quantize_row_q8_K_ref' if name == 'Q8_K' else 'ggml_quantize_chunk'}, "
                              f"gcc {' '.join(oracle.CFLAGS)}")}
    if name in IMATRIX_TYPES:
        w = imatrix()
        qw = ora.quantize(name, x, w)
        if np.array_equal(qw, q):
            raise RuntimeError(f"{name}: ggml ignored the importance weights; fix IMATRIX_TYPES")
        if not _finite(ora, name, qw, x.shape):
            raise RuntimeError(f"{name}: golden imatrix bytes dequantize to non-finite values")
        out["imatrix"] = w
        out["q_imatrix"] = qw
    return out


def main(argv=None) -> None:
    from quantfmt import oracle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "golden")
    ap.add_argument("--cache-dir", default=None, help="oracle build cache (default $QUANTFMT_ORACLE_DIR)")
    args = ap.parse_args(argv)
    ora = oracle.load(args.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_TYPES + ACTIVATION_TYPES:
        arrays = make(ora, name)
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {path.stat().st_size} bytes, amplitude {float(arrays['amplitude']):.6g}, "
              f"tiny_shift {arrays['tiny_shift'].tolist()}"
              + (", with imatrix" if "imatrix" in arrays else ""))


if __name__ == "__main__":
    main()

"""ggml's C reference quantizers as a test oracle and benchmark anchor (built on demand, no FMA).

This module owns the byte-exact reference: it fetches the ggml source tree vendored in the sdist of
`ggml-python` (a pinned version and SHA-256), compiles ggml's `ggml-quants.c`, `ggml.c` and
`ggml-threading.cpp` plus ggml-cpu's `quants.c` (the portable `*_generic` dot products) and a small shim
into one shared library, and calls it through ctypes.

Why build it ourselves: ggml rounds ties in a few bytes per tensor differently when the compiler contracts
`a*b + c` into an FMA. The `gguf` package's numpy quantizers agree with the non-contracted build, so the
library is compiled with `-ffp-contract=off` and no `-march` flags (no FMA, no SIMD paths).

Facts about ggml (type ids, which types `ggml_quantize_chunk` handles, which activation type each dot product
pairs with) are read from the vendored sources at build time, never from a table written here.

Only the standard library, numpy and ctypes are used; importing this module is cheap (nothing is built or
loaded until `build()` / `load()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from quantfmt.errors import QuantfmtError

SDIST_NAME = "ggml-python"
SDIST_VERSION = "0.0.45"
SDIST_FILE = "ggml_python-0.0.45.tar.gz"
SDIST_SHA256 = "10aac52075cf3c7ef2b00d6c35b1c23f7b018dbeff8ae8df67339b4be1166f05"

# No -march: the generic C paths only, and no contraction into FMA (see the module docstring).
CFLAGS = ("-O2", "-fPIC", "-ffp-contract=off")
LIB_NAME = "libggml_oracle.so"

# Our own glue, compiled with ggml. ggml.c references two backend functions that the quantizers never call;
# ggml-cpu's quants.c reads fp16 through a lookup table that ggml-cpu.c would normally own and fill.
SHIM_C = r"""
#include <stddef.h>
#include <stdint.h>
#include "ggml.h"

void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size) {
    (void) tensor; (void) data; (void) offset; (void) size;
}

void ggml_backend_tensor_memset(struct ggml_tensor * tensor, uint8_t value, size_t offset, size_t size) {
    (void) tensor; (void) value; (void) offset; (void) size;
}

float ggml_table_f32_f16[1 << 16];

__attribute__((constructor)) static void qf_oracle_init_fp16_table(void) {
    for (uint32_t i = 0; i < (1u << 16); ++i) {
        ggml_fp16_t h = (ggml_fp16_t) i;
        ggml_table_f32_f16[i] = ggml_fp16_to_fp32(h);
    }
}

/* 1 when the type's traits have a to_float (dequantize) function. */
int qf_has_to_float(int type) {
    return ggml_get_type_traits((enum ggml_type) type)->to_float != NULL;
}

/* Dequantize k values with the type's traits (the same function ggml uses). */
void qf_to_float(int type, const void * src, float * dst, int64_t k) {
    ggml_get_type_traits((enum ggml_type) type)->to_float(src, dst, k);
}
"""


class OracleError(QuantfmtError):
    """The ggml oracle cannot be built or loaded, or was called with input it would abort on."""


def _default_cache_dir() -> Path:
    env = os.environ.get("QUANTFMT_ORACLE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/quantfmt/oracle").expanduser()


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _build_key() -> str:
    """Cache key: sdist version and hash, flags, shim text and compiler version."""
    h = hashlib.sha256()
    for part in (SDIST_NAME, SDIST_VERSION, SDIST_SHA256, " ".join(CFLAGS), SHIM_C,
                 _compiler_id("gcc"), _compiler_id("g++"), "layout-2"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _build_dir(cache_dir: Path) -> Path:
    return cache_dir / f"ggml-{SDIST_VERSION}-{_build_key()}"


def _cache_dir(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()


def _shim_sha() -> str:
    return hashlib.sha256(SHIM_C.encode()).hexdigest()


def _find_built(cache: Path) -> Path | None:
    """The library built for this sdist, flags and shim: the exact cache key first; when no compiler is around to
    name the key, any build of the same sdist, flags and shim (built earlier by some gcc)."""
    exact = _build_dir(cache)
    if (exact / LIB_NAME).is_file() and (exact / "facts.json").is_file():
        return exact / LIB_NAME
    if shutil.which("gcc") is not None:
        return None
    for facts in sorted(cache.glob(f"ggml-{SDIST_VERSION}-*/facts.json")):
        try:
            b = json.loads(facts.read_text()).get("build", {})
        except (OSError, ValueError):
            continue
        if (b.get("sha256") == SDIST_SHA256 and b.get("cflags") == list(CFLAGS) and b.get("shim") == _shim_sha()
                and (facts.parent / LIB_NAME).is_file()):
            return facts.parent / LIB_NAME
    return None


def built(cache_dir=None) -> bool:
    """True when the library is already built (load() then needs neither compiler nor network)."""
    return _find_built(_cache_dir(cache_dir)) is not None


def available(cache_dir=None) -> bool:
    """True when the library is already built, or gcc and g++ are on PATH to build it (network not probed)."""
    if _find_built(_cache_dir(cache_dir)) is not None:
        return True
    return shutil.which("gcc") is not None and shutil.which("g++") is not None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_sdist(cache_dir: Path) -> Path:
    dl = cache_dir / "sdist"
    path = dl / SDIST_FILE
    if not path.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dl)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise OracleError(f"cannot run pip to fetch the {SDIST_NAME} sdist: {e}") from e
        if res.returncode != 0 or not path.is_file():
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-8:])
            raise OracleError(f"pip download of {SDIST_NAME}=={SDIST_VERSION} failed "
                              f"(exit {res.returncode}): {' '.join(cmd)}\n{tail}")
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise OracleError(f"{path}: SHA-256 {digest} is not the pinned {SDIST_SHA256}; delete it and rebuild")
    return path


def _extract_ggml(sdist: Path, dest: Path) -> Path:
    """Extract only what the build reads: vendor/ggml/{LICENSE,include/*,src/*,src/ggml-cpu/*} (no subfolders)."""
    prefix = SDIST_FILE[: -len(".tar.gz")] + "/vendor/ggml/"
    wanted = re.compile(r"^(LICENSE|include/[^/]+|src/[^/]+|src/ggml-cpu/[^/]+)$")
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith(prefix) and wanted.match(m.name[len(prefix):]):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise OracleError(f"{sdist}: no vendor/ggml sources inside")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links and paths outside dest
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(dest, members=members)
    return dest


def _read_facts(src: Path) -> dict:
    """Read ggml facts from its sources: enum ggml_type, ggml_quantize_chunk's cases, generic dot-product pairs."""
    header = (src / "include" / "ggml.h").read_text()
    enum = re.search(r"enum\s+ggml_type\s*\{(.*?)\};", header, re.S)
    if enum is None:
        raise OracleError(f"{src}/include/ggml.h: enum ggml_type not found")
    type_ids = {}
    for line in enum.group(1).splitlines():
        m = re.match(r"\s*GGML_TYPE_(\w+)\s*=\s*(\d+)\s*,", line)  # commented-out (removed) types do not match
        if m and m.group(1) != "COUNT":
            type_ids[m.group(1)] = int(m.group(2))

    ggml_c = (src / "src" / "ggml.c").read_text()
    start = ggml_c.find("size_t ggml_quantize_chunk(")
    end = ggml_c.find("\n}\n", start)
    if start < 0 or end < 0:
        raise OracleError(f"{src}/src/ggml.c: ggml_quantize_chunk not found")
    chunk_types = sorted(set(re.findall(r"case\s+GGML_TYPE_(\w+)\s*:", ggml_c[start:end])),
                         key=lambda t: type_ids.get(t, -1))

    quants_h = (src / "src" / "ggml-quants.h").read_text()
    ref_quantizers = {t.upper(): f"quantize_row_{t}_ref"
                      for t in re.findall(r"\bvoid\s+quantize_row_(\w+?)_ref\s*\(", quants_h)}

    cpu_quants = (src / "src" / "ggml-cpu" / "quants.c").read_text()
    vec_dot = {}
    for w, a in re.findall(r"void\s+ggml_vec_dot_(\w+?)_(q8_0|q8_1|q8_K)_generic\s*\(", cpu_quants):
        vec_dot[w.upper()] = [a.upper(), f"ggml_vec_dot_{w}_{a}"]
    return {"type_ids": type_ids, "chunk_types": chunk_types, "ref_quantizers": ref_quantizers,
            "vec_dot": vec_dot}


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise OracleError(f"cannot run the compiler ({cmd[0]}): {e}") from e
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise OracleError(f"building the ggml oracle failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")


def build(cache_dir=None) -> Path:
    """Fetch, extract and compile the oracle library once; return the path of the shared library.

    Reused when present: the folder name is a hash of the sdist version, flags, shim and compiler version.
    """
    cache = _cache_dir(cache_dir)
    found = _find_built(cache)
    if found is not None:
        return found
    out_dir = _build_dir(cache)
    lib = out_dir / LIB_NAME
    for tool in ("gcc", "g++"):
        if shutil.which(tool) is None:
            raise OracleError(f"cannot build the ggml oracle: {tool} is not on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    sdist = _fetch_sdist(cache)

    # Build in a private folder and move it into place at the end, so a concurrent or interrupted build never
    # leaves a half-written library where load() looks.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        facts = _read_facts(_extract_ggml(sdist, tmp / "ggml"))
        (tmp / "qf_oracle_shim.c").write_text(SHIM_C)
        # Paths relative to the build folder, so that ggml's assertion messages do not name a temporary folder.
        inc = ["-Iggml/include", "-Iggml/src", "-Iggml/src/ggml-cpu"]
        c = ["gcc", *CFLAGS, "-std=gnu11", *inc]
        ver = ['-DGGML_VERSION="' + SDIST_VERSION + '"', '-DGGML_COMMIT="ggml-python-' + SDIST_VERSION + '"']
        jobs = [
            [*c, *ver, "-c", "ggml/src/ggml.c", "-o", "ggml.o"],
            [*c, "-c", "ggml/src/ggml-quants.c", "-o", "ggml-quants.o"],
            ["g++", *CFLAGS, "-std=c++17", *inc, "-c", "ggml/src/ggml-threading.cpp", "-o", "threading.o"],
            [*c, "-c", "ggml/src/ggml-cpu/quants.c", "-o", "cpu-quants.o"],
            [*c, "-c", "qf_oracle_shim.c", "-o", "shim.o"],
        ]
        for job in jobs:
            _run(job, tmp)
        objs = ["ggml.o", "ggml-quants.o", "threading.o", "cpu-quants.o", "shim.o"]
        _run(["g++", "-shared", *CFLAGS, "-o", LIB_NAME, *objs, "-lm", "-lpthread"], tmp)
        facts["build"] = {"sdist": f"{SDIST_NAME}=={SDIST_VERSION}", "sha256": SDIST_SHA256,
                          "cflags": list(CFLAGS), "gcc": _compiler_id("gcc"), "shim": _shim_sha()}
        (tmp / "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True))
        for o in objs:
            (tmp / o).unlink()
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (lib.is_file() and (out_dir / "facts.json").is_file()):  # lost a race to a finished build: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


class Oracle:
    """ctypes front end of the built library. Type names are ggml's, upper case ("Q4_K", "IQ4_NL", "MXFP4")."""

    def __init__(self, lib_path: Path):
        lib_path = Path(lib_path)
        self.path = lib_path
        self.facts = json.loads((lib_path.parent / "facts.json").read_text())
        self.lib = lib = ctypes.CDLL(str(lib_path))
        self.type_ids: dict[str, int] = dict(self.facts["type_ids"])
        self._names = {v: k for k, v in self.type_ids.items()}

        i64, sz, vp, fp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, fp, vp, i64, i64, i64, fp]
        lib.ggml_quantize_chunk.restype = sz
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = i64
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = sz
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.qf_has_to_float.argtypes = [ctypes.c_int]
        lib.qf_has_to_float.restype = ctypes.c_int
        lib.qf_to_float.argtypes = [ctypes.c_int, vp, fp, i64]
        lib.qf_to_float.restype = None

        # The library's own names must agree with the ids read from ggml.h (guards against a stale table).
        for name, tid in self.type_ids.items():
            own = lib.ggml_type_name(tid)
            if own is None or own.decode().upper() != name:
                raise OracleError(f"{lib_path}: ggml_type_name({tid}) is {own!r}, ggml.h says {name}")

        self._ref = {}
        for name, symbol in self.facts["ref_quantizers"].items():
            fn = getattr(lib, symbol)
            fn.argtypes = [fp, vp, i64]
            fn.restype = None
            self._ref[name] = fn

        self._vec_dot = {}
        for w, (a, base) in self.facts["vec_dot"].items():
            # On x86 ggml renames a generic that has no SIMD twin to the plain name (arch-fallback.h).
            fn = getattr(lib, base + "_generic", None) or getattr(lib, base, None)
            if fn is None:
                continue
            fn.argtypes = [ctypes.c_int, fp, sz, vp, sz, vp, sz, ctypes.c_int]
            fn.restype = None
            self._vec_dot[w] = (fn, a)

    # ---- type facts -------------------------------------------------------------------------------------------
    def type_id(self, name: str) -> int:
        try:
            return self.type_ids[name.upper()]
        except KeyError:
            raise OracleError(f"unknown ggml type {name!r}; known: {', '.join(self.type_ids)}") from None

    def type_name(self, tid: int) -> str:
        return self._names[tid]

    def block_size(self, name: str) -> int:
        return int(self.lib.ggml_blck_size(self.type_id(name)))

    def type_size(self, name: str) -> int:
        return int(self.lib.ggml_type_size(self.type_id(name)))

    def row_size(self, name: str, n: int) -> int:
        bs = self.block_size(name)
        if n % bs:
            raise OracleError(f"{name}: row length {n} is not a multiple of the block size {bs}")
        return n // bs * self.type_size(name)

    @property
    def quantizable(self) -> tuple[str, ...]:
        """Types ggml_quantize_chunk handles (its switch cases)."""
        return tuple(self.facts["chunk_types"])

    @property
    def dequantizable(self) -> tuple[str, ...]:
        return tuple(n for n, t in self.type_ids.items() if self.lib.qf_has_to_float(t))

    @property
    def vec_dot_types(self) -> dict[str, str]:
        """Weight type -> activation type of the generic dot product (e.g. Q4_K -> Q8_K)."""
        return {w: a for w, (_, a) in self._vec_dot.items()}

    def requires_imatrix(self, name: str) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(self.type_id(name)))

    # ---- calls ------------------------------------------------------------------------------------------------
    @staticmethod
    def _rows(x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise OracleError(f"expected a 1-D or 2-D float32 array, got shape {x.shape}")
        return x

    def quantize(self, type_name: str, x, imatrix=None) -> np.ndarray:
        """ggml_quantize_chunk over all rows of x (rows, n_per_row) -> uint8 (rows, row_size).

        imatrix: per-column importance weights (n_per_row,), as llama-quantize passes them. ggml aborts the
        process on a few inputs (see in_child); probe unknown inputs with would_abort first.
        """
        name = type_name.upper()
        tid = self.type_id(name)
        if name not in self.facts["chunk_types"]:
            raise OracleError(f"ggml_quantize_chunk does not handle {name}; it handles {', '.join(self.quantizable)}")
        x = self._rows(x)
        rows, n = x.shape
        rs = self.row_size(name, n)
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            if imatrix.shape != (n,):
                raise OracleError(f"{name}: imatrix must have shape ({n},), got {imatrix.shape}")
        elif self.requires_imatrix(name):
            raise OracleError(f"{name}: ggml's quantizer requires an importance matrix (imatrix)")
        out = np.zeros((rows, rs), dtype=np.uint8)  # zeroed: bytes ggml leaves unwritten read as 0, not garbage
        if rows == 0:
            return out
        got = self.lib.ggml_quantize_chunk(tid, x.ctypes.data, out.ctypes.data, 0, rows, n,
                                           None if imatrix is None else imatrix.ctypes.data)
        if got != out.size:
            raise OracleError(f"{name}: ggml_quantize_chunk wrote {got} bytes, expected {out.size}")
        return out

    def would_abort(self, type_name: str, x, imatrix=None) -> bool:
        """True when ggml's quantizer aborts the process on x (checked in a forked child, see in_child)."""
        # Build the i-quant grids here, once, so that every child inherits them instead of rebuilding (seconds).
        self.lib.ggml_quantize_init(self.type_id(type_name))
        return not in_child(lambda: self.quantize(type_name, x, imatrix) is not None)

    def quantize_ref(self, type_name: str, x) -> np.ndarray:
        """ggml's quantize_row_<type>_ref over all rows of x (e.g. Q8_0, Q8_1, Q8_K activations).

        The output starts zeroed: for an all-zero block quantize_row_q8_K_ref writes d and qs but leaves bsums
        untouched, so the oracle's answer there is bsums = 0 (what a zeroed buffer holds).
        """
        name = type_name.upper()
        if name not in self._ref:
            raise OracleError(f"no quantize_row_*_ref for {name}; have {', '.join(self._ref)}")
        x = self._rows(x)
        rows, n = x.shape
        out = np.zeros((rows, self.row_size(name, n)), dtype=np.uint8)
        if x.size:
            self._ref[name](x.ctypes.data, out.ctypes.data, x.size)
        return out

    def quantize_q8_K(self, x) -> np.ndarray:
        """The reference activation quantizer of the k-quant dot products (quantize_row_q8_K_ref)."""
        return self.quantize_ref("Q8_K", x)

    def dequantize(self, type_name: str, data, shape) -> np.ndarray:
        """The type traits' to_float over data (bytes of a (rows, n_per_row) tensor) -> float32 of `shape`."""
        name = type_name.upper()
        tid = self.type_id(name)
        if not self.lib.qf_has_to_float(tid):
            raise OracleError(f"ggml has no to_float for {name}")
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        n = shape[-1] if shape else 1
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray)
                                    else np.asarray(data).view(np.uint8)).reshape(-1)
        need = rows * self.row_size(name, n)
        if data.size != need:
            raise OracleError(f"{name}: {data.size} bytes for shape {shape}, expected {need}")
        out = np.empty(shape, dtype=np.float32)
        if out.size:
            self.lib.qf_to_float(tid, data.ctypes.data, out.ctypes.data, out.size)
        return out

    def vec_dot(self, type_name: str, w_row_bytes, act_row_bytes, n: int) -> float:
        """ggml-cpu's generic (non-SIMD) dot product of one weight row with one quantized activation row.

        The activation must be in the type's pair (see vec_dot_types; quantize it with quantize_ref).
        """
        name = type_name.upper()
        if name not in self._vec_dot:
            raise OracleError(f"no generic vec_dot for {name}; have {', '.join(self._vec_dot)}")
        fn, act = self._vec_dot[name]
        w = np.ascontiguousarray(np.asarray(w_row_bytes).view(np.uint8)).reshape(-1)
        a = np.ascontiguousarray(np.asarray(act_row_bytes).view(np.uint8)).reshape(-1)
        if w.size != self.row_size(name, n) or a.size != self.row_size(act, n):
            raise OracleError(f"{name}: {w.size} weight / {a.size} {act} activation bytes do not hold {n} values")
        s = np.zeros(1, dtype=np.float32)
        fn(int(n), s.ctypes.data, 0, w.ctypes.data, 0, a.ctypes.data, 0, 1)
        return float(s[0])


def in_child(fn) -> bool:
    """Run fn() in a forked child process; True when it returned a true value (False when it failed or aborted).

    ggml assert()s, aborting the whole process, on some inputs its reference does not handle: e.g. the
    k-quant and weighted Q4_1/Q5_1 searches compute an inverse scale that overflows to inf for blocks of float32
    subnormals or ~1e-38 values, and nearest_int() asserts |v| <= 4194303. Probe such inputs here (POSIX only).
    """
    pid = os.fork()
    if pid == 0:  # child: silence ggml's assertion message (and Python's fault handler), report the exit code
        code = 2
        try:
            import faulthandler

            faulthandler.disable()
            os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml_abort would otherwise attach gdb to print a backtrace
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


_LOADED: dict[Path, Oracle] = {}


def load(cache_dir=None) -> Oracle:
    """Build if needed, then load the library (once per process) and return its API."""
    lib = build(cache_dir).resolve()
    if lib not in _LOADED:
        _LOADED[lib] = Oracle(lib)
    return _LOADED[lib]

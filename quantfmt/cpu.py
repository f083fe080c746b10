"""What the CPU can do, read once: the instruction-set features kernels choose their path by.

Owns: the host's feature set as numba will compile for it (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
override the host, e.g. "generic" for portable caches, and then only what they name may be used),
and the short list of features the benchmark reports. A kernel that uses an instruction through
llvmlite intrinsics must check `has(...)` first and keep a portable path for CPUs without it.
"""

from __future__ import annotations

import functools

#: Features worth reporting (and choosing kernels by), in LLVM's names.
REPORTED = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
            "avx512bf16", "avx512fp16", "amx-int8", "amx-bf16", "neon", "dotprod", "i8mm")


@functools.cache
def features() -> frozenset[str]:
    """LLVM feature names enabled for the code numba compiles here (e.g. {"avx2", "fma", ...})."""
    from numba.core import config

    name, listed = getattr(config, "CPU_NAME", None), getattr(config, "CPU_FEATURES", None) or ""
    if name not in (None, "", "host") or listed:
        # compiling for a named (e.g. generic) CPU or a feature list: only what is listed is safe
        return frozenset(f[1:] for f in listed.split(",") if f.startswith("+"))
    import llvmlite.binding as llvm

    return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)


def has(*names: str) -> bool:
    """Whether every named feature is available (LLVM names: "avx2", "avx512vnni", ...)."""
    f = features()
    return all(n in f for n in names)


def reported() -> list[str]:
    """The REPORTED features this CPU has, for the benchmark's header."""
    f = features()
    return [n for n in REPORTED if n in f]

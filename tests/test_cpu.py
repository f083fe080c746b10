"""quantfmt.cpu: the features kernels choose by follow what numba compiles for."""

import os
import subprocess
import sys

from quantfmt import cpu


def _reported(**env) -> str:
    code = "from quantfmt import cpu; print(','.join(cpu.reported()))"
    return subprocess.check_output([sys.executable, "-c", code], env={**os.environ, **env}, text=True).strip()


def test_generic_cpu_name_allows_only_listed_features():
    assert _reported(NUMBA_CPU_NAME="generic") == ""
    assert _reported(NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="+avx2,+fma,-avx512f") == "avx2,fma"


def test_host_features_are_consistent():
    f = cpu.features()
    assert cpu.has() and all(cpu.has(n) for n in cpu.reported())
    if cpu.has("avx512f"):
        assert cpu.has("avx2")
    assert not cpu.has("no-such-feature") and set(cpu.reported()) <= f

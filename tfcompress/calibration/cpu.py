"""What the CPU running this does with INT8 (the saturation problem that ``overflow_fix`` works around)."""

from __future__ import annotations

import platform

__all__ = ["cpu_saturates_int8"]

# x86 instructions that multiply u8 x i8 and accumulate in int32 directly (no int16 intermediate)
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_saturates_int8(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU's INT8 kernels can saturate: an x86 CPU without VNNI (SSE4, AVX2, AVX-512 before
    VNNI) multiplies u8 activations by i8 weights with ``vpmaddubsw``, which adds pairs of products in int16;
    two large products overflow it unless the weights stay within [-63, 63] (``overflow_fix``). ``None`` when
    it cannot tell (not x86 Linux).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return not (_VNNI_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        return None
    return None

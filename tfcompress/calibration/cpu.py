"""What the CPU running this does with INT8: the saturation problem that ``overflow_fix`` works around, and the
layers OpenVINO's CPU plugin runs in INT8 only on some CPUs."""

from __future__ import annotations

import platform

__all__ = ["cpu_int8_deconvolution_needs_static_shapes", "cpu_saturates_int8"]

# x86 instructions that multiply u8 x i8 and accumulate in int32 directly (no int16 intermediate)
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# oneDNN's avx512_core: the AVX-512 subsets OpenVINO's CPU plugin asks for before it takes an INT8 kernel for
# every transposed convolution
_AVX512_CORE_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _x86_flags(cpuinfo: str) -> set[str] | None:
    """The CPU flags of /proc/cpuinfo, or None when this is not x86 Linux."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_saturates_int8(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU's INT8 kernels can saturate: an x86 CPU without VNNI (SSE4, AVX2, AVX-512 before
    VNNI) multiplies u8 activations by i8 weights with ``vpmaddubsw``, which adds pairs of products in int16;
    two large products overflow it unless the weights stay within [-63, 63] (``overflow_fix``). ``None`` when
    it cannot tell (not x86 Linux).
    """
    flags = _x86_flags(cpuinfo)
    return None if flags is None else not (_VNNI_FLAGS & flags)


def cpu_int8_deconvolution_needs_static_shapes(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether OpenVINO's CPU plugin runs a transposed convolution (runtime type Deconvolution) in INT8 only when
    its shapes are static: on x86 CPUs without AVX-512 (F, BW, VL, DQ; e.g. AVX2-only servers such as AMD Zen 2/3)
    its INT8 kernels need every dimension known when the model compiles (and IC^2 x output spatial size at most
    2^26), so a model with a free batch size (what ``model.export`` writes) runs it in float on int8 weights
    there. ``None`` when it cannot tell (not x86 Linux).
    """
    flags = _x86_flags(cpuinfo)
    return None if flags is None else not _AVX512_CORE_FLAGS <= flags

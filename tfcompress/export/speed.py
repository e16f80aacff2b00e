"""OpenVINO latency and throughput, measured side by side.

The machine this runs on is usually shared: timing one model after another lets a burst of load from
elsewhere land on one of them only. ``measure_speed`` compiles every model first and then interleaves the
rounds (A, B, C, then B, C, A ...: no model always runs right after the same one), reporting medians (batch 1:
over every timed call), so the ratios between models are what to read.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Mapping

import numpy as np

__all__ = ["measure_speed", "compression_variants", "default_precision", "FP32", "DEFAULT"]

FP32 = {"INFERENCE_PRECISION_HINT": "f32"}  # the true float baseline
DEFAULT: dict = {}  # OpenVINO's default: bf16 on CPUs with AVX512-BF16 or AMX, else f32


def default_precision() -> str:
    """The floating-point precision OpenVINO's CPU plugin runs by default here: ``"bf16"`` on CPUs with
    AVX512-BF16 or AMX, ``"f32"`` on others (``"f16"`` on some ARM CPUs), as the plugin itself reports it.

    Reports label the default-precision measurements with it: "BF16" is only true on some machines.
    """
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "bf16", "f32", "f16"


def measure_speed(
    models: Mapping[str, tuple[object, dict]],
    sample: np.ndarray,
    rounds: int = 3,
    iters_b1: int = 200,
    iters_b32: int = 20,
) -> dict[str, dict[str, float]]:
    """Median latency at batch 1 (``b1_ms``, over all calls) and throughput at batch 32 (``b32_ips``,
    samples/s, median over rounds) per model.

    Args:
        models: name -> (an ``openvino.Model`` or an IR path, compile config), e.g.
            ``{"fp32": (model, FP32), "bf16": (model, DEFAULT)}``.
        sample: one input sample with its batch axis (shape ``(1, ...)``); batch 32 repeats it.
        rounds: interleaved rounds; the median over rounds is reported.
    """
    import openvino as ov

    if rounds < 1 or iters_b1 < 1 or iters_b32 < 1:
        raise ValueError("rounds, iters_b1 and iters_b32 must be positive")
    sample = np.asarray(sample)
    if sample.ndim < 1 or sample.shape[0] != 1:
        raise ValueError(f"sample must have a batch axis of size 1, got shape {sample.shape}")
    core = ov.Core()
    compiled = {k: core.compile_model(m, "CPU", dict(cfg)) for k, (m, cfg) in models.items()}
    x32 = np.repeat(sample, 32, axis=0)
    res: dict[str, dict[str, list]] = {k: {"b1": [], "b32": []} for k in models}
    names = list(compiled)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:  # each round starts with another model
            req = compiled[k].create_infer_request()
            req.infer({0: sample})  # warm-up: the first call allocates
            for _ in range(iters_b1):  # every call timed: the median ignores the calls another process slowed
                t = time.perf_counter()
                req.infer({0: sample})
                res[k]["b1"].append(1000 * (time.perf_counter() - t))
            req.infer({0: x32})
            t = time.perf_counter()
            for _ in range(iters_b32):
                req.infer({0: x32})
            res[k]["b32"].append(32 * iters_b32 / (time.perf_counter() - t))
    return {k: {"b1_ms": statistics.median(v["b1"]), "b32_ips": statistics.median(v["b32"])}
            for k, v in res.items()}


def compression_variants(original: str, pruned: str, compressed: str) -> dict[str, tuple[str, dict]]:
    """The six OpenVINO variants that compare a model with its compressed version, for :func:`measure_speed`.

    From three :func:`~tfcompress.export.export_saved_model` output directories: the original's FP32 IR at
    f32 and at the default precision and its post-training INT8 IR; the pruned float model's FP32 IR at both
    precisions; the compressed (pruned + QAT) model's INT8 IR. The default-precision variants are named for
    what they run here (``"original default (bf16)"``, or ``(f32)`` on a CPU without BF16).
    """
    def ir(folder: str, precision: str) -> str:
        return os.path.join(folder, f"model_{precision}.xml")

    default = f"default ({default_precision()})"
    return {
        "original FP32": (ir(original, "fp32"), FP32),
        f"original {default}": (ir(original, "fp32"), DEFAULT),
        "original INT8 (post-training)": (ir(original, "int8"), DEFAULT),
        "compressed FP32": (ir(pruned, "fp32"), FP32),
        f"compressed {default}": (ir(pruned, "fp32"), DEFAULT),
        "compressed INT8 (QAT)": (ir(compressed, "int8"), DEFAULT),
    }

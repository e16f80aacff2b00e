"""Cost and effect of ``slice_before_strided_pointwise``: a strided INT8 1x1 convolution against StridedSlice +
stride-1 convolution.

Each case is a small INT8 block as calibration writes it (an INT8 3x3 convolution, ReLU, an unsigned per-tensor
quantizer, then the 1x1 convolution with ``cin`` input channels and stride 2; int8 weights on the 7-bit grid, so
no saturation). For the block as it is and rewritten by ``tfcompress.calibration.placement.rewrite_for_cpu`` it
prints the fraction of outputs that differ from a one-thread run over 5 multi-threaded calls (what the CPU
plugin's strided kernel gets wrong) and the batch-1 / batch-32 time ratio rewritten / as it is, measured in
interleaved rounds in one process (``INFERENCE_PRECISION_HINT=f32``; on a CPU without BF16 or AMX the default
precision is the same setting).

    PYTHONPATH=$PWD python benchmarks/strided_pointwise.py [--rounds 5]
"""

import argparse
import time

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from tfcompress.calibration.placement import rewrite_for_cpu

CASES = [(8, 16, 32), (24, 48, 56), (40, 80, 28), (104, 208, 28), (264, 512, 14)]  # cin, cout, input size


def block(cin: int, cout: int, seed: int = 0) -> ov.Model:
    rng = np.random.default_rng(seed)

    def int8_weights(shape):
        q = ops.constant(rng.integers(-63, 64, size=shape).astype(np.int8))
        return ops.multiply(ops.convert(q, np.float32), ops.constant(np.full((shape[0], 1, 1, 1), 1e-2, np.float32)))

    p = ops.parameter([-1, cin, -1, -1], np.float32)
    x = ops.fake_quantize(p, np.float32(0), np.float32(4), np.float32(0), np.float32(4), 256)
    x = ops.relu(ops.convolution(x, int8_weights((cin, cin, 3, 3)), [1, 1], [1, 1], [1, 1], [1, 1]))
    x = ops.fake_quantize(x, np.float32(0), np.float32(4), np.float32(0), np.float32(4), 256)
    y = ops.convolution(x, int8_weights((cout, cin, 1, 1)), [2, 2], [0, 0], [0, 0], [1, 1])
    y = ops.fake_quantize(y, np.float32(-20), np.float32(20), np.float32(-20), np.float32(20), 256)
    return ov.Model([y], [p])


def wrong_fraction(model: ov.Model, x: np.ndarray) -> float:
    core = ov.Core()
    one = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    ref = one({0: x})[0]
    multi = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return max(float(np.mean(multi({0: x})[0] != ref)) for _ in range(5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"OpenVINO {ov.get_version()}")
    print("| cin | cout | input | wrong outputs as is | rewritten | b1 time rewritten / as is | b32 |")
    print("|---|---|---|---|---|---|---|")
    core = ov.Core()
    for cin, cout, hw in CASES:
        models = {"as is": block(cin, cout)}
        models["rewritten"] = block(cin, cout)
        rewrite_for_cpu(models["rewritten"])
        rng = np.random.default_rng(1)
        wrong = {k: wrong_fraction(m, rng.uniform(0, 4, (32, cin, hw, hw)).astype(np.float32))
                 for k, m in models.items()}
        ratios = []
        for n in (1, 32):
            x = rng.uniform(0, 4, (n, cin, hw, hw)).astype(np.float32)
            compiled = {k: core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for k, m in models.items()}
            times = {k: [] for k in compiled}
            for c in compiled.values():
                c({0: x})
            for _ in range(args.rounds):
                for k, c in compiled.items():
                    t0 = time.perf_counter()
                    for _ in range(max(3, 200 // n)):
                        c({0: x})
                    times[k].append(time.perf_counter() - t0)
            ratios.append(min(times["rewritten"]) / min(times["as is"]))
        print(f"| {cin} | {cout} | {hw}x{hw} | {wrong['as is']:.3%} | {wrong['rewritten']:.3%} | "
              f"{ratios[0]:.2f} | {ratios[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""INT8 on a depthwise network: MLPerf Tiny VWW MobileNetV1-0.25 (96x96), tfcompress vs nncf, same FP32 IR.

    /work/venv/bin/python benchmarks/vww_int8.py [--nncf_python /work/venv-nncf/bin/python] [--ablation]
        [--n_eval 9700]

Inputs: CIFAR-10 JPEG test images resized to 96x96, scaled to [0, 1] (the model's input range); calibration on
[0:300], evaluation on [300:300 + n_eval] (default 2,000; at most 9,700). The reference is the FP32 IR compiled with the f32 hint: agreement of the
INT8 model's argmax with FP32's, and mean KL(FP32 || INT8) of the softmax outputs; each INT8 model is compiled
with the plugin's default precision (bf16 for its float layers on CPUs with AVX512-BF16 or AMX) and with the f32
hint. nncf runs in its own venv (a subprocess on the saved FP32 IR): tfcompress never imports it. ``--ablation`` also measures our INT8 model
without bias correction and with bias correction on Convolution and MatMul layers only (NNCF's op types).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402

MLPERF = common.SHARED / "models" / "mlperf_tiny"

NNCF_SCRIPT = """
import sys, time, numpy as np, openvino as ov, nncf
model = ov.Core().read_model(sys.argv[1])
calib = np.load(sys.argv[2])
advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(sys.argv[4])) if len(sys.argv) > 4 else None
t = time.perf_counter()
q = nncf.quantize(model, nncf.Dataset(list(calib[:, None])), subset_size=len(calib), advanced_parameters=advanced)
print(f"{time.perf_counter() - t:.3f}")
ov.save_model(q, sys.argv[3])
"""


def load_vww():
    """The pretrained VWW model; its legacy DepthwiseConv2D config carries a ``groups`` Keras 3 refuses."""
    import keras

    class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
        def __init__(self, *args, groups=None, **kwargs):
            super().__init__(*args, **kwargs)

    return keras.models.load_model(MLPERF / "vww_96.h5", compile=False,
                                   custom_objects={"DepthwiseConv2D": DepthwiseConv2D})


def vww_ir(work: str) -> str:
    """The FP32 OpenVINO IR of VWW as the export pipeline makes it (Keras -> SavedModel -> ONNX -> OpenVINO,
    which keeps the layers' TF scope names), path to its .xml."""
    from tfcompress.export import to_onnx, to_openvino

    xml = os.path.join(work, "vww_fp32.xml")
    if not os.path.exists(xml):
        load_vww().export(os.path.join(work, "vww_sm"), verbose=False)
        to_onnx(os.path.join(work, "vww_sm"), os.path.join(work, "vww.onnx"))
        to_openvino(os.path.join(work, "vww.onnx"), xml)
    return xml


def vww_data(n_calib: int = 300, n_eval: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 JPEG test images resized to 96x96 in [0, 1]: calibration and evaluation sets."""
    import tensorflow as tf

    x, _ = common.cifar10_test()
    x = tf.image.resize(x[:n_calib + n_eval].astype(np.float32), (96, 96)).numpy() / 255.0
    return x[:n_calib].astype(np.float32), x[n_calib:].astype(np.float32)


def mcnemar(same_a: np.ndarray, same_b: np.ndarray) -> str:
    """Images only A keeps at FP32's class vs only B, and the two-sided p-value of "A and B agree equally often"
    (continuity-corrected McNemar test)."""
    from math import erfc, sqrt

    a_only, b_only = int(np.sum(same_a & ~same_b)), int(np.sum(~same_a & same_b))
    z = (abs(a_only - b_only) - 1) / sqrt(max(a_only + b_only, 1))
    return f"{a_only} images only tfcompress keeps at FP32's class, {b_only} only nncf; McNemar p = " \
           f"{erfc(max(z, 0) / sqrt(2)):.2f}"


def activation_ranges(model) -> dict:
    """Activation FakeQuantizes keyed by their producer's name: input_high (one value per channel or one)."""
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        high = op.input_value(2).get_node()
        while high.get_type_name() != "Constant":
            high = high.input_value(0).get_node()
        out[op.input_value(0).get_node().get_friendly_name()] = np.asarray(high.get_data(), np.float64).ravel()
    return out


def range_difference(ours, theirs) -> str:
    """How far our activation ranges are from nncf's: quantizers compared, largest relative difference."""
    a, b = activation_ranges(ours), activation_ranges(theirs)
    common_keys = [k for k in b if k in a and a[k].shape == b[k].shape]
    worst = max((float(np.max(np.abs(a[k] / b[k] - 1))) for k in common_keys), default=float("nan"))
    return f"{len(common_keys)} of nncf's {len(b)} activation quantizers matched (ours {len(a)}); " \
           f"largest relative range difference {worst:.2e}"


def closeness(reference: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(agreement of argmax with the reference, mean KL(reference || out))."""
    return float(np.mean(reference.argmax(1) == out.argmax(1))), common.kl_divergence(reference, out)


# compile config for f32 inference; without it the float layers of an INT8 model run in the plugin's default
# precision (bf16 on CPUs with AVX512-BF16 or AMX)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}

# our overflow_fix values and nncf's OverflowFix values for the same choice
NNCF_OVERFLOW_FIX = {"first_layer": "first_layer_only", "enable": "enable", "disable": "disable"}


def run_nncf(python: str, xml: str, calib: np.ndarray, work: str, overflow_fix: str | None = None,
             name: str = "vww_nncf") -> tuple[str, float]:
    """nncf.quantize on the IR in nncf's own interpreter (with ``overflow_fix``, in our names, passed as its
    ``AdvancedQuantizationParameters(overflow_fix=...)``; else its default, ``first_layer``): (INT8 IR path
    ``work/name.xml``, calibration seconds)."""
    npy, out = os.path.join(work, "calib.npy"), os.path.join(work, f"{name}.xml")
    np.save(npy, calib)
    cmd = [python, "-c", NNCF_SCRIPT, xml, npy, out] + ([NNCF_OVERFLOW_FIX[overflow_fix]] if overflow_fix else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out, float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nncf_python", default="/work/venv-nncf/bin/python")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--n_eval", type=int, default=2000, help="evaluation images (at most 9,700)")
    ap.add_argument("--work", default=None, help="directory for the IRs (default: a new temporary one)")
    args = ap.parse_args()
    import openvino as ov

    from tfcompress import calibration
    from tfcompress.calibration import quantize

    core = ov.Core()
    work = args.work or tempfile.mkdtemp(prefix="tfcompress-vww-")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {common.machine()}\n")
    xml = vww_ir(work)
    if not 0 < args.n_eval <= 9700:
        raise ValueError(f"--n_eval must be in 1..9700, got {args.n_eval}")
    calib, held_out = vww_data(n_eval=args.n_eval)
    fp = core.read_model(xml)
    reference = common.outputs(core.compile_model(fp, "CPU", F32), held_out, 100)
    rows = {"OpenVINO default precision (no INT8)": (core.compile_model(fp, "CPU"), None)}
    t = time.perf_counter()
    ours = calibration.calibrate(fp, calib, verbose=False)
    rows["tfcompress INT8"] = (core.compile_model(ours, "CPU"), time.perf_counter() - t)
    rows["tfcompress INT8 (f32 hint)"] = (core.compile_model(ours, "CPU", F32), None)
    if args.ablation:
        rows["tfcompress INT8, no bias correction"] = (
            core.compile_model(calibration.calibrate(fp, calib, bias_correction=False, verbose=False), "CPU"), None)
        kept = quantize.BIAS_CORRECTED_OPS
        quantize.BIAS_CORRECTED_OPS = kept - {"GroupConvolution"}
        rows["tfcompress INT8, bias correction without GroupConvolution"] = (
            core.compile_model(calibration.calibrate(fp, calib, verbose=False), "CPU"), None)
        quantize.BIAS_CORRECTED_OPS = kept
    nncf_xml, t_nncf = run_nncf(args.nncf_python, xml, calib, work)
    rows["nncf.quantize INT8"] = (core.compile_model(nncf_xml, "CPU"), t_nncf)
    rows["nncf.quantize INT8 (f32 hint)"] = (core.compile_model(nncf_xml, "CPU", F32), None)
    print(f"VWW MobileNetV1-0.25 96x96: calibration CIFAR-10 test [0:300], evaluation [300:{300 + args.n_eval}], "
          "reference FP32 (f32 hint)")
    print("| model | agreement with FP32 % | KL from FP32 (x1e-3) | calibration s |\n|---|---|---|---|")
    same = {}
    for name, (compiled, seconds) in rows.items():
        out = common.outputs(compiled, held_out, 100)
        agree, kl = closeness(reference, out)
        same[name] = reference.argmax(1) == out.argmax(1)
        print(f"| {name} | {100 * agree:.2f} | {1000 * kl:.2f} | {'-' if seconds is None else f'{seconds:.2f}'} |")
    print("default precision: " + mcnemar(same["tfcompress INT8"], same["nncf.quantize INT8"]))
    print("f32 hint: " + mcnemar(same["tfcompress INT8 (f32 hint)"], same["nncf.quantize INT8 (f32 hint)"]))
    print(range_difference(ours, core.read_model(nncf_xml)))


if __name__ == "__main__":
    main()

"""INT8 on a CPU whose INT8 kernels can saturate (x86 without VNNI): tfcompress vs nncf, each overflow fix,
each IR measured on this CPU's kernels and in exact arithmetic.

    /work/venv/bin/python benchmarks/int8_saturation.py [--nncf_python /work/venv-nncf/bin/python]
        [--calibration_sets 5] [--n_eval 9700] [--models resnet8,vww] [--work W]

Without VNNI (AVX512-VNNI, AVX-VNNI, AMX) the CPU plugin multiplies u8 activations by i8 weights with
``vpmaddubsw``, which adds each pair of products in int16 and saturates above 32767; weights on the 7-bit grid
(``overflow_fix``) cannot reach it. Both calibrators quantize the same FP32 IR with ``overflow_fix`` =
``disable``, ``first_layer`` (both defaults) and ``enable`` (nncf: ``AdvancedQuantizationParameters(
overflow_fix=...)`` in its own venv, a subprocess on the saved FP32 IR). Each of the six INT8 IRs is measured
twice: compiled as it is (INT8 kernels of this CPU) and with its FakeQuantize ops written out as float
arithmetic (:func:`tfcompress.calibration.exact_arithmetic`), which the CPU plugin runs in f32: the values of
the IR without saturation, as a CPU whose INT8 products accumulate in int32 computes them. Their difference is what saturation costs here.

(1) MLPerf Tiny ResNet-8: calibration on CIFAR-10 JPEG test images [0:300], accuracy on [300:10000]; then
    ``--calibration_sets`` sets of 300 random training JPEGs, accuracy on all 10,000 test images (section 3a).
(2) VWW MobileNetV1-0.25 96x96: calibration on test images [0:300], agreement of argmax with the FP32 IR
    (f32 hint) and mean KL(FP32 || INT8) on the next ``--n_eval`` images (section 3c).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402
import vww_int8  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
FIXES = ("disable", "first_layer", "enable")
WHO = ("tfcompress", "nncf")


def compiled_pair(core, q) -> tuple:
    """(the IR on this CPU's INT8 kernels, the IR in exact arithmetic), both with the f32 hint, after checking
    that the first runs INT8 and the second does not."""
    from tfcompress.calibration import exact_arithmetic, int8_layers

    here, ideal = core.compile_model(q, "CPU", F32), core.compile_model(exact_arithmetic(q), "CPU", F32)
    n_here, n_ideal = int8_layers(here), int8_layers(ideal)
    assert n_here["int8"] == n_here["total"] and n_ideal["int8"] == 0, (n_here, n_ideal)
    return here, ideal


def quantize_all(fp, xml: str, calib: np.ndarray, work: str, nncf_python: str, tag: str) -> dict:
    """The six INT8 IRs: {(calibrator, overflow_fix): openvino.Model}."""
    import openvino as ov

    from tfcompress import calibration

    core, out = ov.Core(), {}
    for fix in FIXES:
        out["tfcompress", fix] = calibration.calibrate(fp, calib, subset_size=len(calib), overflow_fix=fix,
                                                       verbose=False)
        path, _ = vww_int8.run_nncf(nncf_python, xml, calib, work, fix, name=f"{tag}_nncf_{fix}")
        out["nncf", fix] = core.read_model(path)
    return out


def label(who: str, fix: str) -> str:
    return f"{who}, overflow_fix={fix}" + (" (default)" if fix == "first_layer" else "")


def resnet8(args, work: str) -> None:
    import keras
    import openvino as ov

    from tfcompress.export import to_onnx, to_openvino

    core = ov.Core()
    x, y = common.cifar10_test()
    x = x.astype(np.float32)
    xml = os.path.join(work, "r8.xml")
    r8 = keras.models.load_model(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet.h5", compile=False)
    r8.export(os.path.join(work, "r8"), verbose=False)
    to_onnx(os.path.join(work, "r8"), os.path.join(work, "r8.onnx"))
    to_openvino(os.path.join(work, "r8.onnx"), xml)
    fp = core.read_model(xml)
    calib, xv, yv = x[:300], x[300:], y[300:]
    fp32 = float((common.outputs(core.compile_model(fp, "CPU", F32), xv, 500).argmax(1) == yv).mean())
    irs = quantize_all(fp, xml, calib, work, args.nncf_python, "r8")
    print("(1) MLPerf Tiny ResNet-8, CIFAR-10 JPEG test images [300:10000], calibration [0:300]; "
          f"FP32 (f32 hint) {100 * fp32:.2f} %")
    print("| calibrator, overflow fix | accuracy on this CPU % | vs FP32 | exact arithmetic % | vs FP32 |\n"
          "|---|---|---|---|---|")
    right = {}
    for key, q in irs.items():
        here, ideal = compiled_pair(core, q)
        right[key] = {k: common.outputs(c, xv, 500).argmax(1) == yv for k, c in (("here", here), ("exact", ideal))}
        a, e = (100 * float(right[key][k].mean()) for k in ("here", "exact"))
        print(f"| {label(*key)} | {a:.2f} | {a - 100 * fp32:+.2f} | {e:.2f} | {e - 100 * fp32:+.2f} |")
    for fix in FIXES:
        for k in ("here", "exact"):
            print(f"overflow_fix={fix}, {k}: " + vww_int8.mcnemar(right["tfcompress", fix][k], right["nncf", fix][k])
                  .replace("keeps at FP32's class", "gets right"))
    print(flush=True)
    if args.calibration_sets > 0:
        calibration_sets(args, work, xml, fp, x, y)


def calibration_sets(args, work: str, xml: str, fp, x, y) -> None:
    """The six IRs on ``--calibration_sets`` sets of 300 random training JPEGs, accuracy on all test images."""
    import openvino as ov

    core = ov.Core()
    x_train, _ = common.cifar10_train()
    rng = np.random.default_rng(0)  # the sets of section 3a
    acc: dict = {}
    for s in range(args.calibration_sets):
        subset = x_train[rng.choice(len(x_train), 300, replace=False)].astype(np.float32)
        for key, q in quantize_all(fp, xml, subset, work, args.nncf_python, f"r8_set{s}").items():
            for k, c in zip(("here", "exact"), compiled_pair(core, q)):
                acc.setdefault((key, k), []).append(100 * float((common.outputs(c, x, 500).argmax(1) == y).mean()))
    fp32 = 100 * float((common.outputs(core.compile_model(fp, "CPU", F32), x, 500).argmax(1) == y).mean())
    print(f"(1b) {args.calibration_sets} calibration sets of 300 random JPEG training images, accuracy on all "
          f"10,000 test images (FP32 (f32 hint) {fp32:.2f} %)")
    print("| calibrator, overflow fix | this CPU: mean % | std | min | max | exact arithmetic: mean % | std |\n"
          "|---|---|---|---|---|---|---|")
    for who in WHO:
        for fix in FIXES:
            h, e = (np.asarray(acc[(who, fix), k]) for k in ("here", "exact"))
            print(f"| {label(who, fix)} | {h.mean():.2f} | {h.std():.2f} | {h.min():.2f} | {h.max():.2f} "
                  f"| {e.mean():.2f} | {e.std():.2f} |")
    for fix in FIXES:
        for k in ("here", "exact"):
            d = np.asarray(acc[("tfcompress", fix), k]) - np.asarray(acc[("nncf", fix), k])
            print(f"overflow_fix={fix}, {k}: per set, tfcompress - nncf (points): "
                  + ", ".join(f"{v:+.2f}" for v in d))
    print(flush=True)


def vww(args, work: str) -> None:
    import openvino as ov

    core = ov.Core()
    xml = vww_int8.vww_ir(work)
    calib, held_out = vww_int8.vww_data(n_eval=args.n_eval)
    fp = core.read_model(xml)
    reference = common.outputs(core.compile_model(fp, "CPU", F32), held_out, 100)
    irs = quantize_all(fp, xml, calib, work, args.nncf_python, "vww")
    print(f"(2) VWW MobileNetV1-0.25 96x96: calibration CIFAR-10 test [0:300], evaluation [300:{300 + args.n_eval}], "
          "reference FP32 (f32 hint)")
    print("| calibrator, overflow fix | this CPU: agreement % | KL (x1e-3) | exact arithmetic: agreement % | "
          "KL (x1e-3) |\n|---|---|---|---|---|")
    same = {}
    for key, q in irs.items():
        cells = []
        for k, c in zip(("here", "exact"), compiled_pair(core, q)):
            out = common.outputs(c, held_out, 100)
            agree, kl = vww_int8.closeness(reference, out)
            same[key, k] = reference.argmax(1) == out.argmax(1)
            cells += [f"{100 * agree:.2f}", f"{1000 * kl:.2f}"]
        print(f"| {label(*key)} | " + " | ".join(cells) + " |")
    for fix in FIXES:
        for k in ("here", "exact"):
            print(f"overflow_fix={fix}, {k}: " + vww_int8.mcnemar(same[("tfcompress", fix), k], same[("nncf", fix), k]))
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nncf_python", default="/work/venv-nncf/bin/python")
    ap.add_argument("--models", default="resnet8,vww")
    ap.add_argument("--calibration_sets", type=int, default=5)
    ap.add_argument("--n_eval", type=int, default=9700, help="VWW evaluation images (at most 9,700)")
    ap.add_argument("--work", default=None, help="directory for the IRs (default: a new temporary one)")
    args = ap.parse_args()
    from tfcompress.calibration import cpu_saturates_int8
    from tfcompress.export.speed import default_precision

    work = args.work or tempfile.mkdtemp(prefix="tfcompress-sat-")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {common.machine()}; INT8 kernels saturate: {cpu_saturates_int8()}; OpenVINO's default "
          f"precision: {default_precision()} (every model here is compiled with the f32 hint)\n")
    models = args.models.split(",")
    if "resnet8" in models:
        resnet8(args, work)
    if "vww" in models:
        vww(args, work)


if __name__ == "__main__":
    main()

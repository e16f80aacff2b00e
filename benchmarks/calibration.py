"""INT8 calibration benchmark: tfcompress.calibration vs nncf.quantize, measured side by side in one run.

    python -m venv /work/venv-nncf && /work/venv-nncf/bin/pip install nncf==3.4.0 openvino==2026.4.1 numpy
    /work/venv/bin/python benchmarks/calibration.py [--nncf_python /work/venv-nncf/bin/python]
    /work/venv/bin/python benchmarks/calibration.py --skip_resnet8 --time_only --models ResNet50 [--rounds 3]

nncf runs in its own environment, in a subprocess on the saved FP32 IR (its calibration time is measured
there, without its import): the package never imports it.

(1) MLPerf Tiny ResNet-8 (pretrained) on CIFAR-10: calibration on JPEG test images [0:300], accuracy on
    [300:10000], for OpenVINO FP32 (f32 hint), BF16 (the default on AMX CPUs), our INT8, NNCF's INT8 and
    MLPerf's official INT8 TFLite model. The same FP32 IR feeds both calibrators. Each INT8 model is compiled
    with the plugin's default precision and with the f32 hint, which decides the precision of the layers left
    in float (bf16 by default on CPUs with AVX512-BF16 or AMX); (1b) too.
    The two INT8 models' disagreements are tested for significance (McNemar).
(1b) The same two calibrators on several calibration sets of 300 training images (accuracy on all 10,000 test
    images): how much of a difference in (1) is the luck of one calibration set.
(2) ResNet50 and MobileNetV2 (keras.applications, weights=None, BatchNorm statistics set from one batch of
    CIFAR images resized to 224): calibration time with 300 samples, latency at batch 1 and throughput at
    batch 32, medians of interleaved rounds; how far each model's output distribution is from FP32's (mean
    KL divergence on 500 other images: the weights are random and the outputs nearly uniform, so there is no
    accuracy, and even top-1 agreement is mostly ties), also with ``channel_alignment=True`` where the model
    has convolution -> convolution pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402
import vww_int8  # noqa: E402
from tfcompress.export.speed import default_precision  # noqa: E402

MLPERF = common.SHARED / "models" / "mlperf_tiny"


def accuracy(compiled, x, y, batch=500):
    return float((top1(compiled, x, batch) == y).mean())


def tflite_accuracy(path, x, y):
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zp = inp["quantization"]
    hits = 0
    for i in range(len(x)):
        xi = x[i:i + 1]
        if inp["dtype"] != np.float32:
            xi = np.clip(np.round(xi / scale + zp), -128, 127).astype(inp["dtype"])
        interp.set_tensor(inp["index"], xi)
        interp.invoke()
        hits += int(interp.get_tensor(out["index"]).argmax() == y[i])
    return hits / len(x)


NNCF_PYTHON = "/work/venv-nncf/bin/python"


def nncf_quantize(model, calib):
    """nncf.quantize in nncf's own environment (benchmarks/vww_int8.py): (INT8 model, seconds)."""
    import openvino as ov

    work = tempfile.mkdtemp(prefix="tfcompress-nncf-")
    xml = os.path.join(work, "fp32.xml")
    ov.save_model(model, xml, compress_to_fp16=False)
    out, seconds = vww_int8.run_nncf(NNCF_PYTHON, xml, np.ascontiguousarray(calib, np.float32), work)
    return ov.Core().read_model(out), seconds


def ours_quantize(model, calib, **options):
    from tfcompress import calibration

    t = time.perf_counter()
    q = calibration.calibrate(model, calib, subset_size=len(calib), verbose=False, **options)
    return q, time.perf_counter() - t


def top1(compiled, x, batch=50):
    return common.outputs(compiled, x, batch).argmax(axis=1)


def runtime_layers(compiled) -> list:
    """The compiled model's layers as (type, runtime precision, output precisions), sorted: two models with
    equal lists run the same kernels, so their speeds can differ only by noise."""
    rows = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        rows.append(tuple(info[k].astype(str) for k in ("layerType", "runtimePrecision", "outputPrecisions")))
    return sorted(rows)


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> str:
    """Images only A gets right vs only B, and the two-sided p-value of "A and B are equally accurate"."""
    from math import erfc, sqrt

    a_only, b_only = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    z = (abs(a_only - b_only) - 1) / sqrt(max(a_only + b_only, 1))  # continuity-corrected
    return f"{a_only} images only tfcompress gets right, {b_only} only nncf; McNemar p = {erfc(max(z, 0) / sqrt(2)):.2f}"


def speed(models: dict, shape, rounds: int, iters_b1: int, iters_b32: int) -> dict:
    """Median latency (ms, batch 1) and throughput (img/s, batch 32) per model, rounds interleaved."""
    from tfcompress.export.speed import measure_speed

    x1 = np.random.default_rng(0).uniform(0, 255, (1,) + tuple(shape)).astype(np.float32)
    return measure_speed(models, x1, rounds=rounds, iters_b1=iters_b1, iters_b32=iters_b32)


def app_ir(name: str, work: str, size: int):
    """keras.applications model with BN statistics from one batch of real images, as FP32 IR."""
    import keras
    import openvino as ov
    import tensorflow as tf

    keras.utils.set_random_seed(0)  # the same random weights in every run
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    x, _ = common.cifar10_test()
    batch = tf.image.resize(x[:32].astype("float32"), (size, size)).numpy()
    batch = keras.applications.imagenet_utils.preprocess_input(batch, mode="torch")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(batch, training=True)  # moving statistics := this batch's statistics
    path = os.path.join(work, name)
    model.export(path, verbose=False)
    ov_model = ov.convert_model(path)
    order = np.random.default_rng(1).permutation(10000)
    calib, held_out = (keras.applications.imagenet_utils.preprocess_input(
        tf.image.resize(x[idx].astype("float32"), (size, size)).numpy(), mode="torch")
        for idx in (order[:300], order[300:800]))
    return ov_model, calib, held_out


F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def int8_variants(fp, q_ours, q_nncf) -> dict:
    """FP32 in both precisions and each INT8 IR compiled with the f32 hint and with the plugin's default (the
    hint decides the precision of the layers left in float: bf16 by default on CPUs with AVX512-BF16 or AMX)."""
    default = f"default ({default_precision()})"
    return {
        "FP32 (f32 hint)": (fp, F32), f"FP32 {default}": (fp, {}),
        "tfcompress INT8 (f32 hint)": (q_ours, F32), "nncf INT8 (f32 hint)": (q_nncf, F32),
        f"tfcompress INT8 {default}": (q_ours, {}), f"nncf INT8 {default}": (q_nncf, {}),
    }


def int8_speed_table(title: str, fp, q_ours, q_nncf, shape, rounds: int, iters_b1: int, iters_b32: int) -> None:
    """Speed of both INT8 IRs, interleaved, in each compile precision; each INT8 row against nncf's in the same
    precision."""
    variants = int8_variants(fp, q_ours, q_nncf)
    s = speed(variants, shape, rounds, iters_b1=iters_b1, iters_b32=iters_b32)
    print(f"{title}: speed, medians of {rounds} interleaved rounds")
    print("| variant | latency b1 ms | throughput b32 img/s | b1 vs nncf (same precision) | "
          "b32 vs nncf (same precision) |\n|---|---|---|---|---|")
    for k, v in s.items():
        ref = s.get(k.replace("tfcompress", "nncf"))
        ratios = (f"{v['b1_ms'] / ref['b1_ms']:.2f} | {v['b32_ips'] / ref['b32_ips']:.2f}"
                  if k.startswith(("tfcompress", "nncf")) else "- | -")
        print(f"| {k} | {v['b1_ms']:.3f} | {v['b32_ips']:.0f} | {ratios} |")
    print(flush=True)


def calibration_sets(fp, x, y, n_sets: int) -> None:
    """(1b): both calibrators on ``n_sets`` sets of 300 random training JPEGs, accuracy on all test images."""
    import openvino as ov

    core = ov.Core()
    x_train, _ = common.cifar10_train()
    rng = np.random.default_rng(0)
    accs: dict = {f"{key}{hint}": [] for hint in ("", " (f32 hint)")
                  for key in ("tfcompress INT8", "nncf.quantize INT8")}
    for _ in range(n_sets):
        subset = x_train[rng.choice(len(x_train), 300, replace=False)].astype(np.float32)
        for key, fn in (("tfcompress INT8", ours_quantize), ("nncf.quantize INT8", nncf_quantize)):
            q = fn(fp, subset)[0]
            accs[key].append(accuracy(core.compile_model(q, "CPU"), x, y))
            accs[f"{key} (f32 hint)"].append(accuracy(core.compile_model(q, "CPU", F32), x, y))
    fp_all = accuracy(core.compile_model(fp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), x, y)
    print(f"(1b) {n_sets} calibration sets of 300 random JPEG training images, accuracy on all "
          f"10,000 test images (FP32 {100 * fp_all:.2f} %)")
    print("| model | mean accuracy % | std | min | max |\n|---|---|---|---|---|")
    for key, v in accs.items():
        v = 100 * np.asarray(v)
        print(f"| {key} | {v.mean():.2f} | {v.std():.2f} | {v.min():.2f} | {v.max():.2f} |")
    for hint in ("", " (f32 hint)"):
        diff = 100 * (np.asarray(accs[f"tfcompress INT8{hint}"]) - np.asarray(accs[f"nncf.quantize INT8{hint}"]))
        print(f"per set, tfcompress - nncf{hint or ' (default precision)'} (points): "
              + ", ".join(f"{d:+.2f}" for d in diff))
    print(flush=True)


def main() -> None:
    global NNCF_PYTHON
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", default="ResNet50,MobileNetV2")
    ap.add_argument("--calibration_sets", type=int, default=5, help="ResNet-8 calibration sets for (1b)")
    ap.add_argument("--nncf_python", default=NNCF_PYTHON, help="a Python with nncf installed")
    ap.add_argument("--skip_resnet8", action="store_true", help="only (2)")
    ap.add_argument("--time_only", action="store_true",
                    help="(2) calibration time only: both calibrators --rounds times, interleaved, medians")
    args = ap.parse_args()
    NNCF_PYTHON = args.nncf_python
    import keras
    import openvino as ov

    from tfcompress.calibration.alignment import alignment_pairs
    from tfcompress.export import to_onnx, to_openvino

    core = ov.Core()
    work = tempfile.mkdtemp(prefix="tfcompress-calib-")
    print(f"machine: {common.machine()}\n")

    if args.skip_resnet8:
        return models_part(args, work)
    # (1) accuracy on ResNet-8
    x, y = common.cifar10_test()
    x = x.astype(np.float32)
    r8 = keras.models.load_model(MLPERF / "pretrainedResnet.h5", compile=False)
    r8.export(os.path.join(work, "r8"), verbose=False)
    to_onnx(os.path.join(work, "r8"), os.path.join(work, "r8.onnx"))
    to_openvino(os.path.join(work, "r8.onnx"), os.path.join(work, "r8.xml"))
    fp = core.read_model(os.path.join(work, "r8.xml"))
    calib, xv, yv = x[:300], x[300:], y[300:]
    q_ours, t_ours = ours_quantize(fp, calib)
    q_nncf, t_nncf = nncf_quantize(fp, calib)
    c_ours, c_nncf = core.compile_model(q_ours, "CPU"), core.compile_model(q_nncf, "CPU")
    right_ours, right_nncf = top1(c_ours, xv, 500) == yv, top1(c_nncf, xv, 500) == yv
    right_ours32 = top1(core.compile_model(q_ours, "CPU", F32), xv, 500) == yv
    right_nncf32 = top1(core.compile_model(q_nncf, "CPU", F32), xv, 500) == yv
    rows = {
        "OpenVINO FP32 (f32 hint)": accuracy(core.compile_model(fp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), xv, yv),
        f"OpenVINO default ({default_precision()})": accuracy(core.compile_model(fp, "CPU"), xv, yv),
        "tfcompress INT8": float(right_ours.mean()),
        "nncf.quantize INT8": float(right_nncf.mean()),
        "tfcompress INT8 (f32 hint)": float(right_ours32.mean()),
        "nncf.quantize INT8 (f32 hint)": float(right_nncf32.mean()),
        "MLPerf official INT8 TFLite": tflite_accuracy(MLPERF / "pretrainedResnet_quant.tflite", xv, yv),
    }
    print("(1) MLPerf Tiny ResNet-8, CIFAR-10 JPEG test images [300:10000], calibration [0:300]")
    print("| model | accuracy % | vs FP32 (pts) |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {100 * v:.2f} | {100 * (v - rows['OpenVINO FP32 (f32 hint)']):+.2f} |")
    print("default precision: " + mcnemar(right_ours, right_nncf))
    print("f32 hint: " + mcnemar(right_ours32, right_nncf32))
    print("compiled INT8 models run the same layers in the same precisions as nncf's: "
          f"{runtime_layers(c_ours) == runtime_layers(c_nncf)}")
    print(f"calibration time: tfcompress {t_ours:.2f} s, nncf {t_nncf:.2f} s (ratio {t_ours / t_nncf:.2f})\n")
    int8_speed_table("MLPerf Tiny ResNet-8 32x32", fp, q_ours, q_nncf, (32, 32, 3), args.rounds,
                     iters_b1=300, iters_b32=60)

    # (1b) the same comparison over several calibration sets drawn from the training split
    if args.calibration_sets > 0:
        calibration_sets(fp, x, y, args.calibration_sets)

    models_part(args, work)


def calibration_times(name: str, fp, calib, rounds: int) -> None:
    """Both calibrators ``rounds`` times each, alternating, on the same IR and samples: the medians and ratio."""
    times: dict = {"tfcompress": [], "nncf": []}
    for _ in range(rounds):
        times["tfcompress"].append(ours_quantize(fp, calib)[1])
        times["nncf"].append(nncf_quantize(fp, calib)[1])
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"(2) {name}: calibration with {len(calib)} samples, {rounds} interleaved rounds: "
          + "; ".join(f"{k} " + ", ".join(f"{t:.1f}" for t in v) + f" s (median {med[k]:.1f})" for k, v in times.items())
          + f"; ratio of medians {med['tfcompress'] / med['nncf']:.2f}", flush=True)


def models_part(args, work: str) -> None:
    """(2): speed and calibration time on larger models."""
    import openvino as ov

    from tfcompress.calibration.alignment import alignment_pairs

    core = ov.Core()
    for name in [m for m in args.models.split(",") if m]:
        if args.time_only:
            fp, calib, _ = app_ir(name, work, args.size)
            calibration_times(name, fp, calib, args.rounds)
            continue
        fp, calib, held_out = app_ir(name, work, args.size)
        q_ours, t_ours = ours_quantize(fp, calib)
        q_nncf, t_nncf = nncf_quantize(fp, calib)
        variants = int8_variants(fp, q_ours, q_nncf)
        pairs = len(alignment_pairs(fp))
        if pairs:
            q_aligned, t_aligned = ours_quantize(fp, calib, channel_alignment=True)
            variants["tfcompress INT8, channel_alignment (default precision)"] = (q_aligned, {})
        s = speed(variants, (args.size, args.size, 3), args.rounds, iters_b1=30, iters_b32=4)
        reference = common.outputs(core.compile_model(fp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), held_out)
        same = runtime_layers(core.compile_model(q_ours, "CPU")) == runtime_layers(core.compile_model(q_nncf, "CPU"))
        print(f"(2) {name} {args.size}x{args.size}: calibration with 300 samples: tfcompress {t_ours:.1f} s, "
              f"nncf {t_nncf:.1f} s (ratio {t_ours / t_nncf:.2f})"
              + (f"; with channel alignment ({pairs} pairs) {t_aligned:.1f} s" if pairs else ""))
        print(f"compiled INT8 models run the same layers in the same precisions as nncf's: {same}")
        print("| variant | latency b1 ms | throughput b32 img/s | b32 vs nncf INT8 (same precision) | "
              "KL from FP32 (x1e-3) |\n"
              "|---|---|---|---|---|")
        for k, v in s.items():
            compiled = core.compile_model(variants[k][0], "CPU", variants[k][1])
            kl = common.kl_divergence(reference, common.outputs(compiled, held_out))
            ref = s[[n for n in s if n.startswith("nncf") and ("f32" in n) == ("f32" in k)][0]]
            print(f"| {k} | {v['b1_ms']:.2f} | {v['b32_ips']:.1f} | {v['b32_ips'] / ref['b32_ips']:.2f} "
                  f"| {1000 * kl:.2f} |")
        print(flush=True)


if __name__ == "__main__":
    main()

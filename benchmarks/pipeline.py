"""End-to-end benchmark: the whole tfcompress pipeline against post-training INT8 and MLPerf's INT8 model.

    python benchmarks/pipeline.py --json pipeline.json                # ~40 min on 2 cores
    python benchmarks/pipeline.py --epochs 1 --pruning_epochs 1 --train_samples 2000 --large_train 2000  # smoke

(A) MLPerf Tiny ResNet-8, pretrained, CIFAR-10 (JPEG train split for training, the 10,000 JPEG test images
    for accuracy, 300 training images for calibration):
      original FP32 -> FilterPruning(flops_target=0.4) fine-tune -> QAT -> strip -> export -> INT8 IR
    against (a) post-training INT8 of the original IR (our calibrator) and (b) MLPerf's official INT8 TFLite
    model. Accuracy, FLOPs, parameters, IR size (also vs the FP16 IR, the reference for this pipeline:
    2.0-3.6x smaller at < 1.2 points lost), OpenVINO latency (batch 1) and throughput (batch 32) for FP32
    (f32 hint), BF16 (the default on this CPU) and INT8, each as a ratio to the original measured in the same
    interleaved run.
(B) keras.applications MobileNetV2 (weights=None, 32x32 input) trained briefly on CIFAR-10, then the same
    pipeline: speed ratios on a model with depthwise convolutions and more arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402

import common  # noqa: E402
import tfcompress  # noqa: E402
from calibration import tflite_accuracy  # noqa: E402
from pruning import load_resnet8, train_dataset  # noqa: E402
from tfcompress.export import export_saved_model  # noqa: E402
from tfcompress.export.speed import compression_variants, measure_speed  # noqa: E402
from tfcompress.quantization import RangeInit, quantize_model  # noqa: E402

LOSS = "sparse_categorical_crossentropy"


def cosine_adam(lr: float, epochs: int, steps: int):
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps)))


def compress(model, ds, steps: int, args, **pruning) -> tuple[keras.Model, keras.Model, float]:
    """FilterPruning fine-tune, then QAT; returns (pruned float, stripped QAT model, seconds)."""
    t = time.perf_counter()
    keras.utils.set_random_seed(1)
    pruned = keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    pruned.compile(cosine_adam(args.lr, args.epochs, steps), LOSS, metrics=["accuracy"])
    pruner = tfcompress.pruning.FilterPruning(flops_target=0.4, pruning_epochs=args.pruning_epochs, **pruning)
    pruned.fit(ds, epochs=args.epochs, callbacks=[pruner], verbose=0)
    q = quantize_model(pruned)
    q.compile(cosine_adam(args.lr / 4, args.qat_epochs, steps), LOSS, metrics=["accuracy"])
    q.fit(ds, epochs=args.qat_epochs, callbacks=[RangeInit(16)], verbose=0)
    # strip in Keras (it follows QAT depthwise kernels, which the SavedModel stripper keeps; see README)
    return pruned, tfcompress.strip(q), time.perf_counter() - t


def export_all(work: str, variants: dict, calib: np.ndarray, valid) -> dict:
    """Each Keras model -> SavedModel -> tfcompress export (INT8 where asked); returns the export reports."""
    reports = {}
    for name, (model, int8) in variants.items():
        sm = os.path.join(work, name + "_sm")
        model.export(sm, verbose=False)
        reports[name] = export_saved_model(sm, os.path.join(work, name), calibration_data=calib,
                                           int8="default" if int8 else "none", validation_data=valid)
    return reports


def ir_bytes(xml: str) -> int:
    return os.path.getsize(xml) + os.path.getsize(xml[:-4] + ".bin")


def bin_bytes(xml: str) -> int:
    return os.path.getsize(xml[:-4] + ".bin")


def fp16_ir(xml: str, work: str) -> str:
    path = os.path.join(work, "fp16.xml")
    ov.save_model(ov.Core().read_model(xml), path, compress_to_fp16=True)
    return path


def speeds(work: str, rounds: int, sample: np.ndarray) -> dict:
    irs = compression_variants(*(os.path.join(work, d) for d in ("original", "pruned", "compressed")))
    return measure_speed(irs, sample, rounds=rounds, iters_b1=200, iters_b32=20)


def print_speed(s: dict) -> None:
    base = s["original FP32"]
    print("| variant | latency b1 ms | vs original FP32 | throughput b32 img/s | vs original FP32 |")
    print("|---|---|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v['b1_ms']:.3f} | {v['b1_ms'] / base['b1_ms']:.2f}x | {v['b32_ips']:.0f} | "
              f"{v['b32_ips'] / base['b32_ips']:.2f}x |")


def part_a(args, x, y, xt, yt, work: str) -> dict:
    original = load_resnet8(args.lr)
    ds = train_dataset(x, y, 64, seed=1)
    steps = -(-len(x) // 64)
    pruned, small, seconds = compress(original, ds, steps, args, prune_downsample_convs=True)
    calib = x[:300].astype(np.float32)
    valid = (xt.astype(np.float32), yt)
    reports = export_all(work, {"original": (original, True), "pruned": (pruned, False),
                                "compressed": (small, True)}, calib, valid)
    tfl = tflite_accuracy(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet_quant.tflite", xt, yt)
    tfl_bytes = os.path.getsize(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet_quant.tflite")
    f16 = fp16_ir(os.path.join(work, "original", "model_fp32.xml"), work)
    fp16, fp16_bin = ir_bytes(f16), bin_bytes(f16)
    o, c = reports["original"], reports["compressed"]
    o32, o8, c8 = (os.path.join(work, d, f) for d, f in (("original", "model_fp32.xml"),
                                                         ("original", "model_int8.xml"),
                                                         ("compressed", "model_int8.xml")))
    rows = {
        "original FP32 (OpenVINO)": (o["accuracy"]["openvino_fp32"], o["flops"]["before"], o["params"]["before"],
                                     ir_bytes(o32), bin_bytes(o32)),
        "(a) post-training INT8 (tfcompress calibrate)": (
            o["accuracy"]["openvino_int8"], o["flops"]["before"], o["params"]["before"], ir_bytes(o8),
            bin_bytes(o8)),
        "(b) MLPerf INT8 TFLite": (tfl, o["flops"]["before"], o["params"]["before"], tfl_bytes, tfl_bytes),
        "pruned + QAT + strip, INT8 IR": (c["accuracy"]["openvino_int8"], c["flops"]["after"], c["params"]["after"],
                                          ir_bytes(c8), bin_bytes(c8)),
    }
    base_acc = rows["original FP32 (OpenVINO)"][0]
    print(f"\n(A) ResNet-8, CIFAR-10 JPEG test ({len(xt)} images); compression {seconds:.0f} s "
          f"({args.epochs} pruning + {args.qat_epochs} QAT epochs on {len(x)} images)")
    print("| variant | accuracy % | vs original (pts) | FLOPs | params | model bytes (.xml+.bin) | FP16 IR / this "
          "| weights bytes (.bin) | FP16 .bin / this |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, (acc, fl, par, size, wbytes) in rows.items():
        print(f"| {k} | {100 * acc:.2f} | {100 * (acc - base_acc):+.2f} | {fl / 1e6:.2f} M | {par:,} | {size:,} | "
              f"{fp16 / size:.2f} | {wbytes:,} | {fp16_bin / wbytes:.2f} |")
    print(f"FP16 IR of the original: {fp16:,} bytes ({fp16_bin:,} in .bin); pruned float (before QAT), Keras: "
          f"{100 * reports['pruned']['accuracy']['original']:.2f} %")
    s = speeds(work, args.rounds, xt[:1].astype(np.float32))
    print_speed(s)
    return {"rows": {k: dict(zip(("accuracy", "flops", "params", "bytes", "bin_bytes"), v)) for k, v in rows.items()},
            "fp16_ir_bytes": fp16, "fp16_bin_bytes": fp16_bin, "speed": s, "compress_seconds": seconds,
            "pruned_float_accuracy": reports["pruned"]["accuracy"]["original"],
            "int8_layers": c["steps"]["int8"]["int8_layers"]}


def part_b(args, x, y, xt, yt, work: str) -> dict:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    base = keras.applications.MobileNetV2(weights=None, input_tensor=keras.layers.Rescaling(1 / 127.5, -1)(inp),
                                          classes=10, classifier_activation="softmax")
    model = keras.Model(inp, base.output, name="mobilenetv2_cifar")
    for layer in model.layers:  # keras.applications' 0.999 leaves the moving statistics untrained in 3 epochs
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    n = args.large_train
    ds = train_dataset(x[:n], y[:n], 64, seed=2)
    steps = -(-n // 64)
    model.compile(cosine_adam(2e-3, args.large_epochs, steps), LOSS, metrics=["accuracy"])
    model.fit(ds, epochs=args.large_epochs, verbose=0)
    sub = argparse.Namespace(**{**vars(args), "epochs": args.large_epochs, "pruning_epochs": 1, "qat_epochs": 1,
                                "lr": 5e-4})
    pruned, small, seconds = compress(model, ds, steps, sub, prune_downsample_convs=True)
    calib = x[:300].astype(np.float32)
    pick = np.random.default_rng(0).permutation(len(xt))[:2000]  # the test split is sorted by class
    valid = (xt[pick].astype(np.float32), yt[pick])
    reports = export_all(work, {"original": (model, True), "pruned": (pruned, False),
                                "compressed": (small, True)}, calib, valid)
    o, c = reports["original"], reports["compressed"]
    print(f"\n(B) MobileNetV2 32x32, {args.large_epochs} epochs on {n} images (speed ratios; accuracy on 2,000 test "
          f"images: FP32 {100 * o['accuracy']['openvino_fp32']:.2f} %, post-training INT8 "
          f"{100 * o['accuracy']['openvino_int8']:.2f} %, compressed INT8 {100 * c['accuracy']['openvino_int8']:.2f} %)")
    print(f"FLOPs {o['flops']['before'] / 1e6:.1f} M -> {c['flops']['after'] / 1e6:.1f} M, params "
          f"{o['params']['before']:,} -> {c['params']['after']:,}; INT8 layers {c['steps']['int8']['int8_layers']}")
    s = speeds(work, args.rounds, xt[:1].astype(np.float32))
    print_speed(s)
    return {"accuracy": {k: r["accuracy"] for k, r in reports.items()}, "speed": s,
            "flops": [o["flops"]["before"], c["flops"]["after"]], "params": [o["params"]["before"], c["params"]["after"]],
            "int8_layers": c["steps"]["int8"]["int8_layers"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10, help="pruning fine-tune epochs (ResNet-8)")
    ap.add_argument("--pruning_epochs", type=int, default=6)
    ap.add_argument("--qat_epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train_samples", type=int, default=50_000)
    ap.add_argument("--large_train", type=int, default=20_000)
    ap.add_argument("--large_epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip_large", action="store_true")
    ap.add_argument("--skip_resnet8", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    print(f"machine: {common.machine()}; openvino {ov.__version__}; OpenVINO default precision here: "
          f"{ov.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT')}")
    x, y = common.cifar10_train_shuffled()
    xt, yt = common.cifar10_test()
    x, y = x[: args.train_samples], y[: args.train_samples]
    results = {"command": "python benchmarks/pipeline.py " + " ".join(sys.argv[1:]), "machine": common.machine()}
    with tempfile.TemporaryDirectory(prefix="tfcompress-pipeline-") as work:
        if not args.skip_resnet8:
            results["resnet8"] = part_a(args, x, y, xt, yt, os.path.join(work, "a"))
        if not args.skip_large:
            results["mobilenetv2"] = part_b(args, x, y, xt, yt, os.path.join(work, "b"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()

"""QAT benchmark on MLPerf Tiny ResNet-8 / CIFAR-10.

    python benchmarks/qat.py [--epochs 3]

(1) Training step time of the QAT model vs the float model, epochs interleaved (goal: at most 1.5x).
(2) The pretrained ResNet-8 fine-tuned with QAT on the CIFAR-10 JPEG training images, exported with
    `model.export` and converted by OpenVINO: INT8 accuracy on the 10,000 JPEG test images vs the float model
    fine-tuned the same epochs vs MLPerf's official INT8 TFLite model (goal: QAT INT8 loses at most 0.3 point
    and beats the TFLite model), and OpenVINO latency / throughput of INT8 vs FP32 (f32 hint) and BF16.
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
from calibration import speed, tflite_accuracy  # noqa: E402
from pruning import load_resnet8, train_dataset  # noqa: E402
from tfcompress.export.speed import default_precision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import keras
    import openvino as ov
    import tensorflow as tf

    from tfcompress import calibration
    from tfcompress.quantization import RangeInit, quantize_model

    print(f"machine: {common.machine()}\n")
    x, y = common.cifar10_train_shuffled()
    xt, yt = common.cifar10_test()
    xt = xt.astype(np.float32)

    # (1) step time, interleaved
    small = tf.data.Dataset.from_tensor_slices((x[:5000].astype("float32"), y[:5000])).batch(64).cache()
    plain = load_resnet8(1e-4)
    q = quantize_model(load_resnet8(1e-4))
    q.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    times = {"float": [], "qat": []}
    for r in range(args.rounds + 1):
        for name, m in (("float", plain), ("qat", q)):
            t = time.perf_counter()
            m.fit(small, epochs=r + 1, initial_epoch=r, verbose=0)
            if r:
                times[name].append(time.perf_counter() - t)
    f, qq = common.median(times["float"]), common.median(times["qat"])
    print(f"(1) epoch of 79 steps: float {f:.2f} s, QAT {qq:.2f} s, ratio {qq / f:.2f} (goal <= 1.5)\n")

    # (2) accuracy and speed
    ds = train_dataset(x, y, 64, seed=1)
    keras.utils.set_random_seed(1)
    fl = load_resnet8(args.lr)
    fl.fit(ds, epochs=args.epochs, verbose=0)
    keras.utils.set_random_seed(1)
    q = quantize_model(load_resnet8(args.lr))
    q.compile(keras.optimizers.Adam(args.lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    q.fit(ds, epochs=args.epochs, callbacks=[RangeInit(16)], verbose=0)
    work = tempfile.mkdtemp(prefix="tfcompress-qat-")
    q.export(os.path.join(work, "q"), verbose=False)
    fl.export(os.path.join(work, "f"), verbose=False)
    core = ov.Core()
    q_ir, f_ir = ov.convert_model(os.path.join(work, "q")), ov.convert_model(os.path.join(work, "f"))
    compiled = core.compile_model(q_ir, "CPU")
    out = np.concatenate([compiled({0: xt[i:i + 500]})[compiled.outputs[0]] for i in range(0, len(xt), 500)])
    acc_q = float((out.argmax(1) == yt).mean())
    acc_f = fl.evaluate(xt, yt, batch_size=256, verbose=0)[1]
    acc_t = tflite_accuracy(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet_quant.tflite", xt, yt)
    print(f"(2) {args.epochs} epochs: float fine-tuned {100 * acc_f:.2f} %, QAT INT8 in OpenVINO {100 * acc_q:.2f} % "
          f"({calibration.int8_layers(compiled)}), MLPerf INT8 TFLite {100 * acc_t:.2f} %")
    s = speed({"FP32 (f32 hint)": (f_ir, {"INFERENCE_PRECISION_HINT": "f32"}), f"default ({default_precision()})": (f_ir, {}),
               "QAT INT8": (q_ir, {})}, (32, 32, 3), args.rounds, iters_b1=200, iters_b32=50)
    print("| variant | latency b1 ms | throughput b32 img/s |\n|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v['b1_ms']:.3f} | {v['b32_ips']:.0f} |")


if __name__ == "__main__":
    main()

"""Speed of quantizing signed tensors after zero pads (``quantize_after_signed_pads``) vs before them.

MobileNetV3Small / MobileNetV3Large (random weights, BatchNorm statistics of CIFAR-10 images, 224x224) are
exported (``export_saved_model``: SavedModel -> ONNX -> FP32 IR, where Keras' ZeroPadding2D is a Pad op; OpenVINO's
TensorFlow reader folds it into the convolution instead) and calibrated twice on the same 64 images: as
``calibrate`` does, and with the move switched off (the quantizer of each hard-swish output stays above the
ZeroPadding2D of a strided depthwise convolution). Prints per IR the INT8 layer count of the compiled model
(and how many quantizers the move placed after a Pad) and batch-1 latency / batch-32 throughput (``tfcompress.export.speed.measure_speed``, interleaved rounds, at
the device's default precision).

    PYTHONPATH=$PWD python benchmarks/signed_pad_quantizers.py [--rounds 5] [--models MobileNetV3Small,...]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="MobileNetV3Small,MobileNetV3Large")
    ap.add_argument("--px", type=int, default=224)
    args = ap.parse_args()

    import keras
    import openvino as ov
    import tensorflow as tf

    from conftest import SHARED_DATA, batchnorm_statistics_of
    from tfcompress.calibration import calibrate, int8_layers, quantize
    from tfcompress.calibration.placement import quantize_after_signed_pads
    from tfcompress.export import export_saved_model
    from tfcompress.export.speed import measure_speed

    x = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["x_test"][:96].astype("float32")
    x = tf.image.resize(x, (args.px, args.px)).numpy()
    for name in args.models.split(","):
        model = getattr(keras.applications, name)(weights=None, input_shape=(args.px, args.px, 3), classes=10)
        batchnorm_statistics_of(model, x[:32])
        with tempfile.TemporaryDirectory() as tmp:
            model.export(f"{tmp}/sm", verbose=False)
            export_saved_model(f"{tmp}/sm", f"{tmp}/out", verbose=False)
            float_ir = ov.Core().read_model(f"{tmp}/out/model_fp32.xml")
        moved = calibrate(float_ir, x[32:], verbose=False)
        original = quantize.quantize_after_signed_pads
        quantize.quantize_after_signed_pads = lambda m: 0  # the placement before the move
        try:
            kept = calibrate(float_ir, x[32:], verbose=False)
        finally:
            quantize.quantize_after_signed_pads = original
        print(name, "quantizers placed after a Pad:", quantize_after_signed_pads(kept.clone()), flush=True)
        core = ov.Core()
        irs = {"before pads": kept, "after pads": moved}
        for k, m in irs.items():
            print(name, k, "INT8 layers", int8_layers(core.compile_model(m, "CPU")), flush=True)
        speed = measure_speed({k: (m, {}) for k, m in irs.items()}, x[:1], rounds=args.rounds)
        for k, v in speed.items():
            print(f"{name} | {k} | {v['b1_ms']:.2f} ms | {v['b32_ips']:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()

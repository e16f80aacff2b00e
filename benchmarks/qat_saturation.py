"""A QAT model on a CPU whose INT8 kernels can saturate: the pretrained MLPerf Tiny ResNet-8 through
``quantize_model`` with each ``overflow_fix``, exported, its IR measured on this CPU's kernels and in exact
arithmetic (:func:`tfcompress.calibration.exact_arithmetic`).

    /work/venv/bin/python benchmarks/qat_saturation.py --work W

Ranges come from ``RangeInit(16)`` over 2,048 shuffled CIFAR-10 training JPEGs with a learning rate of 0 (the
pretrained weights unchanged, so the two fixes differ only in the weight grid); ``python -m tfcompress.export``'s
pipeline writes the IR (its check inputs: the first 64 test images); accuracy on all 10,000 test JPEGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="directory for the models (default: a new temporary one)")
    args = ap.parse_args()
    import keras
    import openvino as ov

    from tfcompress import calibration
    from tfcompress.export import export_saved_model
    from tfcompress.quantization import RangeInit, quantize_model

    work = args.work or tempfile.mkdtemp(prefix="tfcompress-qatsat-")
    x, y = common.cifar10_test()
    x = x.astype(np.float32)
    xt, yt = common.cifar10_train_shuffled()
    xt, yt = xt[:2048].astype(np.float32), yt[:2048]
    print(f"machine: {common.machine()}; INT8 kernels saturate: {calibration.cpu_saturates_int8()}")
    print("| quantize_model overflow_fix | Keras % | IR, exact arithmetic % | IR, this CPU's kernels % | "
          "int8_kernels max / mean rel. error | limit |\n|---|---|---|---|---|---|")
    for fix in ("first_layer", "enable"):
        keras.utils.set_random_seed(0)
        r8 = keras.models.load_model(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet.h5", compile=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_model(r8, overflow_fix=fix)
        q.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
        q.fit(xt, yt, batch_size=128, epochs=1, callbacks=[RangeInit(16)], verbose=0)
        sm, out = os.path.join(work, f"sm_{fix}"), os.path.join(work, f"out_{fix}")
        q.export(sm, verbose=False)
        report = export_saved_model(sm, out, validation_data=x[:64], verbose=False, overwrite=True)
        ir = ov.Core().read_model(os.path.join(out, "model_fp32.xml"))
        acc = {}
        for k, m in (("kernels", ir), ("exact", calibration.exact_arithmetic(ir))):
            compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            acc[k] = 100 * float((common.outputs(compiled, x, 500).argmax(1) == y).mean())
        keras_acc = 100 * float((q.predict(x, batch_size=500, verbose=0).argmax(1) == y).mean())
        k = report["steps"]["openvino"]["int8_kernels"]
        print(f"| {fix} | {keras_acc:.2f} | {acc['exact']:.2f} | {acc['kernels']:.2f} | "
              f"{k['max_rel_error']:.3f} / {k['mean_rel_error']:.3f} | {k['tolerance']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

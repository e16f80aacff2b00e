"""Which quantization-aware convolution twins OpenVINO's CPU plugin runs in INT8.

For each Keras convolution kind, a small model (input -> the layer -> global pooling -> Dense) is quantized with
``quantize_model``, trained a few steps with ``RangeInit``, written with ``model.export`` and converted by
``export_saved_model`` (no calibration data). The compiled FP32 IR's runtime model gives, per weighted layer,
its layer type and runtime precision (u8/i8 = INT8).

Run: PYTHONPATH=$PWD python benchmarks/qat_twins_int8.py
"""

import sys
import tempfile
import warnings

import keras
import numpy as np
import openvino as ov
from keras import layers as L

from tfcompress.export import export_saved_model
from tfcompress.quantization import RangeInit, quantize_model

KINDS = {
    "Conv1D": ((32, 8), lambda: L.Conv1D(8, 3, padding="same")),
    "Conv1D causal": ((32, 8), lambda: L.Conv1D(8, 3, padding="causal", dilation_rate=2)),
    "DepthwiseConv1D": ((32, 8), lambda: L.DepthwiseConv1D(3, padding="same")),
    "SeparableConv1D": ((32, 8), lambda: L.SeparableConv1D(8, 3, padding="same")),
    "Conv1DTranspose": ((32, 8), lambda: L.Conv1DTranspose(8, 3, strides=2, padding="same")),
    "Conv2D": ((16, 16, 8), lambda: L.Conv2D(8, 3, padding="same")),
    "Conv3D": ((8, 8, 8, 8), lambda: L.Conv3D(8, 3, padding="same")),
    "Conv3DTranspose": ((8, 8, 8, 8), lambda: L.Conv3DTranspose(8, 3, strides=2, padding="same")),
}


def model_of(shape, make):
    inp = keras.Input(shape)
    x = L.ReLU()(L.Conv1D(8, 1)(inp) if len(shape) == 2 else L.Conv2D(8, 1)(inp) if len(shape) == 3
                 else L.Conv3D(8, 1)(inp))
    x = make()(x)
    pool = {2: L.GlobalAveragePooling1D, 3: L.GlobalAveragePooling2D, 4: L.GlobalAveragePooling3D}[len(shape)]
    return keras.Model(inp, L.Dense(4)(pool()(x)))


def runtime_precisions(xml):
    compiled = ov.Core().compile_model(xml, "CPU")
    rows = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "Deconvolution", "FullyConnected"):
            rows.append((kind, info["runtimePrecision"].astype(str)))
    return rows


def main():
    rng = np.random.default_rng(0)
    names = sys.argv[1:] or list(KINDS)
    for name in names:
        shape, make = KINDS[name]
        keras.utils.set_random_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize_model(model_of(shape, make))
        x = rng.normal(size=(32, *shape)).astype("float32")
        q.compile(keras.optimizers.SGD(0.0), "mse")
        q.fit(x, rng.normal(size=(32, 4)), epochs=1, batch_size=8, callbacks=[RangeInit(4)], verbose=0)
        with tempfile.TemporaryDirectory() as d:
            q.export(f"{d}/sm", verbose=False)
            export_saved_model(f"{d}/sm", f"{d}/out", verbose=False)
            rows = runtime_precisions(f"{d}/out/model_fp32.xml")
        left = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        print(f"| {name} | {' '.join(f'{k}:{p}' for k, p in rows)} | {'; '.join(left) or '-'} |", flush=True)


if __name__ == "__main__":
    main()

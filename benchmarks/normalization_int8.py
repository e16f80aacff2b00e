"""Normalizations left float in INT8: a small transformer and a ConvNeXt-style CNN, before and after, both routes.

Three stages, each under the lock (the middle one once per code version, with that version's package first on
PYTHONPATH; the other two with either):

    cd <worktree>; W=/work/scratch/s24/norms/bench
    PYTHONPATH=. flock /work/scratch/heavy.lock /work/venv/bin/python benchmarks/normalization_int8.py train --work $W
    PYTHONPATH=/work/main flock ... python benchmarks/normalization_int8.py int8 --work $W --tag main
    PYTHONPATH=. flock ... python benchmarks/normalization_int8.py int8 --work $W --tag branch
    PYTHONPATH=. flock ... python benchmarks/normalization_int8.py measure --work $W --tags main,branch

Models (float, trained here on real data with real labels): ``transformer_<norm>`` on MNIST (each image row a
token: its 28 pixels and a one-hot of its row index, so the Dense embedding adds a learned position embedding;
2 pre-norm blocks of MultiHeadAttention(2 heads) and an MLP(64, GELU), a final norm, average pooling, Dense(10);
20,000 training images, 4 epochs) with ``<norm>`` LayerNormalization (``ln``), RMSNormalization (``rms``) or a
LayerNormalization written with keras.ops (``ops``: mean, var, rsqrt); ``convnext`` on CIFAR-10 (JPEG training
split, 20,000 images, 6 epochs): a 2x2 stride-2 stem, 2 stages of 2 blocks DepthwiseConv 7x7 -> LayerNormalization
over the channels -> Dense(4x) -> GELU -> Dense + residual, LayerNormalization + 2x2 stride-2 convolution between.

``int8`` writes, with the package on the path, the calibrated IR (``calibrate`` on 300 training samples) and the
QAT IR (``quantize_model``, 1 epoch on 10,000 training samples, ``RangeInit``, export). ``measure`` prints per
model and IR: accuracy on the test split (10,000 images), argmax agreement with the FP32 IR (f32 hint), the
activation FakeQuantize count, the weighted layers the CPU runs INT8, and b1 latency / b32 throughput
(interleaved rounds in one process) with the f32 hint and the default precision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402

MODELS = ("transformer_ln", "transformer_rms", "transformer_ops", "convnext")


def _data(name: str):
    """(x_train, y_train, x_test, y_test) for the model ``name``."""
    if name.startswith("transformer"):
        xtr, ytr, xte, yte = common.mnist()
        rows = lambda a: np.concatenate(  # noqa: E731
            [a[..., 0], np.broadcast_to(np.eye(28, dtype="float32"), (len(a), 28, 28))], axis=-1)
        return rows(xtr[:20000]), ytr[:20000], rows(xte), yte
    xtr, ytr = common.cifar10_train_shuffled()
    xte, yte = common.cifar10_test()
    return xtr[:20000].astype("float32"), ytr[:20000], xte.astype("float32"), yte


def _ops_layer_norm(x, eps: float = 1e-5):
    import keras

    mean = keras.ops.mean(x, axis=-1, keepdims=True)
    return (x - mean) * keras.ops.rsqrt(keras.ops.var(x, axis=-1, keepdims=True) + eps)


def _norm(kind: str):
    import keras

    if kind == "ops":
        return _ops_layer_norm
    return keras.layers.LayerNormalization() if kind == "ln" else keras.layers.RMSNormalization()


def transformer(kind: str):
    import keras

    L = keras.layers
    i = keras.Input((28, 56))
    x = L.Dense(32)(i)
    for _ in range(2):
        n = _norm(kind)(x)
        x = x + L.MultiHeadAttention(2, 16)(n, n)
        y = L.Dense(64)(_norm(kind)(x))
        x = x + L.Dense(32)(keras.activations.gelu(y, approximate=True))
    x = L.GlobalAveragePooling1D()(_norm(kind)(x))
    return keras.Model(i, L.Dense(10, activation="softmax")(x))


def convnext():
    import keras

    L = keras.layers
    i = keras.Input((32, 32, 3))
    x = L.Conv2D(32, 2, strides=2)(L.Rescaling(1 / 255)(i))
    for stage, width in enumerate((32, 64)):
        if stage:
            x = L.Conv2D(width, 2, strides=2)(L.LayerNormalization(epsilon=1e-6)(x))
        for _ in range(2):
            y = L.LayerNormalization(epsilon=1e-6)(L.DepthwiseConv2D(7, padding="same")(x))
            y = L.Dense(width)(keras.activations.gelu(L.Dense(4 * width)(y), approximate=True))
            x = x + y
    x = L.LayerNormalization(epsilon=1e-6)(L.GlobalAveragePooling2D()(x))
    return keras.Model(i, L.Dense(10, activation="softmax")(x))


def train(work: str) -> None:
    import keras

    from tfcompress.export import export_saved_model

    for name in MODELS:
        keras.utils.set_random_seed(0)
        xtr, ytr, _, _ = _data(name)
        model = convnext() if name == "convnext" else transformer(name.split("_")[1])
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(xtr, ytr, epochs=6 if name == "convnext" else 4, batch_size=64, verbose=2)
        model.save(os.path.join(work, name + ".keras"))
        model.export(os.path.join(work, name + "_sm"), verbose=False)
        export_saved_model(os.path.join(work, name + "_sm"), os.path.join(work, name + "_fp32"), verbose=False,
                           overwrite=True)


def int8(work: str, tag: str) -> None:
    import keras
    import openvino as ov

    import tfcompress
    from tfcompress.calibration import calibrate
    from tfcompress.export import export_saved_model
    from tfcompress.quantization import RangeInit, quantize_model

    print("tfcompress from", tfcompress.__file__)
    for name in MODELS:
        keras.utils.set_random_seed(0)
        xtr, ytr, _, _ = _data(name)
        fp32 = os.path.join(work, name + "_fp32", "model_fp32.xml")
        ov.save_model(calibrate(fp32, np.ascontiguousarray(xtr[:300]), verbose=False),
                      os.path.join(work, f"{name}_ptq_{tag}.xml"))
        q = quantize_model(keras.saving.load_model(os.path.join(work, name + ".keras")))
        q.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
        q.fit(xtr[:10000], ytr[:10000], epochs=1, batch_size=64, callbacks=[RangeInit(16)], verbose=2)
        q.export(os.path.join(work, f"{name}_qat_{tag}_sm"), verbose=False)
        export_saved_model(os.path.join(work, f"{name}_qat_{tag}_sm"), os.path.join(work, f"{name}_qat_{tag}"),
                           verbose=False, overwrite=True)


def _activation_quantizers(model) -> int:
    return sum(op.get_type_name() == "FakeQuantize" and op.input(0).get_source_output().get_node().get_type_name()
               not in ("Constant", "Convert") for op in model.get_ordered_ops())


def measure(work: str, tags: list[str], models: list[str]) -> None:
    import openvino as ov

    from tfcompress.calibration import int8_layers
    from tfcompress.export.speed import DEFAULT, FP32, default_precision, measure_speed

    core = ov.Core()
    print(common.machine(), "| default precision:", default_precision())
    for name in models:
        _, _, xte, yte = _data(name)
        irs = {"FP32": os.path.join(work, name + "_fp32", "model_fp32.xml")}
        for tag in tags:
            irs[f"PTQ {tag}"] = os.path.join(work, f"{name}_ptq_{tag}.xml")
            irs[f"QAT {tag}"] = os.path.join(work, f"{name}_qat_{tag}", "model_fp32.xml")
        ref = common.outputs(core.compile_model(irs["FP32"], "CPU", FP32), xte, 500)
        speeds = measure_speed({f"{k}|{h}": (p, cfg) for k, p in irs.items() for h, cfg in (("f32", FP32),
                                                                                           ("default", DEFAULT))},
                               np.ascontiguousarray(xte[:1]))
        print(f"\n{name}\n")
        print("| IR | acc % (f32) | acc % (default) | agree % (f32) | act. FQ | INT8 layers | "
              "b1 ms f32 | b1 ms default | b32 img/s f32 | b32 img/s default |\n" + "|---" * 10 + "|")
        rows = {}
        for k, path in irs.items():
            model = core.read_model(path)
            outs = {h: common.outputs(core.compile_model(model, "CPU", cfg), xte, 500)
                    for h, cfg in (("f32", FP32), ("default", DEFAULT))}
            layers = int8_layers(core.compile_model(model, "CPU"))
            s = {h: speeds[f"{k}|{h}"] for h in ("f32", "default")}
            rows[k] = dict(acc={h: float((o.argmax(1) == yte).mean()) for h, o in outs.items()},
                           agree=float((outs["f32"].argmax(1) == ref.argmax(1)).mean()),
                           fq=_activation_quantizers(model), int8=layers, speed=s)
            r = rows[k]
            print(f"| {k} | {100 * r['acc']['f32']:.2f} | {100 * r['acc']['default']:.2f} | {100 * r['agree']:.2f} | "
                  f"{r['fq']} | {layers['int8']}/{layers['total']} | {s['f32']['b1_ms']:.3f} | "
                  f"{s['default']['b1_ms']:.3f} | {s['f32']['b32_ips']:.0f} | {s['default']['b32_ips']:.0f} |")
        if len(tags) == 2:
            a, b = tags
            for route in ("PTQ", "QAT"):
                ratio = {f"{h} {bs}": rows[f"{route} {b}"]["speed"][h][m] / rows[f"{route} {a}"]["speed"][h][m]
                         for h in ("f32", "default") for bs, m in (("b1 ms", "b1_ms"), ("b32 img/s", "b32_ips"))}
                print(f"\n{route} {b} / {a}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items()))
        with open(os.path.join(work, f"measure_{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("train", "int8", "measure"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--tag", default="branch")
    ap.add_argument("--tags", default="main,branch")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.stage == "train":
        train(args.work)
    elif args.stage == "int8":
        int8(args.work, args.tag)
    else:
        measure(args.work, args.tags.split(","), args.models.split(","))


if __name__ == "__main__":
    main()

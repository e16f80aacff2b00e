"""Trace time of QAT models: the first `fit` step and `model.export`, float vs QAT, and QAT with another tfcompress.

    python benchmarks/qat_trace.py [--before DIR] [--rounds 2] [MODEL:PX ...]     (default NASNetMobile:32 ResNet50:32)
    python benchmarks/qat_trace.py --chain [--before DIR] [--rounds 2]            (light: seconds per run)

Each measurement runs in a fresh Python (nothing cached between them), the variants interleaved round by round:
the float model, its QAT model with this tree's tfcompress and, with ``--before DIR`` (a tree holding another
tfcompress, e.g. ``git archive COMMIT tfcompress | tar -x -C DIR``), with that one. ``trace`` is the first
``fit`` call on one batch minus a second one (the train function's trace and first run, where TensorFlow
optimises the new graph); ``export`` is ``model.export``. Models have random weights and BatchNorm statistics
of 16 CIFAR-10 images. Also prints the ops each quantizer adds to a graph (a chain of ActivationQuantizer +
QuantDense against Dense), per tree.

``--chain`` times only Python graph construction, on a chain of 60 Conv2D + BatchNormalization + ReLU blocks
at 8x8 and its ``quantize_model`` copy: ``tf.function`` tracing of the inference call and of a training step
(forward, gradient, SGD update), without running them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _measure(name: str, px: int, kind: str) -> dict:
    """In this process: the model, its trace and export times."""
    import shutil
    import tempfile
    import warnings

    import keras
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import SHARED_DATA, batchnorm_statistics_of
    from test_export_applications import _application, _images

    import tfcompress
    from tfcompress.quantization import RangeInit, quantize_model

    images = _images(16, px)
    labels = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["y_test"][:16].reshape(-1)
    model = _application(name, px)
    batchnorm_statistics_of(model, images)
    if kind == "qat":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = quantize_model(model)
    model.compile(keras.optimizers.SGD(1e-5), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [RangeInit(1)] if kind == "qat" else []
    t0 = time.perf_counter()
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    t1 = time.perf_counter()
    model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    t2 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="qat-trace-")
    model.export(os.path.join(work, "sm"), verbose=False)
    t3 = time.perf_counter()
    shutil.rmtree(work)
    return {"trace": (t1 - t0) - (t2 - t1), "export": t3 - t2, "layers": len(model.layers),
            "tfcompress": os.path.dirname(tfcompress.__file__)}


def _measure_chain(kind: str, blocks: int = 60) -> dict:
    """In this process: trace times of a Conv2D chain (float or QAT), without running the graphs."""
    import warnings

    import keras
    import numpy as np
    import tensorflow as tf

    import tfcompress
    from tfcompress.quantization import quantize_model

    inp = keras.Input((8, 8, 16))
    x = inp
    for _ in range(blocks):
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, padding="same")(x)))
    model = keras.Model(inp, x)
    if kind == "qat":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = quantize_model(model)
    xs = tf.constant(np.ones((2, 8, 8, 16), "float32"))
    train = _train_step(model)
    t0 = time.perf_counter()
    tf.function(lambda t: model(t, training=False)).get_concrete_function(xs)
    t1 = time.perf_counter()
    train.get_concrete_function(xs)
    t2 = time.perf_counter()
    return {"trace": t2 - t1, "export": t1 - t0, "layers": len(model.layers),
            "tfcompress": os.path.dirname(tfcompress.__file__)}


def _train_step(model):
    """A ``tf.function`` training step of ``model`` (SGD on the mean squared output), not yet traced."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.SGD(1e-3)
    opt.build(model.trainable_variables)

    @tf.function
    def train(t):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(t, training=True) ** 2)
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return train


def _ops_per_quantizer() -> dict:
    """Ops that an ActivationQuantizer + QuantDense add over a Dense, inference and training graphs."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfcompress.quantization import ActivationQuantizer, QuantDense

    def counts(n: int, quantized: bool, **options) -> tuple[int, int]:
        inp = keras.Input((16,))
        x = inp
        for _ in range(n):
            x = ActivationQuantizer(**options)(x) if quantized else x
            x = (QuantDense if quantized else keras.layers.Dense)(16)(x)
        model = keras.Model(inp, x)
        xs = tf.constant(np.ones((2, 16), "float32"))
        inference = tf.function(lambda t: model(t, training=False)).get_concrete_function(xs).graph
        training = _train_step(model).get_concrete_function(xs).graph
        return len(inference.get_operations()), len(training.get_operations())

    out = {}
    for label, options in (("symmetric ema", {}), ("asymmetric ema", {"symmetric": False}),
                           ("symmetric learned", {"range_mode": "learned"})):
        q2, q1 = counts(2, True, **options), counts(1, True, **options)
        f2, f1 = counts(2, False), counts(1, False)
        out[label] = [(q2[i] - q1[i]) - (f2[i] - f1[i]) for i in range(2)]
    return out


def _child(tree: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], env=env,
                          capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["NASNetMobile:32", "ResNet50:32"])
    ap.add_argument("--before", help="a tree with another tfcompress, measured side by side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chain", action="store_true", help="time the tracing of a Conv2D chain only")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.child[0] == "ops":
            result = _ops_per_quantizer()
        elif args.child[0] == "chain":
            result = _measure_chain(args.child[1])
        else:
            result = _measure(args.child[0], int(args.child[1]), args.child[2])
        print(json.dumps(result))
        return
    sys.path.insert(0, HERE)
    import common

    print(f"machine: {common.machine()}\n")
    trees = {"after": ROOT} | ({"before": os.path.abspath(args.before)} if args.before else {})
    for tag, tree in trees.items():
        ops = _child(tree, ["ops"])
        print(f"ops added by ActivationQuantizer + QuantDense over Dense ({tag}, {tree}): "
              + ", ".join(f"{k}: inference {v[0]}, training {v[1]}" for k, v in ops.items()), flush=True)
    variants = [("float", ROOT, "float")] + [(f"qat {tag}", tree, "qat") for tag, tree in trees.items()]
    results: dict = {}
    models = ["chain:60"] if args.chain else args.models
    for r in range(args.rounds):
        for spec in models:
            name, px = spec.split(":")
            for label, tree, kind in variants:
                res = _child(tree, ["chain", kind] if args.chain else [name, px, kind])
                results.setdefault((spec, label), []).append(res)
                print(f"round {r + 1} {spec} {label}: trace {res['trace']:.1f} s, export {res['export']:.1f} s, "
                      f"{res['layers']} layers ({res['tfcompress']})", flush=True)
    columns = ("training step trace s", "inference trace s") if args.chain else ("fit first step (trace) s",
                                                                               "model.export s")
    print(f"\n| model | variant | {columns[0]} | {columns[1]} | layers |\n|---|---|---|---|---|")
    for (spec, label), rs in results.items():
        trace = " / ".join(f"{r['trace']:.1f}" for r in rs)
        export = " / ".join(f"{r['export']:.1f}" for r in rs)
        print(f"| {spec} | {label} | {trace} | {export} | {rs[0]['layers']} |")


if __name__ == "__main__":
    main()

"""Held-out accuracy vs training accuracy of a short pruning fine-tune: where a gap between them comes from.

    python benchmarks/pruning_bn_statistics.py recipe                       # the README recipe, 2 epochs
    python benchmarks/pruning_bn_statistics.py ce loss=ce                   # the same without distillation
    python benchmarks/pruning_bn_statistics.py l1 crit=l1                   # one factor changed at a time:
    python benchmarks/pruning_bn_statistics.py uniform alloc=uniform        #   loss, T, crit, comp, alloc, cap,
    python benchmarks/pruning_bn_statistics.py l1_nocomp crit=l1 comp=0 avg=0   #   avg, epochs

The MLPerf Tiny ResNet-8 (softmax outputs) fine-tuned on 8,000 of the 10,000 CIFAR-10 test JPEGs (shuffled with
seed 0; the other 2,000 held out), Adam 1e-4, batch 64, 2 epochs, with ``FilterPruning(flops_target=0.4,
flops_allocation="global_per_flop", max_group_level=0.95, criterion="emitted", compensation_data=512 training
images, pruning_epochs=1, prune_downsample_convs=True)`` and ``DistillationLoss(alpha=0.5, temperature=4.0,
from_logits=False)`` on ``with_teacher`` batches (the unpruned model teaches); ``comp=0`` passes no
compensation_data (the BatchNorm statistics then come from the training batches, ``average_batchnorm``, which
``avg=0`` turns off). Printed (one JSON line, also appended to ``--out``): the epochs' logs, the stripped model's
held-out accuracy, its accuracy on 2,000 training images in inference mode (overfitting?), on the held-out images
with BatchNorms on batch statistics (256 per batch: what training sees), and after its BatchNorms' moving
statistics are measured again on 2,000 training images layer by layer (stale statistics?).
"""

from __future__ import annotations

import json
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import tfcompress
from tfcompress.pruning import DistillationAccuracy, DistillationLoss, FilterPruning, with_teacher

DATA = "/work/shared/data/"
DEFAULTS = dict(loss="distill", T=4.0, alpha=0.5, alloc="global_per_flop", cap=0.95, crit="emitted", comp=1, avg=1,
                epochs=2, target=0.4, seed=0, out="pruning_bn_statistics.jsonl")


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, training: bool = False) -> float:
    """Top-1 accuracy, 256 images per call; ``training=True`` normalises with each batch's statistics."""
    out = np.concatenate([np.asarray(model(x[i:i + 256], training=training)) for i in range(0, len(x), 256)])
    return float((out.argmax(-1) == y.reshape(-1)).mean())


def _reestimate_layer_by_layer(model: keras.Model, x: np.ndarray) -> None:
    """Moving statistics of every BatchNorm set to its input's mean and variance on ``x`` in inference mode, in
    order, so that each one sees the ones before it re-estimated."""
    for bn in [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]:
        f = keras.Model(model.inputs, bn.input)
        z = np.concatenate([np.asarray(f(x[i:i + 250], training=False)) for i in range(0, len(x), 250)])
        z = z.reshape(-1, z.shape[-1])
        bn.moving_mean.assign(z.mean(0))
        bn.moving_variance.assign(z.var(0))


def main(name: str, options: dict) -> dict:
    o = dict(DEFAULTS)
    for k, v in options.items():
        o[k] = type(DEFAULTS[k])(v)
    d = np.load(DATA + "cifar10/cifar10_jpeg_q75_test.npz")
    x, y = d["x_test"].astype("float32"), d["y_test"].astype("int64")
    p = np.random.default_rng(0).permutation(len(x))
    x, y = x[p], y[p]
    xtr, ytr, xva, yva = x[:8000], y[:8000], x[8000:], y[8000:]
    keras.utils.set_random_seed(o["seed"])
    model = keras.models.load_model(DATA + "models/mlperf_tiny/pretrainedResnet.h5", compile=False)
    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    train_ds = tf.data.Dataset.from_tensor_slices((xtr, ytr)).shuffle(8000, seed=o["seed"]).batch(64)
    val_ds = tf.data.Dataset.from_tensor_slices((xva, yva)).batch(256)
    kw = dict(flops_target=o["target"], flops_allocation=o["alloc"], criterion=o["crit"], pruning_epochs=1,
              prune_downsample_convs=True, average_batchnorm=bool(o["avg"]))
    if o["alloc"] == "sensitivity":
        kw["sensitivity_data"] = (xva, yva) if o["loss"] == "ce" else with_teacher(val_ds, teacher)
    else:
        kw["max_group_level"] = o["cap"]
    if o["comp"]:
        kw["compensation_data"] = xtr[:512]
    if o["loss"] == "distill":
        model.compile(keras.optimizers.Adam(1e-4), DistillationLoss(o["alpha"], o["T"], from_logits=False),
                      metrics=[DistillationAccuracy()])
        train, val = with_teacher(train_ds, teacher), with_teacher(val_ds, teacher)
    else:
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
        train, val = train_ds, val_ds
    t = time.time()
    h = model.fit(train, validation_data=val, epochs=o["epochs"], callbacks=[FilterPruning(**kw)], verbose=2)
    fit_s = time.time() - t
    small = tfcompress.strip(model)
    small.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    r = dict(name=name, options=o, fit_s=round(fit_s, 1),
             history={k: [round(float(v), 4) for v in vs] for k, vs in h.history.items()},
             stripped_val=round(small.evaluate(xva, yva, verbose=0)[1], 4),
             train_inference=round(_accuracy(small, xtr[:2000], ytr[:2000]), 4),
             val_batch_statistics=round(_accuracy(small, xva, yva, training=True), 4),
             params=small.count_params())
    _reestimate_layer_by_layer(small, xtr[:2000])
    r["val_bn_reestimated"] = round(small.evaluate(xva, yva, verbose=0)[1], 4)
    print("RESULT", json.dumps(r))
    with open(o["out"], "a") as fh:
        fh.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    main(sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:]))

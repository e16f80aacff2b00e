"""Module file for the TFX example: the Trainer's ``run_fn`` (with FilterPruning) and CompressModel's
``preprocessing_fn``.

The data are scikit-learn's 8x8 digits written as CSV (``p00`` ... ``p63``, ``label``); CsvExampleGen turns
each column into an int64 feature.
"""

from __future__ import annotations

import glob

import keras
import numpy as np
import tensorflow as tf

import tfcompress

PIXELS = [f"p{i:02d}" for i in range(64)]
LABEL = "label"
L = keras.layers


def preprocessing_fn(features: dict) -> np.ndarray:
    """Parsed examples -> model input (n, 8, 8, 1) in [0, 1]: what CompressModel calibrates with."""
    x = np.concatenate([np.asarray(features[p], np.float32).reshape(-1, 1) for p in PIXELS], axis=1)
    return (x / 16.0).reshape(-1, 8, 8, 1)


def build_model() -> keras.Model:
    """A small residual CNN on 8x8 images."""
    inp = keras.Input((8, 8, 1), name="image")
    x = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 3, padding="same", use_bias=False)(inp)))
    y = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 3, padding="same", use_bias=False)(x)))
    y = L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 3, padding="same", use_bias=False)(y))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x))


def _dataset(file_patterns, batch: int, repeat: bool) -> tf.data.Dataset:
    files = sorted(f for p in file_patterns for f in glob.glob(p))
    spec = {k: tf.io.FixedLenFeature([1], tf.int64) for k in PIXELS + [LABEL]}

    def parse(records):
        f = tf.io.parse_example(records, spec)
        x = tf.concat([tf.cast(f[p], tf.float32) for p in PIXELS], axis=1) / 16.0
        return tf.reshape(x, (-1, 8, 8, 1)), f[LABEL][:, 0]

    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    ds = ds.shuffle(2048, seed=0).repeat() if repeat else ds
    return ds.batch(batch).map(parse)


def train(model: keras.Model, train_ds, eval_ds, epochs: int, steps: int, target: float,
          eval_steps: int) -> keras.Model:
    """``model.fit`` with FilterPruning: the one change a training script needs."""
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    pruner = tfcompress.pruning.FilterPruning(target=target, pruning_epochs=max(1, epochs - 1),
                                              prune_first_conv=True)
    model.fit(train_ds, shuffle=False, epochs=epochs, steps_per_epoch=steps, validation_data=eval_ds.repeat(),
              validation_steps=eval_steps, callbacks=[pruner], verbose=2)
    return model


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (GenericExecutor): train with pruning, save the serving SavedModel."""
    epochs = int((fn_args.custom_config or {}).get("epochs", 4))
    target = float((fn_args.custom_config or {}).get("target", 0.5))
    steps = max(1, fn_args.train_steps // epochs)
    keras.utils.set_random_seed(int((fn_args.custom_config or {}).get("seed", 0)))  # a reproducible run
    model = train(build_model(), _dataset(fn_args.train_files, 32, repeat=True),
                  _dataset(fn_args.eval_files, 256, repeat=False), epochs, steps, target, fn_args.eval_steps)
    model.export(fn_args.serving_model_dir, verbose=False)  # serving_default takes the image tensor

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


FEATURES = {k: tf.io.FixedLenFeature([1], tf.int64) for k in PIXELS + [LABEL]}


def features_to_image(features: dict) -> tf.Tensor:
    """Parsed example features -> the network's ``image`` input (n, 8, 8, 1) in [0, 1]."""
    x = tf.concat([tf.cast(tf.reshape(features[p], (-1, 1)), tf.float32) for p in PIXELS], axis=1) / 16.0
    return tf.reshape(x, (-1, 8, 8, 1))


def parse_examples(serialized: tf.Tensor) -> tf.Tensor:
    """Serialized ``tf.train.Example`` records -> ``image``: what the serving signature parses."""
    return features_to_image(tf.io.parse_example(serialized, {p: FEATURES[p] for p in PIXELS}))


def preprocessing_fn(features: dict) -> np.ndarray:
    """Parsed examples (numpy) -> model input: what CompressModel calibrates with."""
    return features_to_image(features).numpy()


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

    def parse(records):
        f = tf.io.parse_example(records, FEATURES)
        return features_to_image(f), f[LABEL][:, 0]

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
    export(model, fn_args.serving_model_dir)


def export(model: keras.Model, path: str) -> None:
    """Save the serving SavedModel with the usual TFX signatures.

    ``serving_default`` takes serialized ``tf.train.Example`` records (what TFMA's Evaluator and TF Serving's
    Predict on examples feed); ``serving_image`` is the network alone (the ``image`` tensor), the signature
    CompressModel compresses; ``parse_examples`` is the parsing alone, which CompressModel puts back in front
    of the compressed network.
    """
    examples = tf.TensorSpec([None], tf.string, name="examples")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", lambda examples: model(parse_examples(examples), training=False),
                         input_signature=[examples])
    archive.add_endpoint("serving_image", lambda image: model(image, training=False),
                         input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")])
    archive.add_endpoint("parse_examples", lambda examples: {"image": parse_examples(examples)},
                         input_signature=[examples])
    archive.write_out(path, verbose=False)

"""What the callbacks put into Keras ``logs`` reaches a TensorBoard callback's event files."""

import glob

import keras
import numpy as np
import tensorflow as tf
from keras import layers as L

import tfcompress
from tfcompress.pruning import FilterPruning
from tfcompress.quantization import RangeInit


def _small_cnn() -> keras.Model:
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="mid")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4)(x))


def _scalars(logdir) -> dict[str, list[float]]:
    """Every scalar the TensorBoard callback wrote under ``logdir`` (train run), tag -> values by step."""
    scalars: dict[str, list[float]] = {}
    for path in sorted(glob.glob(f"{logdir}/train/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars


def test_pruning_level_and_flops_ratio_reach_tensorboard(tmp_path, rng):
    x = rng.random((64, 8, 8, 3), dtype=np.float32)
    y = rng.integers(0, 4, 64)
    model = _small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruner = FilterPruning(target=0.5, schedule="polynomial", pruning_epochs=2)
    model.fit(x, y, epochs=3, batch_size=32, verbose=0,
              callbacks=[pruner, keras.callbacks.TensorBoard(str(tmp_path))])
    scalars = _scalars(tmp_path)
    assert len(scalars["epoch_pruning_level"]) == 3
    assert scalars["epoch_pruning_level"][-1] == 0.5
    assert scalars["epoch_pruning_level"][0] < 0.5
    ratios = scalars["epoch_flops_ratio"]
    assert 0 < ratios[-1] < ratios[0] <= 1
    assert np.isclose(ratios[-1], pruner.flops_ratio)


def test_quantizer_ranges_reach_tensorboard(tmp_path, rng):
    x = rng.random((64, 8, 8, 3), dtype=np.float32)
    y = rng.integers(0, 4, 64)
    model = tfcompress.quantization.quantize_model(_small_cnn())
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0,
              callbacks=[RangeInit(2, log_ranges=True), keras.callbacks.TensorBoard(str(tmp_path))])
    tags = set(_scalars(tmp_path))
    assert any(t.startswith("epoch_") and t.endswith("_max") for t in tags), tags

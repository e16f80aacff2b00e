"""Video models: a per-frame CNN in ``TimeDistributed`` wrappers, then a recurrent layer or pooling over time.

The wrapped layers are pruned, stripped (Keras model and SavedModel) and quantized as the same layers without
the wrapper would be; every frame runs the wrapped layer, so the SavedModel holds one copy of it per frame.
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

import tfcompress
from tfcompress import calibration
from tfcompress.export.checks import mean_rel_error
from tfcompress.pruning import FilterPruning
from tfcompress.quantization import RangeInit, quantize_model
from conftest import assert_int8_where_the_cpu_can, rel_error

FRAMES, PX = 8, 12
TD = L.TimeDistributed
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def video_net(temporal: str) -> keras.Model:
    """Per frame: conv, BN, ReLU, max pool, conv, global pool, dense; then ``temporal`` over the frames."""
    x = keras.Input((FRAMES, PX, PX, 3), name="frames")
    h = TD(L.Conv2D(8, 3, padding="same", name="c1"), name="td_c1")(x)
    h = TD(L.BatchNormalization(name="bn"), name="td_bn")(h)
    h = TD(L.ReLU(), name="td_relu")(h)
    h = TD(L.MaxPooling2D(), name="td_pool")(h)
    h = TD(L.Conv2D(12, 3, activation="relu", name="c2"), name="td_c2")(h)
    h = TD(L.GlobalAveragePooling2D(), name="td_gap")(h)
    h = TD(L.Dense(10, activation="relu", name="fc"), name="td_fc")(h)
    h = {"lstm": L.LSTM(6), "gru": L.GRU(6), "pool": L.GlobalAveragePooling1D()}[temporal](h)
    return keras.Model(x, L.Dense(4, name="logits")(h))


def clips(rng, n: int = 48):
    return rng.uniform(0, 1, (n, FRAMES, PX, PX, 3)).astype(np.float32), rng.integers(0, 4, n)


def _filters(model: keras.Model, name: str) -> int:
    inner = model.get_layer(name).layer
    return int(getattr(inner, "filters", None) or inner.units)


WRAPPED = ["td_c1", "td_c2", "td_fc"]


@pytest.mark.parametrize("temporal", ["lstm", "gru", "pool"])
def test_pruning_goes_through_time_distributed_and_strip_removes_the_channels(temporal, rng, tmp_path):
    x, y = clips(rng)
    model = video_net(temporal)
    assert [g.layers for g in tfcompress.channel_groups(model)] == [(n,) for n in WRAPPED]
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    pruner = FilterPruning(target=0.5, criterion="l1", pruning_epochs=1, prune_first_conv=True)
    model.fit(x, y, epochs=2, batch_size=16, callbacks=[pruner], verbose=0)

    # the wrapped layers' weights producing a pruned channel are zero (kernel columns, bias, BN gamma and beta)
    for g in pruner.groups:
        pruned = ~pruner.masks[g.layers]
        assert pruned.sum() == g.size // 2
        inner = model.get_layer(g.layers[0]).layer
        assert not np.any(inner.kernel.numpy()[..., pruned]) and not np.any(inner.bias.numpy()[pruned])
    bn = model.get_layer("td_bn").layer
    c1_pruned = ~pruner.masks[("td_c1",)]
    assert not np.any(bn.gamma.numpy()[c1_pruned]) and not np.any(bn.beta.numpy()[c1_pruned])

    small = tfcompress.strip(model)
    assert [_filters(small, n) for n in WRAPPED] == [4, 6, 5]
    assert small.get_layer("td_bn").layer.gamma.shape == (4,)
    assert small.count_params() < model.count_params()
    assert tfcompress.count_flops(small) < tfcompress.count_flops(model)
    assert rel_error(small.predict(x, verbose=0), model.predict(x, verbose=0)) < 1e-4

    small.save(tmp_path / "small.keras")
    loaded = keras.models.load_model(tmp_path / "small.keras")
    assert isinstance(loaded.get_layer("td_c2"), L.TimeDistributed)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), small.predict(x, verbose=0))


def test_flops_count_the_wrapped_layers_once_per_frame():
    per_frame = keras.Sequential([
        keras.Input((PX, PX, 3)), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
        L.MaxPooling2D(), L.Conv2D(12, 3, activation="relu"), L.GlobalAveragePooling2D(),
        L.Dense(10, activation="relu")])
    over_time = keras.Sequential([keras.Input((FRAMES, 10)), L.GlobalAveragePooling1D(), L.Dense(4)])
    expected = FRAMES * tfcompress.count_flops(per_frame) + tfcompress.count_flops(over_time)
    assert tfcompress.count_flops(video_net("pool")) == expected


@pytest.mark.parametrize("inner", [
    lambda: L.DepthwiseConv2D(3, padding="same"),
    lambda: L.SeparableConv2D(6, 3, padding="same"),
    lambda: L.Flatten(),
])
def test_the_wrapped_layer_decides_how_channels_pass(inner, rng):
    """A depthwise, separable or flattening wrapped layer reads the channels as it would without the wrapper."""
    x = keras.Input((4, 6, 6, 3))
    h = TD(L.Conv2D(8, 3, padding="same", name="c"), name="td_c")(x)
    h = TD(inner(), name="td_inner")(h)
    h = TD(L.GlobalAveragePooling2D())(h) if len(h.shape) == 5 else h
    model = keras.Model(x, L.Dense(3)(L.GlobalAveragePooling1D()(TD(L.Dense(5, name="d"), name="td_d")(h))))
    groups = {g.layers[0]: g for g in tfcompress.channel_groups(model)}
    assert "td_c" in groups
    tfcompress.zero_channels(model, groups["td_c"], [1, 4, 6])
    small = tfcompress.strip(model)
    assert small.get_layer("td_c").layer.filters == 5
    data = rng.normal(size=(2, 4, 6, 6, 3)).astype(np.float32)
    assert rel_error(small.predict(data, verbose=0), model.predict(data, verbose=0)) < 1e-4


@pytest.mark.parametrize("temporal", ["pool", "lstm"])
def test_savedmodel_stripper_removes_the_channels_keras_strip_removes(temporal, rng, tmp_path):
    """``python -m tfcompress.export`` on the exported pruned model: the frames' copies of each wrapped
    convolution lose the channels ``strip`` removes; the SavedModel's recurrent loop keeps what reaches it."""
    model = video_net(temporal)
    # trained-like weights: no bias or BatchNormalization vector uniform (equal uniform constants of different
    # layers count apart, so the frames' copies of an untrained zero bias would count once per frame)
    model.set_weights([np.abs(rng.normal(size=w.shape)).astype(np.float32) + 0.5 for w in model.get_weights()])
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, [0, 3, 4])
    small = tfcompress.strip(model)
    model.export(str(tmp_path / "sm"), verbose=False)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={tmp_path / 'sm'}",
                           f"--output_dir={tmp_path / 'out'}", "--int8=none"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    convs = {}
    for row in report["layers"]:
        for name in WRAPPED:
            if f"/{name}" in row["name"]:
                convs.setdefault(name, []).append(row["channels_after"])
    assert {n: len(c) for n, c in convs.items()} == {n: FRAMES for n in WRAPPED}  # one copy per frame
    kept_by_loop = {"td_fc"} if temporal == "lstm" else set()
    for name, after in convs.items():
        expected = _filters(model, name) if name in kept_by_loop else _filters(small, name)
        assert after == [expected] * FRAMES, (name, after)
    # each weight counted once, not once per frame: at most the Keras models' parameters (fewer: the
    # SavedModel folds BatchNormalization and the bias before it into two vectors)
    params = report["params"]
    assert params["after"] < params["before"] <= model.count_params()
    assert params["after"] <= small.count_params() or kept_by_loop


def test_qat_quantizes_the_wrapped_layers_and_the_ir_runs_them_int8(rng, tmp_path):
    x, y = clips(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer with weights left float
        q = quantize_model(video_net("pool"))
    assert all(type(q.get_layer(n).layer).__name__.startswith("Quant") for n in WRAPPED)
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, epochs=1, batch_size=16, callbacks=[RangeInit(2)], verbose=0)
    q.save(tmp_path / "q.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "q.keras").predict(x[:8], verbose=0),
                                  q.predict(x[:8], verbose=0))

    q.export(str(tmp_path / "sm"), verbose=False)
    np.save(tmp_path / "val.npy", x[:16])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={tmp_path / 'sm'}",
                           f"--output_dir={tmp_path / 'out'}", f"--validation_data={tmp_path / 'val.npy'}"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fp32 = ov.Core().read_model(str(tmp_path / "out" / "model_fp32.xml"))
    # every frame's convolutions and dense layer, and the classifier
    assert_int8_where_the_cpu_can(ov.Core().compile_model(fp32, "CPU"), total=3 * FRAMES + 1)
    # the IR's quantizers in exact arithmetic follow the Keras QAT model within the export's limits
    exact = ov.Core().compile_model(calibration.exact_arithmetic(fp32), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got, ref = exact({0: x[:16]})[exact.outputs[0]], q.predict(x[:16], verbose=0)
    limits = report["quantized_check"]
    assert rel_error(got, ref) <= limits["tolerance"]
    assert mean_rel_error(got, ref) <= limits["mean_tolerance"]

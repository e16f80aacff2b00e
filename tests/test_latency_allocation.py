"""Latency-aware allocation: a measured OpenVINO profile per Keras layer, and FilterPruning spending its FLOPs
budget where that profile says time goes."""

import keras
import numpy as np
import pytest
from keras import layers as L

from tfcompress.pruning import FilterPruning
from tfcompress.graph.flops import FlopsCounter
from tfcompress.pruning.latency import channel_seconds, measure_latency_profile
from tfcompress.graph import build_graph


def _mobile_block_model():
    """Conv+BN+ReLU6, a depthwise convolution, a 1x1 projection with a residual add, a separable convolution,
    a nested model, a Dense."""
    inp = keras.Input((24, 24, 3))
    x = L.ReLU(6.0)(L.BatchNormalization(name="bn0")(L.Conv2D(16, 3, padding="same", name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization(name="bn1")(L.Conv2D(48, 1, name="expand")(x)))
    y = L.ReLU(6.0)(L.DepthwiseConv2D(3, padding="same", name="dw")(y))
    x = L.Add()([x, L.Conv2D(16, 1, name="project")(y)])
    x = L.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    inner = keras.Sequential([keras.Input((24, 24, 16)), L.Conv2D(24, 3, strides=2, name="inner_conv")],
                             name="sub")
    x = L.GlobalAveragePooling2D()(inner(x))
    return keras.Model(inp, L.Dense(10, name="head")(x))


def _two_branch_model():
    """c0 feeds branches a and b of the same shape (equal FLOPs per channel); the k-th filter of a is as
    important as the k-th of b (norms 1 .. 2 in both)."""
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", name="c0")(inp)
    a = L.Conv2D(16, 3, padding="same", name="a")(x)
    b = L.Conv2D(16, 3, padding="same", name="b")(x)
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(L.Concatenate()([a, b]))))
    for layer in model.layers:
        if isinstance(layer, L.Conv2D):
            n = layer.kernel.shape[-1]
            layer.kernel.assign(np.ones(layer.kernel.shape, "float32") * np.linspace(1.0, 2.0, n, dtype="float32"))
    model.compile(keras.optimizers.SGD(0.0), "mse")  # the weights (and so the importances) stay as set
    return model


def _removed(model, **kwargs) -> dict[str, int]:
    pruner = FilterPruning(flops_target=0.3, pruning_epochs=1, criterion="l1", **kwargs)
    x, y = np.ones((4, 16, 16, 3), "float32"), np.zeros((4, 10), "float32")
    ratio = model.fit(x, y, epochs=1, callbacks=[pruner], verbose=0).history["flops_ratio"][-1]
    assert ratio <= 0.7 + 1e-9  # the FLOPs budget is met whatever ranks the channels
    return {g.layers[0]: int((~pruner.masks[g.layers]).sum()) for g in pruner.groups}


def test_the_profile_maps_every_convolution_and_dense_layer():
    """Every layer with a kernel (also inside a nested model, named 'outer/inner') gets a measured time > 0,
    with BatchNormalization and activations fused into their convolutions; batch 64 takes longer than batch 1
    (64 times the arithmetic, so one slow iteration under load cannot reverse the order)."""
    model = _mobile_block_model()
    p1 = measure_latency_profile(model, batch_size=1, iterations=5)
    assert set(p1) == {"stem", "expand", "dw", "project", "sep", "sub/inner_conv", "head"}
    assert all(s > 0 for s in p1.values()), p1
    p64 = measure_latency_profile(model, batch_size=64, iterations=5)
    assert sum(p64.values()) > sum(p1.values())


def test_the_int8_profile_maps_every_layer_of_the_calibrated_model(monkeypatch):
    """With calibration_data the profiled model is the one calibrate quantizes (every convolution and the Dense
    run INT8), compiled at the device's default precision; every layer is still found."""
    import tfcompress.calibration

    quantized = []
    real = tfcompress.calibration.calibrate

    def spy(*args, **kwargs):
        quantized.append(real(*args, **kwargs))
        return quantized[-1]

    monkeypatch.setattr(tfcompress.calibration, "calibrate", spy)
    model = _mobile_block_model()
    x = np.random.default_rng(0).standard_normal((8, 24, 24, 3)).astype("float32")
    p = measure_latency_profile(model, batch_size=2, iterations=3, precision=None, calibration_data=x)
    assert set(p) == {"stem", "expand", "dw", "project", "sep", "sub/inner_conv", "head"}
    assert all(s > 0 for s in p.values()), p
    assert len(quantized) == 1
    import openvino as ov

    counts = tfcompress.calibration.int8_layers(ov.Core().compile_model(quantized[0], "CPU"))
    assert counts == {"int8": 8, "total": 8}  # the separable convolution is two layers


def test_latency_allocation_prunes_where_the_profile_says_time_goes():
    """a and b cost the same FLOPs per channel and their filters are equally important, so global_per_flop
    splits the cut between them; a profile where one branch is slow moves the cut to that branch."""
    flop = _removed(_two_branch_model(), flops_allocation="global_per_flop")
    assert abs(flop["a"] - flop["b"]) <= 1, flop
    slow_a = _removed(_two_branch_model(), flops_allocation="global_per_latency",
                      latency_profile={"c0": 1e-5, "a": 1e-3, "b": 1e-5, "head": 1e-6})
    slow_b = _removed(_two_branch_model(), flops_allocation="global_per_latency",
                      latency_profile={"c0": 1e-5, "a": 1e-5, "b": 1e-3, "head": 1e-6})
    assert slow_a["a"] > flop["a"] and slow_a["b"] < flop["b"], (flop, slow_a)
    assert slow_b["b"] > flop["b"] and slow_b["a"] < flop["a"], (flop, slow_b)


def test_a_layer_called_twice_charges_its_measured_seconds_once():
    """A shared layer is one profiled name but one op per call: its seconds are spread over the MACs of all its
    calls, not charged in full to each. One channel of the group (a, b) carries 1/8 of a's, b's and both of
    shared's calls' MACs: (1 + 1 + 5) / 8 seconds (profile: seconds per layer, made up)."""
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(8, 3, strides=2, padding="same", name="b")(inp)
    shared = L.Conv2D(16, 3, padding="same", name="shared")
    pool = L.GlobalAveragePooling2D
    model = keras.Model(inp, L.Dense(4, name="head")(L.Concatenate()([pool()(shared(a)), pool()(shared(b))])))
    kg = build_graph(model)
    groups = {g.layers: g for g in kg.groups()}
    cost = channel_seconds(FlopsCounter(kg.graph), groups.values(), {"a": 1.0, "b": 1.0, "shared": 5.0, "head": 0.5})
    assert cost[groups[("b", "a")].id] == pytest.approx(7.0 / 8, rel=1e-9)
    # one of shared's 16 outputs: 1/16 of both calls, and 2 of head's 32 inputs
    assert cost[groups[("shared",)].id] == pytest.approx(5.0 / 16 + 0.5 / 16, rel=1e-9)


def test_channel_costs_follow_a_measured_profile():
    """With a real profile, a channel's cost is its layers' measured seconds per MAC times the MACs it takes:
    doubling one layer's time raises exactly the groups that layer's MACs depend on."""
    model = _mobile_block_model()
    profile = measure_latency_profile(model, iterations=5)
    kg = build_graph(model)
    groups = kg.groups()
    counter = FlopsCounter(kg.graph)
    base = channel_seconds(counter, groups, profile)
    assert all(s > 0 for s in base.values()), base
    slower = channel_seconds(counter, groups, {**profile, "dw": 2 * profile["dw"]})
    by_layer = {g.layers: g.id for g in groups}
    expand = by_layer[("expand",)]  # dw reads and writes the expand channels: only they pay dw's time
    assert slower[expand] > base[expand]
    assert all(slower[gid] == pytest.approx(base[gid], rel=1e-12) for gid in base if gid != expand)
    # the pruning run with that profile meets its FLOPs target
    pruner = FilterPruning(flops_target=0.3, pruning_epochs=1, flops_allocation="global_per_latency",
                           latency_profile=profile)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x, y = np.ones((4, 24, 24, 3), "float32"), np.zeros((4, 10), "float32")
    assert model.fit(x, y, epochs=1, callbacks=[pruner], verbose=0).history["flops_ratio"][-1] <= 0.7 + 1e-9


def test_config_round_trips_without_the_profile():
    profile = {"c0": 1e-5, "a": 1e-3}
    pruner = FilterPruning(flops_target=0.3, flops_allocation="global_per_latency", latency_profile=profile)
    config = pruner.get_config()
    assert "latency_profile" not in config and config["flops_allocation"] == "global_per_latency"
    again = FilterPruning.from_config(config, latency_profile=profile)
    assert again.get_config() == config and again.latency_profile == profile
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        FilterPruning(flops_target=0.3, flops_allocation="global_per_flop")))
    assert restored.get_config()["flops_allocation"] == "global_per_flop"


@pytest.mark.parametrize("kwargs, message", [
    (dict(flops_target=0.3, flops_allocation="global_per_latency"), "needs latency_profile"),
    (dict(flops_allocation="global_per_latency", latency_profile={"a": 1.0}), "set flops_target"),
    (dict(flops_target=0.3, latency_profile={"a": 1.0}), "only used with"),
    (dict(flops_target=0.3, flops_allocation="global_per_latency", latency_profile={"a": -1.0}), "'a'"),
    (dict(flops_target=0.3, flops_allocation="global_per_latency", latency_profile=[1.0]), "non-empty dict"),
])
def test_bad_latency_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FilterPruning(**kwargs)


def test_a_profile_for_another_model_is_refused():
    pruner = FilterPruning(flops_target=0.3, flops_allocation="global_per_latency",
                           latency_profile={"not_a_layer": 1e-3})
    model = _two_branch_model()
    with pytest.raises(ValueError, match="not_a_layer"):
        model.fit(np.ones((4, 16, 16, 3), "float32"), np.zeros((4, 10), "float32"), epochs=1,
                  callbacks=[pruner], verbose=0)


def _stack_model():
    """A stem the pruner leaves alone, then 64, 64 and 128 channels, the last at half the resolution: the
    first two layers cost most FLOPs per channel, so a per-FLOP allocation wants to cut them deepest."""
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="a")(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu", name="b")(x)
    x = L.Conv2D(128, 3, strides=2, padding="same", activation="relu", name="c")(x)
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


@pytest.mark.parametrize("round_to", [1, 16])
def test_max_group_level_keeps_part_of_every_group_and_the_budget_moves_elsewhere(round_to):
    """With the default cap (0.8) global_per_flop cuts one group to its cap; with max_group_level=0.5 every
    group keeps at least half of its channels (a multiple of round_to) and the FLOPs budget is still met, so
    the cut moves to groups the per-FLOP ranking spared."""
    def run(**kwargs):
        model = _stack_model()
        pruner = FilterPruning(flops_target=0.45, pruning_epochs=1, criterion="l1", round_to=round_to,
                               flops_allocation="global_per_flop", prune_downsample_convs=True, **kwargs)
        x, y = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype("float32"), np.zeros((4, 10))
        ratio = model.fit(x, y, epochs=1, callbacks=[pruner], verbose=0).history["flops_ratio"][-1]
        kept = {g.layers[0]: int(pruner.masks[g.layers].sum()) for g in pruner.groups}
        return ratio, kept

    ratio, deep = run()
    assert ratio <= 0.55 + 1e-9
    assert min(deep[n] / s for n, s in (("a", 64), ("b", 64))) < 0.5, deep  # the default cap lets one go deep
    ratio, capped = run(max_group_level=0.5)
    assert ratio <= 0.55 + 1e-9
    sizes = {"a": 64, "b": 64, "c": 128}
    assert all(capped[n] >= sizes[n] / 2 for n in sizes), capped
    assert all(capped[n] % round_to == 0 for n in sizes), capped
    deepest = min(sizes, key=lambda n: deep[n] / sizes[n])
    assert capped[deepest] > deep[deepest], (deep, capped)
    assert any(capped[n] < deep[n] for n in sizes if n != deepest), (deep, capped)  # the budget moved

"""measure_latency_profile on the models the rest of the pipeline takes: several inputs (image towers, a metadata
vector, a nested tower shared by two inputs), calibration samples in every form `calibrate` takes, inputs with
unknown dimensions; and latency-aware pruning of such a model through `model.fit`."""

import keras
import numpy as np
import pytest
from keras import layers as L

from tfcompress.pruning import FilterPruning
from tfcompress.pruning.latency import measure_latency_profile

TOWER_LAYERS = {"scene_tower/s1", "scene_tower/s2", "c1", "c2", "m1", "joint", "head"}


def _towers_model():
    """A scene image through a nested tower, a crop image of another size through its own convolutions, joined by
    keras.ops.add, concatenated with a metadata vector's Dense. Keras's input order (scene, meta, crop) is not
    the converted model's (sorted by name), and no two inputs have the same shape, so an input fed in the wrong
    place cannot run."""
    scene, meta, crop = keras.Input((20, 20, 3), name="scene"), keras.Input((6,), name="meta"), keras.Input(
        (12, 12, 3), name="crop")
    t_in = keras.Input((20, 20, 3))
    t = L.Conv2D(16, 3, padding="same", activation="relu", name="s2")(
        L.Conv2D(16, 3, padding="same", activation="relu", name="s1")(t_in))
    tower = keras.Model(t_in, L.GlobalAveragePooling2D()(t), name="scene_tower")
    c = L.Conv2D(16, 3, padding="same", activation="relu", name="c2")(
        L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(crop))
    images = keras.ops.add(tower(scene), L.GlobalAveragePooling2D()(c))
    m = L.Dense(8, activation="relu", name="m1")(meta)
    z = L.Dense(16, activation="relu", name="joint")(L.Concatenate()([images, m]))
    return keras.Model([scene, meta, crop], L.Dense(4, name="head")(z))


def _towers_data(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {"scene": rng.uniform(0, 1, (n, 20, 20, 3)).astype("float32"),
            "meta": (3 * rng.normal(size=(n, 6))).astype("float32"),
            "crop": rng.uniform(0, 1, (n, 12, 12, 3)).astype("float32")}


def _open_shapes_model():
    """An image of any size and a token sequence of any length (int32, through an Embedding)."""
    image, tokens = keras.Input((None, None, 3), name="image"), keras.Input((None,), dtype="int32", name="tokens")
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, name="conv")(image))
    e = L.GlobalAveragePooling1D()(L.Conv1D(8, 3, name="seq_conv")(L.Embedding(50, 8, name="emb")(tokens)))
    return keras.Model([image, tokens], L.Dense(3, name="head")(L.Concatenate()([x, e])))


@pytest.fixture
def no_export(monkeypatch):
    """Bad arguments must be refused before the model is exported."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was exported")

    monkeypatch.setattr(keras.Model, "export", refuse)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_multi_input_profile_times_every_layer_of_every_tower(batch_size):
    """Every convolution and Dense of both image towers (one nested), the metadata branch and the head gets a
    measured time > 0, with each input fed a batch of its own shape."""
    profile = measure_latency_profile(_towers_model(), batch_size=batch_size, iterations=3)
    assert set(profile) == TOWER_LAYERS
    assert all(s > 0 for s in profile.values()), profile


def test_calibration_samples_in_every_form_give_the_same_int8_layers():
    """A dict by input name, a tuple in Keras's input order, (x, y) pairs and a list of per-sample tuples are the
    same samples: each INT8 profile covers the same layers as the float one."""
    model = _towers_model()
    x = _towers_data(6)
    in_order = (x["scene"], x["meta"], x["crop"])
    forms = {"dict": x, "tuple": in_order, "(x, y)": (x, np.zeros((6, 4), "float32")),
             "samples": [tuple(a[i] for a in in_order) for i in range(6)]}
    profiles = {k: measure_latency_profile(model, batch_size=2, iterations=2, precision=None, calibration_data=v)
                for k, v in forms.items()}
    for form, profile in profiles.items():
        assert set(profile) == TOWER_LAYERS, form
        assert all(s > 0 for s in profile.values()), (form, profile)


def _fake_clock(monkeypatch, seconds_of):
    """OpenVINO's real conversion, compilation and runtime graph, with every profiled node reporting
    ``seconds_of(node)`` (a ``ProfilingInfo``) instead of its measured time."""
    import datetime
    import types

    import openvino as ov

    class Request:
        def __init__(self, request):
            self.request = request

        def infer(self, *args, **kwargs):
            return self.request.infer(*args, **kwargs)

        @property
        def profiling_info(self):
            return [types.SimpleNamespace(node_name=p.node_name, real_time=datetime.timedelta(seconds=seconds_of(p)))
                    for p in self.request.profiling_info]

    class Compiled:
        def __init__(self, compiled):
            self.compiled = compiled

        def get_runtime_model(self):
            return self.compiled.get_runtime_model()

        def create_infer_request(self):
            return Request(self.compiled.create_infer_request())

    class Core(ov.Core):
        def compile_model(self, *args, **kwargs):
            return Compiled(super().compile_model(*args, **kwargs))

    monkeypatch.setattr(ov, "Core", Core)


@pytest.fixture
def one_microsecond_per_node(monkeypatch):
    """Every profiled node reports 1 us: a layer's profile counts the runtime nodes charged to it, whatever the
    shared machine's load."""
    _fake_clock(monkeypatch, lambda p: 1e-6)


# profiled node types that compute (with weights, a product of two tensors, a recurrent layer's loop)
COMPUTING = ("Convolution", "ConvolutionBackpropData", "FullyConnected", "MatMul", "Gather", "Loop", "TensorIterator")


@pytest.fixture
def one_millisecond_per_computing_node(monkeypatch):
    """Nodes of the :data:`COMPUTING` types report 1 ms, all others (reshapes, reorders, constants) nothing."""
    _fake_clock(monkeypatch, lambda p: 1e-3 if p.node_type in COMPUTING else 0.0)


def test_a_layer_shared_by_two_inputs_is_charged_both_calls(one_microsecond_per_node):
    """A nested tower called on two inputs is one profiled layer computed twice: it is charged both calls, twice
    an identical convolution called once (ref: the same kernel shape, so a match by shape alone could take
    the tower's second call for it)."""
    left, right = keras.Input((24, 24, 8), name="left"), keras.Input((24, 24, 8), name="right")
    t_in = keras.Input((24, 24, 8))
    tower = keras.Model(t_in, L.GlobalAveragePooling2D()(L.Conv2D(32, 3, padding="same", name="c")(t_in)),
                        name="tower")
    ref = L.GlobalAveragePooling2D()(L.Conv2D(32, 3, padding="same", name="ref")(right))
    model = keras.Model([left, right], L.Dense(2, name="head")(L.Concatenate()([tower(left), tower(right), ref])))
    profile = measure_latency_profile(model, iterations=2)
    assert set(profile) == {"tower/c", "ref", "head"}
    assert profile["ref"] > 0 and profile["tower/c"] == pytest.approx(2 * profile["ref"], rel=1e-9), profile


def test_unknown_dimensions_are_taken_from_input_shapes_or_calibration_data():
    model = _open_shapes_model()
    fp32 = measure_latency_profile(model, iterations=2, input_shapes={"image": (20, 20, 3), "tokens": (12,)})
    rng = np.random.default_rng(0)
    x = {"image": rng.uniform(size=(4, 16, 16, 3)).astype("float32"),
         "tokens": rng.integers(0, 50, (4, 10)).astype("int32")}
    int8 = measure_latency_profile(model, iterations=2, precision=None, calibration_data=x)
    # input_shapes wins over the samples' shape; an input it does not name takes the samples'
    longer = measure_latency_profile(model, iterations=2, precision=None, calibration_data=x,
                                     input_shapes={"tokens": (40,)})
    for profile in (fp32, int8, longer):
        assert set(profile) == {"conv", "emb", "seq_conv", "head"}
        assert all(s > 0 for s in profile.values()), profile
    # a single-input model's shape may be given bare
    single = keras.Sequential([keras.Input((None, None, 3)), L.Conv2D(4, 3, name="a"), L.Conv2D(4, 3, name="b")])
    profile = measure_latency_profile(single, iterations=2, input_shapes=(16, 16, 3))
    assert set(profile) == {"a", "b"} and all(s > 0 for s in profile.values()), profile


def test_an_int8_profile_calibrates_on_samples_of_different_sizes(rng):
    """Images of several sizes and token sequences of several lengths all calibrate the profiled INT8 model
    (profiled at the first sample's shapes)."""
    samples = [(rng.uniform(size=(h, h, 3)).astype("float32"), rng.integers(0, 50, (n,)).astype("int32"))
               for h, n in [(16, 10), (20, 7), (16, 12), (24, 10)]]
    profile = measure_latency_profile(_open_shapes_model(), iterations=2, precision=None, calibration_data=samples)
    assert set(profile) == {"conv", "emb", "seq_conv", "head"}
    assert all(s > 0 for s in profile.values()), profile


@pytest.mark.parametrize("kwargs, message", [
    (dict(), r"input 'image' .*unknown dimensions \('\?', '\?', 3\): pass input_shapes=\{'image'"),
    (dict(input_shapes={"image": (20, 20, 3)}), r"input 'tokens' .*unknown dimensions"),
    (dict(input_shapes={"image": (20, 20, 4), "tokens": (5,)}), r"input_shapes\['image'\] must be .*\(20, 20, 4\)"),
    (dict(input_shapes={"image": (20, 0, 3), "tokens": (5,)}), r"input_shapes\['image'\]"),
    (dict(input_shapes={"img": (20, 20, 3)}), r"unknown input\(s\) \['img'\]"),
    (dict(input_shapes=(20, 20, 3)), "give a dict from input name"),
])
def test_unknown_dimensions_without_shapes_are_named(no_export, kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_latency_profile(_open_shapes_model(), **kwargs)


@pytest.mark.parametrize("data, message", [
    (lambda x: {**x, "crop": x["crop"][:, :8]}, r"input 'crop' must have shape \(12, 12, 3\)"),
    (lambda x: {k: v for k, v in x.items() if k != "meta"}, r"no array for input\(s\) \['meta'\]"),
    (lambda x: {**x, "extra": x["meta"]}, r"unknown key\(s\) \['extra'\]"),
    (lambda x: (x["scene"], x["crop"], x["meta"]), "input 'meta' must have shape"),  # not Keras's input order
    (lambda x: x["scene"], "give one array per input"),
    (lambda x: {**x, "meta": x["meta"][:3]}, "different numbers of samples"),
    (lambda x: [], "holds no samples"),
])
def test_calibration_samples_that_do_not_fit_the_inputs_are_refused_before_export(no_export, data, message):
    with pytest.raises(ValueError, match=message):
        measure_latency_profile(_towers_model(), calibration_data=data(_towers_data(4)))


def test_latency_aware_pruning_of_a_multi_input_model_trains_through_fit():
    """The measured profile of the three-input model drives FilterPruning in model.fit: the FLOPs budget is met
    by removing channels, and the pruned model still predicts."""
    model = _towers_model()
    profile = measure_latency_profile(model, iterations=3)
    pruner = FilterPruning(flops_target=0.3, pruning_epochs=1, flops_allocation="global_per_latency",
                           latency_profile=profile)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = _towers_data(8)
    history = model.fit(x, np.zeros((8, 4), "float32"), epochs=1, batch_size=4, callbacks=[pruner], verbose=0)
    assert history.history["flops_ratio"][-1] <= 0.7 + 1e-9
    assert sum(int((~pruner.masks[g.layers]).sum()) for g in pruner.groups) > 0
    assert np.all(np.isfinite(model.predict(x, verbose=0)))


def _text_model():
    """Token sequences of any length through the weighted layers of text and audio models: an Embedding (a
    Gather in the IR), a Conv1D, MultiHeadAttention (its projections an Einsum over an unknown length, which the
    CPU plugin decomposes into MatMuls named after none of the IR's ops), a transposed convolution, a
    Bidirectional LSTM and a GRU (loops holding their kernels), a Dense."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = L.Conv1D(16, 3, padding="same", name="conv")(L.Embedding(50, 16, name="emb")(tokens))
    x = L.LayerNormalization(name="norm")(L.Add()([x, L.MultiHeadAttention(2, 8, name="mha")(x, x)]))
    x = L.Conv1DTranspose(16, 3, name="convt")(x)
    x = L.GRU(8, name="gru")(L.Bidirectional(L.LSTM(8, return_sequences=True), name="bilstm")(x))
    return keras.Model(tokens, L.Dense(3, name="head")(x))


def test_every_weighted_layer_of_a_text_model_is_charged_its_nodes(one_millisecond_per_computing_node):
    """Each layer with weights is charged the computing nodes made from it: one Gather, convolution,
    deconvolution, Dense and GRU loop each, a loop per direction of the Bidirectional, and the attention's four
    projections (and its score products) wherever the plugin's decomposition put them."""
    profile = measure_latency_profile(_text_model(), iterations=2, input_shapes=(20,))
    assert set(profile) == {"emb", "conv", "mha", "convt", "bilstm", "gru", "head"}, profile
    expected = {"emb": 1, "conv": 1, "convt": 1, "bilstm": 2, "gru": 1, "head": 1}
    assert {k: round(profile[k] / 1e-3) for k in expected} == expected, profile
    assert profile["mha"] >= 4e-3 - 1e-9, profile


def test_a_recurrent_layer_is_charged_its_whole_loop():
    """A loop's node holds the time of its body (the recurrent layer's every step): an LSTM over 256 steps takes
    more than 4 times as long as over 4 (64 times the steps, so a loaded machine's slower runs cannot reverse
    the order; a fixed cost per loop keeps the ratio well below 64)."""
    inp = keras.Input((None, 16))
    model = keras.Model(inp, L.Dense(3, name="head")(L.LSTM(32, name="lstm")(inp)))
    short, long = (measure_latency_profile(model, iterations=5, input_shapes=(steps, 16))["lstm"] for steps in (4, 256))
    assert long > 4 * short > 0, (short, long)

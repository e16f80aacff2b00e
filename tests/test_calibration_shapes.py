"""Calibration of models with dynamic dimensions on samples of different shapes (variable-length sequences,
images of different sizes): batches hold samples of one shape, so every statistic is the one the samples give
alone, and accuracy control ranks such samples too."""

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

from conftest import randomize_biases
from tfcompress import calibration
from tfcompress.calibration import accuracy_control, quantize, statistics
from tfcompress.calibration.placement import find_points
from tfcompress.calibration.samples import batches

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _ir(model, tmp_path):
    model.export(str(tmp_path / "sm"), verbose=False)
    return ov.convert_model(str(tmp_path / "sm"))


@pytest.fixture(scope="module")
def sequence_ir(tmp_path_factory):
    """Conv1D layers over sequences of any length (Keras -> SavedModel -> openvino.convert_model), non-zero
    biases (a zero one is dropped by the converter, and bias correction needs one)."""
    inp = keras.Input((None, 4), name="seq")
    x = L.Conv1D(8, 3, activation="relu", name="c1")(inp)
    x = L.Conv1D(8, 3, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    randomize_biases(model, np.random.default_rng(1))
    return _ir(model, tmp_path_factory.mktemp("seq"))


def _sequences(rng, n: int, lengths=(5, 12)) -> list[np.ndarray]:
    return [rng.normal(size=(int(k), 4)).astype("float32") for k in rng.integers(*lengths, n)]


def _run_alone(model, samples) -> list[np.ndarray]:
    """The first output for each sample run alone (f32)."""
    compiled = ov.Core().compile_model(model, "CPU", F32)
    return [compiled({0: s[None]})[compiled.outputs[0]] for s in samples]


def test_batches_hold_samples_of_one_shape_with_their_positions():
    lengths = [3, 5, 3, 3, 5, 7, 3, 5]
    samples = [(np.full((1, k, 2), i, "float32"), np.full((1, 4), i, "float32")) for i, k in enumerate(lengths)]
    got = list(batches(samples, 2))
    assert sorted(p for positions, _ in got for p in positions) == list(range(len(samples)))
    for positions, (seq, meta) in got:
        assert len(positions) <= 2 and len({lengths[p] for p in positions}) == 1
        assert seq.shape == (len(positions), lengths[positions[0]], 2) and meta.shape == (len(positions), 4)
        assert [int(v) for v in seq[:, 0, 0]] == positions and [int(v) for v in meta[:, 0]] == positions
    # samples of one shape: consecutive batches in order, the last one shorter
    same = [(np.full((1, 3), i, "float32"),) for i in range(5)]
    assert [positions for positions, _ in batches(same, 2)] == [[0, 1], [2, 3], [4]]


def test_sequences_of_different_lengths_calibrate_with_their_per_sample_statistics(sequence_ir, rng):
    """Per-sample minima and maxima are those of each sample alone (batches of one), exactly; per-channel
    means weigh every sample the same; the INT8 model runs every layer INT8 and stays close to FP32."""
    samples = _sequences(rng, 40)
    acts, weights = find_points(sequence_ir)
    corrected = quantize.bias_points(sequence_ir, weights)
    means = sorted({(key, kind) for _, key, kind in corrected})
    assert means, "the model has a biased layer to correct"
    grouped = statistics.collect(sequence_ir, acts, samples, 300, batch=16, verbose=False, mean_points=means)
    alone = statistics.collect(sequence_ir, acts, samples, 300, batch=1, verbose=False, mean_points=means)
    assert grouped.samples == alone.samples == 40
    for p in acts:
        assert sorted(map(float, grouped.maxs[p.key])) == sorted(map(float, alone.maxs[p.key]))
        assert sorted(map(float, grouped.mins[p.key])) == sorted(map(float, alone.mins[p.key]))
    for key in means:
        np.testing.assert_allclose(grouped.means[key], alone.means[key], rtol=1e-5, atol=1e-7)

    int8 = calibration.calibrate(sequence_ir, samples, verbose=False)
    assert calibration.int8_layers(ov.Core().compile_model(int8, "CPU")) == {"int8": 3, "total": 3}
    held = _sequences(rng, 10)
    for got, ref in zip(_run_alone(int8, held), _run_alone(sequence_ir, held)):
        assert np.max(np.abs(got - ref)) < 0.1 * np.max(np.abs(ref))


def test_a_sample_that_does_not_fit_a_static_dimension_is_refused(sequence_ir, rng):
    samples = _sequences(rng, 4) + [rng.normal(size=(6, 5)).astype("float32")]
    with pytest.raises(ValueError, match=r"must have shape \('\?', 4\)"):
        calibration.calibrate(sequence_ir, samples, verbose=False)


def test_bias_correction_weighs_each_image_size_by_its_samples(tmp_path, rng):
    """A 3x3 convolution's shift comes from its mean input map, which images of different sizes do not share:
    with two sizes it is the shifts each size gives alone, weighted by their sample counts."""
    inp = keras.Input((None, None, 3))
    x = L.Conv2D(8, 3, activation="relu")(inp)
    x = L.Conv2D(8, 3, padding="same", strides=2)(x)
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    randomize_biases(model, rng)
    ir = _ir(model, tmp_path)
    acts, weights = find_points(ir)
    corrected = quantize.bias_points(ir, weights)
    assert sum(kind == "map" for _, _, kind in corrected) == 2
    means = sorted({(key, kind) for _, key, kind in corrected})

    def shifts(samples):
        stats = statistics.collect(ir, acts, samples, 300, batch=4, verbose=False, mean_points=means)
        return quantize.fast_bias_shifts(corrected, stats)

    small = [rng.uniform(0, 1, (12, 12, 3)).astype("float32") for _ in range(6)]
    wide = [rng.uniform(0, 1, (9, 15, 3)).astype("float32") for _ in range(3)]
    alone_small, alone_wide, mixed = shifts(small), shifts(wide), shifts(small[:2] + wide + small[2:])
    assert set(mixed) == {wp.key for wp, _, _ in corrected}
    for key, shift in mixed.items():
        np.testing.assert_allclose(shift, (6 * alone_small[key] + 3 * alone_wide[key]) / 9, rtol=1e-5,
                                   atol=1e-6 * np.abs(shift).max())


def test_ranking_outputs_keep_each_sample_in_its_place(sequence_ir, rng):
    """Accuracy control runs its ranking samples in batches of one length: each sample's outputs come back in
    its place, as the sample run alone gives them."""
    samples = [(s[None],) for s in _sequences(rng, 9)]
    compiled = ov.Core().compile_model(sequence_ir, "CPU", F32)
    got = accuracy_control._outputs(compiled, samples, batch=2)
    for a, b in zip(got[0], _run_alone(sequence_ir, [s[0][0] for s in samples])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_accuracy_control_with_validation_sequences_of_different_lengths(sequence_ir, rng):
    """Validation samples of different lengths rank the layers; with max_drop=0 the search reverts layers until
    the metric (minus the INT8 outputs' error against FP32, sample by sample) is the FP32 model's."""
    val = _sequences(rng, 12)
    ref = _run_alone(sequence_ir, val)

    def validate(compiled, data):
        return -float(np.mean([np.abs(compiled({0: s[None]})[compiled.outputs[0]] - r).max()
                               for s, r in zip(data, ref)]))

    model, info = calibration.calibrate_with_accuracy_control(
        sequence_ir, _sequences(rng, 30), val, validate, max_drop=0.0, verbose=False)
    assert info["int8_metric"] < info["fp32_metric"] == 0.0
    assert info["max_drop_met"] and info["reverted"], info
    assert validate(ov.Core().compile_model(model, "CPU", F32), val) == pytest.approx(info["metric"], abs=1e-7)


def test_a_tensor_of_dynamic_rank_is_refused_with_one_line(rng):
    """An IR input of shape [?...] (or a reshape to a shape computed in the graph) ended in a RuntimeError from
    OpenVINO's shape code inside the statistics pass; given a rank, the same model calibrates."""
    import openvino.opset13 as ops

    w = ops.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32))

    def conv(x):
        return ops.relu(ops.convolution(x, w, [1, 1], [0, 0], [0, 0], [1, 1]))

    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    p = ops.parameter(ov.PartialShape.dynamic(), np.float32, name="image")
    model = ov.Model([conv(p)], [p], "any_rank")
    for run in (lambda m: calibration.calibrate(m, x, verbose=False),
                lambda m: calibration.calibrate_with_accuracy_control(m, x, x, lambda c: 1.0, verbose=False)):
        with pytest.raises(ValueError, match=r"^the model input 'image' has a dynamic rank \(\[\?\.\.\.\]\): .*"
                                             r"model.reshape\(\{'image': \[-1, -1, -1, -1\]\}\)"):
            run(model)
    model.reshape({"image": [-1, -1, -1, -1]})
    assert calibration.calibrate(model, x, verbose=False).inputs[0].get_partial_shape().rank.get_length() == 4
    image = ops.parameter([-1, 3, 8, 8], np.float32, name="image")
    shape = ops.parameter([-1], np.int64, name="shape")
    inner = ov.Model([conv(ops.reshape(image, shape, special_zero=False))], [image, shape], "computed_rank")
    with pytest.raises(ValueError, match="the output of Reshape .* has a dynamic rank"):
        calibration.calibrate(inner, {"image": x, "shape": np.tile([1, 3, 8, 8], (4, 1))}, verbose=False)

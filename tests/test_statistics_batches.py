"""How many samples a statistics pass puts in one batch: as many as fit a budget of activation memory.

A 512x512 U-Net's pass at 16 samples per batch held 10 GiB (NNCF's pass, one sample at a time, 0.7 GiB) and ran
slower than at one sample per batch; the budget keeps each batch's activations bounded whatever the input size.
"""

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from tfcompress import calibration
from tfcompress.calibration import statistics


def _conv_relu(rng, spatial=(12, 12), channels=(3, 8, 8)) -> ov.Model:
    """Two convolution + bias + ReLU layers on an NCHW input with a dynamic batch (and ``spatial`` dims)."""
    p = ops.parameter([-1, channels[0], *spatial], ov.Type.f32)
    x = p
    for cin, cout in zip(channels, channels[1:]):
        w = ops.constant(rng.normal(size=(cout, cin, 3, 3)).astype(np.float32))
        b = ops.constant(rng.uniform(-0.2, 0.2, (1, cout, 1, 1)).astype(np.float32))
        x = ops.relu(ops.add(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]), b))
    return ov.Model([x.output(0)], [p])


def test_activation_bytes_count_every_op_output_per_sample(rng):
    model = _conv_relu(rng)
    # per layer: convolution, bias add and ReLU, each 8 channels of 12 x 12 float32
    assert statistics.activation_bytes(model, [(3, 12, 12)]) == 2 * 3 * 8 * 12 * 12 * 4
    dynamic = _conv_relu(rng, spatial=(-1, -1))  # a fully convolutional model: the sample's size decides
    assert statistics.activation_bytes(dynamic, [(3, 24, 24)]) == 2 * 3 * 8 * 24 * 24 * 4
    assert [p.get_partial_shape().is_static for p in dynamic.inputs] == [False]  # not reshaped in place


def test_activation_bytes_count_outputs_whose_batch_is_not_their_first_axis(rng):
    """An op that folds the batch into another axis ((N, 8, 12, 12) -> (N * 96, 12)) was counted without its
    first axis, as if that were the batch: 12 values per sample instead of 1152. A dynamic-rank input crashed
    the count ('rank().is_static()')."""
    p = ops.parameter([-1, 3, 12, 12], ov.Type.f32)
    x = ops.convolution(p, ops.constant(rng.normal(size=(8, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1],
                        [1, 1], [1, 1])
    x = ops.relu(ops.reshape(x, ops.constant(np.array([-1, 12], np.int64)), False))
    x = ops.reshape(x, ops.constant(np.array([-1, 8, 12, 12], np.int64)), False)
    model = ov.Model([x.output(0)], [p])
    # convolution, reshape, ReLU, reshape: 8 x 12 x 12 float32 each
    assert statistics.activation_bytes(model, [(3, 12, 12)]) == 4 * 8 * 12 * 12 * 4
    any_rank = ops.parameter(ov.PartialShape.dynamic(), ov.Type.f32)
    assert statistics.activation_bytes(ov.Model([ops.relu(any_rank).output(0)], [any_rank]), [(5, 7)]) == 5 * 7 * 4


def test_samples_of_several_sizes_are_batched_by_their_own_size(rng, monkeypatch):
    """The batch size was chosen from the first sample alone: small images first, then large ones, and the
    large ones ran as many to a batch as the small ones, far beyond the activation budget."""
    model = _conv_relu(rng, spatial=(-1, -1))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    small, large = statistics.activation_bytes(model, [(3, 12, 12)]), statistics.activation_bytes(model, [(3, 48, 48)])
    assert large == 16 * small
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", 2 * large)
    samples = [rng.normal(size=(1, 3, 12, 12)).astype(np.float32) for _ in range(10)]
    samples += [rng.normal(size=(1, 3, 48, 48)).astype(np.float32) for _ in range(10)]
    seen: list[tuple] = []
    statistics.run_batches(model, compiled, iter(samples), 20, None, "test", False,
                           lambda res, n, shape: seen.append((n, shape[0][1:])))
    assert sorted(seen) == [(2, (48, 48))] * 5 + [(10, (12, 12))]


def test_batches_hold_what_fits_the_budget_and_statistics_do_not_depend_on_it(rng, monkeypatch):
    model = _conv_relu(rng)
    data = rng.normal(size=(10, 3, 12, 12)).astype(np.float32)
    per_sample = statistics.activation_bytes(model, [(3, 12, 12)])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def counts() -> list[int]:
        seen: list[int] = []
        statistics.run_batches(model, compiled, data, 10, None, "test", False, lambda res, n, shape: seen.append(n))
        return seen

    assert counts() == [10]  # small samples: up to PASS_BATCH (16) per batch
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", 3 * per_sample)
    assert counts() == [3, 3, 3, 1]
    small = calibration.calibrate(model, data, subset_size=10, verbose=False)
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", per_sample // 2)  # not even one sample fits: one a batch
    assert counts() == [1] * 10
    one = calibration.calibrate(model, data, subset_size=10, verbose=False)
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", 100 * per_sample)
    whole = calibration.calibrate(model, data, subset_size=10, verbose=False)

    def limits(m) -> list[np.ndarray]:
        return [op.input_value(k).get_node().get_data().copy() for op in m.get_ordered_ops()
                if op.get_type_name() == "FakeQuantize" for k in range(1, 5)]

    # per-sample statistics: the same ranges (and bias shifts) whatever the batches, to float32 rounding
    for a, b, c in zip(limits(small), limits(one), limits(whole), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-7)
    assert len(limits(whole)) >= 8


def test_a_model_with_a_static_batch_keeps_it(rng, monkeypatch):
    static_batch = 4
    model = _conv_relu(rng)
    model.reshape({0: [static_batch, 3, 12, 12]})
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", 1)
    compiled = ov.Core().compile_model(model, "CPU")
    seen: list[int] = []
    data = rng.normal(size=(8, 3, 12, 12)).astype(np.float32)
    statistics.run_batches(model, compiled, data, 8, None, "test", False, lambda res, n, shape: seen.append(n))
    assert seen == [static_batch, static_batch]


def test_the_batch_size_is_asked_once_per_shape_that_has_company(rng):
    """Asking a shape's batch size reshapes a clone of the model, which costs as much as an inference (a
    1274-op attention model: 68 ms against 40): samples of sequences that all differ in length asked it for
    every sample. A sample alone is a batch of one; a shape is asked once its second sample comes."""
    from tfcompress.calibration.samples import batches

    asked: list[tuple] = []

    def size(sample) -> int:
        asked.append(sample[0].shape[1:])
        return 2 if sample[0].shape[1] == 5 else 1

    lengths = [3, 5, 4, 5, 5, 7, 7, 5, 6]
    samples = [(rng.normal(size=(1, n, 2)),) for n in lengths]
    got = [(positions, x[0].shape) for positions, x in batches(samples, size)]
    assert sorted(asked) == [(5, 2), (7, 2)]
    assert sorted(got) == sorted([([1, 3], (2, 5, 2)), ([4, 7], (2, 5, 2)), ([5], (1, 7, 2)), ([6], (1, 7, 2)),
                                  ([0], (1, 3, 2)), ([2], (1, 4, 2)), ([8], (1, 6, 2))])
    assert [p for p, _ in batches(samples, 4)] == [[1, 3, 4, 7], [0], [2], [5, 6], [8]]  # a fixed size as before


def test_accuracy_control_runs_its_models_in_batches_of_the_same_budget(rng, monkeypatch):
    """Accuracy control ran its ranking model 16 samples a batch whatever their size (a 256x256 U-Net: 2.0 GiB
    against the default calibration's 0.8 GiB)."""
    from tfcompress.calibration import accuracy_control

    model = _conv_relu(rng)
    data = rng.normal(size=(12, 3, 12, 12)).astype(np.float32)
    ref = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: data})[0]
    monkeypatch.setattr(statistics, "PASS_ACTIVATIONS", 2 * statistics.activation_bytes(model, [(3, 12, 12)]))
    seen: list[int] = []
    real = accuracy_control.batches

    def spy(samples, size):
        for positions, x in real(samples, size):
            seen.append(len(positions))
            yield positions, x

    monkeypatch.setattr(accuracy_control, "batches", spy)
    _, info = calibration.calibrate_with_accuracy_control(
        model, data, data, lambda c, d: -float(np.abs(c({0: d})[0] - ref).max()), max_drop=0.0, max_iterations=1,
        verbose=False)
    # the float model's outputs (6 batches), then the ranking model's for every candidate: two samples a batch
    assert len(seen) > 6 and set(seen) == {2}

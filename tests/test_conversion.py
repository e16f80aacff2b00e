"""SavedModel -> ONNX / OpenVINO conversion of model families tf2onnx cannot take as Keras exports them.

Grouped convolutions (kept as XLA function calls), exact GELU (``Erfc``), graphs tf2onnx refuses (the IR then
comes from OpenVINO's TensorFlow reader), serving graphs traced in training mode, and the package's
independence from onnxruntime (used here only as a cross-check)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

from tfcompress.export import ExportError, export_saved_model, to_onnx, to_openvino
from tfcompress.export.convert import prepare_for_tf2onnx, saved_model_to_openvino
from tfcompress.stripping.savedmodel_strip import freeze_saved_model
from conftest import randomize_batchnorm, randomize_biases, rel_error

TOL = 1e-4  # relative max error of every float conversion against Keras


def _ort_outputs(onnx_path, x):
    """onnxruntime's outputs, optimisations off (1.31 fuses Pad into MaxPool wrongly)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, x)


def _ov_f32(xml, x):
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.outputs[0]]


def _grouped(groups: int, nested: bool):
    """RegNet-style: a grouped 3x3 conv between 1x1 convs, optionally inside a nested Functional block."""
    inp = keras.Input((12, 12, 8), name="image")
    x = L.Conv2D(16, 1, name="expand")(inp)
    block_in = keras.Input((12, 12, 16))
    y = L.Conv2D(16, 3, groups=groups, padding="same", name="grouped")(block_in)
    y = L.ReLU()(L.BatchNormalization()(y))
    block = keras.Model(block_in, y, name="block")
    x = block(x) if nested else block.layers[-1](block.layers[-2](block.layers[1](x)))
    x = L.Conv2D(4, 1, name="project")(x)
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def _gelu(kind: str):
    inp = keras.Input((6, 6, 4), name="image")
    x = L.Conv2D(8, 1)(inp)
    if kind == "layer":
        x = L.Activation("gelu")(x)  # Keras 3: exact (erf-based) by default
    elif kind == "dense":
        x = L.Dense(8, activation=lambda t: keras.activations.gelu(t, approximate=False))(L.Flatten()(x))
    else:  # erfc used directly, on values large enough that 1 - erf(x) is far from 1
        x = L.Lambda(lambda t: tf.math.erfc(3.0 * t))(x)
    return keras.Model(inp, L.Flatten()(x))


def _export(model, path, rng):
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    model.export(str(path), verbose=False)
    return {"image": rng.normal(0, 1, (2, *model.input_shape[1:])).astype("float32")}


def _check_conversions(model, tmp_path, x):
    c = to_onnx(str(tmp_path / "src"), str(tmp_path / "m.onnx"), check_inputs=x)
    assert c["max_rel_error"] < TOL
    to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"), check_inputs=x)
    ref = model(x["image"])
    assert rel_error(_ort_outputs(tmp_path / "m.onnx", x)[0], ref) < TOL
    assert rel_error(_ov_f32(tmp_path / "m.xml", x), ref) < TOL


@pytest.mark.parametrize("groups,nested", [(4, True), (16, False)])
def test_grouped_conv_converts(groups, nested, tmp_path, rng):
    model = _grouped(groups, nested)
    x = _export(model, tmp_path / "src", rng)
    frozen = freeze_saved_model(str(tmp_path / "src")).graph_def
    # Keras compiles the grouped conv as an XLA function; freezing inlines its call
    assert any(f.attr["_XlaMustCompile"].b for f in frozen.library.function if "_XlaMustCompile" in f.attr)
    assert not {n.op for n in frozen.node} & {"StatefulPartitionedCall", "PartitionedCall"}
    prepared = prepare_for_tf2onnx(frozen)
    assert not {n.op for n in prepared.node} & {"StatefulPartitionedCall", "PartitionedCall"}
    _check_conversions(model, tmp_path, x)


@pytest.mark.parametrize("kind", ["layer", "dense", "erfc"])
def test_exact_gelu_converts(kind, tmp_path, rng):
    model = _gelu(kind)
    x = _export(model, tmp_path / "src", rng)
    frozen_ops = {n.op for n in freeze_saved_model(str(tmp_path / "src")).graph_def.node}
    # tf.nn.gelu is erfc-based in current TensorFlow, erf-based in older releases (2.16)
    assert "Erfc" in frozen_ops or (kind != "erfc" and "Erf" in frozen_ops)
    _check_conversions(model, tmp_path, x)


@pytest.mark.parametrize("norm", ["group", "layer", "rms", "unit"])
def test_stripped_normalizations_convert(norm, tmp_path, rng):
    """The layers stripping puts in place of a channel normalization (statistics that still count removed
    channels) run the same in ONNX and OpenVINO."""
    import tfcompress

    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(12, 3, padding="same", name="stem")(inp)
    x = {"group": L.GroupNormalization(groups=4), "layer": L.LayerNormalization(),
         "rms": L.RMSNormalization(), "unit": L.UnitNormalization()}[norm](x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 1)(x)))
    randomize_biases(model, rng)
    stem = next(g for g in tfcompress.channel_groups(model) if g.layers == ("stem",))
    tfcompress.zero_channels(model, stem, [0, 5, 6, 11])
    stripped = tfcompress.strip(model)
    assert stripped.get_layer("stem").filters == 8 and type(stripped.layers[2]).__name__.startswith("Partial")
    x = _export(stripped, tmp_path / "src", rng)
    _check_conversions(stripped, tmp_path, x)


class _NarrowFakeQuant(L.Layer):
    """An activation fake-quant on the symmetric narrow grid, which tf2onnx 1.17 refuses to convert."""

    def call(self, x):
        return tf.quantization.fake_quant_with_min_max_vars(x, -4.0, 4.0, num_bits=8, narrow_range=True)


def _narrow_model():
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu")(_NarrowFakeQuant()(inp))
    x = L.Conv2D(8, 3, padding="same")(_NarrowFakeQuant()(x))
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def test_savedmodel_path_when_tf2onnx_fails(tmp_path, rng):
    model = _narrow_model()
    x = _export(model, tmp_path / "src", rng)
    with pytest.raises(ExportError, match="FakeQuant"):
        to_onnx(str(tmp_path / "src"), str(tmp_path / "m.onnx"), check_inputs=x)
    assert not (tmp_path / "m.onnx").exists()
    c = saved_model_to_openvino(str(tmp_path / "src"), str(tmp_path / "m.xml"), check_inputs=x, tolerance=0.15)
    assert c["max_rel_error"] < 0.15
    import openvino as ov

    fq = [op for op in ov.Core().read_model(str(tmp_path / "m.xml")).get_ordered_ops()
          if op.get_type_name() == "FakeQuantize"]
    assert [int(op.get_levels()) for op in fq] == [255, 255]  # narrow range kept as 255 levels


def _recurrent(kind: str):
    """Causal convolutions feeding a recurrent layer: the loop is control flow in the SavedModel's graph."""
    inp = keras.Input((20, 4), name="signal")
    x = L.Conv1D(8, 3, padding="causal", activation="relu", name="c1")(inp)
    x = L.Conv1D(8, 3, padding="causal", name="c2")(x)
    rnn = {"lstm": L.LSTM(6), "gru": L.GRU(6), "bidirectional": L.Bidirectional(L.LSTM(4))}[kind]
    return keras.Model(inp, L.Dense(3)(rnn(x)))


@pytest.mark.parametrize("kind", ["lstm", "gru", "bidirectional"])
def test_recurrent_models_are_stripped_and_exported(kind, tmp_path, rng):
    """A recurrent layer is a While loop: the graph is frozen with the loop kept whole, the convolutions before
    it are stripped, and the OpenVINO IR (from the SavedModel where OpenVINO cannot read tf2onnx's Loop)
    computes what Keras does; INT8 is written too."""
    import tfcompress

    model = _recurrent(kind)
    (c1,) = [g for g in tfcompress.channel_groups(model) if g.layers == ("c1",)]
    tfcompress.zero_channels(model, c1, [0, 3])
    model.export(str(tmp_path / "src"), verbose=False)
    x = rng.normal(size=(16, 20, 4)).astype("float32")
    np.save(tmp_path / "calib.npy", x)
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"),
                                calibration_data=str(tmp_path / "calib.npy"), verbose=False)
    assert {r["name"].split("/")[-2]: r["channels_after"] for r in report["layers"]}["c1_1"] == 6
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "out" / "model_fp32.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    assert rel_error(compiled(x[:4])[compiled.outputs[0]], model(x[:4])) < TOL
    assert (tmp_path / "out" / "model_int8.xml").exists()
    # tf2onnx turns an LSTM into ONNX's LSTM; a GRU it writes as an ONNX Loop, which onnxruntime runs but
    # OpenVINO 2026.4's ONNX reader cannot read: the export says so and reads the SavedModel instead
    if (tmp_path / "out" / "model.onnx").exists():
        assert report["steps"]["onnx"]["max_rel_error"] < TOL
    else:
        assert report["steps"]["onnx"]["skipped"].endswith("cannot convert Loop-17")


def _resizing_bn(sequential: bool):
    if sequential:
        return keras.Sequential([keras.Input((16, 16, 3)), L.Resizing(8, 8), L.BatchNormalization(),
                                 L.Conv2D(4, 3), L.GlobalAveragePooling2D()])
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(4, 3, padding="same")(inp)
    x = L.BatchNormalization()(L.Resizing(8, 8)(x))
    return keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(x)))


@pytest.mark.parametrize("sequential", [True, False])
def test_training_mode_serving_graph_is_refused(sequential, tmp_path, rng):
    model = _resizing_bn(sequential)
    _export(model, tmp_path / "src", rng)
    with pytest.raises(ExportError, match=r"training mode.*AssignVariableOp.*Resizing"):
        export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="training mode"):
        to_onnx(str(tmp_path / "src"), str(tmp_path / "m.onnx"))


def test_resize_with_keras_ops_is_the_working_alternative(tmp_path, rng):
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Lambda(lambda t: keras.ops.image.resize(t, (8, 8)))(inp)
    x = L.Conv2D(4, 3)(L.BatchNormalization()(x))
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    x = _export(model, tmp_path / "src", rng)
    _check_conversions(model, tmp_path, x)


# --- the command, with onnxruntime made unimportable --------------------------------------------------------

_NO_ORT = ("import sys, runpy; sys.modules['onnxruntime'] = None; sys.argv = ['tfcompress.export'] + sys.argv[1:]; "
           "runpy.run_module('tfcompress.export', run_name='__main__')")


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", _NO_ORT, *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """One small SavedModel per family that used to fail, with calibration data."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(1)
    builders = {"grouped": lambda: _grouped(4, True), "gelu": lambda: _gelu("layer"), "narrow_fq": _narrow_model,
                "resizing_bn": lambda: _resizing_bn(False)}
    out = {}
    for name, build in builders.items():
        model = build()
        randomize_batchnorm(model, rng)
        randomize_biases(model, rng)
        model.export(str(root / name), verbose=False)
        np.save(root / f"{name}.npy", rng.normal(0, 1, (32, *model.input_shape[1:])).astype("float32"))
        out[name] = (root / name, root / f"{name}.npy", model)
    return out


def _int8_all(report):
    run = report["steps"]["int8"]["int8_layers"]
    return run["total"] > 0 and run["int8"] == run["total"]


@pytest.mark.parametrize("name", ["grouped", "gelu"])
def test_command_converts_through_onnx(name, families, tmp_path):
    src, calib, model = families[name]
    proc = _cli(f"--saved_model_dir={src}", f"--output_dir={tmp_path / 'out'}", f"--calibration_data={calib}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" not in proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["openvino"]["source"] == "onnx" and (tmp_path / "out" / "model.onnx").exists()
    x = np.load(calib)[:4]
    assert rel_error(_ov_f32(tmp_path / "out" / "model_fp32.xml", x), model(x)) < TOL
    assert _int8_all(report), report["steps"]["int8"]


def test_command_falls_back_to_the_savedmodel_reader(families, tmp_path):
    src, calib, model = families["narrow_fq"]
    proc = _cli(f"--saved_model_dir={src}", f"--output_dir={tmp_path / 'out'}", f"--calibration_data={calib}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ONNX skipped" in warnings[0] and "--require_onnx" in warnings[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["openvino"]["source"] == "saved_model"
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert "No ONNX model: tf2onnx left" in (tmp_path / "out" / "report.md").read_text()
    assert _int8_all(report), report["steps"]["int8"]
    x = np.load(calib)[:4]
    # the model quantizes its own activations: the f32 IR runs them as FakeQuantize, within a quantization step
    assert rel_error(_ov_f32(tmp_path / "out" / "model_fp32.xml", x), model(x)) < 0.15

    proc = _cli(f"--saved_model_dir={src}", f"--output_dir={tmp_path / 'o2'}", "--require_onnx")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: tf2onnx left")
    assert not (tmp_path / "o2").exists()


def test_command_explains_a_training_mode_export(families, tmp_path):
    src, calib, _ = families["resizing_bn"]
    proc = _cli(f"--saved_model_dir={src}", f"--output_dir={tmp_path / 'out'}", f"--calibration_data={calib}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SavedModel") and "training mode" in last and "Resizing" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_training_mode_export_names_the_layers_that_cause_it(tmp_path):
    """Keras's model.export traces random augmentation layers in training mode too (the SavedModel flips and
    changes the contrast of its inputs): the error names those layers, not a Resizing the model does not have."""
    from tfcompress.export.convert import freeze_for_export

    inp = keras.Input((8, 8, 3))
    x = L.RandomContrast(0.1, name="contrast")(L.RandomFlip("horizontal", name="flip")(inp))
    model = keras.Model(inp, L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="conv")(x)))
    model.export(str(tmp_path / "src"), verbose=False)
    with pytest.raises(ExportError, match="training mode") as err:
        freeze_for_export(str(tmp_path / "src"))
    message = str(err.value)
    assert "'contrast'" in message and "'flip'" in message and "'conv'" not in message
    assert "RandomFlip" in message and "input pipeline" in message


def test_an_onnx_pass_that_fails_half_way_is_skipped_as_tf2onnx_skips_it(tmp_path, rng, monkeypatch):
    """A pass that raises after rewriting part of the graph (here: it drops the first Conv's node) must not
    leave that damage in the ONNX file: the pass is skipped, the others run, and the file still matches
    TensorFlow (whatever the export does to save tf2onnx's copy of the graph before each pass)."""
    from tfcompress.export import convert

    real = convert.onnx_optimizer_passes
    failed = []

    class HalfDone:
        graph_been_opt = False

        def optimize(self, graph, iteration):
            conv = next(n for n in graph.get_nodes() if n.type == "Conv")
            graph.remove_node(conv.name)  # the damage a failing pass can leave behind
            failed.append(iteration)
            raise RuntimeError("a pass that fails half way")

    def with_a_failing_pass(*args, **kwargs):
        return {"half_done": HalfDone, **real(*args, **kwargs)}

    monkeypatch.setattr(convert, "onnx_optimizer_passes", with_a_failing_pass)
    model = _grouped(1, False)
    x = _export(model, tmp_path / "src", rng)
    check = to_onnx(str(tmp_path / "src"), str(tmp_path / "m.onnx"), check_inputs=x)
    assert failed  # the pass ran (and raised)
    assert check["max_rel_error"] < TOL
    assert rel_error(_ort_outputs(tmp_path / "m.onnx", x)[0], model(x["image"])) < TOL

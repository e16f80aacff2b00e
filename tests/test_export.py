"""SavedModel stripping, ONNX and OpenVINO conversion, and the `python -m tfcompress.export` command."""

import collections
import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import tfcompress
from tfcompress.export import ExportError, export_saved_model, strip_saved_model, to_onnx, to_openvino
from conftest import SHARED_DATA, batchnorm_statistics_of, randomize_batchnorm, randomize_biases, rel_error

KWS = SHARED_DATA / "models" / "mlperf_tiny" / "kws_ref_model_savedmodel" / "kws_ref_model"


def _tree_digest(path) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def _pruned_model(rng):
    inp = keras.Input((24, 24, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = L.ReLU()(L.BatchNormalization()(x))
    y = L.Conv2D(16, 3, padding="same", name="body")(x)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    se = L.Reshape((1, 1, 16))(L.GlobalAveragePooling2D()(x))
    se = L.Conv2D(16, 1, activation="sigmoid", name="se")(L.Conv2D(8, 1, activation="relu", name="se_r")(se))
    x = L.Multiply()([x, se])
    d = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Concatenate()([x, L.ReLU(6.0)(L.BatchNormalization()(d))])
    x = L.Conv2D(24, 3, strides=2, activation="relu", name="head_conv")(x)
    model = keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(x)))
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))
    return model


def test_strip_saved_model_from_model_export(tmp_path, rng):
    model = _pruned_model(rng)
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.export(str(src), verbose=False)
    digest = _tree_digest(src)
    result = strip_saved_model(str(src), str(dst))
    assert _tree_digest(src) == digest  # the input is never modified
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(dst) < size(src)
    assert result.params_after < 0.8 * result.params_before
    assert result.flops_after < 0.8 * result.flops_before
    keras_stripped = tfcompress.strip(model)
    assert result.flops_after == pytest.approx(tfcompress.count_flops(keras_stripped), rel=1e-6)
    loaded = tf.saved_model.load(str(dst))
    assert set(loaded.signatures) == {"serve", "serving_default"}
    sig = loaded.signatures["serving_default"]
    assert list(sig.structured_input_signature[1]) == ["image"]
    x = rng.uniform(0, 1, (4, 24, 24, 3)).astype("float32")
    out = sig(image=tf.constant(x))
    assert list(out) == list(tf.saved_model.load(str(src)).signatures["serving_default"].structured_outputs)
    assert rel_error(list(out.values())[0], model(x)) < 1e-4
    assert result.max_rel_error < 1e-4


def test_strip_saved_model_from_tf_saved_model_save(tmp_path, rng):
    model = _pruned_model(rng)

    class Wrapper(tf.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        @tf.function(input_signature=[tf.TensorSpec((None, 24, 24, 3), tf.float32, name="pixels")])
        def predict(self, pixels):
            return {"scores": self.m(pixels)}

    w = Wrapper(model)
    tf.saved_model.save(w, str(tmp_path / "src"), signatures={"serving_default": w.predict})
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert result.params_after < 0.8 * result.params_before
    sig = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"]
    x = rng.uniform(0, 1, (3, 24, 24, 3)).astype("float32")
    assert rel_error(sig(pixels=tf.constant(x))["scores"], model(x)) < 1e-4


def test_onnx_and_openvino_match_keras(tmp_path, rng):
    model = _pruned_model(rng)
    model.export(str(tmp_path / "src"), verbose=False)
    strip_saved_model(str(tmp_path / "src"), str(tmp_path / "stripped"))
    x = {"image": rng.uniform(0, 1, (4, 24, 24, 3)).astype("float32")}
    c = to_onnx(str(tmp_path / "stripped"), str(tmp_path / "m.onnx"), check_inputs=x)
    assert c["max_rel_error"] < 1e-4
    c = to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"), check_inputs=x)
    assert c["max_rel_error"] < 1e-4
    import onnxruntime as ort
    import openvino as ov

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    compiled = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled({"image": x["image"]})[compiled.outputs[0]]
    assert rel_error(out, model(x["image"])) < 1e-4


class QuantConv(L.Layer):
    """A minimal QAT-style conv: fake-quantized input (per tensor, uint8) and weights (per channel, int8; on the
    whole grid, or on the 7-bit grid of the overflow fix: integers -63..63)."""

    def __init__(self, filters, half_range=True, **kw):
        super().__init__(**kw)
        self.filters, self.half_range = filters, half_range

    def build(self, shape):
        self.kernel = self.add_weight(shape=(3, 3, shape[-1], self.filters), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros")

    def call(self, x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 3.0, num_bits=8)
        m = tf.reduce_max(tf.abs(self.kernel), axis=[0, 1, 2]) * (127 / 63 if self.half_range else 1)
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(self.kernel, -m, m, num_bits=8, narrow_range=True)
        return tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME") + self.bias)


def _qat_model(half_range):
    inp = keras.Input((16, 16, 3), name="image")
    x = QuantConv(16, half_range)(inp)
    x = QuantConv(16, half_range)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4)(x))


def test_quantization_aware_model_runs_int8_in_openvino(tmp_path, rng):
    model = _qat_model(half_range=True)
    model.export(str(tmp_path / "src"), verbose=False)
    xs = {"image": rng.uniform(-1, 3, (2, 16, 16, 3)).astype("float32")}
    c = to_onnx(str(tmp_path / "src"), str(tmp_path / "q.onnx"), check_inputs=xs, tolerance=1e-3)
    assert c["quantized_weights"] == 2  # on the 7-bit grid: restored as int8 within [-63, 63]
    c2 = to_openvino(str(tmp_path / "q.onnx"), str(tmp_path / "q.xml"), check_inputs=xs, tolerance=1e-3)
    import openvino as ov

    core = ov.Core()
    for path in (tmp_path / "q.onnx", tmp_path / "q.xml"):
        compiled = core.compile_model(str(path), "CPU")
        convs = [op for op in compiled.get_runtime_model().get_ops()
                 if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
        assert len(convs) == 2
        for op in convs:
            assert op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8"), path
    weights = [op.get_data() for op in core.read_model(str(tmp_path / "q.xml")).get_ordered_ops()
               if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]
    assert [int(np.abs(w).max()) for w in weights] == [63, 63]
    # on the 7-bit grid no CPU's INT8 kernels saturate: they compute the IR's exact arithmetic
    assert c2["int8_kernels"]["within_tolerance"] and c2["int8_kernels"]["max_rel_error"] < 1e-3, c2


def test_full_range_qat_weights_are_checked_in_exact_arithmetic(tmp_path, rng, capsys):
    # weights on the whole int8 grid: the conversion is checked in the IR's exact arithmetic and passes on
    # every CPU; this CPU's INT8 kernels are measured against it apart. Where they add u8 x i8 product pairs in
    # int16 (no VNNI), these inputs (filling the u8 range) overflow them: the export says so on stderr and in
    # its report, naming the fix, and writes the IR (right on CPUs with VNNI); elsewhere the kernels match
    from tfcompress import calibration

    _qat_model(half_range=False).export(str(tmp_path / "src"), verbose=False)
    x = rng.uniform(2, 3, (8, 16, 16, 3)).astype("float32")  # the top quarter of the u8 range
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"), calibration_data=x, int8="none",
                                verbose=False)
    kernels = report["steps"]["openvino"]["int8_kernels"]
    assert report["steps"]["onnx"]["max_rel_error"] < 1e-3 and report["steps"]["openvino"]["max_rel_error"] < 1e-3
    assert kernels["cpu_saturates_int8"] == calibration.cpu_saturates_int8()
    assert kernels["tolerance"] == report["steps"]["openvino"]["tolerance"]
    err, md = capsys.readouterr().err, (tmp_path / "out" / "report.md").read_text()
    if calibration.cpu_saturates_int8():
        assert kernels["max_rel_error"] > 2 * kernels["tolerance"] and not kernels["within_tolerance"], kernels
        assert "no VNNI" in err and "quantize_model(..., overflow_fix='enable')" in err, err
        assert "**beyond** its rounding noise" in md
    else:
        assert kernels["max_rel_error"] < 1e-3 and kernels["within_tolerance"], kernels
        assert "VNNI" not in err
        assert "within its rounding noise" in md
    assert "checked in exact arithmetic" in md


def test_a_broken_int8_ir_fails_its_check_on_every_cpu(tmp_path, rng):
    # exact arithmetic is the IR's function wherever it runs: a conversion that doubles one dequantization
    # scale is refused here as on a CPU with VNNI
    from tfcompress.export import convert

    _qat_model(half_range=True).export(str(tmp_path / "src"), verbose=False)
    xs = {"image": rng.uniform(-1, 3, (4, 16, 16, 3)).astype("float32")}
    c = to_onnx(str(tmp_path / "src"), str(tmp_path / "q.onnx"), check_inputs=xs, tolerance=1e-3)
    c.model = _double_a_dequantization_scale(c.model)
    with pytest.raises(ExportError, match=r"OpenVINO IR outputs \(f32, quantizers in exact arithmetic\) differ"):
        convert.to_openvino(str(tmp_path / "q.onnx"), str(tmp_path / "q.xml"), onnx_check=c, tolerance=1e-3)
    assert not (tmp_path / "q.xml").exists()


def _cli(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tfcompress.export", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def test_kws_savedmodel_through_the_command(tmp_path):
    """The MLPerf Tiny keyword-spotting SavedModel, written by TF/Keras 2, goes through the whole command."""
    assert KWS.is_dir(), f"shared data missing: {KWS}"
    digest = _tree_digest(KWS)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "val.npz", x=rng.normal(size=(64, 49, 10, 1)).astype("float32"), y=rng.integers(0, 12, 64))
    out = tmp_path / "out"
    proc = _cli(f"--saved_model_dir={KWS}", f"--output_dir={out}", "--int8=none",
                f"--validation_data={tmp_path / 'val.npz'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _tree_digest(KWS) == digest
    assert sorted(os.listdir(out)) == ["model.onnx", "model_fp32.bin", "model_fp32.xml", "report.json", "report.md",
                                       "stripped"]
    report = json.loads((out / "report.json").read_text())
    assert all(s["max_rel_error"] < 1e-4 for s in report["steps"].values())
    acc = report["accuracy"]
    assert acc["original"] == acc["stripped"] == acc["onnx"] == acc["openvino_fp32"]
    assert "| parameters |" in (out / "report.md").read_text()
    import openvino as ov

    assert len(ov.Core().read_model(str(out / "model_fp32.xml")).inputs) == 1


def test_command_help_documents_every_flag():
    proc = _cli("--help")
    assert proc.returncode == 0
    for flag in ("saved_model_dir", "output_dir", "calibration_data", "int8", "max_drop", "validation_data",
                 "opset", "overwrite"):
        assert f"--{flag}" in proc.stdout


@pytest.fixture(scope="module")
def small_saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm") / "model"
    # module-scoped fixtures are made before the per-test seed (conftest): seed here, or the weights depend on
    # which tests ran before in the worker
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3), name="x"), L.Conv2D(4, 3), L.GlobalAveragePooling2D(), L.Dense(2)])
    model.export(str(path), verbose=False)
    return path


def test_export_reads_runs_and_inlines_the_graph_once(tmp_path, small_saved_model, monkeypatch):
    """OpenVINO reads and runs the ONNX file once (the IR's check takes the ONNX check's outputs as its
    reference), and the graph's function calls are inlined once (when it is frozen), not again for tf2onnx."""
    from tfcompress.export import convert
    from tfcompress.graph import frozen_graph

    calls = collections.Counter()

    def count(module, name):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module, name in ((convert, "_read_onnx"), (convert, "run_openvino"), (convert, "inline_function_calls"),
                         (frozen_graph, "inline_function_calls")):
        count(module, name)
    x = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype("float32")
    report = export_saved_model(str(small_saved_model), str(tmp_path / "out"), calibration_data=x, int8="none",
                                verbose=False)
    assert report["steps"]["onnx"]["max_rel_error"] <= 1e-4 and report["steps"]["openvino"]["max_rel_error"] <= 1e-4
    # run_openvino: the ONNX file (to_onnx's check) and the saved IR (to_openvino's check)
    assert calls == {"_read_onnx": 1, "run_openvino": 2, "inline_function_calls": 1}, calls


def test_export_writes_loads_and_runs_each_graph_once(tmp_path, small_saved_model, monkeypatch):
    """One SavedModel is written (the stripped one, its graph traced once for all its signatures) and loaded
    back once: its outputs there are the conversions' reference and its signature scores accuracy. The
    original graph runs once on the check inputs (the strip's reference), once to find the scored output
    and once for accuracy; the stripped frozen graph is not run by TensorFlow again."""
    from tfcompress.export import convert, pipeline
    from tfcompress.stripping import savedmodel_strip

    calls = collections.Counter()

    def count(module, name, key=None):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key or name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(tf.saved_model, "save", "saved_model.save")
    count(tf.saved_model, "load", "saved_model.load")
    count(tf.compat.v1, "import_graph_def", "trace")  # save_graph_def's import into its tf.function
    for module in (pipeline, convert, savedmodel_strip):
        count(module, "run_frozen")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 2, 8)
    report = export_saved_model(str(small_saved_model), str(tmp_path / "out"), validation_data=(x, y),
                                int8="none", verbose=False)
    assert report["steps"]["onnx"]["max_rel_error"] <= 1e-4
    assert report["accuracy"]["stripped"] == report["accuracy"]["original"]
    # loads: the source (freezing it) and the stripped SavedModel; runs: the strip's reference, the scored
    # output's search, accuracy (one batch)
    assert calls == {"saved_model.save": 1, "saved_model.load": 2, "trace": 1, "run_frozen": 3}, calls


def test_report_sizes_are_those_of_the_savedmodels_written_alike(tmp_path, rng):
    """report.json's ``unstripped`` size (computed, not written) is what the unstripped graph takes when written
    as the stripped one is; ``stripped`` is the stripped SavedModel's."""
    from tfcompress.stripping.savedmodel_strip import freeze_saved_model, save_graph_def

    inp = keras.Input((12, 12, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(64, 3, name="c1")(inp)))
    x = L.Conv2D(96, 3, activation="relu", name="c2")(x)
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    randomize_batchnorm(model, rng)
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))
    model.export(str(tmp_path / "src"), verbose=False)
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"), int8="none", verbose=False)
    frozen = freeze_saved_model(str(tmp_path / "src"))
    save_graph_def(frozen, frozen.graph_def, str(tmp_path / "unstripped"))

    def size(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

    sizes = report["sizes"]
    assert sizes["stripped"] == size(tmp_path / "out" / "stripped")
    assert sizes["stripped"] < 0.8 * sizes["unstripped"]  # a quarter of every group's channels went
    assert abs(sizes["unstripped"] - size(tmp_path / "unstripped")) <= 0.002 * size(tmp_path / "unstripped")


def _assert_clean_failure(proc, message, parent, out):
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert not [p for p in os.listdir(parent) if p.startswith(".tfcompress-")]  # no temp dir left behind


def test_bad_inputs_get_one_line_errors(tmp_path, small_saved_model):
    out = tmp_path / "out"
    proc = _cli(f"--saved_model_dir={tmp_path / 'missing'}", f"--output_dir={out}")
    _assert_clean_failure(proc, "does not exist", tmp_path, out)
    (tmp_path / "notsm").mkdir()
    proc = _cli(f"--saved_model_dir={tmp_path / 'notsm'}", f"--output_dir={out}")
    _assert_clean_failure(proc, "not a SavedModel", tmp_path, out)
    assert not out.exists()

    class NoSig(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 2))])
        def f(self, x):
            return x

    tf.saved_model.save(NoSig(), str(tmp_path / "nosig"), signatures={})
    proc = _cli(f"--saved_model_dir={tmp_path / 'nosig'}", f"--output_dir={out}")
    _assert_clean_failure(proc, "no 'serving_default' signature", tmp_path, out)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _cli(f"--saved_model_dir={small_saved_model}", f"--output_dir={out}")
    _assert_clean_failure(proc, "not empty", tmp_path, out)
    assert os.listdir(out) == ["keep.txt"]

    np.save(tmp_path / "wrong.npy", np.zeros((4, 9, 9, 3), "float32"))
    proc = _cli(f"--saved_model_dir={small_saved_model}", f"--output_dir={tmp_path / 'o2'}",
                f"--calibration_data={tmp_path / 'wrong.npy'}")
    _assert_clean_failure(proc, "expects (8, 8, 3)", tmp_path, tmp_path / "o2")
    bad = np.zeros((4, 8, 8, 3), "float32")
    bad[1, 2, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    proc = _cli(f"--saved_model_dir={small_saved_model}", f"--output_dir={tmp_path / 'o2'}",
                f"--calibration_data={tmp_path / 'nan.npy'}")
    _assert_clean_failure(proc, "NaN", tmp_path, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def _mixed_precision_model(policy, head, rng):
    """Two convolutions (the first with a BatchNorm of random statistics) built under Keras ``policy``, then
    ``head`` (a function of their output)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((8, 8, 3), name="x")
        h = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", activation="relu")(inp))
        h = L.Conv2D(8, 3, padding="same", activation="relu")(h)
        model = keras.Model(inp, head(h))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    randomize_batchnorm(model, rng)
    return model


def test_a_mixed_precision_model_is_checked_at_its_own_precision(tmp_path, rng):
    """Keras mixed precision (float16 layers, float32 outputs): TensorFlow rounds every layer's output to
    float16, OpenVINO does not, so the checks allow float16's precision instead of refusing the export; the IR
    still has to match the model as closely as float16 allows."""
    model = _mixed_precision_model("mixed_float16", lambda h: L.Conv2D(4, 1, dtype="float32")(h), rng)
    model.export(str(tmp_path / "sm"), verbose=False)
    x = rng.uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), validation_data=None,
                                calibration_data=str(tmp_path / "x.npy"), int8="none", verbose=False)
    assert report["half_precision"] == {"dtype": "float16", "tolerance": 16 * 2.0 ** -10}
    assert 1e-4 < report["steps"]["onnx"]["max_rel_error"] < report["half_precision"]["tolerance"]
    import openvino as ov

    ir = ov.Core().compile_model(str(tmp_path / "out" / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert rel_error(ir({0: x})[0], model(x)) < 4 * 2.0 ** -10


@pytest.mark.parametrize("head_dtype", [None, "float32"])
def test_a_bfloat16_model_exports_a_float32_ir_and_calibrates(head_dtype, tmp_path, rng):
    """Keras mixed_bfloat16, with a bfloat16 output (no float32 head) or a float32 head: OpenVINO's Python API
    read the IR's bfloat16 output as float16 bits (the export refused it: 'relative error 5.10e+00'), and
    calibration added float16 constants to bfloat16 ops (a traceback). The IR computes in float32 (OpenVINO's
    precision hint still picks bfloat16 on CPUs that have it) and matches the model to bfloat16's precision."""
    model = _mixed_precision_model("mixed_bfloat16",
                                   lambda h: L.Dense(4, dtype=head_dtype)(L.GlobalAveragePooling2D()(h)), rng)
    model.export(str(tmp_path / "sm"), verbose=False)
    x = rng.uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), validation_data=None,
                                calibration_data=str(tmp_path / "x.npy"), verbose=False)
    assert report["half_precision"]["dtype"] == "bfloat16"
    import openvino as ov

    ref = np.asarray(model(x), "float32")
    # INT8: this random model's error is the quantization's (0.12-0.23 with the float32 policy); bfloat16
    # weights read as float16 bits gave 1.2
    for name, limit in (("model_fp32.xml", 4 * 2.0 ** -7), ("model_int8.xml", 0.5)):
        ir = ov.Core().read_model(str(tmp_path / "out" / name))
        assert ir.outputs[0].get_element_type() == ov.Type.f32
        got = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
        assert rel_error(got, ref) < limit, name


def test_overwrite_replaces_output(tmp_path, small_saved_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    report = export_saved_model(str(small_saved_model), str(out), int8="none", overwrite=True)
    assert "old.txt" not in os.listdir(out) and (out / "model.onnx").exists()
    assert report["steps"]["onnx"]["max_rel_error"] < 1e-4
    with pytest.raises(ExportError, match="opset"):
        export_saved_model(str(small_saved_model), str(tmp_path / "o3"), opset=19)


@pytest.mark.parametrize("name", ["MobileNetV2", "EfficientNetB0"])
def test_strip_saved_model_keras_applications(name, tmp_path, rng):
    """Depthwise convolutions, squeeze-excite, swish (IdentityN custom gradients) through the GraphDef adapter."""
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10,
                                              classifier_activation=None)
    randomize_batchnorm(model, rng)
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))
    model.export(str(tmp_path / "src"), verbose=False)
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    stripped = tfcompress.strip(model)
    # the SavedModel stripper removes what the Keras stripper removes (BN moving statistics aside)
    assert result.flops_after == pytest.approx(tfcompress.count_flops(stripped), rel=1e-6)
    assert result.max_rel_error < 1e-4


def test_report_md_says_why_zeroed_channels_were_kept(tmp_path):
    """A zeroed channel of the model's output cannot go; report.md's layer table says so, as report.json does."""
    model = keras.Sequential([keras.Input((8, 8, 3), name="x"), L.Conv2D(4, 3, name="conv"),
                              L.GlobalAveragePooling2D(), L.Dense(3, name="logits")])
    kernel, bias = model.get_layer("logits").get_weights()
    kernel[:, 1] = 0.0
    model.get_layer("logits").set_weights([kernel, bias])
    model.export(str(tmp_path / "sm"), verbose=False)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    (row,) = [r for r in report["layers"] if r["kept_reasons"]]
    (why, n), = row["kept_reasons"].items()
    assert n == 1 and "output" in why
    table = (tmp_path / "out" / "report.md").read_text().split("## Layers")[1]
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| `{row['name']}`")]
    assert line.endswith(f"| {why} (1) |")
    assert all(ln.endswith("| - |") for ln in table.splitlines() if ln.startswith("| `") and ln != line)


def test_image_directory_as_validation_data(tmp_path, small_saved_model):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for k in range(3):
            img = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
            (tmp_path / "images" / cls / f"{k}.png").write_bytes(tf.io.encode_png(img).numpy())
    report = export_saved_model(str(small_saved_model), str(tmp_path / "out"), int8="none",
                                validation_data=str(tmp_path / "images"))
    acc = report["accuracy"]
    assert acc["samples"] == 6
    assert acc["original"] == acc["openvino_fp32"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="empty"):
        export_saved_model(str(small_saved_model), str(tmp_path / "o2"), validation_data=str(tmp_path / "empty"))


def test_int8_export_writes_a_model_that_runs_int8(tmp_path, small_saved_model):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.uniform(0, 1, (64, 8, 8, 3)).astype("float32"))
    np.savez(tmp_path / "val.npz", x=rng.uniform(0, 1, (32, 8, 8, 3)).astype("float32"), y=rng.integers(0, 2, 32))
    proc = _cli(f"--saved_model_dir={small_saved_model}", f"--output_dir={tmp_path / 'out'}",
                f"--calibration_data={tmp_path / 'calib.npy'}", f"--validation_data={tmp_path / 'val.npz'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["int8"]["int8_layers"] == {"int8": 2, "total": 2}
    assert abs(report["accuracy"]["openvino_int8"] - report["accuracy"]["openvino_fp32"]) <= 0.1
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "out" / "model_int8.xml"), "CPU")
    from tfcompress import calibration

    assert calibration.int8_layers(compiled) == {"int8": 2, "total": 2}
    # int8 weights are stored as int8
    assert (tmp_path / "out" / "model_int8.bin").stat().st_size < (tmp_path / "out" / "model_fp32.bin").stat().st_size
    proc = _cli(f"--saved_model_dir={small_saved_model}", f"--output_dir={tmp_path / 'o2'}",
                f"--calibration_data={tmp_path / 'calib.npy'}", "--int8=accuracy_aware")
    _assert_clean_failure(proc, "needs --validation_data", tmp_path, tmp_path / "o2")


def _stable_qat_saved_model(path, n: int = 24):
    """The demo's residual CNN (random weights, BatchNorm statistics of CIFAR-10 images in gray) after one QAT
    step: a model whose outputs do not amplify rounding ties, exported to ``path``; returns 8 check images."""
    from tfcompress.demo.workload import residual_cnn
    from tfcompress.quantization import RangeInit, quantize_model

    data = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")
    x = data["x_test"][:n].astype("float32").mean(-1, keepdims=True) / 255.0
    y = data["y_test"][:n].reshape(-1)
    model = residual_cnn((32, 32, 1))
    batchnorm_statistics_of(model, x)
    q = quantize_model(model)
    q.compile(keras.optimizers.SGD(1e-5), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x[:16], y[:16], batch_size=16, epochs=1, callbacks=[RangeInit(1)], verbose=0)
    q.export(str(path), verbose=False)
    return x[16:]


def _double_a_dequantization_scale(model):
    """Break ``model`` (an ``openvino.Model``) the way a wrong scale would: the middle FakeQuantize's output
    range doubled."""
    import openvino as ov

    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    fq = fqs[len(fqs) // 2]
    for i in (3, 4):
        value = fq.input(i).get_source_output().get_node().get_data()
        fq.input(i).replace_source_output(ov.opset13.constant(np.asarray(value) * 2).output(0))
    return model


@pytest.fixture(scope="module")
def stable_qat(tmp_path_factory):
    d = tmp_path_factory.mktemp("stable_qat")
    x = _stable_qat_saved_model(d / "sm")
    return str(d / "sm"), x


def test_quantized_export_holds_a_stable_model_to_the_floor(stable_qat, tmp_path):
    from tfcompress.export import checks

    sm, x = stable_qat
    report = export_saved_model(sm, str(tmp_path / "out"), calibration_data=x, int8="none", verbose=False)
    steps = report["steps"]
    assert report["quantized"]
    for step in ("strip", "onnx", "openvino"):
        assert steps[step]["noise_floor"] < checks.MAX_FLOOR / checks.K  # measured 7e-3
        assert steps[step]["tolerance"] == checks.MAX_FLOOR
        assert steps[step]["max_rel_error"] <= checks.MAX_FLOOR
    assert steps["openvino"]["mean_rel_error"] <= steps["openvino"]["mean_tolerance"] == checks.MEAN_FLOOR
    assert report["quantized_check"]["verified"] is True


def test_quantized_export_refuses_a_wrong_scale_in_onnx(stable_qat, tmp_path, monkeypatch):
    """The ONNX model, as OpenVINO reads it, computes with one scale doubled: the ONNX check refuses it."""
    import openvino

    sm, x = stable_qat
    convert = openvino.convert_model

    def broken(source, *args, **kwargs):
        model = convert(source, *args, **kwargs)
        return _double_a_dequantization_scale(model) if str(source).endswith(".onnx") else model

    monkeypatch.setattr(openvino, "convert_model", broken)
    with pytest.raises(ExportError, match=r"ONNX outputs .* differ from TensorFlow's \(relative error .* > 5e-02"):
        export_saved_model(sm, str(tmp_path / "out"), calibration_data=x, int8="none", verbose=False,
                           require_onnx=True)
    assert not (tmp_path / "out").exists()


def test_quantized_export_refuses_an_ir_wrong_by_itself(stable_qat, tmp_path, monkeypatch):
    """An IR converter that writes a wrong IR and checks it against itself: the end-to-end mean check (the IR
    against the original SavedModel) refuses it."""
    import openvino as ov

    from tfcompress.export import convert, pipeline

    sm, x = stable_qat

    def broken_to_openvino(onnx_path, xml_path, check_inputs=None, tolerance=1e-4, onnx_check=None):
        model = _double_a_dequantization_scale(ov.convert_model(onnx_path))
        ov.save_model(model, xml_path, compress_to_fp16=False)
        c = convert.ConversionCheck(max_rel_error=0.0)
        c.outputs = convert.run_openvino(xml_path, check_inputs)
        return c

    monkeypatch.setattr(pipeline, "to_openvino", broken_to_openvino)
    with pytest.raises(ExportError, match=r"OpenVINO IR outputs differ from the original SavedModel's \(mean "
                                          r"relative error .* > 5\.00e-02"):
        export_saved_model(sm, str(tmp_path / "out"), calibration_data=x, int8="none", verbose=False)
    assert not (tmp_path / "out").exists()


def test_quantized_export_says_when_its_checks_cannot_verify(stable_qat, tmp_path, monkeypatch, capsys):
    """A graph whose outputs move as much under a rounding as under a broken conversion (here: made so by a
    perturbation far above a rounding's) is exported, but not called verified: stderr, report.json and
    report.md say so."""
    from tfcompress.export import checks

    sm, x = stable_qat
    monkeypatch.setattr(checks, "PERTURBATION", 0.5)
    report = export_saved_model(sm, str(tmp_path / "out"), calibration_data=x, int8="none", verbose=False)
    q = report["quantized_check"]
    assert q["mean_tolerance"] >= checks.DISCERNING and q["verified"] is False
    assert "output checks cannot tell a correct conversion from a broken one" in capsys.readouterr().err
    assert "**Not verified**" in (tmp_path / "out" / "report.md").read_text()



# SavedModels written by other means than keras.Model.export: tf.saved_model.save of a tf.Module with
# hand-written ops, TF1 builders


class _TinyNet(tf.Module):
    """conv -> relu -> mean -> matmul, written with tf.nn ops and variables (no Keras)."""

    def __init__(self, rng, size: int = 8):
        super().__init__()
        self.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 4)).astype("float32"))
        self.dense = tf.Variable(rng.normal(0, 0.3, (4, 3)).astype("float32"))
        self.size = size

    def logits(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(y, axis=[1, 2]), self.dense)


def _save_tiny_net(path, rng, outputs, spec=None):
    """Save a :class:`_TinyNet` whose serving signature returns ``outputs(net, x)`` (a dict) for the input
    ``spec`` (default: float32 (None, 8, 8, 3) named x)."""
    net = _TinyNet(rng)
    spec = spec or tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")
    net.serve = tf.function(lambda x: outputs(net, x), input_signature=[spec])
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.serve})
    return net


def test_outputs_named_unlike_tensorflow_scopes_are_kept(tmp_path, rng):
    """Signature outputs may be named anything (``logits:0``, unicode): the stripped SavedModel and the ONNX
    model keep those names and values."""
    names = ("logits:0", "ausgabe_ü")
    net = _save_tiny_net(tmp_path / "sm", rng,
                         lambda n, x: {names[0]: n.logits(x), names[1]: tf.nn.softmax(n.logits(x))})
    x = rng.uniform(0, 1, (4, 8, 8, 3)).astype("float32")
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x, int8="none",
                                verbose=False)
    assert report["steps"]["onnx"]["max_rel_error"] < 1e-5
    out = tf.saved_model.load(str(tmp_path / "out" / "stripped")).signatures["serving_default"](x=tf.constant(x))
    assert sorted(out) == sorted(names)
    assert rel_error(out["logits:0"], net.logits(x)) < 1e-5
    import onnx

    assert sorted(o.name for o in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.output) == sorted(names)


@pytest.mark.parametrize("batch, int8", [(1, "accuracy_aware"), (3, "default")])
def test_a_signature_with_a_fixed_batch_size(batch, int8, tmp_path, rng):
    """A signature that takes exactly ``batch`` samples (as models written for a device often do) is checked,
    calibrated and scored in batches of that size; validation data of any length is scored whole; the INT8
    IR keeps the batch size (accuracy control's trial models run with a free one)."""
    spec = tf.TensorSpec([batch, 8, 8, 3], tf.float32, name="x")
    net = _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"probs": tf.nn.softmax(n.logits(x))}, spec)
    x = rng.uniform(0, 1, (13, 8, 8, 3)).astype("float32")
    labels = np.argmax(net.logits(x).numpy(), axis=1)
    np.savez(tmp_path / "val.npz", x=x[:7], y=labels[:7])
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x,
                                validation_data=str(tmp_path / "val.npz"), int8=int8, verbose=False)
    assert report["steps"]["onnx"]["max_rel_error"] < 1e-5
    assert report["steps"]["int8"]["int8_layers"]["int8"] >= 1
    acc = report["accuracy"]
    assert acc["samples"] == 7
    assert acc["original"] == acc["stripped"] == acc["onnx"] == acc["openvino_fp32"] == 1.0
    import openvino as ov

    assert ov.Core().read_model(str(tmp_path / "out" / "model_int8.xml")).inputs[0].get_partial_shape()[0] == batch


def test_an_output_read_from_a_lookup_table_is_left_out_and_said(tmp_path, rng, capsys):
    """A serving signature that also returns class names through a lookup table (tf.lookup, StringLookup):
    the table cannot be frozen into ONNX or an IR, so that output is left out, with a warning and the reason
    in the report, and the numeric outputs are exported."""
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant([0, 1, 2], tf.int64), tf.constant(["cat", "dog", "owl"])), "unknown")

    def outputs(net, x):
        probs = tf.nn.softmax(net.logits(x))
        return {"probs": probs, "label": net.table.lookup(tf.argmax(probs, axis=1))}

    net = _TinyNet(rng)
    net.table = table
    net.serve = tf.function(lambda x: outputs(net, x), input_signature=[tf.TensorSpec([None, 8, 8, 3], name="x")])
    tf.saved_model.save(net, str(tmp_path / "sm"), signatures={"serving_default": net.serve})
    x = rng.uniform(0, 1, (8, 8, 8, 3)).astype("float32")
    np.savez(tmp_path / "val.npz", x=x, y=np.argmax(net.logits(x).numpy(), axis=1))
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x,
                                validation_data=str(tmp_path / "val.npz"), verbose=False)
    assert list(report["dropped_outputs"]) == ["label"]
    assert "lookup table" in report["dropped_outputs"]["label"]
    assert "output 'label'" in capsys.readouterr().err
    assert report["accuracy"]["output"] == "probs" and report["accuracy"]["openvino_fp32"] == 1.0
    out = tf.saved_model.load(str(tmp_path / "out" / "stripped")).signatures["serving_default"](x=tf.constant(x))
    assert list(out) == ["probs"] and rel_error(out["probs"], tf.nn.softmax(net.logits(x))) < 1e-5


def _tf1_saved_model(path, rng, input_key: str = "images", table: bool = False, as_text: bool = False,
                     dropout: bool = False, more_signatures: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Write a TF1 SavedModel (``tf.compat.v1.saved_model.Builder``; ``saved_model.pbtxt`` with ``as_text``)
    whose ``serving_default`` takes ``input_key`` and returns ``scores`` (and, with ``table``, ``classes`` from
    a lookup table its ``main_op`` initializes; with ``dropout``, a dropout whose ``keep_prob`` placeholder
    defaults to 1; with ``more_signatures``, also ``twin``, the same signature again, and ``features``, which
    returns the pooled features instead); returns sample inputs and their scores."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="input")
        kernel = tf.compat.v1.get_variable("k", initializer=rng.normal(0, 0.3, (3, 3, 3, 4)).astype("float32"))
        dense = tf.compat.v1.get_variable("fc", initializer=rng.normal(0, 0.3, (4, 3)).astype("float32"))
        features = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME")), [1, 2])
        if dropout:
            features = tf.compat.v1.nn.dropout(features, keep_prob=tf.compat.v1.placeholder_with_default(1.0, []))
        scores = tf.nn.softmax(tf.matmul(features, dense))
        outputs = {"scores": scores}
        if table:
            lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant([0, 1, 2], tf.int64), tf.constant(["cat", "dog", "owl"])), "?")
            outputs["classes"] = lookup.lookup(tf.argmax(scores, 1))
        samples = rng.uniform(0, 1, (6, 8, 8, 3)).astype("float32")
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run([tf.compat.v1.global_variables_initializer(), tf.compat.v1.tables_initializer()])
            expected = sess.run(scores, {x: samples})
            builder = tf.compat.v1.saved_model.Builder(str(path))
            sig = tf.compat.v1.saved_model.predict_signature_def({input_key: x}, outputs)
            signatures = {"serving_default": sig}
            if more_signatures:
                signatures["twin"] = sig
                signatures["features"] = tf.compat.v1.saved_model.predict_signature_def({input_key: x},
                                                                                        {"features": features})
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signatures,
                                                 main_op=tf.compat.v1.tables_initializer())
            builder.save(as_text=as_text)
    return samples, expected


def test_a_tf1_savedmodel_with_a_lookup_table(tmp_path, rng):
    """A TF1 SavedModel whose signature also returns class names through a table initialized by its
    ``main_op``: read with the TF1 loader, its scores are exported."""
    samples, expected = _tf1_saved_model(tmp_path / "sm", rng, table=True)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=samples, int8="none",
                                verbose=False)
    assert list(report["dropped_outputs"]) == ["classes"]
    out = tf.saved_model.load(str(tmp_path / "out" / "stripped")).signatures["serving_default"](
        images=tf.constant(samples))
    assert list(out) == ["scores"] and rel_error(out["scores"], expected) < 1e-5


@pytest.mark.parametrize("key", ["images:0", "input-image"])
def test_a_tf1_input_named_unlike_a_python_identifier(key, tmp_path, rng):
    """TF1 signature inputs may be named anything (``images:0``); the stripped SavedModel, the ONNX model and
    the IR keep the name."""
    samples, expected = _tf1_saved_model(tmp_path / "sm", rng, input_key=key)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=samples,
                                verbose=False)
    assert report["steps"]["onnx"]["max_rel_error"] < 1e-5 and report["steps"]["int8"]["int8_layers"]["int8"] >= 1
    sig = tf.saved_model.load(str(tmp_path / "out" / "stripped")).signatures["serving_default"]
    assert rel_error(sig(**{key: tf.constant(samples)})["scores"], expected) < 1e-5
    import onnx
    import openvino as ov

    assert [i.name for i in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input] == [key]
    assert ov.Core().read_model(str(tmp_path / "out" / "model_int8.xml")).inputs[0].get_names() == {key}


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_savedmodel_with_broken_variables_is_named_so(damage, tmp_path, rng):
    """A SavedModel whose variables/ is truncated or missing (an interrupted download or copy) gets an error
    that says so, not TensorFlow's 'Graph execution error:'."""
    _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"y": n.logits(x)})
    variables = tmp_path / "sm" / "variables"
    if damage == "missing":
        import shutil

        shutil.rmtree(variables)
    else:
        data = next(variables.glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"variables .* missing, truncated or damaged") as e:
        export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    assert "Graph execution error" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_savedmodel_without_serving_default_names_its_signatures_and_the_flag(tmp_path, rng):
    """A SavedModel saved with other signature keys only (``signatures={"predict": ...}``): the error lists
    them and says how to pick one (``--signature``); picked, it exports."""
    net = _TinyNet(rng)
    net.predict = tf.function(lambda x: {"y": net.logits(x)}, input_signature=[tf.TensorSpec([None, 8, 8, 3])])
    tf.saved_model.save(net, str(tmp_path / "sm"), signatures={"predict": net.predict})
    with pytest.raises(ExportError, match=r"no 'serving_default' signature \(it has \['predict'\]\); pass one of "
                                          r"them as --signature"):
        export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False,
                                signature_key="predict")
    assert report["signature"] == "predict" and report["steps"]["onnx"]["max_rel_error"] < 1e-5


def test_accuracy_is_scored_on_the_output_with_class_scores(tmp_path, rng):
    """Estimator-style serving outputs ``{"classes": argmax, "probabilities": softmax}``, and the input image
    passed through: labels are scored against ``probabilities`` (the output with one score per class), in
    every artifact and in accuracy control; ``classes`` (first by name) has one value per sample, and the
    argmax of an ``image`` is no class."""
    net = _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"classes": tf.argmax(n.logits(x), axis=1), "image": x,
                                                          "probabilities": tf.nn.softmax(n.logits(x))})
    x = rng.uniform(0, 1, (12, 8, 8, 3)).astype("float32")
    np.savez(tmp_path / "val.npz", x=x, y=np.argmax(net.logits(x).numpy(), axis=1))
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x,
                                validation_data=str(tmp_path / "val.npz"), int8="accuracy_aware", max_drop=0.5,
                                verbose=False)
    acc = report["accuracy"]
    assert acc["output"] == "probabilities"
    assert acc["original"] == acc["stripped"] == acc["onnx"] == acc["openvino_fp32"] == 1.0
    assert report["steps"]["int8"]["fp32_metric"] == 1.0


def test_a_signature_that_draws_random_numbers_is_refused_by_name(tmp_path, rng):
    """A serving function that adds noise (tf.random.uniform, Monte Carlo dropout) gives different outputs on
    every call: no step can be checked against it. The error names the random op; it blamed the stripper
    ('stripped model outputs differ from the original')."""
    _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"y": n.logits(x) + tf.random.uniform([3], 0, 1e-3)})
    with pytest.raises(ExportError, match=r"draws random numbers \(RandomUniform"):
        export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    assert not (tmp_path / "out").exists()
    # a TF1 dropout whose keep_prob defaults to 1 draws random numbers that change nothing: it is exported
    samples, expected = _tf1_saved_model(tmp_path / "tf1", rng, dropout=True)
    report = export_saved_model(str(tmp_path / "tf1"), str(tmp_path / "out"), calibration_data=samples,
                                int8="none", verbose=False)
    assert report["steps"]["openvino"]["max_rel_error"] < 1e-5


def test_a_float64_model_is_exported_and_its_int8_refused_up_front(tmp_path, rng):
    """A model computing in float64 (scientific code): the IR runs it, but OpenVINO's CPU plugin cannot compile
    the calibrated model ('does not support f64 for use with oneDNN'), which ended the command in a traceback
    after all the other work. INT8 is refused before any work; without it the export succeeds."""
    net = tf.Module()
    net.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 4)))
    net.serve = tf.function(lambda x: {"y": tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(x, net.kernel, 1, "SAME")), [1, 2])},
                            input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float64, name="x")])
    tf.saved_model.save(net, str(tmp_path / "sm"), signatures={"serving_default": net.serve})
    x = rng.uniform(0, 1, (4, 8, 8, 3))
    with pytest.raises(ExportError, match="float64"):
        export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x, verbose=False)
    assert not (tmp_path / "out").exists()
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x, int8="none",
                                verbose=False)
    assert report["steps"]["openvino"]["max_rel_error"] < 1e-6


def test_an_input_of_unknown_rank_is_refused_with_what_to_export(tmp_path, rng):
    """A signature input of unknown rank (``TensorSpec(None)``) cannot be given check or calibration samples
    of a known shape, nor an ONNX / IR input: one error names the input (it ended in a traceback)."""
    _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"y": n.logits(tf.reshape(x, [-1, 8, 8, 3]))},
                   tf.TensorSpec(None, tf.float32, name="x"))
    with pytest.raises(ExportError, match=r"input 'x' has no known rank"):
        export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=np.zeros((2, 8, 8, 3)),
                           verbose=False)


def test_an_image_directory_for_a_uint8_input(tmp_path, rng):
    """A signature that takes uint8 pixels and scales them in the graph (Cast, / 255) reads an image folder
    as uint8 pixels; it was refused ('has float samples, the model input is uint8')."""
    spec = tf.TensorSpec([None, 8, 8, 3], tf.uint8, name="pixels")
    net = _save_tiny_net(tmp_path / "sm", rng, lambda n, x: {"probs": tf.nn.softmax(n.logits(tf.cast(x, tf.float32)
                                                                                          / 255.0))}, spec)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        (tmp_path / "images" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / f"c{k % 2}" / f"{k}.png").write_bytes(tf.io.encode_png(img).numpy())
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=str(tmp_path / "images"),
                                validation_data=str(tmp_path / "images"), verbose=False)
    scores = net.logits(tf.cast(images, tf.float32) / 255.0).numpy()
    expected = np.mean(scores.argmax(1) == np.arange(6) % 2)  # the folder of image k is c{k % 2}
    acc = report["accuracy"]
    assert acc["original"] == acc["openvino_fp32"] == pytest.approx(expected)
    assert report["steps"]["int8"]["int8_layers"]["int8"] >= 1


def test_a_text_savedmodel_through_accuracy_control(tmp_path, rng):
    """A SavedModel written as text (``saved_model.pbtxt``) goes through accuracy-aware INT8, which reads its
    variable names; that failed at the end with 'No such file or directory (.../saved_model.pb)'."""
    samples, expected = _tf1_saved_model(tmp_path / "sm", rng, as_text=True)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=samples,
                                validation_data=(samples, expected.argmax(1)), int8="accuracy_aware", max_drop=0.5,
                                verbose=False)
    assert report["steps"]["int8"]["fp32_metric"] == 1.0


def test_signatures_the_export_leaves_out_are_named(tmp_path, rng, capsys):
    """keras.export.ExportArchive-style SavedModels carry several endpoints; the stripped SavedModel keeps the
    exported signature and those with its inputs and outputs. The others were dropped without a word; now
    stderr and the report name them."""
    net = _TinyNet(rng)
    net.serve = tf.function(lambda x: {"y": net.logits(x)}, input_signature=[tf.TensorSpec([None, 8, 8, 3], name="x")])
    net.serve_u8 = tf.function(lambda x: {"y": net.logits(tf.cast(x, tf.float32) / 255.0)},
                               input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8, name="x")])
    net.twin = tf.function(lambda x: {"y": net.logits(x)}, input_signature=[tf.TensorSpec([None, 8, 8, 3], name="x")])
    tf.saved_model.save(net, str(tmp_path / "sm"), signatures={
        "serving_default": net.serve, "serve_u8": net.serve_u8, "twin": net.twin})
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    assert report["signatures_left_out"] == ["serve_u8"]
    assert "'serve_u8'" in capsys.readouterr().err
    assert sorted(tf.saved_model.load(str(tmp_path / "out" / "stripped")).signatures) == ["serving_default", "twin"]


def test_signatures_a_tf1_savedmodel_leaves_out_are_named(tmp_path, rng, capsys):
    """The same for a SavedModel only TensorFlow 1's loader can freeze (a lookup table its main_op fills)."""
    _tf1_saved_model(tmp_path / "sm", rng, table=True, more_signatures=True)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False)
    assert report["signatures_left_out"] == ["features"]
    assert "'features'" in capsys.readouterr().err

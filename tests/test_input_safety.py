"""The commands never touch their input, leave nothing half-written, and end every user-caused failure with
one line on stderr and a documented exit code (2: input or environment, 130: Ctrl-C, 143: SIGTERM)."""

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tfcompress.errors import ExportError
from tfcompress.output_dir import STAGING_PREFIX, check_output_dir, staged_output

from conftest import ROOT


def tree_digest(path) -> str:
    """Names, contents, modes and link targets of everything under ``path`` (links are not followed)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, path)} {stat.S_IFMT(st.st_mode)} {stat.S_IMODE(st.st_mode)}".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                h.update(open(p, "rb").read())
    return h.hexdigest()


def command(*args, module="tfcompress.export", cwd=None, env=None):
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


def assert_one_line_error(proc, message, code=2, alone=True):
    """Exit ``code``; stderr ends with one ``error:`` line holding ``message`` (and holds nothing else, or
    with ``alone=False`` only the command's stage lines before it)."""
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and message in lines[-1], proc.stderr[-2000:]
    others = lines[:-1]
    assert not others if alone else all(ln.startswith("[") for ln in others), proc.stderr[-2000:]


def staging_dirs(parent):
    return [p for p in os.listdir(parent) if p.startswith(STAGING_PREFIX)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small Keras SavedModel at ``<tmp>/parent/model``."""
    import keras
    from keras import layers as L

    path = tmp_path_factory.mktemp("safety") / "parent" / "model"
    model = keras.Sequential([keras.Input((8, 8, 3), name="x"), L.Conv2D(4, 3), L.GlobalAveragePooling2D(),
                              L.Dense(2)])
    model.export(str(path), verbose=False)
    return path


@pytest.fixture
def no_tensorflow(tmp_path):
    """A PYTHONPATH entry whose ``tensorflow`` fails to import: path checks must not need TensorFlow."""
    fake = tmp_path / "fake_tf"
    (fake / "tensorflow").mkdir(parents=True)
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('TensorFlow was imported')\n")
    return {"PYTHONPATH": str(fake)}


def test_hostile_output_paths_are_refused_before_tensorflow_loads(saved_model, tmp_path, no_tensorflow):
    parent = saved_model.parent
    data, images = parent / "data" / "calib.npy", parent / "images"
    data.parent.mkdir(exist_ok=True)
    np.save(data, np.zeros((2, 8, 8, 3), np.float32))
    (images / "cat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "link").symlink_to(saved_model, target_is_directory=True)
    (tmp_path / "parent_link").symlink_to(parent, target_is_directory=True)
    keras_file = parent / "model.keras"
    keras_file.write_bytes(b"PK")
    before = tree_digest(parent)
    cases = [
        # output == the input's parent, with --overwrite: replacing it would delete the input
        ([f"--saved_model_dir={saved_model}", f"--output_dir={parent}", "--overwrite"], "contains the input"),
        # output inside the input, reached through a symlinked input path
        ([f"--saved_model_dir={tmp_path / 'link'}", f"--output_dir={saved_model / 'exported'}"], "inside it"),
        # output is a symlink to the input
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'link'}", "--overwrite"], "inside it"),
        # the input itself, spelled with ..
        ([f"--saved_model_dir={saved_model}", f"--output_dir={saved_model / '..' / 'model'}", "--overwrite"],
         "inside it"),
        # inside the input through a symlinked parent
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'parent_link' / 'model' / 'x'}"],
         "inside it"),
        ([f"--saved_model_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'out'}"], "does not exist"),
        # a Keras model file given for the SavedModel: the error says how to make one
        ([f"--saved_model_dir={keras_file}", f"--output_dir={tmp_path / 'out'}"], "is a Keras model file"),
        ([f"--saved_model_dir={saved_model}", "--output_dir=/proc/tfcompress_out"], "cannot write"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={saved_model / 'saved_model.pb'}"], "inside it"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}", "--no_such_flag=1"],
         "no_such_flag"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}", "--int8=fast"], "--int8"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}", "--max_drop=x"], "max_drop"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}", "--max_iterations=-1"],
         "max_iterations"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}",
          f"--calibration_data={saved_model / 'saved_model.pb'}"], "must be a .npy or .npz file"),
        # the data files are inputs too: --overwrite of the folder holding them would delete them
        ([f"--saved_model_dir={saved_model}", f"--output_dir={data.parent}", f"--calibration_data={data}",
          "--overwrite"], "contains the input"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={images}", f"--validation_data={images}",
          "--overwrite"], "inside it"),
        ([f"--saved_model_dir={saved_model}", f"--output_dir={images / 'out'}", f"--calibration_data={images}"],
         "inside it"),
    ]
    for args, message in cases:
        assert_one_line_error(command(*args, env=no_tensorflow), message)
        assert tree_digest(parent) == before, args
        assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path) and not staging_dirs(parent)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(saved_model)


def test_accuracy_aware_without_calibration_data_is_refused_before_tensorflow_loads(saved_model, tmp_path,
                                                                                       no_tensorflow):
    """--int8=accuracy_aware without --calibration_data wrote no INT8 model, measured nothing and exited 0."""
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 8, 8, 3), np.float32), y=np.array([0, 1]))
    proc = command(f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}",
                   f"--validation_data={tmp_path / 'val.npz'}", "--int8=accuracy_aware", env=no_tensorflow)
    assert_one_line_error(proc, "--int8=accuracy_aware needs --calibration_data")
    assert not (tmp_path / "out").exists()


def test_the_python_api_names_its_parameters_not_the_commands_flags(saved_model, tmp_path):
    from tfcompress.export import export_saved_model

    x = np.zeros((2, 8, 8, 3), np.float32)
    cases = [(dict(int8="accuracy_aware", calibration_data=x), "int8='accuracy_aware' needs validation_data"),
             (dict(int8="accuracy_aware", validation_data=(x, [0, 1])), "needs calibration_data"),
             (dict(opset=9), "opset must be in 13..18")]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message) as e:
            export_saved_model(str(saved_model), str(tmp_path / "out"), **kwargs)
        assert "--" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--max_drop=0.02", "--max_iterations=5", "--allow_drop_miss"])
def test_accuracy_control_flags_without_accuracy_control_are_refused(flag, saved_model, tmp_path, no_tensorflow):
    """They were silently ignored: a user who set --max_drop got an export that never looked at it."""
    proc = command(f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}", flag, env=no_tensorflow)
    assert_one_line_error(proc, f"{flag.split('=')[0]} only applies to --int8=accuracy_aware")
    assert not (tmp_path / "out").exists()


def test_data_and_signature_mistakes_are_refused_before_tensorflow_loads(saved_model, tmp_path, no_tensorflow):
    """Each was found only after TensorFlow had loaded (seconds later), or not at all: accuracy control without
    validation data, an unknown --signature, an image folder with no images in class sub-folders, an .npz whose
    samples' array is not named (the first array was taken silently), labels that are no class indices."""
    x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
    np.save(tmp_path / "calib.npy", x)
    flat, empty = tmp_path / "flat", tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    flat.mkdir()
    (flat / "0.png").write_bytes(b"\x89PNG")  # only its name is looked at before TensorFlow loads
    np.savez(tmp_path / "two_arrays.npz", image=x, meta=np.zeros((4, 5), np.float32))
    np.savez(tmp_path / "nan_labels.npz", x=x, y=np.array([0, np.nan, 1, 0]))
    np.savez(tmp_path / "negative_labels.npz", x=x, y=np.array([0, 1, -1, 0]))
    model, out = f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}"
    cases = [
        ([f"--calibration_data={tmp_path / 'calib.npy'}", "--int8=accuracy_aware"],
         "--int8=accuracy_aware needs --validation_data"),
        (["--signature=serving"], "has no 'serving' signature (it has ['serve', 'serving_default'])"),
        ([f"--calibration_data={flat}"], "holds no images (.bmp .gif .jpeg .jpg .png) in class sub-folders; the "
                                         "images in the folder itself are not read"),
        ([f"--validation_data={empty}"], "holds no images"),
        ([f"--calibration_data={tmp_path / 'two_arrays.npz'}"],
         "holds the arrays ['image', 'meta'], none of them named after the model input 'x'"),
        ([f"--validation_data={tmp_path / 'nan_labels.npz'}"], "not class indices (whole numbers from 0 within "
                                                                "int64's range): label 1 is nan"),
        ([f"--validation_data={tmp_path / 'negative_labels.npz'}"], "label 2 is -1"),
    ]
    for args, message in cases:
        assert_one_line_error(command(model, out, *args, env=no_tensorflow), message)
        assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_the_signatures_are_read_from_the_meta_graph_tensorflow_loads(tmp_path):
    """With several meta graphs TensorFlow loads the one tagged exactly 'serve' (tf.saved_model.load refuses
    to choose; the TF1 loader matches the tag set): the one tagged 'serve' and 'tpu' written before it was read
    instead, and its signatures refused a --signature the loaded one has."""
    from tensorflow.core.protobuf import saved_model_pb2

    from tfcompress.saved_model_dir import check_signature, signature_inputs, signature_keys

    def write(tag_sets: list[list[str]]) -> str:
        sm = saved_model_pb2.SavedModel()
        for tags in tag_sets:
            mg = sm.meta_graphs.add()
            mg.meta_info_def.tags.extend(tags)
            t = mg.signature_def["_".join(tags)].inputs["x"]
            t.name, t.dtype = "x:0", 1  # float32
            t.tensor_shape.dim.add().size = -1
        folder = tmp_path / "_".join("+".join(tags) for tags in tag_sets)
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(sm.SerializeToString())
        return str(folder)

    for tag_sets in ([["serve", "tpu"], ["serve"]], [["serve"], ["serve", "gpu"]]):
        d = write(tag_sets)
        assert signature_keys(d) == ["serve"]
        assert signature_inputs(d, "serve") == {"x": ("float32", [None])}
        check_signature(d, "serve")
        with pytest.raises(ExportError, match=r"has no 'serve_tpu' signature \(it has \['serve'\]\)"):
            check_signature(d, "serve_tpu")
    only = write([["train"]])  # the only meta graph: TensorFlow loads it, whatever its tags
    assert signature_keys(only) == ["train"]
    none_serve = write([["serve", "tpu"], ["train"]])  # TensorFlow loads none of them: it says why
    assert signature_keys(none_serve) is None and signature_inputs(none_serve, "serve_tpu") is None
    check_signature(none_serve, "serving_default")


def test_a_closed_standard_output_ends_the_command_without_a_traceback(tmp_path):
    """`python -m tfcompress.export --help | head -3` printed a BrokenPipeError traceback."""
    for module in ("tfcompress.export", "tfcompress.demo"):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the command writes
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", module, "--help"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=300)
        os.close(write_end)
        assert proc.returncode == 141 and proc.stderr == "", (module, proc.returncode, proc.stderr[-2000:])


def test_a_symlinked_output_is_replaced_not_followed(saved_model, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    with pytest.raises(ExportError, match="symbolic link"):
        check_output_dir(str(tmp_path / "out"), [str(saved_model)], overwrite=False)
    check_output_dir(str(tmp_path / "out"), [str(saved_model)], overwrite=True)
    with staged_output(str(tmp_path / "out"), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert not (tmp_path / "out").is_symlink() and os.listdir(tmp_path / "out") == ["new.txt"]
    assert os.listdir(target) == ["mine.txt"]


def test_output_spelled_with_a_trailing_slash_or_dots_is_written_there(tmp_path, monkeypatch):
    """``out/``, ``out/.`` and ``x/../out`` name the directory ``out``, as the shell does: it is checked and
    written there (not its parent), and a symbolic link spelled ``link/`` is still a link."""
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    for spelling in ("out/", "out//", "out/.", "x/../out"):
        for existing in (False, True):
            if existing:
                (tmp_path / "out").mkdir()
            check_output_dir(spelling, [str(src)])
            with staged_output(spelling) as tmp:
                open(os.path.join(tmp, "new.txt"), "w").close()
            assert os.listdir(tmp_path / "out") == ["new.txt"], spelling
            assert sorted(os.listdir(tmp_path)) == ["out", "src", "x"], spelling
            shutil.rmtree(tmp_path / "out")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(ExportError, match="symbolic link"):
        check_output_dir("link/", [str(src)])
    with pytest.raises(ExportError, match="contains the input"):
        check_output_dir("src/..", [str(src)], overwrite=True)


def test_a_failed_or_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with staged_output(str(out)) as tmp:
                open(os.path.join(tmp, "half.bin"), "wb").close()
                raise exc
        assert os.listdir(tmp_path) == []  # no output, no staging directory, no parents it created
    # an existing output survives a failed replacement
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(str(out), overwrite=True):
            raise RuntimeError("boom")
    assert os.listdir(out) == ["old.txt"] and not staging_dirs(out.parent)


def test_staging_left_by_a_killed_run_is_removed_by_the_next(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{STAGING_PREFIX}{dead.pid}-abc123"
    (stale / "stripped").mkdir(parents=True)
    alive = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-xyz"  # a live process's: may still be working
    alive.mkdir()
    user = tmp_path / ".tfcompress-notes"  # not ours: no pid in the name
    user.mkdir()
    with staged_output(str(tmp_path / "out")):
        pass
    assert not stale.exists() and alive.exists() and user.exists() and (tmp_path / "out").is_dir()


def test_data_files_numpy_cannot_read_get_one_line_errors(tmp_path):
    import tensorflow as tf

    from tfcompress.export.data import load_data

    spec = {"x": tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")}
    good = np.zeros((4, 8, 8, 3), np.float32)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")
    np.save(tmp_path / "good.npy", good)
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "good.npz", x=good, y=np.arange(4))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) - 200])
    (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with zipfile.ZipFile(tmp_path / "badmember.npz", "w") as z:
        z.writestr("x.npy", b"\x93NUMPY garbage")
    for name in ("pickled.npy", "text.npy", "truncated.npy", "truncated.npz", "notzip.npz", "badmember.npz"):
        with pytest.raises(ExportError, match="calibration data .* not a readable numpy file"):
            load_data(str(tmp_path / name), spec, "calibration data")
    assert load_data(str(tmp_path / "good.npz"), spec)[1].tolist() == [0, 1, 2, 3]


def test_samples_that_are_not_finite_real_float32_are_refused(tmp_path):
    """float64 samples beyond float32's range would be infinite in the model; complex ones would lose their
    imaginary part: both are one-line errors, not NaN outputs or a silent cast."""
    import tensorflow as tf

    from tfcompress.export.data import load_data

    spec = {"x": tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")}
    big = np.ones((4, 8, 8, 3))
    big[2, 1, 1, 0] = 1e300
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(ExportError, match="NaN or infinite"):
        load_data(str(tmp_path / "big.npy"), spec, "calibration data")
    with pytest.raises(ExportError, match="complex128, not real numbers"):
        load_data(np.ones((4, 8, 8, 3)) + 1j, spec, "calibration data")
    assert load_data(big.clip(0, 1), spec)[0]["x"].dtype == np.float32


def test_an_image_folder_with_a_broken_image_names_it(tmp_path):
    import tensorflow as tf

    from tfcompress.export.data import load_data

    spec = {"x": tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")}
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "cat" / "a.png").write_bytes(tf.io.encode_png(img).numpy())
    (tmp_path / "imgs" / "cat" / "b.png").write_bytes(b"")  # an interrupted download
    with pytest.raises(ExportError, match="calibration data: cannot decode the image .*b.png"):
        load_data(str(tmp_path / "imgs"), spec, "calibration data")


@pytest.mark.parametrize("shape, message", [
    ((None, None, None, 3), r"takes images of any size \(None, None, 3\).* give the samples as a \.npy"),
    ((None, 8, 8, 2), r"needs a model input of shape \(batch, H, W, 1\|3\), not \(8, 8, 2\)"),
])
def test_an_image_folder_for_an_input_it_cannot_be_resized_to_says_why(tmp_path, shape, message):
    """An image folder is read at the input's size, which an input of any size (a fully convolutional model)
    does not have; a .npy / .npz holds samples of one size."""
    from tfcompress.export.data import InputSpec, load_data

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(ExportError, match=message):
        load_data(str(tmp_path / "imgs"), {"x": InputSpec(shape, np.dtype("float32"))}, "calibration data")


def test_integer_samples_outside_the_inputs_dtype_are_refused():
    """Token ids of int64 beyond int32 would wrap around in the cast to the model's int32 input."""
    import tensorflow as tf

    from tfcompress.export.data import load_data

    spec = {"tokens": tf.TensorSpec((None, 10), tf.int32, name="tokens")}
    with pytest.raises(ExportError, match="outside the range of the model input 'tokens' \\(int32\\)"):
        load_data(np.full((4, 10), 2**40), spec, "calibration data")
    assert load_data(np.full((4, 10), 2**31 - 1), spec)[0]["tokens"].dtype == np.int32


def test_labels_are_class_indices_or_one_hot(saved_model, tmp_path):
    """One-hot labels (keras.utils.to_categorical) are read as their class indices; labels that are no class
    indices (text, NaN, fractions, soft or multi-dimensional targets) are one-line errors before any work."""
    import tensorflow as tf

    from tfcompress.export import export_saved_model
    from tfcompress.export.data import load_data

    spec = {"x": tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")}
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    idx = np.array([0, 1, 1, 0, 1, 0])
    for y in (idx, idx[:, None], idx.astype(np.float32), np.eye(2)[idx], np.eye(2, dtype=bool)[idx]):
        assert load_data((x, y), spec)[1].tolist() == idx.tolist(), y
    bad = [np.array(["a"] * 6), np.full(6, np.nan), idx + 0.5, np.array([[0.9, 0.1]] * 6),
           np.zeros((6, 2, 2)), np.array(3)]
    for y in bad:
        with pytest.raises(ExportError, match="validation data .*label"):
            load_data((x, y), spec, "validation data")
    np.savez(tmp_path / "onehot.npz", x=x, y=np.eye(2, dtype=np.float32)[idx])
    report = export_saved_model(str(saved_model), str(tmp_path / "out"), int8="none",
                                validation_data=str(tmp_path / "onehot.npz"), verbose=False)
    logits = tf.saved_model.load(str(saved_model)).signatures["serving_default"](x=tf.constant(x))
    expected = float(np.mean(np.argmax(list(logits.values())[0].numpy(), axis=1) == idx))
    assert report["accuracy"]["original"] == report["accuracy"]["openvino_fp32"] == expected


def test_labels_must_name_a_class_the_output_scores(saved_model, tmp_path):
    """Accuracy is the argmax of the output: a one-unit sigmoid classifier's is always 0, so the export reported
    the share of label 0 (0.875 for a model right on every sample) and accuracy control measured no drop; labels
    beyond the output's classes were silently counted as wrong."""
    import keras
    from keras import layers as L

    from tfcompress.export import export_saved_model

    binary = keras.Sequential([keras.Input((6,), name="x"), L.Dense(1, activation="sigmoid")])
    binary.export(str(tmp_path / "binary"), verbose=False)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=(binary.predict(x, verbose=0)[:, 0] > 0.5).astype(np.int64))
    proc = command(f"--saved_model_dir={tmp_path / 'binary'}", f"--output_dir={tmp_path / 'out'}",
                   f"--calibration_data={tmp_path / 'val.npz'}", f"--validation_data={tmp_path / 'val.npz'}",
                   "--int8=accuracy_aware")
    assert_one_line_error(proc, "has 1 value per sample", alone=False)
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)
    images = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ExportError, match=r"labels in \[0, 3\], but the model output .* scores 2 classes"):
        export_saved_model(str(saved_model), str(tmp_path / "out2"), int8="none",
                           validation_data=(images, np.array([0, 1, 3, 1])), verbose=False)
    report = export_saved_model(str(saved_model), str(tmp_path / "out3"), int8="none",
                                validation_data=(images, np.array([0, 1, 1, 1])), verbose=False)
    assert report["accuracy"]["samples"] == 4


def test_the_report_names_the_output_accuracy_was_measured_on(tmp_path):
    """Of a model with several outputs the first by name is scored; the report did not say which."""
    import keras
    from keras import layers as L

    from tfcompress.export import export_saved_model

    inp = keras.Input((6,), name="x")
    model = keras.Model(inp, {"z_main": L.Dense(3, name="z_main")(inp), "a_aux": L.Dense(3, name="a_aux")(inp)})
    model.export(str(tmp_path / "sm"), verbose=False)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), int8="none", verbose=False,
                                validation_data=(x, model.predict(x, verbose=0)["a_aux"].argmax(1)))
    assert report["accuracy"]["output"] == "a_aux" and report["accuracy"]["original"] == 1.0
    assert "## Accuracy (8 validation samples, output `a_aux`)" in (tmp_path / "out" / "report.md").read_text()


def test_a_pickled_data_file_through_the_command(saved_model, tmp_path):
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    before = tree_digest(saved_model)
    proc = command(f"--saved_model_dir={saved_model}", f"--output_dir={tmp_path / 'out'}",
                   f"--calibration_data={tmp_path / 'pickled.npy'}")
    assert_one_line_error(proc, "not a readable numpy file", alone=False)
    assert tree_digest(saved_model) == before and not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_os_errors_become_one_line(tmp_path):
    """A full disk or an unwritable location met during the work: one line, exit 2 (a command whose work
    raises the OSError: a real full disk cannot be made here without privileges CI may lack)."""
    code = (
        "import errno, sys\n"
        "from tfcompress._cli import run\n"
        "def main(argv):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', '/data/out/model.onnx')\n"
        "run(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert_one_line_error(proc, "no space left on the device (/data/out/model.onnx)")


def _default_interrupt() -> None:
    """Ctrl-C as a terminal's foreground job gets it: a shell without job control (CI scripts, ``cmd &``) starts
    its background commands with SIGINT ignored, the child inherits that, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_an_interrupted_export_exits_cleanly(saved_model, tmp_path, sig, code, word):
    rng = np.random.default_rng(0)
    # enough validation samples that the last stage (accuracy of every artifact) takes seconds even on an idle
    # machine: the signal lands while the output is complete in the staging directory but not yet in place
    n = 240_000
    np.savez(tmp_path / "val.npz", x=rng.normal(size=(n, 8, 8, 3)).astype(np.float32), y=rng.integers(0, 2, n))
    before = tree_digest(saved_model)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={saved_model}",
                             f"--output_dir={tmp_path / 'a' / 'out'}", f"--validation_data={tmp_path / 'val.npz'}",
                             "--int8=none"], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_interrupt)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[5/5]"):
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == code, "".join(seen) + rest
    assert rest.strip().splitlines() == [f"error: {word}; nothing was written"], rest
    assert not (tmp_path / "a").exists()  # no output, no staging directory, no parent it created
    assert tree_digest(saved_model) == before


def test_outputs_have_the_users_file_mode(saved_model, tmp_path):
    from tfcompress.export import export_saved_model

    old = os.umask(0o022)
    try:
        export_saved_model(str(saved_model), str(tmp_path / "out"), int8="none", verbose=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.onnx"] == modes["model_fp32.xml"] == modes["report.json"] == 0o644
    assert modes["stripped"] == 0o755


def test_calibrate_rejects_nan_and_inf(tmp_path, saved_model):
    import openvino as ov

    from tfcompress import calibration

    model = ov.convert_model(str(saved_model))
    for bad in (np.nan, np.inf):
        x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
        x[3, 1, 1, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            calibration.calibrate(model, x, subset_size=16, verbose=False)


def test_an_interrupt_that_native_code_turned_into_another_exception_still_exits_130(tmp_path):
    """Ctrl-C while TensorFlow builds a graph (the demo's fit) came back as a pybind11 RuntimeError or a
    graph-nesting AssertionError: a traceback and exit code 1 instead of the one line and 130."""
    script = tmp_path / "interrupted_command.py"
    script.write_text(
        "import os, signal\n"
        "from tfcompress._cli import run\n"
        "def main(argv):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        signal.pause()\n"
        "    except KeyboardInterrupt:\n"
        "        raise RuntimeError('pybind11::error_already_set: MISMATCH ... REPLACED BY KeyboardInterrupt')\n"
        "run(main)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert_one_line_error(proc, "interrupted; nothing was written", code=130)


def test_an_interrupt_while_the_flags_are_parsed_exits_130(tmp_path):
    """Ctrl-C while absl parsed the flags (a --flagfile being read, a flag's parser) came before the signal
    handlers and the error handling: a KeyboardInterrupt traceback."""
    script = tmp_path / "interrupted_flags.py"
    script.write_text(
        "import os, signal\n"
        "from absl import flags\n"
        "from tfcompress._cli import run\n"
        "class Interrupted(flags.ArgumentParser):\n"
        "    def parse(self, argument):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        signal.pause()\n"
        "flags.DEFINE(Interrupted(), 'slow', None, 'a flag whose parsing the user interrupts')\n"
        "run(lambda argv: 0)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), "--slow=1"], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert_one_line_error(proc, "interrupted; nothing was written", code=130)


def declared_saved_model(folder, inputs: dict, outputs: dict):
    """A ``saved_model.pb`` that declares only a ``serving_default`` signature with these inputs and outputs
    (name -> dims, -1 unknown, None for an unknown rank; float32): what the export reads before TensorFlow."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    mg = sm.meta_graphs.add()
    mg.meta_info_def.tags.append("serve")
    signature = mg.signature_def["serving_default"]
    for tensors, declared in ((signature.inputs, inputs), (signature.outputs, outputs)):
        for name, dims in declared.items():
            t = tensors[name]
            t.name, t.dtype = f"{name}:0", 1
            if dims is None:
                t.tensor_shape.unknown_rank = True
            for d in dims or ():
                t.tensor_shape.dim.add().size = d
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(sm.SerializeToString())
    return folder


def test_rank_labels_and_chunked_models_are_refused_before_tensorflow_loads(tmp_path, no_tensorflow):
    """An input of unknown rank was refused only after TensorFlow loaded; labels beyond the classes the output
    declares (from a .npz or an image folder's class sub-folders) only after the model ran; labels of 1e20
    overflowed int64 silently; a chunked saved_model.cpb was called "not a SavedModel"."""
    images = declared_saved_model(tmp_path / "images", {"x": [-1, 8, 8, 3]}, {"probs": [-1, 4]})
    any_rank = declared_saved_model(tmp_path / "any_rank", {"x": None}, {"probs": [-1, 4]})
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    (chunked / "saved_model.cpb").write_bytes(b"")
    x = np.zeros((3, 8, 8, 3), np.float32)
    np.savez(tmp_path / "huge.npz", x=x, y=np.array([0, 1e20, 1]))
    np.savez(tmp_path / "class4.npz", x=x, y=np.array([0, 4, 1]))
    folder = tmp_path / "folder"
    for k in range(6):
        (folder / f"class{k}").mkdir(parents=True)
    (folder / "class4" / "a.png").write_bytes(b"\x89PNG")  # label 4 (class5 holds no image)
    cases = [
        (any_rank, [f"--calibration_data={tmp_path / 'huge.npz'}"], "input 'x' has no known rank"),
        (images, [f"--validation_data={tmp_path / 'huge.npz'}"], "within int64's range): label 1 is 1e+20"),
        (images, [f"--validation_data={tmp_path / 'class4.npz'}"],
         "labels in [0, 4], but the model output 'probs' scores 4 classes"),
        (images, [f"--validation_data={folder}"], "labels in [4, 4], but the model output 'probs' scores 4 classes"),
        (chunked, [], "holds a chunked SavedModel (saved_model.cpb"),
    ]
    for model, args, message in cases:
        proc = command(f"--saved_model_dir={model}", f"--output_dir={tmp_path / 'out'}", *args, env=no_tensorflow)
        assert_one_line_error(proc, message)
        assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_the_checks_before_tensorflow_read_saved_model_pb_once(tmp_path):
    """check_args parsed saved_model.pb for the signature and check_data_files parsed it again for the inputs:
    the signatures check_args returns serve both (the file can go after the first read). Labels the declared
    classes take, and labels of calibration data (not scored), pass."""
    from tfcompress.export.data import check_data_files
    from tfcompress.export.options import check_args

    model = declared_saved_model(tmp_path / "m", {"x": [-1, 8, 8, 3]}, {"probs": [-1, 4]})
    x = np.zeros((3, 8, 8, 3), np.float32)
    np.savez(tmp_path / "good.npz", x=x, y=np.array([0, 3, 1]))
    np.savez(tmp_path / "bad.npz", x=x, y=np.array([0, 4, 1]))
    serving = check_args(str(model), str(tmp_path / "out"), signature_key="serving_default")
    (model / "saved_model.pb").unlink()
    data = {"--calibration_data": str(tmp_path / "bad.npz"), "--validation_data": str(tmp_path / "good.npz")}
    check_data_files(str(model), "serving_default", data, scored="--validation_data", serving=serving)
    with pytest.raises(ExportError, match="scores 4 classes"):
        check_data_files(str(model), "serving_default", {"--validation_data": str(tmp_path / "bad.npz")},
                         scored="--validation_data", serving=serving)


BROKEN_PIPE = """
import socket, sys
from tfcompress._cli import run

def main(argv):
    if argv[-1] == "socket":  # a connection of the command's own, whose peer has gone
        ours, peer = socket.socketpair()
        peer.close()
        ours.sendall(b"x" * 1_000_000)
    else:
        for _ in range(100_000):
            print("line " * 20)
    return 0

run(main)
"""


def test_only_a_closed_standard_output_is_reported_as_one(tmp_path):
    """Every BrokenPipeError was reported as "standard output was closed" (exit 141), also one from a socket
    or pipe the command opened itself, whose reader had gone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", BROKEN_PIPE, "socket"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert_one_line_error(proc, "a pipe or connection the command wrote to was closed by its reader (Broken pipe)")
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-c", BROKEN_PIPE, "stdout"], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: standard output was closed before the command finished", proc.stderr


def test_tfx_options_are_checked_before_the_examples_are_read(tmp_path):
    """compress_model_dir read the examples before it refused max_drop / opset (named as the command's flags),
    and int8="accuracy_aware" without label_key asked for --validation_data, which the component has not."""
    from tfcompress.export.artifacts import compress_model_dir

    missing = str(tmp_path / "no_examples")  # reading it would fail: the options must be refused first
    for kwargs, message in [({"max_drop": 2.0}, r"^max_drop must be in \[0, 1\), got 2.0"),
                            ({"opset": 12}, r"^opset must be in 13..18"),
                            ({"int8": "accuracy_aware"}, r"give examples and label_key")]:
        with pytest.raises(ExportError, match=message):
            compress_model_dir(str(tmp_path / "model"), str(tmp_path / "out"), missing, **kwargs)
    assert not (tmp_path / "out").exists()


def test_data_for_a_scalar_input_is_refused_in_one_line(tmp_path, no_tensorflow):
    """A signature input of shape () (a temperature, a boolean switch: one value per call) cannot be fed from
    samples: the command said ``TypeError: len() of unsized object`` (a traceback) for a 0-d array in the
    .npz; now one line, before TensorFlow loads, for a 0-d array and for one value per sample alike."""
    import tensorflow as tf

    class Tempered(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x"),
                                      tf.TensorSpec([], tf.float32, name="temperature")])
        def __call__(self, x, temperature):
            return {"probs": tf.nn.softmax(x / temperature)}

    module = Tempered()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    x = np.ones((4, 3), np.float32)
    np.savez(tmp_path / "one_value.npz", x=x, temperature=np.float32(2.0))
    np.savez(tmp_path / "per_sample.npz", x=x, temperature=np.full(4, 2.0, np.float32))
    for data in ("one_value.npz", "per_sample.npz"):
        proc = command(f"--saved_model_dir={tmp_path / 'model'}", f"--output_dir={tmp_path / 'out'}",
                       f"--calibration_data={tmp_path / data}", env=no_tensorflow)
        assert_one_line_error(proc, "the model input 'temperature' is a scalar (shape ())")
        assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_data_named_by_a_dict_arguments_keys_is_refused_with_the_inputs_shapes(tmp_path, no_tensorflow):
    """``tf.function(input_signature=[{"image": ..., "meta": ...}])`` saved by ``tf.saved_model.save`` names
    its signature inputs ``inputs`` and ``inputs_1``, not by the dict's keys: the error gives each input's shape
    and type, which tell the user which array goes under which name."""
    import tensorflow as tf

    class TwoInputs(tf.Module):
        @tf.function(input_signature=[{"image": tf.TensorSpec([None, 4, 4, 3], tf.float32),
                                       "meta": tf.TensorSpec([None, 2], tf.float32)}])
        def __call__(self, inputs):
            return {"out": tf.reduce_mean(inputs["image"], [1, 2]) + tf.reduce_sum(inputs["meta"], 1, True)}

    module = TwoInputs()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    np.savez(tmp_path / "by_key.npz", image=np.ones((2, 4, 4, 3), np.float32), meta=np.ones((2, 2), np.float32))
    proc = command(f"--saved_model_dir={tmp_path / 'model'}", f"--output_dir={tmp_path / 'out'}",
                   f"--calibration_data={tmp_path / 'by_key.npz'}", env=no_tensorflow)
    assert_one_line_error(proc, "the model's inputs are 'inputs' (None, 4, 4, 3) float32, 'inputs_1' (None, 2) "
                                "float32")


def test_an_image_folders_labels_are_checked_as_keras_numbers_its_sub_folders(tmp_path):
    """Keras skips hidden sub-folders (``.ipynb_checkpoints``, images included) and numbers the others, empty ones
    too: the labels checked before TensorFlow loads are those ``load_data`` reads, so a folder whose classes
    fit the output's passes, and one whose only images are hidden is refused as holding none."""
    import tensorflow as tf

    from tfcompress.export.data import check_data_files, check_image_folder, load_data

    png = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    folder = tmp_path / "imgs"
    for sub in (".ipynb_checkpoints", "a", "b", "c/nested"):
        (folder / sub).mkdir(parents=True)
    for sub in (".ipynb_checkpoints", "a", "c/nested"):
        (folder / sub / "img.png").write_bytes(png)
    labels = load_data(str(folder), {"x": tf.TensorSpec((None, 4, 4, 3), tf.float32)}, "validation data")[1]
    assert sorted(check_image_folder(str(folder), "validation data")) == sorted(set(labels)) == [0, 2]
    model = declared_saved_model(tmp_path / "m", {"x": [-1, 4, 4, 3]}, {"probs": [-1, 3]})
    check_data_files(str(model), "serving_default", {"--validation_data": str(folder)}, scored="--validation_data")
    hidden = tmp_path / "hidden"
    (hidden / ".cache").mkdir(parents=True)
    (hidden / ".cache" / "img.png").write_bytes(png)
    with pytest.raises(ExportError, match="holds no images"):
        check_image_folder(str(hidden), "validation data")

"""Calibration / validation data for the export: .npy, .npz, a directory of images, or arrays in memory.

Samples are one array per model input, by the signature's input names: a single-input model's may come as one
array (``.npy``, an image folder, or the ``x`` of an ``.npz``). Everything here but reading an image folder runs
without TensorFlow, so that the export command can refuse bad data before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Mapping

import numpy as np

from tfcompress.calibration.samples import one_array_per_input
from tfcompress.errors import ExportError
from tfcompress.export.options import check_data_path
from tfcompress.saved_model_dir import ServingSignatures, read_serving_signatures

__all__ = ["InputSpec", "check_data_files", "check_image_folder", "check_labels", "declared_classes", "input_specs",
           "load_data", "scored_output"]

_X_KEYS = ("x", "x_test", "x_val", "x_train", "images", "inputs")
_Y_KEYS = ("y", "y_test", "y_val", "y_train", "labels")
_IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what keras.utils.image_dataset_from_directory reads


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A signature input: its dimensions (None where any size goes) and numpy type."""

    shape: tuple
    dtype: np.dtype

    @classmethod
    def of(cls, spec) -> "InputSpec":
        """From a ``tf.TensorSpec``, an InputSpec, or ``(dtype name, dims)`` as
        :meth:`tfcompress.saved_model_dir.ServingSignatures.inputs` reads them."""
        if isinstance(spec, InputSpec):
            return spec
        if isinstance(spec, tuple):
            return cls(tuple(spec[1]), np.dtype(spec[0]))
        return cls(tuple(spec.shape.as_list()), np.dtype(spec.dtype.as_numpy_dtype))


def input_specs(specs: Mapping) -> dict[str, InputSpec]:
    """``specs`` (input name -> ``tf.TensorSpec``, InputSpec or ``(dtype name, dims)``) as InputSpecs."""
    return {name: InputSpec.of(spec) for name, spec in specs.items()}


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"  # ml_dtypes' bfloat16 is no np.floating


def load_data(path, specs: Mapping, what: str = "data") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Load samples (and labels when the file or folder has them), checked against the model inputs ``specs``
    (input name -> ``tf.TensorSpec`` or :class:`InputSpec`, in input order).

    * from Python callers: one array (a single-input model), a dict from input name to array, a tuple / list of
      arrays in input order (a model with several inputs), or ``(samples, labels)`` with samples in any of
      these forms;
    * ``.npy``: an array of samples (a single-input model);
    * ``.npz``: one array per input, under the input's name, with optional labels under ``y`` (or ``labels``,
      ``y_test`` ...); for a single-input model also samples under ``x`` (or ``x_test``, ``x_train`` ...);
    * a directory: images in one sub-directory per class (``keras.utils.image_dataset_from_directory``
      conventions), resized to the model's input size; labels are the sorted class folders. Pixels are
      floats in [0, 255], or rounded to whole values for an integer input (a model that scales its pixels).

    Returns ``(samples by input name, labels or None)``.

    Raises:
        ExportError: missing file, unknown format, missing or unknown input names, different sample counts per
        input, shape or dtype that does not match, NaN or inf values.
    """
    specs = input_specs(specs)
    names = list(specs)
    y = None
    if isinstance(path, (np.ndarray, dict, tuple, list)):
        x, y = _from_python(path, specs, what)
        path = "array " + ", ".join(f"{tuple(np.shape(a))}" for a in x.values())
    elif not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"{what} must be a file or directory path, an array, a dict of arrays by input name or "
                          f"(samples, labels), got {type(path).__name__}")
    else:
        check_data_path(path, what)
        if os.path.isdir(path):
            x, y = _images(path, _single(specs, what, "a directory of images"), what)
            x = {names[0]: x}
        else:
            x, y = _load_numpy(path, specs, what)
    x = {name: _checked(np.asarray(x[name]), specs[name], name, len(names) > 1, path, what) for name in names}
    counts = {name: len(a) for name, a in x.items()}
    if len(set(counts.values())) > 1:
        raise ExportError(f"{what} {path!r} holds different numbers of samples per input: "
                          + ", ".join(f"{n!r} {c}" for n, c in counts.items()))
    if y is not None:
        y = _class_indices(y, counts[names[0]], path, what)
    return x, y


def check_data_files(saved_model_dir: str, signature_key: str, data: Mapping, scored: str | None = None,
                     serving: ServingSignatures | None = None) -> None:
    """:func:`load_data` of every .npy / .npz path among ``data`` (what it is called -> path), against the inputs
    of the signature as ``saved_model.pb`` declares them, read without TensorFlow: the export command refuses
    missing or unknown input names, different sample counts, wrong shapes or types before TensorFlow loads.
    An image folder must feed a single input of shape (batch, H, W, 1|3) and hold images in class sub-folders;
    its images are decoded later, as are the files of SavedModels whose signature cannot be read so (a
    ``.pbtxt``). The labels of the entry ``scored`` (the validation data) must name a class of the output
    accuracy is measured on, when the signature declares its outputs' shapes (:func:`declared_classes`).
    ``serving``: the signatures :func:`tfcompress.export.options.check_args` read (else ``saved_model.pb`` is
    read here)."""
    paths = {what: p for what, p in data.items() if isinstance(p, (str, os.PathLike))}
    if not paths:
        return
    serving = serving or read_serving_signatures(saved_model_dir)
    specs = serving.inputs(signature_key)
    known = specs and all(dims is not None for _, dims in specs.values())
    for what, path in paths.items():
        if os.path.isdir(path):
            if known:
                _image_input(_single(input_specs(specs), what, "a directory of images"), what)
            labels = check_image_folder(path, what)
        elif known:
            labels = load_data(path, specs, what)[1]
        else:
            continue
        classes = declared_classes(serving, signature_key) if what == scored and labels is not None else None
        if classes is not None:
            check_labels(labels, classes[1], classes[0], what)


def declared_classes(serving: ServingSignatures, signature_key: str) -> tuple[str, int] | None:
    """``(output, classes)``: the output of signature ``signature_key`` accuracy is measured on
    (:func:`scored_output`) and how many values it has per sample, from the shapes ``saved_model.pb`` declares;
    None unless every output declares its per-sample shape and the one scored is a float output (an output
    the export leaves out, a lookup table's, is then not one that could be chosen instead)."""
    outputs = serving.outputs(signature_key)
    if not outputs or any(dims is None or None in dims[1:] for _, dims in outputs.values()):
        return None
    shapes = {name: (np.dtype(dtype), tuple(dims[1:])) for name, (dtype, dims) in outputs.items()}
    name = scored_output(shapes)
    return (name, int(np.prod(shapes[name][1]))) if _is_float(shapes[name][0]) else None


def scored_output(outputs: Mapping[str, tuple[np.dtype, tuple]]) -> str:
    """The output accuracy is measured on, given each output's ``(dtype, per-sample shape)``: the first by name
    with a score per class (floats of shape (classes > 1,)), so that Estimator-style ``classes`` (the argmax)
    beside ``probabilities``, or an image passed through, is passed over; else the first by name with more
    than one float per sample, else the first by name (:func:`check_labels` then says why it cannot be
    scored)."""
    keys = sorted(outputs)
    floats = [k for k in keys if _is_float(np.dtype(outputs[k][0])) and np.prod(outputs[k][1]) > 1]
    return next((k for k in floats if len(outputs[k][1]) == 1), (floats or keys)[0])


def check_image_folder(path: str, what: str) -> np.ndarray:
    """Raise :class:`ExportError` unless the directory ``path`` holds an image (``.bmp .gif .jpeg .jpg .png``)
    in a sub-folder: images are read one sub-folder per class, and those lying in ``path`` itself are not.
    Returns the labels its images will have: the positions, among the sorted sub-folders, of those holding
    images (``keras.utils.image_dataset_from_directory`` numbers every sub-folder but hidden ones, such as
    ``.ipynb_checkpoints``, whose images it does not read)."""
    try:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        labels = [k for k, name in enumerate(classes) if _holds_images(os.path.join(path, name))]
        if labels:
            return np.asarray(labels)
        loose = any(e.is_file() and e.name.lower().endswith(_IMAGE_FORMATS) for e in os.scandir(path))
    except OSError as e:
        raise ExportError(f"cannot read {what} {path!r}: {e.strerror}") from None
    raise ExportError(f"{what} {path!r} holds no images ({' '.join(_IMAGE_FORMATS)}) in class sub-folders"
                      + ("; the images in the folder itself are not read: move them into a sub-folder (one per "
                         "class)" if loose else ""))


def _holds_images(folder: str) -> bool:
    return any(f.lower().endswith(_IMAGE_FORMATS) for _, _, files in os.walk(folder) for f in files)


def _single(specs: dict, what: str, form: str):
    """The one input's spec; ExportError when ``form`` is given for a model with several inputs."""
    if len(specs) > 1:
        raise ExportError(f"{what}: the model has {len(specs)} inputs {list(specs)}; {form} feeds one input: give "
                          "a .npz with one array per input name")
    return next(iter(specs.values()))


def _from_python(data, specs: dict[str, InputSpec], what: str) -> tuple[dict, np.ndarray | None]:
    """Samples by input name (and labels) from a Python caller's arrays."""
    names = list(specs)
    if isinstance(data, (tuple, list)):
        if one_array_per_input(data, len(names)):
            return dict(zip(names, data)), None  # one array per input, in input order
        if len(data) != 2:
            raise ExportError(f"{what}: give (samples, labels), or for a model with several inputs one array per "
                              f"input {names}; got a {type(data).__name__} of {len(data)}")
        x, labels = _from_python(data[0], specs, what)
        if labels is not None:
            raise ExportError(f"{what}: the samples of (samples, labels) hold labels themselves")
        return x, np.asarray(data[1])
    if isinstance(data, dict):
        _check_names(list(data), specs, what, "")
        return dict(data), None
    if len(names) > 1:
        raise ExportError(f"{what}: the model has {len(names)} inputs {names}: give one array per input (a dict by "
                          "input name, or a tuple in input order), not one array")
    return {names[0]: data}, None


def _check_names(keys: list[str], specs: dict[str, InputSpec], what: str, path, label: str | None = None) -> None:
    """ExportError unless ``keys`` are exactly the names of the inputs ``specs`` (plus the labels' key ``label``).
    The error gives each input's shape and type: a signature traced from a dict or nested argument names its
    inputs ``inputs``, ``inputs_1`` ... (not by the dict's keys), which only their shapes tell apart."""
    names = list(specs)
    missing = [n for n in names if n not in keys]
    extra = [k for k in keys if k not in names and k != label]
    if missing or extra:
        said = ([f"no array for input(s) {missing}"] if missing else []) + (
            [f"unknown key(s) {extra}"] if extra else [])
        where = f" {path!r}" if path else ""
        inputs = ", ".join(f"{n!r} {tuple(specs[n].shape)} {specs[n].dtype.name}" for n in sorted(names))
        raise ExportError(f"{what}{where}: {'; '.join(said)}; the model's inputs are {inputs}"
                          + (f" (labels go under one of {list(_Y_KEYS)})" if path else ""))


def _checked(x: np.ndarray, spec: InputSpec, name: str, named: bool, path, what: str) -> np.ndarray:
    """``x`` as samples of the input ``name`` in its type; ExportError for a shape, type or value it cannot take.
    ``named``: the model has several inputs (messages name the one at fault)."""
    of = f" (input {name!r})" if named else ""
    if not spec.shape:
        raise ExportError(f"{what} {path!r}: the model input {name!r} is a scalar (shape ()), one value per call "
                          "rather than one per sample, which data in samples cannot feed; export a signature whose "
                          "inputs all have a batch axis (one that calls this one with the value fixed)")
    if x.ndim != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape[1:], x.shape[1:])):
        raise ExportError(f"{what} {path!r}{of} has samples of shape {tuple(x.shape[1:])}, the model input "
                          f"{name!r} expects {tuple(spec.shape[1:])}")
    if not _real_numbers(x.dtype):
        raise ExportError(f"{what} {path!r}{of} has dtype {x.dtype}, not real numbers")
    if _is_integer(spec.dtype) and np.issubdtype(x.dtype, np.floating):
        raise ExportError(f"{what} {path!r}{of} has float samples, the model input {name!r} is {spec.dtype.name}")
    if len(x) == 0:
        raise ExportError(f"{what} {path!r}{of} holds no samples")
    if _is_integer(spec.dtype):  # a cast would wrap values around silently
        info, lo, hi = np.iinfo(spec.dtype), x.min(), x.max()
        if lo < info.min or hi > info.max:
            raise ExportError(f"{what} {path!r}{of} has values in [{lo}, {hi}], outside the range of the model "
                              f"input {name!r} ({spec.dtype.name})")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range: checked just below
        x = x.astype(spec.dtype)
    if _is_float(spec.dtype) and not np.all(np.isfinite(x)):
        raise ExportError(f"{what} {path!r}{of} contains NaN or infinite values (in {spec.dtype.name})")
    return x


def check_labels(y: np.ndarray, classes: int, output: str, what: str = "validation data") -> None:
    """Raise :class:`ExportError` unless the class indices ``y`` can be scored against the model output
    ``output``, which has ``classes`` values per sample: accuracy is the share of samples whose label is the
    output's argmax, so the output needs one score per class (a one-unit sigmoid or regression output's argmax
    is always 0) and every label must name one of them."""
    if classes < 2:
        raise ExportError(f"{what} has labels, but the model output {output!r} has {classes} value per sample: "
                          "accuracy is the argmax of one score per class, which a one-unit (sigmoid or "
                          "regression) output does not give; pass the samples without labels")
    if y.min() < 0 or y.max() >= classes:
        raise ExportError(f"{what} has labels in [{y.min()}, {y.max()}], but the model output {output!r} scores "
                          f"{classes} classes (labels 0..{classes - 1})")


def _real_numbers(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` hold real numbers (booleans included; not text, objects or complex)."""
    return (np.issubdtype(dtype, np.number) or dtype == bool) and not np.issubdtype(dtype, np.complexfloating)


def _class_indices(y: np.ndarray, n: int, path, what: str) -> np.ndarray:
    """Labels as a vector of ``n`` class indices: from indices of shape (n,) or (n, 1), or from one-hot rows
    (``keras.utils.to_categorical``), which become their argmax. Accuracy compares them with the argmax of
    the model's output, so anything else (text, NaN, fractions, soft targets) is refused, not miscounted."""
    if y.ndim == 0:
        raise ExportError(f"{what} {path!r} has a single number as labels, not one per sample")
    if len(y) != n:
        raise ExportError(f"{what} {path!r} has {n} samples but {len(y)} labels")
    if not _real_numbers(y.dtype):
        raise ExportError(f"{what} {path!r} has labels of dtype {y.dtype}; give class indices (integers)")
    rows = y.reshape(n, -1)
    one_hot = rows.shape[1] > 1 and np.isin(rows, (0, 1)).all() and (rows.sum(axis=1) == 1).all()
    if one_hot:
        return np.argmax(rows, axis=1)
    if rows.shape[1] != 1:
        raise ExportError(f"{what} {path!r} has labels of shape {y.shape[1:]} that are neither class indices "
                          "nor one-hot rows")
    labels = rows[:, 0]
    with np.errstate(invalid="ignore"):  # NaN: refused as not finite
        bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0) | (labels >= 2 ** 63)
    if bad.any():
        i = int(np.argmax(bad))
        raise ExportError(f"{what} {path!r} has labels that are not class indices (whole numbers from 0 within "
                          f"int64's range): label {i} is {labels[i]}")
    return labels.astype(np.int64)


def _load_numpy(path: str, specs: dict, what: str) -> tuple[dict, np.ndarray | None]:
    """Samples by input name (and labels) from a .npy or .npz file; ExportError for anything numpy cannot read
    safely (pickled objects, text, truncated or corrupt files) or that does not name the inputs."""
    names = list(specs)
    try:
        if str(path).endswith(".npy"):
            _single(specs, what, "a .npy file")
            return {names[0]: np.load(path, allow_pickle=False)}, None
        with np.load(path, allow_pickle=False) as d:
            if not d.files:
                raise ExportError(f"{what} {path!r} holds no arrays")
            yk = next((k for k in _Y_KEYS if k in d and k not in names), None)
            if len(names) == 1 and names[0] not in d:  # one input's samples under x (or x_test ...)
                xk = next((k for k in _X_KEYS if k in d), None)
                if xk is None:  # else the only array that is not the labels
                    others = [k for k in d.files if k != yk]
                    if len(others) != 1:
                        raise ExportError(f"{what} {path!r} holds the arrays {d.files}, none of them named after the "
                                          f"model input {names[0]!r} or {_X_KEYS[0]!r}: name the samples' array so")
                    xk = others[0]
                return {names[0]: d[xk]}, (d[yk] if yk else None)
            _check_names(list(d.files), specs, what, path, yk)
            return {n: d[n] for n in names}, (d[yk] if yk else None)
    except ExportError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # unreadable file: permissions, I/O error
            raise ExportError(f"cannot read {what} {path!r}: {e.strerror}") from None
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{what} {path!r} is not a readable numpy file of numbers ({detail})") from None


def _image_input(spec: InputSpec, what: str) -> list:
    """The input's shape, checked to be one an image folder can feed: (batch, H, W, 1|3) with H and W known."""
    shape = list(spec.shape)
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise ExportError(f"{what}: an image directory needs a model input of shape (batch, H, W, 1|3), "
                          f"not {tuple(shape[1:])}")
    if shape[1] is None or shape[2] is None:  # the images are resized to the input's size, and it has none
        raise ExportError(f"{what}: the model takes images of any size {tuple(shape[1:])}, and an image directory "
                          "is read at the input's size: give the samples as a .npy / .npz of the size to calibrate "
                          "at (samples of several sizes: calibration.calibrate on a list of arrays)")
    return shape


def _images(path: str, spec: InputSpec, what: str):
    shape = _image_input(spec, what)
    check_image_folder(path, what)
    import keras
    import tensorflow as tf

    try:
        ds = keras.utils.image_dataset_from_directory(
            path, image_size=(shape[1], shape[2]), batch_size=None, shuffle=False,
            color_mode="grayscale" if shape[3] == 1 else "rgb", verbose=False,
        )
    except Exception as e:
        raise ExportError(f"{what} {path!r}: {str(e).splitlines()[0]}") from None
    xs, ys = [], []
    try:
        for img, label in ds:
            xs.append(img.numpy())
            ys.append(int(label.numpy()))
    except tf.errors.OpError as e:  # files are read in order (shuffle=False): the next one is the bad one
        reason = e.message.splitlines()[0].rsplit(": ", 1)[-1]  # after the dataset's function and node names
        raise ExportError(f"{what}: cannot decode the image {ds.file_paths[len(xs)]!r} ({reason})") from None
    if not xs:
        raise ExportError(f"{what} {path!r} holds no images")
    x = np.stack(xs)
    if _is_integer(spec.dtype):  # a model that takes pixels (uint8, int32) and scales them itself
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x, np.asarray(ys)

"""Calibration / validation data for the export: .npy, .npz, a directory of images, or arrays in memory."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import tensorflow as tf

from tfcompress.errors import ExportError
from tfcompress.export.options import check_data_path

__all__ = ["load_data", "check_labels"]

_X_KEYS = ("x", "x_test", "x_val", "x_train", "images", "inputs")
_Y_KEYS = ("y", "y_test", "y_val", "y_train", "labels")


def load_data(path, spec: tf.TensorSpec, what: str = "data") -> tuple[np.ndarray, np.ndarray | None]:
    """Load samples (and labels when the file or folder has them), checked against the model input ``spec``.

    * an array of samples, or a tuple ``(samples, labels)``: used as they are (from Python callers);
    * ``.npy``: an array of samples.
    * ``.npz``: samples under ``x`` (or ``x_test``, ``x_train`` ...), optional labels under ``y`` (...).
    * a directory: images in one sub-directory per class (``keras.utils.image_dataset_from_directory``
      conventions), resized to the model's input size; labels are the sorted class folders. Pixels are
      floats in [0, 255], or rounded to whole values for an integer input (a model that scales its pixels).

    Raises:
        ExportError: missing file, unknown format, shape or dtype that does not match, NaN or inf values.
    """
    y = None
    if isinstance(path, (np.ndarray, tuple, list)):
        x, y = (path[0], path[1]) if isinstance(path, (tuple, list)) else (path, None)
        x, y = np.asarray(x), None if y is None else np.asarray(y)
        path = f"array {tuple(x.shape)}"
    elif not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"{what} must be a file or directory path, an array or (samples, labels), "
                          f"got {type(path).__name__}")
    else:
        check_data_path(path, what)
        x, y = _images(path, spec, what) if os.path.isdir(path) else _load_numpy(path, what)
    shape = spec.shape.as_list()
    if x.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
        raise ExportError(
            f"{what} {path!r} has samples of shape {tuple(x.shape[1:])}, the model input "
            f"{spec.name!r} expects {tuple(shape[1:])}"
        )
    if not _real_numbers(x.dtype):
        raise ExportError(f"{what} {path!r} has dtype {x.dtype}, not real numbers")
    if spec.dtype.is_integer and np.issubdtype(x.dtype, np.floating):
        raise ExportError(f"{what} {path!r} has float samples, the model input {spec.name!r} is {spec.dtype.name}")
    if len(x) == 0:
        raise ExportError(f"{what} {path!r} holds no samples")
    if spec.dtype.is_integer and not spec.dtype.is_bool:  # a cast would wrap values around silently
        info, lo, hi = np.iinfo(spec.dtype.as_numpy_dtype), x.min(), x.max()
        if lo < info.min or hi > info.max:
            raise ExportError(f"{what} {path!r} has values in [{lo}, {hi}], outside the range of the model "
                              f"input {spec.name!r} ({spec.dtype.name})")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32's range: checked just below
        x = x.astype(spec.dtype.as_numpy_dtype)
    if spec.dtype.is_floating and not np.all(np.isfinite(x)):
        raise ExportError(f"{what} {path!r} contains NaN or infinite values (in {spec.dtype.name})")
    if y is not None:
        y = _class_indices(y, len(x), path, what)
    return x, y


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
    y = y.reshape(n, -1)
    one_hot = y.shape[1] > 1 and np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()
    if one_hot:
        return np.argmax(y, axis=1)
    if y.shape[1] != 1 or not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ExportError(f"{what} {path!r} has labels of shape {y.shape[1:]} that are neither class indices "
                          "(whole numbers) nor one-hot rows")
    return y[:, 0].astype(np.int64)


def _load_numpy(path: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples (and labels) from a .npy or .npz file; ExportError for anything numpy cannot read safely
    (pickled objects, text, truncated or corrupt files)."""
    try:
        if str(path).endswith(".npy"):
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as d:
            xk = next((k for k in _X_KEYS if k in d), None) or (d.files[0] if d.files else None)
            if xk is None:
                raise ExportError(f"{what} {path!r} holds no arrays")
            yk = next((k for k in _Y_KEYS if k in d), None)
            return d[xk], (d[yk] if yk else None)
    except ExportError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # unreadable file: permissions, I/O error
            raise ExportError(f"cannot read {what} {path!r}: {e.strerror}") from None
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{what} {path!r} is not a readable numpy file of numbers ({detail})") from None


def _images(path: str, spec: tf.TensorSpec, what: str):
    shape = spec.shape.as_list()
    if len(shape) != 4 or shape[1] is None or shape[2] is None or shape[3] not in (1, 3):
        raise ExportError(f"{what}: an image directory needs a model input of shape (batch, H, W, 1|3)")
    import keras

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
    if spec.dtype.is_integer:  # a model that takes pixels (uint8, int32) and scales them itself
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return x, np.asarray(ys)

"""Calibration samples of a model with one or more inputs: one array per model input, fed together.

Every statistics pass, ranking run and evaluation feeds a model all its inputs at once, so a sample is a tuple
of arrays in the model's input order (a one-element tuple for a single-input model). Callers give them in the
forms Keras takes ``x`` in: one array (a single input), a dict from input name to array, or a tuple / list in
input order; of whole data sets, of single samples or of batches, alone or as the ``x`` of ``(x, y)`` pairs,
from arrays, lists, generators or a ``tf.data.Dataset``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["ModelInput", "batches", "iterate_samples", "model_inputs", "one_array_per_input", "shape_of"]


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """One input of an OpenVINO model: its tensor names, dimensions (None where dynamic) and element type."""

    names: frozenset
    dims: tuple
    dtype: np.dtype

    @property
    def name(self) -> str:
        """The name messages use (the input's first tensor name in sorted order)."""
        return min(self.names) if self.names else "?"

    @property
    def rank(self) -> int:
        return len(self.dims)

    def sample_shape(self) -> tuple:
        return tuple("?" if d is None else d for d in self.dims[1:])


def model_inputs(model) -> list[ModelInput]:
    """The inputs of an ``openvino.Model`` (or compiled model), in order."""
    found = []
    for port in model.inputs:
        shape = port.get_partial_shape()
        dims = tuple(d.get_length() if d.is_static else None for d in shape)
        et = port.get_element_type()
        dtype = np.dtype(et.to_dtype()) if et.is_static() else np.dtype(np.float32)
        found.append(ModelInput(frozenset(port.get_names()), dims, dtype))
    return found


Inputs = tuple  # one array per model input, sharing their first (sample) axis


def shape_of(x: Inputs) -> tuple:
    """The sample shape of every input of ``x`` (without the batch axis): samples batch together only when
    they agree in all of them (a model with dynamic dimensions takes sequences or images of any size, one size
    per inference)."""
    return tuple(part.shape[1:] for part in x)


def batches(samples: Iterable[Inputs], size: int | Callable[[Inputs], int]) -> Iterator[tuple[list[int], Inputs]]:
    """Batches of up to ``size`` samples of one shape (:func:`shape_of`), each with the positions of its
    samples in ``samples``; ``size`` may be a function of a sample (a batch of large samples may hold fewer),
    asked once per shape when a second sample of that shape comes: a sample alone is a batch of one whatever
    its size, and a function that reshapes a model costs as much as an inference.

    Samples of every shape are kept apart until ``size`` of one shape have come (that batch is yielded) or the
    samples end (the rest, one batch per shape in the order the shapes first came). With samples of one shape
    this is consecutive batches in order; with samples of many shapes a batch holds samples of one shape only,
    so every statistic of a batch is one of samples computed alone, as with batches of one.
    """
    pending: dict[tuple, list[tuple[int, Inputs]]] = {}
    sizes: dict[tuple, int] = {}
    for position, sample in enumerate(samples):
        shape = shape_of(sample)
        group = pending.setdefault(shape, [])
        group.append((position, sample))
        if shape not in sizes:
            if callable(size) and len(group) == 1:
                continue
            sizes[shape] = max(1, size(sample)) if callable(size) else size
        while 0 < sizes[shape] <= len(group):
            yield _joined(group[:sizes[shape]])
            del group[:sizes[shape]]
    for group in pending.values():
        if group:
            yield _joined(group)


def _joined(group: list[tuple[int, Inputs]]) -> tuple[list[int], Inputs]:
    positions = [p for p, _ in group]
    return positions, tuple(np.concatenate([s[i] for _, s in group]) for i in range(len(group[0][1])))


def _array(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _is_collection(value) -> bool:
    return isinstance(value, (dict, tuple, list))


def one_array_per_input(value: Sequence, n_inputs: int) -> bool:
    """Whether the tuple / list ``value`` is one array per input of a model with ``n_inputs`` inputs (several),
    rather than ``(x, y)`` or a list of samples: what a tuple means wherever samples are given."""
    return n_inputs > 1 and len(value) == n_inputs and not any(_is_collection(v) for v in value)


def _from_dict(data: dict, inputs: Sequence[ModelInput]) -> Inputs:
    """The dict's arrays in input order; ValueError naming missing and unknown keys."""
    keys = list(data)
    chosen, missing = [], []
    for inp in inputs:
        key = next((k for k in keys if k in inp.names), None)
        if key is None:
            missing.append(inp.name)
        chosen.append(key)
    extra = [k for k in keys if k not in chosen]
    if missing or extra:
        said = ([f"no array for input(s) {missing}"] if missing else []) + ([f"unknown key(s) {extra}"] if extra else [])
        raise ValueError(f"calibration samples given by name: {'; '.join(said)}; the model's inputs are "
                         f"{[i.name for i in inputs]}")
    return tuple(_array(data[k]) for k in chosen)


def _as_inputs(value, inputs: Sequence[ModelInput]) -> Inputs:
    """``value`` as one array per model input: a dict by name, a tuple / list of ``len(inputs)`` arrays in
    input order, one array for a single input, or ``(x, y[, weights])`` whose ``x`` is any of these."""
    if isinstance(value, dict):
        return _from_dict(value, inputs)
    if isinstance(value, (tuple, list)):
        if not value:
            raise ValueError("calibration samples: an empty tuple / list is not a sample")
        if one_array_per_input(value, len(inputs)):
            return tuple(_array(v) for v in value)
        return _as_inputs(value[0], inputs)  # (x, y): the samples are x
    if len(inputs) > 1:
        raise ValueError(f"the model has {len(inputs)} inputs {[i.name for i in inputs]}: give one array per input "
                         f"(a dict by input name, or a tuple / list in input order), got one array")
    return (_array(value),)


def _checked(parts: Inputs, inputs: Sequence[ModelInput], n: int) -> Inputs:
    """``parts`` with a batch axis on every array, checked against the inputs' shapes and against each other."""
    out = []
    for part, inp in zip(parts, inputs):
        if part.ndim == inp.rank - 1:
            part = part[None]
        said = f" {inp.name!r}" if len(inputs) > 1 else ""
        if part.ndim != inp.rank or any(d is not None and d != a for d, a in zip(inp.dims[1:], part.shape[1:])):
            raise ValueError(f"calibration samples of input{said} must have shape {inp.sample_shape()} (model input), "
                             f"got {part.shape[1:]} (samples must have {inp.rank - 1} dimensions, batches {inp.rank})")
        if part.dtype.kind == "f" and not np.all(np.isfinite(part)):  # NaN ranges or inf scales break the IR
            raise ValueError(f"calibration samples{said} contain NaN or infinite values (in samples {n}..{n + len(part) - 1})")
        out.append(part)
    counts = [len(p) for p in out]
    if len(set(counts)) > 1:
        raise ValueError("calibration samples hold different numbers of samples per input: "
                         + ", ".join(f"{i.name!r} {c}" for i, c in zip(inputs, counts)))
    return tuple(out)


def _whole(data, inputs: Sequence[ModelInput]) -> Inputs | None:
    """``data`` as the arrays of a whole data set when it is one (an array, a dict, or a tuple of arrays or
    ``(x, y)`` arrays), else None (an iterable of samples or batches)."""
    if isinstance(data, np.ndarray) or isinstance(data, dict):
        return _as_inputs(data, inputs)
    if isinstance(data, tuple) and data:  # (x, y) arrays, or (for several inputs) one array per input
        first = data[0]
        if isinstance(first, dict) or (isinstance(first, (tuple, list)) and len(inputs) > 1):
            return _as_inputs(first, inputs)
        if len(inputs) == 1 and len(data) == 2 and np.ndim(first) == inputs[0].rank:
            return (_array(first),)
    if isinstance(data, (tuple, list)) and one_array_per_input(data, len(inputs)):
        return tuple(_array(v) for v in data)
    return None


def iterate_samples(data, inputs: Sequence[ModelInput], limit: int | None = None) -> Iterator[Inputs]:
    """Yield samples, each a tuple of arrays with a batch axis of 1, one per model input.

    ``data``: the samples of a whole data set (an array for a single-input model, a dict from input name to
    array, a tuple of arrays in input order, or ``(x, y)`` of those), or any iterable (a list, a generator, a
    ``tf.data.Dataset``) of samples, batches or ``(x, y)`` pairs in the same forms. ``inputs``: the model's
    (:func:`model_inputs`). Raises ValueError for missing or unknown input names, shapes that do not fit the
    inputs, different sample counts per input, and NaN or infinite values.
    """
    whole = _whole(data, inputs)
    items = [whole] if whole is not None else data
    n = 0
    for item in items:
        parts = _checked(item if item is whole else _as_inputs(item, inputs), inputs, n)
        for k in range(len(parts[0])):
            yield tuple(p[k:k + 1] for p in parts)
            n += 1
            if limit is not None and n >= limit:
                return

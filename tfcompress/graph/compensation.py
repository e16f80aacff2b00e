"""Hand the contribution of channels about to be zeroed to the layers that consume them.

A trained channel rarely outputs zero: a filter pruned to zero still emits its BatchNorm shift (after ReLU6 a
constant such as 6.0), and later layers depend on it. Zeroing the channel removes that signal. A consumer
(Conv, Dense) that reads the channel through a weight ``w`` sees ``w * x``; replacing ``x`` by its mean ``m``
turns this into a bias ``w * m``, which the consumer's bias (or, without one, the BatchNorm right after it)
absorbs. The channel itself can then be zeroed, so :func:`tfcompress.strip` removes it exactly.

The value handed over is exact where the engine proves the channel constant (:meth:`ChannelGraph.constants`),
else the channel's mean on data the caller gives. It is exact for the consumer only when the channel is
constant *and* every output position sees the whole kernel window (Dense, 1x1 or 'valid' convolutions);
'same' zero padding at the borders and the channel's variation around its mean leave an error, which
:func:`compensate` measures on the data as the relative RMS change of each consumer's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import keras
import numpy as np

from tfcompress.graph import ops
from tfcompress.graph.engine import ChannelGroup, Rule
from tfcompress.graph.kernels import fold_rows, window_sum

__all__ = ["CompensationReport", "TrackedConstants", "compensate", "consumer_means", "emitted_importance",
           "moves_with_batches", "refresh_batchnorm", "undo"]


@dataclasses.dataclass
class CompensationReport:
    """What :func:`compensate` did for one removal.

    Attributes:
        folded: consumer layer -> "bias" or "batchnorm" (where the constant went).
        exact: consumer layers whose fold is exact (a proven constant, whole kernel windows).
        not_absorbed: consumer layers that read removed channels but have nowhere to put a constant
            (no bias and no BatchNorm right after, or a layer kind that cannot fold, e.g. SeparableConv);
            their input simply loses the channel.
        error: consumer layer -> relative RMS change of its output, ``||y' - y|| / ||y||`` on the data
            (only when data was given).
    """

    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    exact: list[str] = dataclasses.field(default_factory=list)
    not_absorbed: list[str] = dataclasses.field(default_factory=list)
    error: dict[str, float] = dataclasses.field(default_factory=dict)
    changes: list[tuple[Any, int, np.ndarray]] = dataclasses.field(default_factory=list, repr=False)
    """(variable, group channel, value added to the variable) of every fold: undoing a channel's hand-over
    (when pruning brings it back) is subtracting its entries."""

    @property
    def max_error(self) -> float:
        """The largest relative error over the consumers (0.0 without data)."""
        return max(self.error.values(), default=0.0)


class TrackedConstants:
    """The per-tensor constants of a :class:`KerasGraph` (:meth:`ChannelGraph.constants`), brought up to date
    from the weights reported changed instead of evaluated over the whole graph again.

    A loop that compensates one group after another changes a few layers per group; evaluating the whole
    graph for each group made it quadratic in the model's size. Every weight change between two reads must
    be reported with :meth:`changed` (a variable no layer of the graph owns makes the next read a full one),
    or :meth:`reset` called.
    """

    def __init__(self, kg: Any) -> None:
        self._graph = kg.graph
        self._owners: dict[int, set[str]] = {}
        for rec in kg.records:
            for v in getattr(rec.kind.layer, "weights", ()):  # keras.ops nodes and inputs have none
                self._owners.setdefault(id(v), set()).add(rec.op.layer)
        self._values: dict[int, np.ndarray] | None = None
        self._changed: set[str] = set()

    def changed(self, variables: Iterable[Any]) -> None:
        """Report that ``variables`` were assigned since the last read."""
        for v in variables:
            owners = self._owners.get(id(v))
            if owners is None:
                self._values = None
            else:
                self._changed |= owners

    def changed_layers(self, layers: Iterable[str]) -> None:
        """Report that weights of the layers named ``layers`` (:attr:`Op.layer`) were assigned."""
        self._changed.update(layers)

    def reset(self) -> None:
        """Forget the values (weights changed without being reported): the next read evaluates everything."""
        self._values = None
        self._changed = set()

    def get(self) -> dict[int, np.ndarray]:
        """The constants for the weights as they are now."""
        if self._values is None:
            self._values = self._graph.constants()
        elif self._changed:
            self._values = self._graph.constants(self._values, self._changed)
        self._changed = set()
        return self._values


def _consumers(kg: Any, group: ChannelGroup, chosen: np.ndarray) -> list[tuple[Any, int, np.ndarray, np.ndarray]]:
    """(record, input index, positions on that input, their group channels) of every Conv/Dense consumer
    reading a removed channel as its layer's input ``i`` (not a tensor inside a layer call, such as the heads a
    MultiHeadAttention's output projection reads: there is nothing to measure or fold there)."""
    by_name = {r.op.name: r for r in kg.records}
    out = []
    for op, i in kg.graph.consumers:
        pos, ch = kg.graph.positions(op.inputs[i], group)
        sel = chosen[ch]
        rec = by_name[op.name]
        tensors = rec.node.input_tensors if rec.node is not None else []
        if i >= len(tensors) or rec.scope.get(id(tensors[i])) != op.inputs[i]:
            continue
        if sel.any() and op.rule is Rule.PRODUCER:
            out.append((rec, i, pos[sel], ch[sel]))
    return out


def _input_structure(model: keras.Model) -> Any:
    """The model's inputs as its data comes: one tensor, or with several inputs the model's own structure (a
    dict of named inputs, a list) so that its data fits as it is."""
    inputs = model.inputs
    return inputs[0] if len(inputs) == 1 else getattr(model, "input", inputs)


def _submodel(kg: Any, tensors: list[Any]) -> keras.Model:
    try:
        return keras.Model(_input_structure(kg.model), tensors)
    except Exception as e:  # nested sub-models: their inner tensors are not reachable from the outer inputs
        raise ValueError(
            f"cannot measure channel statistics inside model {kg.model.name!r} ({e}); compensation from data "
            "needs the consumers to be layers of the model itself (flatten nested sub-models first)"
        ) from None


def _one_array_per_input(data: Any, n_inputs: int) -> bool:
    """Whether the tuple / list ``data`` is one array per input of a model with several inputs (as Keras takes
    ``x``), rather than ``(x, y)``: the meaning of a tuple wherever tfcompress takes samples."""
    return (n_inputs > 1 and isinstance(data, (tuple, list)) and len(data) == n_inputs
            and not any(isinstance(v, (dict, tuple, list)) for v in data))


def _batches(data: Any, batch_size: int, inputs: Any = None):
    """Input batches of ``data`` for a model whose input structure is ``inputs`` (``model.input``): an array, a
    dict of arrays (named inputs), a tuple / list of one array per input (in ``model.inputs`` order), a tuple
    ``(x, ...)`` of any of these, or a batched ``tf.data.Dataset``."""
    n_inputs = len(keras.tree.flatten(inputs)) if inputs is not None else 1
    if isinstance(data, (tuple, list)) and not _one_array_per_input(data, n_inputs):
        data = data[0]  # (x, y[, sample weights])
    if _one_array_per_input(data, n_inputs):
        for part in _sliced([np.asarray(v) for v in data], batch_size):
            yield keras.tree.pack_sequence_as(inputs, part)
        return
    if isinstance(data, dict):
        for part in _sliced([np.asarray(v) for v in data.values()], batch_size):
            yield dict(zip(data, part))
        return
    if isinstance(data, np.ndarray) or hasattr(data, "shape") and not hasattr(data, "element_spec"):
        x = np.asarray(data)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"compensation data must be a non-empty batch of model inputs; got shape {x.shape}")
        for s in range(0, len(x), batch_size):
            yield x[s:s + batch_size]
        return
    if hasattr(data, "element_spec"):
        for b in data:
            if isinstance(b, (tuple, list)) and not _one_array_per_input(b, n_inputs):
                b = b[0]  # (x, y[, sample weights])
            yield keras.tree.pack_sequence_as(inputs, list(b)) if _one_array_per_input(b, n_inputs) else b
        return
    raise ValueError(f"compensation data must be an array, a dict or tuple of input arrays, (x, y) or a "
                     f"tf.data.Dataset; got {type(data).__name__}")


def _sliced(xs: list[np.ndarray], batch_size: int):
    """Consecutive batches of the arrays ``xs`` (one per input, as many samples each)."""
    n = {len(v) for v in xs}
    if len(n) != 1 or not n.pop():
        raise ValueError("compensation data as a dict or a tuple of inputs needs non-empty arrays of one length")
    for s in range(0, len(xs[0]), batch_size):
        yield [v[s:s + batch_size] for v in xs]


def consumer_means(kg: Any, consumers: list[tuple[Any, int, np.ndarray]], data: Any,
                   batch_size: int = 64) -> list[np.ndarray]:
    """Per consumer input, the mean of every channel over the data (all axes but the last)."""
    tensors = [c[0].node.input_tensors[c[1]] for c in consumers]
    fn = _submodel(kg, tensors)
    sums = [np.zeros(int(t.shape[-1])) for t in tensors]
    count = 0
    for x in _batches(data, batch_size, _input_structure(kg.model)):
        outs = fn(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for k, o in enumerate(outs):
            o = np.asarray(o, dtype=np.float64)
            sums[k] += o.reshape(-1, o.shape[-1]).sum(axis=0)
        count += int(np.prod(np.asarray(outs[0]).shape[:-1]))
    return [s / max(count, 1) for s in sums]


def _bn_after(kg: Any, rec: Any) -> Any:
    """The BatchNormalization that is the only reader of ``rec``'s output, if any."""
    out = rec.op.outputs[0]
    readers = [r for r in kg.records if out in r.op.inputs]
    if out in kg.output_ids or len(readers) != 1:
        return None
    layer = readers[0].kind.layer
    return layer if isinstance(layer, keras.layers.BatchNormalization) else None


def _fold(kg: Any, rec: Any, i: int, pos: np.ndarray, channels: np.ndarray, values: np.ndarray,
          changes: list) -> str | None:
    """Add ``W[pos] . values`` to the consumer's bias (or subtract it from the next BatchNorm's moving mean);
    what each group channel added is appended to ``changes``."""
    kind, layer = rec.kind, rec.kind.layer
    if layer.use_bias:
        target, sign, where = layer.bias, 1.0, "bias"
    else:
        bn = _bn_after(kg, rec)
        if bn is None:
            return None
        # BN computes (x - moving_mean): x losing ``add`` is moving_mean losing it too
        target, sign, where = bn.moving_mean, -1.0, "batchnorm"
    kernel = np.moveaxis(np.asarray(layer.kernel), (kind.in_axis, kind.out_axis), (-2, -1))
    w = window_sum(kernel)  # once: each channel below folds through the same sums
    total = np.zeros(target.shape[0])
    for c in np.unique(channels):
        mine = channels == c
        add = sign * fold_rows(w, pos[mine], values[mine], kind.blocks())
        changes.append((target, int(c), add))
        total += add
    target.assign((np.asarray(target) + total).astype(np.float32))
    return where


def _foldable_kind(kind: Any) -> bool:
    """Whether the consumer's op (from the op table) has a bias that a removed channel's value can fold into."""
    return ops.folds_into_bias(getattr(kind, "op", ""))


def compensate(kg: Any, group: ChannelGroup, chosen: np.ndarray, data: Any = None,
               batch_size: int = 64, measure_error: bool = True,
               constants: TrackedConstants | None = None) -> tuple[CompensationReport, Any]:
    """Fold the contribution of channels ``chosen`` of ``group`` into their consumers (before zeroing them).

    Returns the report and a function ``finish()`` to call after the channels are zeroed: with data it
    measures each consumer's output error (before vs. after) into the report (unless ``measure_error`` is
    False). With ``constants`` (shared by a loop over groups) the graph's constants are updated rather than
    evaluated again: the caller then reports its own weight changes (the zeroing) to it before ``finish()``;
    the folds made here are reported by this function.
    """
    report = CompensationReport()
    consumers = _consumers(kg, group, chosen)
    if not consumers:
        return report, lambda: None
    own = constants is None
    tracked = TrackedConstants(kg) if own else constants
    consts = tracked.get()
    means = consumer_means(kg, consumers, data, batch_size) if data is not None else None
    probe = _probe(kg, consumers, data, batch_size) if data is not None and measure_error else None
    done: set[str] = set()
    folded = []
    for k, (rec, i, pos, channels) in enumerate(consumers):
        if rec.op.layer in done:  # a shared layer has one bias: fold once
            continue
        done.add(rec.op.layer)
        exact = consts[rec.op.inputs[i]][pos]
        proven = np.isfinite(exact)
        values = np.where(proven, exact, means[k][pos] if means is not None else 0.0)
        name = rec.op.layer
        where = _fold(kg, rec, i, pos, channels, values, report.changes) if _foldable_kind(rec.kind) else None
        if where is None:
            if np.any(values != 0):
                report.not_absorbed.append(name)
            continue
        folded.append((rec, i, pos, channels))
        report.folded[name] = where
        if proven.all() and rec.kind.can_fold(i):
            report.exact.append(name)
    tracked.changed(v for v, _, _ in report.changes)

    def finish() -> None:
        # a zeroed channel still emits f(0) through an activation with f(0) != 0 (sigmoid: 0.5), which the
        # consumer keeps seeing: only the difference to that value was lost
        if own:  # the caller's zeroing was not reported
            tracked.reset()
        after = tracked.get()
        start = len(report.changes)
        for rec, i, pos, channels in folded:
            rest = np.nan_to_num(after[rec.op.inputs[i]][pos])
            if np.any(rest != 0):
                _fold(kg, rec, i, pos, channels, -rest, report.changes)
        tracked.changed(v for v, _, _ in report.changes[start:])
        if probe is not None:
            report.error.update(probe())

    return report, finish


def _probe(kg: Any, consumers: list, data: Any, batch_size: int):
    """Record the consumers' outputs now; the returned function gives their relative change later."""
    names = [c[0].op.layer for c in consumers]
    fn = _submodel(kg, [c[0].node.outputs[0] for c in consumers])
    # arrays, or dicts of arrays for named inputs
    batches = list(_batches(data, batch_size, _input_structure(kg.model)))
    x = keras.tree.map_structure(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:256], *batches)

    def run() -> list[np.ndarray]:
        outs = fn(x, training=False)
        return [np.asarray(o, np.float64) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]

    before = run()

    def measure() -> dict[str, float]:
        after = run()
        return {n: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
                for n, a, b in zip(names, after, before)}

    return measure


def _batchnorms(layer: Any) -> list[keras.layers.BatchNormalization]:
    """The BatchNormalization layers in ``layer`` and in the models and layers nested in it, each once."""
    found, seen, todo = [], set(), [layer]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, keras.layers.BatchNormalization):
            found.append(current)
        todo.extend(getattr(current, "layers", None) or getattr(current, "_layers", None) or [])
    return found


def moves_with_batches(bn: keras.layers.BatchNormalization) -> bool:
    """Whether training normalises ``bn`` with each batch's statistics and moves its moving mean and variance
    towards them at ``momentum``: a trainable, built BatchNorm without ``renorm`` (which keeps moving statistics
    of its own kind, updated at ``renorm_momentum``)."""
    return bn.built and bn.trainable and not bn.renorm


def refresh_batchnorm(model: keras.Model, data: Any, batch_size: int = 64,
                      layers: Iterable[keras.layers.BatchNormalization] | None = None) -> list[str]:
    """Set the moving statistics of ``model``'s BatchNorms to the batch statistics training sees on ``data``.

    Why: removing channels changes what the layers after them receive (a consumer reading 5 % of its channels
    has a fraction of its former variance), while a BatchNorm's moving mean and variance forget the old
    distribution only at ``1 - momentum`` per step: for hundreds of steps the model then normalises with stale
    statistics at inference and scores far below what training (which uses each batch's own) reports. The
    statistics are measured as training computes them: the model runs in training mode on each batch of
    ``data`` (model inputs, in any form :func:`compensate` takes), every trainable BatchNorm (those that use
    batch statistics in training) takes its batch's mean and variance, and the averages over the batches become
    its moving statistics. Every other variable of the model keeps its value. BatchNorms with ``renorm`` are left
    alone; with ``layers``, only those BatchNorms of the model are refreshed. Returns the names of the BatchNorms
    refreshed.
    """
    chosen = None if layers is None else {id(bn) for bn in layers}
    bns = [bn for bn in _batchnorms(model) if moves_with_batches(bn) and (chosen is None or id(bn) in chosen)]
    if not bns:
        return []
    saved = [(v, v.numpy()) for v in model.non_trainable_variables]
    momenta = [bn.momentum for bn in bns]
    sums = [[np.zeros(tuple(bn.moving_mean.shape)), np.zeros(tuple(bn.moving_variance.shape))] for bn in bns]
    count = 0
    try:
        for bn in bns:
            bn.momentum = 0.0  # the moving statistics become the batch's own
        for x in _batches(data, batch_size, _input_structure(model)):
            model(x, training=True)
            for bn, acc in zip(bns, sums):
                acc[0] += np.asarray(bn.moving_mean, np.float64)
                acc[1] += np.asarray(bn.moving_variance, np.float64)
            count += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for v, value in saved:  # training mode must not move anything else (quantizer ranges, seeds)
            v.assign(value)
    if not count:
        raise ValueError("refresh_batchnorm got no batches of data")
    for bn, (mean, var) in zip(bns, sums):
        bn.moving_mean.assign((mean / count).astype(bn.moving_mean.dtype))
        bn.moving_variance.assign((var / count).astype(bn.moving_variance.dtype))
    return [bn.name for bn in bns]


def undo(changes: list[tuple[Any, int, np.ndarray]], channels: np.ndarray) -> list[tuple[Any, int, np.ndarray]]:
    """Take back the folds of ``channels`` (a boolean mask over the group); returns the changes that remain."""
    rest = []
    for var, c, add in changes:
        if channels[c]:
            var.assign((np.asarray(var) - add).astype(np.float32))
        else:
            rest.append((var, c, add))
    return rest


def emitted_importance(kg: Any, group: ChannelGroup, data: Any, batch_size: int = 64) -> np.ndarray:
    """Per channel of ``group``: what it emits into its consumers once its mean is handed over.

    The sum over Conv/Dense consumers of the channel's standard deviation at the consumer's input (on ``data``)
    times the norm of the consumer's weights reading it: the part of the consumer's input that compensation
    cannot keep. Unlike kernel norms it sees BatchNorm, activations and dead (constant) channels.
    """
    chosen = np.ones(group.size, dtype=bool)
    consumers = _consumers(kg, group, chosen)
    score = np.zeros(group.size)
    if not consumers:
        return score
    fn = _submodel(kg, [c[0].node.input_tensors[c[1]] for c in consumers])
    n, s1, s2 = 0, [0.0] * len(consumers), [0.0] * len(consumers)
    for x in _batches(data, batch_size, _input_structure(kg.model)):
        outs = fn(x, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for k, o in enumerate(outs):
            o = np.asarray(o, np.float64).reshape(-1, o.shape[-1])
            s1[k] = s1[k] + o.sum(axis=0)
            s2[k] = s2[k] + (o * o).sum(axis=0)
        n += o.shape[0]
    for k, (rec, i, pos, channels) in enumerate(consumers):
        std = np.sqrt(np.maximum(s2[k] / n - (s1[k] / n) ** 2, 0.0))
        kind = rec.kind
        kernel = np.moveaxis(np.asarray(kind.layer.kernel), kind.in_axis, 0)
        norm = np.linalg.norm(kernel.reshape(kernel.shape[0], -1), axis=1)
        norm = np.tile(norm, kind.blocks()) if norm.size * kind.blocks() == std.size else norm
        np.add.at(score, channels, std[pos] * norm[pos])
    return score

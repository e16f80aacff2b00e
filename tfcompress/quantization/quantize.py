"""quantize_model: turn a float Keras model into a quantization-aware one, and the RangeInit callback."""

from __future__ import annotations

import warnings
from typing import Iterable

import keras
import numpy as np

from tfcompress import int8_policy as policy
from tfcompress.int8_policy import OVERFLOW_FIX
from tfcompress.graph.keras_adapter import build_graph
from tfcompress.graph.keras_rebuild import layer_config, layer_from_config, rebuild
from tfcompress.quantization import layers as Q
from tfcompress.quantization.layers import ActivationQuantizer, ChannelMask

__all__ = ["quantize_model", "RangeInit", "PRESETS"]

PRESETS = ("performance", "mixed")

_L = keras.layers
# layer classes with a quantized twin: OpenVINO runs them in INT8 when their inputs and weights are quantized
_WEIGHTED = {
    _L.Conv1D: Q.QuantConv1D, _L.Conv2D: Q.QuantConv2D, _L.Conv3D: Q.QuantConv3D, _L.Dense: Q.QuantDense,
    _L.Conv1DTranspose: Q.QuantConv1DTranspose, _L.Conv2DTranspose: Q.QuantConv2DTranspose,
    _L.Conv3DTranspose: Q.QuantConv3DTranspose,
    _L.DepthwiseConv1D: Q.QuantDepthwiseConv1D, _L.DepthwiseConv2D: Q.QuantDepthwiseConv2D,
    _L.SeparableConv1D: Q.QuantSeparableConv1D, _L.SeparableConv2D: Q.QuantSeparableConv2D,
    _L.EinsumDense: Q.QuantEinsumDense, _L.MultiHeadAttention: Q.QuantMultiHeadAttention,
}
_DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
_SEPARABLE = (_L.SeparableConv1D, _L.SeparableConv2D)
# the other Keras layers the INT8 placement policy (tfcompress.int8_policy) names; a layer with weights and no
# twin, or any other layer, is FLOAT
_LAYER_POLICIES = {
    _L.Add: policy.JOIN, _L.Multiply: policy.GATE,
    _L.MaxPooling1D: policy.MAX_POOLING, _L.MaxPooling2D: policy.MAX_POOLING, _L.MaxPooling3D: policy.MAX_POOLING,
    _L.AveragePooling1D: policy.POOLING, _L.AveragePooling2D: policy.POOLING, _L.AveragePooling3D: policy.POOLING,
    _L.GlobalAveragePooling1D: policy.POOLING, _L.GlobalAveragePooling2D: policy.POOLING,
    _L.GlobalAveragePooling3D: policy.POOLING, _L.GlobalMaxPooling1D: policy.POOLING,
    _L.GlobalMaxPooling2D: policy.POOLING, _L.GlobalMaxPooling3D: policy.POOLING,
    _L.ZeroPadding1D: policy.PAD, _L.ZeroPadding2D: policy.PAD, _L.ZeroPadding3D: policy.PAD,
    _L.Flatten: policy.RESHAPE, _L.Reshape: policy.RESHAPE, _L.Permute: policy.RESHAPE,
}
# keras.ops nodes (by operation class name): a residual ``x + y`` is the same Add for OpenVINO as a layers.Add
_OP_POLICIES = {
    "Add": policy.JOIN, "Multiply": policy.GATE, "Reshape": policy.RESHAPE, "Transpose": policy.RESHAPE,
    "Squeeze": policy.RESHAPE, "ExpandDims": policy.RESHAPE,
}
# keras.ops nodes and layers (by class name) -> their role in a normalization (tfcompress.int8_policy.STATISTICS_ROLES;
# Power: _role)
_ROLES = {
    "Mean": "reduce", "Sum": "reduce", "Var": "moment", "Std": "moment", "Norm": "moment", "Square": "square",
    "Subtract": "subtract", "Multiply": "multiply", "Divide": "divide", "TrueDivide": "divide", "Add": "add",
    **dict.fromkeys(("Sqrt", "Rsqrt", "Reciprocal", "Negative", "Maximum", "Minimum", "Clip", "Power", "Abs",
                     "Reshape", "ExpandDims", "Squeeze", "Transpose", "Cast"), "arithmetic"),
}
# float layers with weights not worth a warning: OpenVINO folds them into the neighbouring convolution
# (BatchNormalization after it, Rescaling and Normalization before the first one), applies them elementwise
# with the activation (PReLU) or looks rows up (Embedding: a gather, nothing to multiply in INT8). Any other
# layer with weights and no twin (LayerNormalization, a custom layer) is named in quantize_model's warning.
_FLOAT_OK = (_L.BatchNormalization, _L.PReLU, _L.Normalization, _L.Rescaling, _L.Embedding)
_CONSTRAINT_KEYS = {
    "kernel": "kernel_constraint", "bias": "bias_constraint", "gamma": "gamma_constraint",
    "beta": "beta_constraint", "pointwise_kernel": "pointwise_constraint",
}


def quantize_model(
    model: keras.Model,
    preset: str = "performance",
    per_channel_weights: bool = True,
    ignored_layers: Iterable[str] = (),
    range_mode: str = "ema",
    overflow_fix: str = "first_layer",
) -> keras.Model:
    """A quantization-aware copy of ``model``, ready to ``compile`` and ``fit``.

    Every Keras convolution (1D, 2D and 3D; depthwise, separable and transposed ones too), Dense, EinsumDense
    and MultiHeadAttention's four projections become layers with fake-quantized weights (int8, symmetric, per
    output channel); their inputs, both inputs of
    every ``Add`` (a layer or a ``keras.ops`` addition of two tensors), both operands of a product whose one
    operand is broadcast over the other (a squeeze-and-excitation gate) and the inputs of pooling layers get an
    :class:`ActivationQuantizer` (one per tensor, shared by all its readers): the placement OpenVINO's CPU
    plugin executes in INT8. BatchNormalization stays as it is (OpenVINO fuses it after the convolution). Other
    layers and ``keras.ops`` nodes (LayerNormalization, activations such as GELU, the products of two activations
    inside attention) stay float where they are, the graph unchanged around them; one warning names the float
    layers that hold weights.
    Channels that are zero across their group (pruned earlier) are kept exactly zero during QAT by
    :class:`ChannelMask` constraints. Weights are copied; ``model`` is not modified.

    Args:
        preset: ``"performance"`` (symmetric activation ranges) or ``"mixed"`` (asymmetric).
        per_channel_weights: per-output-channel weight ranges (else one per tensor).
        ignored_layers: layer names to keep in float (nested layers: ``"submodel/layer"``).
        range_mode: ``"ema"`` (track ranges with a moving average) or ``"learned"``.
        overflow_fix: which layers' weights train on the 7-bit grid (integers -63..63), chosen by the rule and
            on the grid of :func:`tfcompress.calibration.calibrate` (:func:`tfcompress.int8_policy.overflow_fix_layers`,
            :func:`~tfcompress.int8_policy.weight_grid`): ``"first_layer"`` (default: the quantized layers a model
            input reaches first, whose inputs, e.g. raw pixels, fill the u8 range), ``"enable"`` (all) or
            ``"disable"`` (none). On CPUs without VNNI the INT8 kernels add pairs of u8 x i8 products in int16,
            which full-range weights can overflow; the IR may run on such a CPU. A depthwise kernel with one output
            channel per input channel (a DepthwiseConv, a separable convolution's first half) never gets the fix:
            its INT8 kernel widens each product and cannot saturate, so ``"first_layer"`` fixes the layers after it.

    Raises:
        tfcompress.UnsupportedModelError: for a subclassed model.
        ValueError: unknown preset, overflow_fix or ignored layer, or a model already quantization-aware.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if overflow_fix not in OVERFLOW_FIX:
        raise ValueError(f"unknown overflow_fix {overflow_fix!r}; choose one of {list(OVERFLOW_FIX)}")
    kg = build_graph(model)
    done = [rec.op.layer for rec in kg.records
            if isinstance(rec.kind.layer, (ActivationQuantizer, Q._QuantizedKernel))]
    if done:
        raise ValueError(f"model {model.name!r} is already quantization-aware (it has {', '.join(done[:3])}"
                         f"{' ...' if len(done) > 3 else ''}); quantize the float model it was made from")
    ignored = {ignored_layers} if isinstance(ignored_layers, str) else set(ignored_layers)
    missing = sorted(ignored - set(kg.layers))
    if missing:
        raise ValueError(f"ignored_layers names {missing} that are not layers of model {model.name!r}")
    removed, _ = kg.graph.plan_removal()  # channels already pruned (exactly zero across their group)
    removed = {gid: m for gid, m in removed.items() if m.any()}
    left_float: list[str] = []

    def quantized_class(layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None) is not None:
            return None  # LoRA factors, or Keras's own post-training quantization: not a plain kernel
        if isinstance(layer, _L.MultiHeadAttention) and layer.get_config().get("use_gate"):
            return None  # its output projection reads the attention output times a gate
        return _WEIGHTED.get(_computing_class(layer, _WEIGHTED))  # a subclass with its own computation keeps it

    def quantized(rec) -> bool:
        return rec.op.layer not in ignored and quantized_class(rec.kind.layer) is not None

    # the overflow fix chooses among kernels: (layer path, index in _kernel_policies); a separable convolution's
    # two kernels run as two OpenVINO layers, the depthwise one first
    kernels = {(rec.op.layer, i): p for rec in kg.records if quantized(rec) and not rec.part
               for i, p in enumerate(_kernel_policies(rec.kind.layer))}

    def first_reached(saturating: set) -> set:  # in each first layer, its first saturating kernel
        paths = {path for path, _ in saturating}
        return {min(k for k in saturating if k[0] == path) for path in kg.first_layers(lambda r: r.op.layer in paths)}

    half_range = policy.overflow_fix_layers(overflow_fix, kernels, kernels.get, first_reached)

    def make_layer(rec):
        layer, path = rec.kind.layer, rec.op.layer
        q = quantized_class(layer) if path not in ignored else None
        # a twin takes the config its base class writes (a shim's own get_config may add a legacy argument)
        cfg = layer_config(layer, path, _computing_class(layer, _WEIGHTED).get_config(layer) if q else None)
        weights = rec.kind.current_weights()
        nested: dict[str, dict] = {}  # masks of a sublayer's weights ("query/kernel"), for a twin taking them
        if removed and rec.op.outputs:
            masks: dict[int, list] = {}  # id(variable) -> [(keep, ChannelParam)]
            # the call's own op and the ops it is made of (a MultiHeadAttention's heads)
            calls = [r for r in kg.records if r.part and r.node is rec.node] + [rec]
            for r in calls:
                keep = kg.graph.keep_mask(r.op.outputs[0], removed)
                if not keep.all():
                    for p in r.kind.output_params():
                        masks.setdefault(id(p.variable), []).append((keep, p))
            for r in [r for r in calls if kg.row_reader(r)]:
                in_keep = kg.graph.keep_mask(r.op.inputs[0], removed)
                if not in_keep.all():  # rows reading pruned channels: zero too, so weight ranges ignore them
                    for p in r.kind.input_params():
                        masks.setdefault(id(p.variable), []).append((in_keep, p))
            own = [id(w) for w in getattr(layer, "weights", [])]  # none on keras.ops nodes
            for specs in masks.values():
                (k0, p0), *rest = specs
                name = p0.variable.path.split("/")[-1]
                key = _CONSTRAINT_KEYS.get(name) if getattr(layer, name, None) is p0.variable else None
                if isinstance(layer, _DEPTHWISE) and key == "kernel_constraint":
                    key = "depthwise_constraint"
                constraint = ChannelMask(k0.tolist(), p0.axis, p0.view, blocks=p0.blocks,
                                         extra=[{"keep": k.tolist(), "axis": p.axis, "view": p.view,
                                                 "blocks": p.blocks} for k, p in rest],
                                         inner=cfg.get(key) if key else None)  # the layer's own still applies
                if key is not None:
                    cfg[key] = constraint
                else:  # a sublayer's weight: "query/kernel" of layer "mha"
                    nested["/".join(p0.variable.path.split("/")[-2:])] = keras.saving.serialize_keras_object(
                        constraint)
                idx = own.index(id(p0.variable))
                weights[idx] = np.asarray(constraint(keras.ops.convert_to_tensor(weights[idx])))
        if q is not None:
            options = {"per_channel": per_channel_weights, "half_range": (path, 0) in half_range}
            if issubclass(q, Q.QuantMultiHeadAttention):
                options.update(symmetric=preset == "performance", range_mode=range_mode, weight_masks=nested)
            if issubclass(q, (Q.QuantSeparableConv1D, Q.QuantSeparableConv2D)):
                options.update(symmetric=preset == "performance", range_mode=range_mode,
                               depthwise_half_range=(path, 0) in half_range, half_range=(path, 1) in half_range)
            new = q.from_config({**cfg, **options})
        else:
            if getattr(layer, "weights", None) and not isinstance(layer, _FLOAT_OK) and quantized_class(layer) is None:
                left_float.append(f"{path} ({type(layer).__name__})")
            new = layer_from_config(type(layer), cfg, layer)
        return new, weights if isinstance(layer, keras.layers.Layer) else None

    normalization = _normalization_records(kg)

    def op_policy(rec) -> policy.OpPolicy:
        layer = rec.kind.layer
        if rec.op.layer in ignored:
            return policy.FLOAT
        if rec.op.name in normalization:
            return policy.NORMALIZATION
        if quantized_class(layer) is not None:
            return _kernel_policies(layer)[0]  # of the layer's first kernel, which reads its input
        if isinstance(layer, keras.layers.Layer):
            return _LAYER_POLICIES.get(_computing_class(layer, _LAYER_POLICIES), policy.FLOAT)
        return _OP_POLICIES.get(type(layer).__name__, policy.FLOAT)

    quantize_at = _placement(kg, op_policy)
    quantized_tensors: dict[int, object] = {}

    def quantized(rec, old, new):  # ``new``, the call's argument for the original tensor ``old``, quantized
        tid = rec.scope.get(id(old)) if isinstance(old, keras.KerasTensor) else None
        if tid not in quantize_at:
            return new
        if tid not in quantized_tensors:
            quantized_tensors[tid] = ActivationQuantizer(
                symmetric=preset == "performance", range_mode=range_mode, name=quantize_at[tid])(new)
        return quantized_tensors[tid]

    def rewrite_args(rec, args, kwargs):
        old = keras.tree.flatten(rec.node.arguments.args)
        new = [quantized(rec, o, n) for o, n in zip(old, keras.tree.flatten(args))]
        named = {k: quantized(rec, rec.node.arguments.kwargs[k], kwargs[k]) for k in _named_data(rec)}
        return keras.tree.pack_sequence_as(args, new), {**kwargs, **named}

    qmodel = rebuild(kg, make_layer, rewrite_args)
    if left_float:
        warnings.warn(f"quantize_model left {len(left_float)} layer(s) with weights in float (no INT8 twin; "
                      f"they compute in float, also in OpenVINO): {', '.join(left_float)}", stacklevel=2)
    return qmodel


# the methods that only say how a layer is constructed and described: a subclass overriding only these (a
# ``custom_objects`` shim loading an older model) computes as its base class
_CONSTRUCTION = frozenset({"__init__", "from_config", "get_config"})


def _computing_class(layer: keras.layers.Layer, known: dict) -> type:
    """The class to look ``layer`` up by in a table whose keys are ``known``: the nearest class of its MRO that
    is a key or defines more than the construction methods of :data:`_CONSTRUCTION` (any other method or
    descriptor: ``call``, ``build``, a property). A subclass that changes only how it is constructed and
    configured (the ``custom_objects`` shims that drop a config argument older Keras wrote, e.g.
    ``DepthwiseConv2D(groups=1)``, in ``__init__`` or ``from_config``) computes as its base, so a twin built
    from the config the base writes of it (``base.get_config(layer)``; the subclass's own may add an argument
    the twin does not take) computes what it does. Keras's own classes may define only ``__init__`` too
    (``Conv2D`` over its base class): a key is taken as it comes."""
    for cls in type(layer).__mro__:
        if cls in known:
            return cls
        own = {k: v for k, v in vars(cls).items() if k not in _CONSTRUCTION}
        if any(not (k.startswith("__") and k.endswith("__")) or callable(v) or hasattr(v, "__get__")
               for k, v in own.items()):
            return cls
    return type(layer)


def _kernel_policies(layer: keras.layers.Layer) -> list[policy.OpPolicy]:
    """The INT8 placement policy of each quantized kernel of a convolution or Dense layer, in the order its
    input passes them (:mod:`tfcompress.int8_policy`): a depthwise kernel with one output channel per input
    channel is ``DEPTHWISE`` (OpenVINO runs it as a depthwise convolution); with a channel multiplier it runs as
    a grouped convolution and is ``WEIGHTED``, as every other kernel (a separable convolution's pointwise one
    too). A MultiHeadAttention's projections read all its tensor inputs: ``PROJECTIONS``."""
    if isinstance(layer, _DEPTHWISE + _SEPARABLE):
        depthwise = policy.DEPTHWISE if layer.depth_multiplier == 1 else policy.WEIGHTED
        return [depthwise, policy.WEIGHTED] if isinstance(layer, _SEPARABLE) else [depthwise]
    if isinstance(layer, _L.MultiHeadAttention):
        return [policy.PROJECTIONS]
    return [policy.WEIGHTED]


def _named_data(rec) -> list[str]:
    """The keyword arguments of a call that are data its weights read: a MultiHeadAttention's ``query``,
    ``value`` and ``key`` given by name (its masks are not)."""
    if not isinstance(rec.kind.layer, _L.MultiHeadAttention):
        return []
    return [k for k in ("query", "value", "key") if isinstance(rec.node.arguments.kwargs.get(k), keras.KerasTensor)]


def _role(rec) -> str:
    """A layer call's role in a normalization: keras.ops arithmetic and weightless merging layers by their class
    name (an ``ops.power`` by 2 squares); anything with weights or any other computation has none."""
    layer = rec.kind.layer
    if rec.part or getattr(layer, "weights", None) or type(layer).__name__ not in _ROLES:
        return ""
    if type(layer).__name__ == "Power":
        exponent = keras.tree.flatten(rec.node.arguments.args)[1:]
        return "square" if exponent and not isinstance(exponent[0], keras.KerasTensor) and np.all(
            np.asarray(exponent[0]) == 2) else "arithmetic"
    return _ROLES[type(layer).__name__]


def _normalization_records(kg) -> set[str]:
    """Names of the records of ``kg`` that normalize a tensor by its own statistics
    (:func:`tfcompress.int8_policy.normalizations`): written with ``keras.ops`` (``(x - ops.mean(x)) *
    ops.rsqrt(ops.var(x) + eps)``), their products are not gates; quantization keeps them float, as
    post-training calibration keeps the ops of the same normalization in an IR."""
    producer = {tid: rec.op.name for rec in kg.records for tid in rec.op.outputs}
    stat_ops = []
    for rec in kg.records:
        if rec.node is None:
            continue
        leaves = keras.tree.flatten(rec.node.arguments.args)
        inputs = tuple(producer.get(rec.scope.get(id(t))) if isinstance(t, keras.KerasTensor) else None
                       for t in leaves)
        stat_ops.append(policy.StatisticsOp(rec.op.name, _role(rec), inputs))
    return policy.normalizations(stat_ops)


def _placement(kg, op_policy) -> dict[int, str]:
    """The tensors (ids in ``kg``) that get an activation quantizer, with the quantizer's name: the inputs
    :func:`tfcompress.int8_policy.quantized_inputs` names, each moved above the value-moving layers (zero
    padding, max pooling, reshapes) whose every reader reads quantized values anyway, as post-training
    placement moves it (:mod:`tfcompress.calibration.placement`)."""
    producer = {tid: rec for rec in kg.records if rec.node is not None for tid in rec.op.outputs}
    readers: dict[int, list] = {}
    wanted: dict[int, list[int]] = {}  # id(record) -> ids of the tensors it reads quantized
    for rec in kg.records:
        if rec.node is None or rec.part:  # a part reads the call's tensors: the call's record places them
            continue
        named = [rec.node.arguments.kwargs[k] for k in _named_data(rec)]
        leaves = keras.tree.flatten(rec.node.arguments.args) + named
        tids = [rec.scope.get(id(t)) if isinstance(t, keras.KerasTensor) else None for t in leaves]
        for tid in tids:
            if tid is not None:
                readers.setdefault(tid, []).append(rec)
        shapes = {tuple(t.shape) for t in leaves if isinstance(t, keras.KerasTensor)}
        picked = policy.quantized_inputs(op_policy(rec), [t is None for t in tids], broadcast=len(shapes) > 1)
        wanted[id(rec)] = [tids[k] for k in picked if k < len(tids) and tids[k] is not None]
    memo: dict[int, bool] = {}

    def moves_quantizer(rec) -> bool:
        if id(rec) not in memo:
            memo[id(rec)] = False  # no cycles in a Functional graph; guards re-entry only
            out = rec.op.outputs
            memo[id(rec)] = (len(out) == 1 and len(rec.op.inputs) == 1 and out[0] not in kg.output_ids
                             and policy.quantizer_moves_above(
                                 op_policy(rec), [out[0] in wanted[id(r)] or moves_quantizer(r)
                                                  for r in readers.get(out[0], [])]))
        return memo[id(rec)]

    names: dict[int, str] = {}
    taken: set[str] = set()
    for rec in kg.records:
        for k, tid in enumerate(wanted.get(id(rec), [])):
            name = rec.op.layer.replace("/", "_") + (f"_input_{k}_quant" if len(wanted[id(rec)]) > 1 else "_input_quant")
            while tid in producer and moves_quantizer(producer[tid]):
                top = producer[tid]
                tid = top.op.inputs[0]
                name = top.op.layer.replace("/", "_") + "_input_quant"
            if tid not in names:  # a shared layer's calls read different tensors: each quantizer its own name
                unique, n = name, 1
                while unique in taken:
                    unique, n = f"{name}_{n}", n + 1
                names[tid] = unique
                taken.add(unique)
    return names


@keras.saving.register_keras_serializable(package="tfcompress")
class RangeInit(keras.callbacks.Callback):
    """Initialise activation ranges from the running min/max of the first ``num_batches`` training batches.

    Without it, each quantizer starts from its first batch. With ``log_ranges=True`` every epoch's logs get
    ``<quantizer>_min`` / ``_max`` (TensorBoard then plots them).
    """

    def __init__(self, num_batches: int = 16, log_ranges: bool = False):
        super().__init__()
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        self.num_batches = num_batches
        self.log_ranges = bool(log_ranges)

    def _quantizers(self):
        return [layer for layer in self.model._flatten_layers() if isinstance(layer, ActivationQuantizer)]

    def on_train_begin(self, logs=None):
        qs = self._quantizers()
        if not qs:
            raise ValueError("RangeInit needs a model from tfcompress.quantization.quantize_model")
        for q in qs:
            if float(q.initialized.numpy()) == 0.0:
                q.init_steps.assign(float(self.num_batches))

    def on_epoch_end(self, epoch, logs=None):
        if self.log_ranges and logs is not None:
            for q in self._quantizers():
                lo, hi = q.quant_range()
                logs[f"{q.name}_min"] = float(lo)
                logs[f"{q.name}_max"] = float(hi)

    def get_config(self):
        return {"num_batches": self.num_batches, "log_ranges": self.log_ranges}

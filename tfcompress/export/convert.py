"""SavedModel -> ONNX (tf2onnx) -> OpenVINO IR, or SavedModel -> OpenVINO IR directly for graphs tf2onnx cannot
convert; each step checked numerically against the previous one, with OpenVINO as the runtime."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import tempfile
from typing import Any

import numpy as np

from tfcompress.calibration.placement import rewrite_for_cpu
from tfcompress.graph.frozen_graph import (
    RANDOM_OPS, calls_functions, inline_function_calls, keep_library_functions_in_use,
)
from tfcompress.calibration import is_quantized
from tfcompress.export.onnx_optimizer import onnx_optimizer_passes
from tfcompress.export.ov_run import int8_kernel_check, run_openvino
from tfcompress.int8_policy import on_int8_grid
from tfcompress.output_dir import STAGING_PREFIX, staged_file
from tfcompress.stripping.savedmodel_strip import (
    ExportError, FrozenSignature, check_outputs, check_reference, freeze_saved_model, rel_errors, run_frozen,
    sample_inputs,
)

__all__ = [
    "ConversionCheck", "freeze_for_export", "prepare_for_tf2onnx", "raise_quantize_above_reshapes",
    "refuse_random_outputs", "rejoin_quantize_dequantize", "restore_weight_quantization", "run_onnx", "run_openvino",
    "saved_model_to_openvino", "tf2onnx_graph", "to_onnx", "to_openvino",
]


class ConversionCheck(dict):
    """What a conversion measured: ``max_rel_error`` vs the reference, ``quantized_weights`` restored, ...

    ``outputs`` (an attribute, not an item, so the dict stays JSON) holds the converted model's outputs on the
    check inputs (the saved IR's; for :func:`to_onnx`, the ONNX file's as OpenVINO's ONNX reader runs it at f32;
    an INT8 model's in the exact arithmetic of its quantizers, see :mod:`tfcompress.export.ov_run`),
    for callers that compare another model with it without running it again. :func:`to_onnx` also keeps
    ``inputs`` (the check inputs) and ``model`` (the file as OpenVINO read it), which :func:`to_openvino` takes
    instead of reading and running the file a second time.
    """

    outputs: dict[str, np.ndarray] | None = None
    inputs: dict[str, np.ndarray] | None = None
    model: Any = None


def _has_weight_fake_quant(frozen: FrozenSignature) -> bool:
    nodes = {n.name: n for n in frozen.graph_def.node}
    for n in frozen.graph_def.node:
        if n.op.startswith("FakeQuantWithMinMax"):
            src = nodes.get(n.input[0].split(":")[0])
            if src is not None and src.op == "Const":
                return True
    return False


# ops by which a serving graph changes its own variables or computes batch statistics: a layer traced in
# training mode
_TRAINING_OPS = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "AssignMovingAvg")


def freeze_for_export(saved_model_dir: str, signature_key: str = "serving_default") -> FrozenSignature:
    """:func:`freeze_saved_model`, refusing a serving graph that was traced in training mode.

    Keras's ``model.export`` traces random augmentation layers (``RandomFlip`` ...) and a BatchNormalization
    that follows them or ``keras.layers.Resizing`` in training mode: the signature transforms its inputs at
    random, updates the moving statistics and normalizes by batch statistics, so its outputs are not the Keras
    model's, and freezing its variables fails inside TensorFlow. Such a graph gets one ExportError naming the
    ops, their layers and the likely cause.
    """
    try:
        frozen = freeze_saved_model(saved_model_dir, signature_key)
    except Exception as e:  # freezing a training-mode graph fails inside TensorFlow: name the cause instead
        try:
            found = _training_nodes(_signature_graph_def(saved_model_dir, signature_key))
        except Exception:
            found = []
        if found:
            raise _training_mode_error(saved_model_dir, found) from None
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"cannot freeze SavedModel {saved_model_dir!r}: {str(e).splitlines()[0]}") from None
    found = _training_nodes(frozen.graph_def)
    if found:
        raise _training_mode_error(saved_model_dir, found)
    return frozen


def refuse_random_outputs(frozen: FrozenSignature, inputs: dict[str, np.ndarray], saved_model_dir: str) -> None:
    """Raise ExportError naming the random ops when the frozen signature's outputs on ``inputs`` change from
    one run to the next (noise, dropout kept active at inference): no conversion can be checked against them.

    A graph whose random ops do not reach its values (a TF1 dropout whose ``keep_prob`` defaults to 1) runs
    the same twice and passes.
    """
    import tensorflow as tf

    random = _random_nodes(frozen.graph_def)
    if not random:
        return
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(frozen.graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:  # one session: a seeded op draws new numbers on each run
        fetches = list(frozen.outputs.values())
        feeds = {frozen.inputs[n]: a for n, a in inputs.items()}
        try:
            first, second = sess.run(fetches, feeds), sess.run(fetches, feeds)
        except tf.errors.OpError:  # inputs the graph cannot take: the strip step's check says so, in one line
            return
    if all(np.array_equal(a, b) for a, b in zip(first, second)):
        return
    shown = ", ".join(f"{op}: {name}" for name, op in random[:3]) + (
        f" and {len(random) - 3} more" if len(random) > 3 else "")
    raise ExportError(
        f"the {frozen.signature_key!r} signature of {saved_model_dir!r} draws random numbers ({shown}): its "
        "outputs change from call to call, so no converted model can be checked against it; export a signature "
        "without random ops (noise or dropout kept active at inference)")


def _random_nodes(graph_def) -> list[tuple[str, str]]:
    """(name, op) of the nodes (also inside library functions) that draw new random numbers on every run."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sorted({(n.name, n.op) for n in nodes if n.op in RANDOM_OPS})


def _signature_graph_def(saved_model_dir: str, signature_key: str):
    import tensorflow as tf

    return tf.saved_model.load(saved_model_dir).signatures[signature_key].graph.as_graph_def()


def _training_nodes(graph_def) -> list[str]:
    """Names of the nodes (also inside library functions) that update variables or run BN in training mode."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sorted({n.name for n in nodes if n.op in _TRAINING_OPS or (
        n.op.startswith("FusedBatchNorm") and n.attr["is_training"].b)})


def _training_mode_error(saved_model_dir: str, nodes: list[str]) -> ExportError:
    shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
    # a node is named <model>/<layer>_1/<op>: TensorFlow adds "_1" to the scope Keras entered when it built the layer
    layers = sorted({re.sub(r"_1$", "", n.split("/")[-2]) for n in nodes if n.count("/") >= 1})
    return ExportError(
        f"SavedModel {saved_model_dir!r} was traced in training mode: its serving signature updates variables "
        f"or normalizes by batch statistics ({shown}; in layers {', '.join(map(repr, layers))}), so its outputs "
        "differ from the Keras model's. Likely cause: a Keras bug: model.export traces Keras' preprocessing "
        "layers (random augmentation such as RandomFlip or RandomContrast, and Resizing) and a "
        "BatchNormalization after them in training mode; apply augmentation in the input pipeline (tf.data) "
        "instead of inside the exported model, and resize there or with keras.ops.image.resize")


def prepare_for_tf2onnx(graph_def):
    """Return a copy of a frozen GraphDef that tf2onnx can convert: function calls inlined, ops rewritten.

    Keras 3 compiles some layers through XLA (e.g. ``Conv2D(groups>1)``); the SavedModel keeps them as
    ``StatefulPartitionedCall`` nodes marked ``_noinline``, which neither grappler nor tf2onnx inlines. Ops
    tf2onnx has no handler for are replaced by an exact equivalent it has (:data:`_REWRITES`).
    """
    if calls_functions(graph_def):
        out = inline_function_calls(graph_def)
    else:  # a frozen signature is inlined already (freezing folds it, :func:`fold_constants`): copy its nodes
        out = type(graph_def)()
        out.versions.CopyFrom(graph_def.versions)
        out.node.extend(graph_def.node)
        out.library.CopyFrom(graph_def.library)
    # what is left of the library is the bodies of control flow (an RNN's While loop), which tf2onnx converts
    keep_library_functions_in_use(out)
    for op, rewrite in _REWRITES.items():
        for node in list(out.node):
            if node.op == op:
                out.node.extend(rewrite(node))
    return out


def _erfc(node) -> list:
    """``Erfc(x) = 1 - Erf(x)`` (exact GELU). ``node`` becomes the ``Sub`` under its own name; returns the
    nodes to add."""
    import tensorflow as tf
    from tensorflow.core.framework import node_def_pb2

    dtype = node.attr["T"].type
    erf = node_def_pb2.NodeDef(name=node.name + "/erf", op="Erf", input=node.input[:1])
    erf.attr["T"].type = dtype
    one = node_def_pb2.NodeDef(name=node.name + "/one", op="Const")
    one.attr["dtype"].type = dtype
    one.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0, tf.dtypes.as_dtype(dtype)))
    node.op = "Sub"
    node.input[:] = [one.name, erf.name] + [i for i in node.input if i.startswith("^")]
    return [erf, one]


# ops tf2onnx 1.17 has no handler for, each with a rewrite into an exact equivalent it converts
_REWRITES = {"Erfc": _erfc}


def to_onnx(
    saved_model_dir: str,
    onnx_path: str,
    opset: int = 17,
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    signature_key: str = "serving_default",
    frozen: FrozenSignature | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> ConversionCheck:
    """Convert a SavedModel signature to ONNX with tf2onnx, then check it.

    The checks tf2onnx does not do: a graph still holding TensorFlow ops (tf2onnx logs an error and returns
    it anyway) is refused; the ONNX file, run by OpenVINO's ONNX reader at f32 precision (quantizers in exact
    arithmetic, as TensorFlow computes them), must match TensorFlow within ``tolerance`` (relative max error). For quantization-aware models, the per-channel int8 weight quantization that TF's constant folding
    bakes into float weights is restored as int8 initializers with ``DequantizeLinear``, so that OpenVINO runs
    those layers in INT8. Inputs and outputs keep the signature's names.

    ``frozen``, when the caller already has the signature frozen (e.g. ``StripResult.stripped``), is converted
    instead of freezing ``saved_model_dir`` again. ``reference``, TensorFlow's outputs of the signature on
    ``check_inputs`` when the caller has them (``StripResult.outputs``), is what the ONNX file is checked
    against instead of running the graph again.

    Returns:
        A :class:`ConversionCheck` with ``max_rel_error``, ``quantized_weights`` and ``opset``.
    """
    import onnx

    if not isinstance(opset, int) or not 13 <= opset <= 18:
        raise ExportError(f"opset must be an integer in 13..18 (tf2onnx 1.17 supports no newer), got {opset!r}")
    check_reference(reference, check_inputs)
    if frozen is None:
        frozen = freeze_for_export(saved_model_dir, signature_key)
    gc.collect()  # the loaded SavedModel's objects are cyclic: free them before tf2onnx needs the memory
    x = check_inputs if check_inputs is not None else sample_inputs(frozen.specs)
    # now, so that the frozen graph can go before conversion
    ref = reference if reference is not None else run_frozen(frozen, frozen.graph_def, x)
    weight_fake_quant = _has_weight_fake_quant(frozen)
    inputs, outputs = list(frozen.inputs.values()), list(frozen.outputs.values())
    rename = {t: n for n, t in frozen.inputs.items()}
    rename.update({t: n for n, t in frozen.outputs.items()})
    graph_def = prepare_for_tf2onnx(frozen.graph_def)
    del frozen
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = _tf2onnx(graph_def, inputs, outputs, opset, rename)
    except Exception as e:
        raise ExportError(f"tf2onnx could not convert {saved_model_dir!r}: {str(e).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)
    del graph_def
    foreign = sorted({
        f"{n.op_type}" for n in model.graph.node
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    } | {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")})
    if foreign:
        raise ExportError(
            f"tf2onnx left operations ONNX does not define in the graph: {foreign} (see the tf2onnx messages "
            "above; e.g. FakeQuant with narrow_range or num_bits != 8 is not convertible)"
        )
    restored = restore_weight_quantization(model) if weight_fake_quant else 0
    rejoin_quantize_dequantize(model)
    raise_quantize_above_reshapes(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"tf2onnx produced an invalid ONNX model: {str(e).splitlines()[0]}") from None
    with staged_file(onnx_path) as tmp:
        onnx.save_model(model, tmp)
        del model
        read = _read_onnx(tmp)
        got = run_openvino(read, x, precision="f32", exact=True)
        err = check_outputs(got, ref, tolerance, "ONNX outputs (OpenVINO's ONNX reader, f32, quantizers in exact "
                            "arithmetic) differ from TensorFlow's")
    check = ConversionCheck(max_rel_error=err, quantized_weights=restored, opset=opset, **_by_output(got, ref))
    check.inputs, check.outputs, check.model = x, got, read
    return check


def tf2onnx_graph(graph_def, inputs: list[str], outputs: list[str], opset: int = 17, rename: dict | None = None):
    """tf2onnx's graph of a frozen ``graph_def`` (grappler-optimized first, as tf2onnx's ``from_graph_def``
    does), before its ONNX optimizer passes. ``inputs`` / ``outputs`` are tensor names; ``rename`` maps
    tensor names to the names the ONNX graph gives them."""
    import tensorflow as tf
    from tf2onnx import tf_loader
    from tf2onnx.tfonnx import process_tf_graph

    with tf.Graph().as_default():  # grappler's meta-graph export needs graph mode
        optimized = tf_loader.tf_optimize(inputs, outputs, graph_def)
    with tf.Graph().as_default() as tf_graph:
        tf.import_graph_def(optimized, name="")
        del optimized
        return process_tf_graph(tf_graph, continue_on_error=True, opset=opset, input_names=inputs,
                                output_names=outputs, tensors_to_rename=rename)


def _tf2onnx(graph_def, inputs: list[str], outputs: list[str], opset: int, rename: dict):
    """tf2onnx's ``from_graph_def`` on an already frozen graph, in less memory.

    It skips ``from_graph_def``'s second freeze, runs the ONNX optimizer passes of
    :mod:`tfcompress.export.onnx_optimizer` (tf2onnx's, its transpose pass in linear time), and on large graphs
    collects garbage before each pass (see there). The collections skip the objects that existed before the
    conversion (see :func:`_collecting_new_objects_only`).

    The passes run as tf2onnx runs them (``catch_errors``: on a copy of the graph, so that a pass that raises
    is skipped). Running them on the graph itself, without the copies, measured faster but held more than twice
    the memory on large graphs (what the passes replace stays reachable from the graph they rewrite).
    """
    from tf2onnx import optimizer

    collect = graph_def.ByteSize() > _COLLECT_ABOVE
    with _collecting_new_objects_only() if collect else contextlib.nullcontext():
        graph = tf2onnx_graph(graph_def, inputs, outputs, opset, rename)
        graph = optimizer.optimize_graph(graph, catch_errors=True, optimizers=onnx_optimizer_passes(collect))
    gc.collect()
    return graph.make_model("converted from a SavedModel by tfcompress")


@contextlib.contextmanager
def _collecting_new_objects_only():
    """Within the block, garbage collections look only at objects created inside it.

    Every object alive on entry (TensorFlow's modules, the caller's data) is moved to the collector's
    permanent generation (``gc.freeze``): each collection then walks only the objects of the conversion (the
    ONNX graph and the copies the passes make), not the whole interpreter, and frees the same garbage.
    Objects frozen here that die inside the block are freed by the first collection after it. A caller's own
    ``gc.freeze`` is kept.
    """
    already_frozen = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not already_frozen:
            gc.unfreeze()


_COLLECT_ABOVE = 16 * 2**20  # graph bytes above which the garbage of tf2onnx's passes is collected


def run_onnx(onnx_path: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX file with OpenVINO's ONNX reader at f32 precision; outputs keyed by their tensor names.

    OpenVINO, not onnxruntime, is the reference runtime: it is a dependency already, and onnxruntime 1.31
    miscomputes ``Pad`` followed by ``MaxPool`` with its default graph optimisations.
    """
    return run_openvino(_read_onnx(onnx_path), inputs, precision="f32")


def _read_onnx(onnx_path: str):
    """The ONNX file as an ``openvino.Model``; ExportError when OpenVINO's ONNX reader refuses it."""
    import openvino as ov

    try:
        model = ov.convert_model(onnx_path)
    except Exception as e:
        lines = str(e).splitlines()
        failed = [ln.split("Conversion is failed for:", 1)[1].strip() for ln in lines if "Conversion is failed for:" in ln]
        why = f"it cannot convert {', '.join(failed)}" if failed else (lines[0] if lines else type(e).__name__)
        raise ExportError(f"OpenVINO's ONNX reader cannot read what tf2onnx wrote: {why}") from None
    _restore_output_node_names(model, onnx_path)
    return model


def _restore_output_node_names(model, onnx_path: str) -> None:
    """Give the ops that produce the model's outputs their ONNX node names back (in place).

    OpenVINO's ONNX reader names such an op after the output it produces (``output_0``), while the ONNX node
    name (``StatefulPartitionedCall/model/dense_2/MatMul``) holds the layer's TF scope, which calibration
    reports layers by (:mod:`tfcompress.calibration.names`). Output tensor names are not changed.
    """
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    producers = {out: node.name for node in graph.node for out in node.output if out in outputs and node.name}
    for result in model.get_results():
        op = result.input_value(0).get_node()
        if op.get_friendly_name() in producers:
            op.set_friendly_name(producers[op.get_friendly_name()])


def restore_weight_quantization(model) -> int:
    """Re-insert per-channel int8 ``DequantizeLinear`` for Conv/ConvTranspose/MatMul/Gemm weights on an int8 grid.

    tf2onnx hands the graph to grappler, which folds ``FakeQuantWithMinMaxVarsPerChannel(weights)`` into float
    constants whose values are exactly ``q * scale`` with ``q`` in [-127, 127] (or [-63, 63] with the overflow
    fix). Storing ``q`` as int8 with its scale gives identical outputs and lets OpenVINO's low-precision
    transformations run the layer in INT8.
    Returns the number of layers whose weights it restored.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    # weight initializer -> the output-channel axis every layer reading it gives it (None: they disagree); a
    # weight read by several layers (a TimeDistributed or shared layer, one initializer per distinct value
    # after tf2onnx) is restored once for all of them
    readers: dict[str, list] = {}
    axes: dict[str, int | None] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits:
            continue
        axis = _weight_axis(node, len(inits[name].dims))
        readers.setdefault(name, []).append(node)
        axes[name] = axis if axes.get(name, axis) == axis else None
    restored = 0
    new_nodes = []
    for name, nodes in readers.items():
        if users.get(name, 0) != len(nodes) or axes[name] is None:  # read as something else too
            continue
        w = numpy_helper.to_array(inits[name])  # float16 in a Keras mixed_float16 model: on the grid to its precision
        q, scale = on_int8_grid(w, axes[name])
        if q is None:
            continue
        base = name.replace(":", "_")
        q_init = numpy_helper.from_array(q.astype(np.int8), base + "_int8")
        s_init = numpy_helper.from_array(scale.astype(np.float32), base + "_scale")
        z_init = numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point")
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([q_init, s_init, z_init])
        deq_out = base + "_dequantized"
        new_nodes.append(helper.make_node(
            "DequantizeLinear", [q_init.name, s_init.name, z_init.name], [deq_out],
            name=base + "_DequantizeLinear", axis=axes[name]))
        if w.dtype != np.float32:  # DequantizeLinear gives float32 (opsets < 19): cast back for the layer
            new_nodes.append(helper.make_node("Cast", [deq_out], [deq_out + "_cast"], name=base + "_Cast",
                                              to=helper.np_dtype_to_tensor_dtype(w.dtype)))
            deq_out += "_cast"
        for node in nodes:
            node.input[1] = deq_out
        restored += len(nodes)
    if new_nodes:
        nodes = list(new_nodes) + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return restored


def _weight_axis(node, rank: int) -> int:
    """The axis of the output channels of a Conv / ConvTranspose / MatMul / Gemm node's weight input."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":  # weights (in, out / group, ...): output channels on axis 1
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return rank - 1


# ops that only rearrange a tensor's values: they commute with a per-tensor (de)quantization
_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def rejoin_quantize_dequantize(model) -> int:
    """Move a per-tensor ``DequantizeLinear`` above a layout op that tf2onnx left between it and its
    ``QuantizeLinear`` (``Q -> Transpose -> DQ`` becomes ``Q -> DQ -> Transpose``; exact, since a per-tensor
    dequantization is elementwise).

    tf2onnx's transpose optimizer pushes the NHWC -> NCHW transposes through ``DequantizeLinear``, e.g. before
    the ``Flatten`` of a convolution's output that a ``Dense`` reads. OpenVINO fuses a Q/DQ pair into one
    ``FakeQuantize`` only when they are adjacent; split, the reader (the fully connected layer) runs in float.
    Returns the number of pairs rejoined.
    """
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    position = {id(n): k for k, n in enumerate(nodes)}
    renamed = set()
    for dq in nodes:
        if dq.op_type != "DequantizeLinear" or any(sizes.get(t, 0) != 1 for t in dq.input[1:]):
            continue
        layout = producer.get(dq.input[0])
        if layout is None or layout.op_type not in _LAYOUT_OPS or readers.get(dq.input[0]) != 1:
            continue
        q = producer.get(layout.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers.get(layout.input[0]) != 1:
            continue
        # Q -> layout -> DQ  =>  Q -> DQ -> layout, with the layout op now writing what DQ wrote
        between, out = dq.input[0], dq.output[0]
        dq.input[0], dq.output[0] = layout.input[0], between
        layout.input[0], layout.output[0] = between, out
        i, j = position[id(layout)], position[id(dq)]
        nodes[i], nodes[j] = dq, layout
        position[id(dq)], position[id(layout)] = i, j
        renamed.add(between)
    if renamed:
        kept = [v for v in model.graph.value_info if v.name not in renamed]  # their old (integer) types
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(renamed)


_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def raise_quantize_above_reshapes(model) -> int:
    """Move a per-tensor ``QuantizeLinear -> DequantizeLinear`` pair above the shape op that feeds it
    (``X -> Squeeze -> Q -> DQ`` becomes ``X -> Q -> DQ -> Squeeze``; exact, since per-tensor quantization is
    elementwise), repeatedly, as long as the shape op has no other reader.

    The quantizer then sits on the output of the op that computed the values, as post-training placement puts
    it (a quantizer moves above value-moving ops). tf2onnx writes a global average pooling as ``ReduceMean``
    plus ``Squeeze``: a QAT quantizer of the pooled values lands after the ``Squeeze``, where OpenVINO's CPU
    plugin cannot fuse it into the reduction and runs it as a separate float op, with layout reorders around
    it, in every squeeze-and-excitation block. Returns the number of moves.
    """
    moves = 0
    while True:
        nodes = list(model.graph.node)
        producer = {o: n for n in nodes for o in n.output}
        readers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
        outputs = {o.name for o in model.graph.output}
        moved = None
        for q in nodes:
            if q.op_type != "QuantizeLinear" or any(sizes.get(t, 0) != 1 for t in q.input[1:]):
                continue
            shape = producer.get(q.input[0])
            dqs = readers.get(q.output[0], [])
            if (shape is None or shape.op_type not in _SHAPE_OPS or len(readers.get(q.input[0], [])) != 1
                    or q.input[0] in outputs or len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear"
                    or any(sizes.get(t, 0) != 1 for t in dqs[0].input[1:])):
                continue
            moved = shape, q, dqs[0]
            break
        if moved is None:
            break
        shape, q, dq = moved
        # X -> shape -> Q -> DQ -> out  =>  X -> Q -> DQ -> shape -> out
        x, between, out = shape.input[0], q.input[0], dq.output[0]
        q.input[0], dq.output[0] = x, between
        shape.input[0], shape.output[0] = between, out
        order = [n for n in nodes if n is not q and n is not dq]
        at = order.index(shape)
        order[at:at] = [q, dq]
        del model.graph.node[:]
        model.graph.node.extend(order)
        kept = [v for v in model.graph.value_info if v.name not in (between, q.output[0])]  # old shapes/types
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        moves += 1
    return moves


def to_openvino(
    onnx_path: str,
    xml_path: str,
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    onnx_check: ConversionCheck | None = None,
) -> ConversionCheck:
    """Convert ONNX to OpenVINO IR (FP32 weights); the saved IR, read back and run at f32 precision, must match
    the ONNX model as OpenVINO's ONNX reader runs it (relative max error within ``tolerance``). A quantized
    model is compared in the exact arithmetic of its quantizers, and the result's ``int8_kernels`` says how far
    this CPU's INT8 kernels land from it (:func:`tfcompress.export.ov_run.int8_kernel_check`).
    A quantized model gets the rewrites that keep its outputs and let the CPU plugin run it right in INT8
    (:func:`tfcompress.calibration.placement.rewrite_for_cpu`): signed quantizers (QAT) before a zero padding
    go after it, strided pointwise convolutions the plugin computes wrong take a StridedSlice.

    ``onnx_check``, :func:`to_onnx`'s result for this file, gives the file as read and its outputs on its check
    inputs: the reader and that run are not repeated when ``check_inputs`` are those inputs (or None).
    """
    if not os.path.isfile(onnx_path):
        raise ExportError(f"ONNX file {onnx_path!r} does not exist")
    _check_xml_path(xml_path)
    if onnx_check is not None and onnx_check.model is not None and (
            check_inputs is None or check_inputs is onnx_check.inputs):
        model, check_inputs, ref = onnx_check.model, onnx_check.inputs, onnx_check.outputs
    else:
        model = _read_onnx(onnx_path)
        if check_inputs is None:
            check_inputs = _random_inputs_for(model)
        ref = run_openvino(model, check_inputs, precision="f32", exact=True)
    rewrite_for_cpu(model)
    return _save_checked(model, xml_path, check_inputs, ref, tolerance, "the ONNX model's")


def saved_model_to_openvino(
    saved_model_dir: str,
    xml_path: str,
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    signature_key: str = "serving_default",
    reference: dict[str, np.ndarray] | None = None,
) -> ConversionCheck:
    """Convert a SavedModel to OpenVINO IR (FP32 weights) with OpenVINO's TensorFlow reader, without ONNX.

    The path for graphs tf2onnx cannot convert. The reader keeps ``FakeQuantWithMinMaxVars(PerChannel)`` as
    ``FakeQuantize``, so quantization-aware models still run INT8 (with :func:`to_openvino`'s rewrites). The
    saved IR, run at f32 precision (as :func:`to_openvino`: quantizers in exact arithmetic, ``int8_kernels``
    for this CPU's kernels), must match the SavedModel's ``signature_key`` signature as TensorFlow runs it
    (relative max error), or ``reference``, those outputs on ``check_inputs`` when the caller has them (the
    SavedModel is then not frozen here).
    """
    import openvino as ov

    _check_xml_path(xml_path)
    check_reference(reference, check_inputs)
    if reference is not None:
        x, ref = check_inputs, reference
    else:
        frozen = freeze_for_export(saved_model_dir, signature_key)
        x = check_inputs if check_inputs is not None else sample_inputs(frozen.specs)
        ref = run_frozen(frozen, frozen.graph_def, x)
        del frozen
    try:
        model = ov.convert_model(saved_model_dir)
    except Exception as e:
        raise ExportError(f"OpenVINO could not convert {saved_model_dir!r}: {str(e).splitlines()[0]}") from None
    rewrite_for_cpu(model)
    return _save_checked(model, xml_path, x, ref, tolerance, "TensorFlow's")


def _by_output(got: dict, ref: dict) -> dict:
    """``{"max_rel_error_by_output": {output: error}}`` for a model with several outputs, else nothing."""
    return {"max_rel_error_by_output": rel_errors(got, ref)} if len(ref) > 1 else {}


def _check_xml_path(xml_path: str) -> None:
    if not xml_path.endswith(".xml"):
        raise ExportError(f"the IR path must end in .xml, got {xml_path!r}")


def _save_checked(model, xml_path: str, inputs: dict, ref: dict, tolerance: float, what: str) -> ConversionCheck:
    """Save ``model`` as IR next to ``xml_path``, run the saved files at f32 (an INT8 IR in the exact arithmetic
    of its quantizers), compare with ``ref`` and move the .xml/.bin into place only if they match; the result
    holds the relative max error, the IR's outputs and, for an INT8 IR, ``int8_kernels``: how far this CPU's
    INT8 kernels land from its exact arithmetic (:func:`tfcompress.export.ov_run.int8_kernel_check`)."""
    import shutil

    import openvino as ov

    model = float32_from_half(model)
    folder = os.path.dirname(os.path.abspath(xml_path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder)
    try:
        tmp_xml = os.path.join(tmp, "model.xml")
        ov.save_model(model, tmp_xml, compress_to_fp16=False)
        saved = ov.Core().read_model(tmp_xml)
        got = run_openvino(saved, inputs, precision="f32", exact=True)
        err = check_outputs(got, ref, tolerance, f"OpenVINO IR outputs (f32, quantizers in exact arithmetic) "
                            f"differ from {what}")
        kernels = int8_kernel_check(saved, inputs, got, tolerance) if is_quantized(saved) else None
        del saved
        os.replace(tmp_xml[:-4] + ".bin", xml_path[:-4] + ".bin")
        os.replace(tmp_xml, xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check = ConversionCheck(max_rel_error=err, **_by_output(got, ref))
    if kernels is not None:
        check["int8_kernels"] = kernels
    check.outputs = got
    return check


def float32_from_half(model):
    """``model`` (converted from a Keras ``mixed_bfloat16`` or ``mixed_float16`` model) computing in float32
    where it computed in a 16-bit float: its casts to bfloat16 / float16 are dropped, its 16-bit constants and
    inputs made float32 (exactly).

    The IR's precision is only a default: OpenVINO runs float32 IRs in bfloat16 on CPUs that have it
    (``INFERENCE_PRECISION_HINT``). A bfloat16 IR breaks what reads it: OpenVINO's Python API hands a bfloat16
    tensor over as a float16 array of the same bits (1.27 comes out as 1.91), and numpy has no bfloat16 for the
    constants calibration adds. A float16 IR of a quantization-aware model runs its layers in float: the casts
    between its float32 quantizers and its float16 layers keep OpenVINO's low-precision transformations from
    seeing them as quantized."""
    import openvino as ov
    import openvino.opset13 as ops

    half, f32 = (ov.Type.bf16, ov.Type.f16), ov.Type.f32
    changed = False
    for op in model.get_ordered_ops():
        if op.get_output_size() != 1 or op.get_output_element_type(0) not in half:
            continue
        kind = op.get_type_name()
        if kind == "Parameter":
            op.set_element_type(f32)
        elif kind == "Convert":
            source = op.input_value(0)
            op.output(0).replace(source if source.get_element_type() == f32 else ops.convert(source, f32).output(0))
        elif kind == "Constant":
            op.output(0).replace(ops.constant(_float32_values(op)).output(0))
        else:
            continue
        changed = True
    if changed:
        model.validate_nodes_and_infer_types()
    return model


def _float32_values(const) -> np.ndarray:
    """A bfloat16 or float16 constant's values as float32 (exactly)."""
    data = np.asarray(const.get_data())
    if const.get_output_element_type(0).get_type_name() == "bf16":  # the top half of a float32: shift its bits
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def _random_inputs_for(model) -> dict[str, np.ndarray]:
    import tensorflow as tf

    specs = {port.get_any_name(): tf.TensorSpec([d.get_length() if d.is_static else None
                                                 for d in port.get_partial_shape()], tf.float32)
             for port in model.inputs}
    return sample_inputs(specs)

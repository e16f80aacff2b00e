"""Physically remove zeroed channels from a SavedModel, with no Keras objects involved.

The serving signature is frozen (variables become constants) and constant-folded, analysed by the same
channel engine as Keras models (through :mod:`tfcompress.graph.graphdef_adapter`), rewritten without the
channels that are provably zero, checked numerically against the original and saved with the same signature,
input and output names. The source directory is never modified; the destination is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import keyword
import os
import re

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import convert_to_constants

from tfcompress.errors import ExportError
from tfcompress.graph.engine import Rule
from tfcompress.graph.flops import FlopsCounter
from tfcompress.graph.frozen_graph import fold_constants, has_cycle, prune_unused
from tfcompress.graph.graphdef_adapter import GraphDefGraph
from tfcompress.output_dir import check_output_dir, staged_output
from tfcompress.saved_model_dir import (
    check_saved_model_dir, missing_signature, read_saved_model_proto, unknown_rank,
)

__all__ = [
    "ExportError", "FrozenSignature", "StripResult", "call_signature", "check_outputs", "check_reference",
    "freeze_saved_model", "max_rel_error", "rel_errors", "sample_inputs", "strip_saved_model", "variable_bytes",
]


@dataclasses.dataclass
class FrozenSignature:
    """A SavedModel signature as a frozen, constant-folded GraphDef."""

    graph_def: tf.compat.v1.GraphDef
    inputs: dict[str, str]  # signature input name -> tensor name
    outputs: dict[str, str]  # signature output name -> tensor name
    specs: dict[str, tf.TensorSpec]  # signature input name -> spec
    signature_key: str
    other_signatures: list[str]  # signature keys with the same interface (Keras' "serve")
    # signature outputs left out, with the reason: they read a lookup table or are not numbers
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    # the SavedModel's other signatures, whose interface differs: not exported with this one
    left_out: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StripResult:
    """What :func:`strip_saved_model` did."""

    layers: list[dict]  # per producing op: name, op, channels before / after, zeroed, kept_reasons
    flops_before: float
    flops_after: float
    params_before: int
    params_after: int
    max_rel_error: float
    signatures: list[str]
    # the stripped graph, frozen as the stripped SavedModel holds it: converters can start from it instead of
    # freezing the written SavedModel again
    stripped: FrozenSignature | None = dataclasses.field(default=None, repr=False)
    # the check's inputs and the written SavedModel's outputs on them (TensorFlow's outputs of the stripped
    # graph: a reference for the conversions checked next), and its signature as loaded back to run them
    inputs: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    outputs: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    signature: object = dataclasses.field(default=None, repr=False)

    @property
    def kept_reasons(self) -> dict[str, int]:
        """Why zeroed channels were kept, over all layers: reason -> number of channels."""
        total: dict[str, int] = {}
        for row in self.layers:
            for why, n in row["kept_reasons"].items():
                total[why] = total.get(why, 0) + n
        return total


def freeze_saved_model(src_dir: str, signature_key: str = "serving_default") -> FrozenSignature:
    """Load ``src_dir``'s serving signature and freeze it into a constant-folded GraphDef.

    TF 2 SavedModels are read with ``tf.saved_model.load``; TF1 ones (and TF/Keras 2 ones TF 2.16+ cannot
    restore) with the TF1 loader when that fails. Outputs that read a lookup table or are not numbers are left
    out, with the reason, in ``FrozenSignature.dropped``; the stripped SavedModel has the others.
    """
    check_saved_model_dir(src_dir)
    try:
        loaded = tf.saved_model.load(src_dir)
    except Exception:  # e.g. TF/Keras 2 SavedModels whose optimizer objects TF 2.16+ cannot restore
        graph_def, inputs, outputs, specs, same, others, out_dtypes = _freeze_v1(src_dir, signature_key)
    else:
        try:
            graph_def, inputs, outputs, specs, same, others, out_dtypes = _freeze_v2(loaded, src_dir, signature_key)
        except ExportError:
            raise
        except Exception as e:  # e.g. a signature that assigns variables (a layer traced in training mode)
            if _written_by_tf1(src_dir):  # e.g. a table its main_op initializes: TF 2's freezing cannot import it
                graph_def, inputs, outputs, specs, same, others, out_dtypes = _freeze_v1(src_dir, signature_key)
            else:
                raise ExportError(
                    f"cannot freeze the {signature_key!r} signature of {src_dir!r} into constants "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from e
    _check_inputs(specs)
    dropped = _unfreezable_outputs(graph_def, inputs, outputs, out_dtypes)
    if len(dropped) == len(outputs):
        raise ExportError(f"no output of the {signature_key!r} signature of {src_dir!r} can be exported: "
                          + "; ".join(f"{k!r} {why}" for k, why in sorted(dropped.items())))
    outputs = {k: t for k, t in outputs.items() if k not in dropped}
    # the inputs too: a signature input no output reads stays one (its callers still feed it)
    graph_def = fold_constants(graph_def, list(outputs.values()) + list(inputs.values()))
    return FrozenSignature(graph_def, inputs, outputs, specs, signature_key, same, dropped,
                           sorted(set(others) - set(same)))


# ops holding a lookup table (tf.lookup, StringLookup / IntegerLookup, TF1 index_to_string)
_TABLE_OPS = ("HashTable", "HashTableV2", "MutableHashTable", "MutableHashTableV2", "MutableHashTableOfTensors",
              "MutableHashTableOfTensorsV2", "MutableDenseHashTable", "MutableDenseHashTableV2")


def _unfreezable_outputs(graph_def, inputs: dict[str, str], outputs: dict[str, str],
                         dtypes: dict[str, tf.DType]) -> dict[str, str]:
    """The signature outputs that the frozen graph cannot compute on its own or ONNX / OpenVINO cannot hold,
    with the reason: those that read a lookup table (freezing turns variables into constants, but a table
    stays a resource, still to be fed or initialized) and those that are not numbers (class names).

    The control edges from the table's readers to other nodes (a tf.function orders its stateful ops) are
    removed from ``graph_def`` in place: looking a table up does not change what the other outputs compute."""
    from tfcompress.graph.frozen_graph import node_name, topological_order

    nodes = {n.name: n for n in graph_def.node}
    fed = {node_name(t) for t in inputs.values()}
    readers: dict[str, str] = {}  # node -> the table it reads (through its data inputs)
    for name in topological_order(graph_def):
        n = nodes[name]
        if n.op in _TABLE_OPS or (n.op == "Placeholder" and name not in fed
                                  and n.attr["dtype"].type == tf.resource.as_datatype_enum):
            readers[name] = name
            continue
        table = next((readers[node_name(i)] for i in n.input if not i.startswith("^") and node_name(i) in readers),
                     None)
        if table is not None:
            readers[name] = table
    if readers:
        for n in graph_def.node:
            n.input[:] = [i for i in n.input if not (i.startswith("^") and node_name(i) in readers)]
    dropped = {}
    for key, t in outputs.items():
        if node_name(t) in readers:
            dropped[key] = (f"reads a lookup table ({readers[node_name(t)]}), which a frozen graph, ONNX and "
                            "OpenVINO IR cannot hold; compute it from the exported outputs instead")
        elif key in dtypes and not (dtypes[key].is_floating or dtypes[key].is_integer or dtypes[key].is_bool):
            dropped[key] = f"is a {dtypes[key].name} tensor; ONNX and OpenVINO IR outputs here are numbers"
    return dropped


def _load_error(src_dir: str, e: Exception) -> ExportError:
    """The ExportError for a SavedModel TensorFlow cannot load: its own reason (TensorFlow's first line is often
    just 'Graph execution error:'), and for unreadable variables what that likely means."""
    lines = [ln.strip() for ln in str(getattr(e, "message", None) or e).splitlines()]
    why = next((ln for ln in lines if ln and ln != "Graph execution error:"), type(e).__name__)
    if isinstance(e, (tf.errors.OutOfRangeError, tf.errors.DataLossError, tf.errors.NotFoundError)) or (
            "not a valid checkpoint" in why):
        return ExportError(f"cannot read the variables of SavedModel {src_dir!r} ({why}): its variables/ directory "
                           "is missing, truncated or damaged (an interrupted download or copy?)")
    return ExportError(f"cannot load SavedModel {src_dir!r}: {why}")


def _written_by_tf1(src_dir: str) -> bool:
    """Whether ``src_dir`` is a TF1 SavedModel (``tf.compat.v1.saved_model.Builder``, ``simple_save``): its
    meta graphs hold no object graph, only graphs, signatures and the ops that initialize them."""
    return not any(mg.object_graph_def.nodes for mg in read_saved_model_proto(src_dir).meta_graphs)


def _check_inputs(specs: dict[str, tf.TensorSpec]) -> None:
    """Refuse an input of unknown rank, and a text (or other non-numeric) input: the checks, ONNX, OpenVINO
    and INT8 calibration all run the network on numbers of a known rank, and TensorFlow's string ops (a
    TextVectorization layer's) have no ONNX / OpenVINO form."""
    for name, spec in specs.items():
        if spec.shape.rank is None:
            raise unknown_rank(name)
        if not (spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool):
            raise ExportError(
                f"input {name!r} is a {spec.dtype.name} tensor: the export needs numeric inputs; export a "
                "signature that takes the token ids (or features) the model computes from it, with the text "
                "preprocessing kept outside (keras.export.ExportArchive can add such a signature)")


def _constant_graph(fn, lower_control_flow: bool = True) -> tuple:
    """``fn``'s graph with its variables as constants, cut to what its outputs read: (graph_def, input tensor
    names, output tensor names), as ``convert_variables_to_constants_v2`` gives them.

    That function also wraps the graph into a new ConcreteFunction (import, prune, lift), which takes longer
    than the conversion itself on a large graph and is not needed here: the graph is cut to its outputs
    directly, and the read ops' colocation with their variables dropped as that wrapping drops it.
    TensorFlow versions without the two internal steps take the public function."""
    try:
        data = convert_to_constants._FunctionConverterDataInEager(
            func=fn, lower_control_flow=lower_control_flow, aggressive_inlining=False)
        graph_def, converted = convert_to_constants._replace_variables_by_constants(converter_data=data)
    except AttributeError:
        frozen = convert_to_constants.convert_variables_to_constants_v2(fn, lower_control_flow=lower_control_flow)
        return frozen.graph.as_graph_def(), [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    with tf.Graph().as_default():  # an op that still needs a variable (a signature that assigns one, e.g. a
        tf.import_graph_def(graph_def, name="")  # layer traced in training mode) fails here, as when wrapped
    captured = {id(fn.graph.internal_captures[k]) for k in converted}
    inputs = [t.name for t in fn.inputs if id(t) not in captured]
    outputs = [t.name for t in fn.outputs]
    graph_def = prune_unused(graph_def, inputs + outputs)  # an input no output reads stays an input
    for node in graph_def.node:  # colocation with the variables, now constants: nothing to colocate with
        if "_class" in node.attr:
            del node.attr["_class"]
    return graph_def, inputs, outputs


def _freeze_v2(loaded, src_dir: str, key: str):
    sigs = dict(loaded.signatures)
    if key not in sigs:
        raise missing_signature(src_dir, key, sigs)
    fn = sigs[key]
    specs = dict(fn.structured_input_signature[1])
    graph_def, input_names, output_names = _constant_graph(fn)
    if has_cycle(graph_def):
        # lowered control flow (an RNN's loop) is a cycle of Enter/Merge/NextIteration nodes; kept functional,
        # the loop is one While node whose body is a library function
        graph_def, input_names, output_names = _constant_graph(fn, lower_control_flow=False)
    # the frozen function's inputs are its placeholders and its outputs the flattened structured outputs,
    # both in tf.nest order (dict keys sorted)
    inputs = dict(zip(sorted(specs), input_names))
    outputs = dict(zip(sorted(fn.structured_outputs), output_names))
    same = [
        k for k, f in sigs.items() if k != key
        and f.structured_input_signature == fn.structured_input_signature
        and f.structured_outputs.keys() == fn.structured_outputs.keys()
    ]
    dtypes = {k: v.dtype for k, v in fn.structured_outputs.items() if isinstance(v, tf.TensorSpec)}
    return graph_def, inputs, outputs, specs, same, [k for k in sigs if k != key], dtypes


def _freeze_v1(src_dir: str, key: str):
    """TF1-style loading: the signature_def's tensors, functions inlined by grappler, variables frozen."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    g = tf.Graph()
    with g.as_default(), tf.compat.v1.Session() as sess:
        try:
            mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], src_dir)
        except Exception as e:
            raise _load_error(src_dir, e) from None
        if key not in mg.signature_def:
            raise missing_signature(src_dir, key, mg.signature_def)
        sig = mg.signature_def[key]
        inputs = {k: v.name for k, v in sig.inputs.items()}
        outputs = {k: v.name for k, v in sig.outputs.items()}
        specs = {
            k: tf.TensorSpec(tf.TensorShape(v.tensor_shape), tf.as_dtype(v.dtype), name=k)
            for k, v in sig.inputs.items()
        }
        meta = meta_graph_pb2.MetaGraphDef()
        meta.graph_def.CopyFrom(g.as_graph_def())
        fetch = meta_graph_pb2.CollectionDef()
        fetch.node_list.value.extend(outputs.values())
        meta.collection_def["train_op"].CopyFrom(fetch)
        cfg = config_pb2.ConfigProto()
        rw = cfg.graph_options.rewrite_options
        rw.optimizers[:] = ["function"]  # inline function calls, nothing else
        rw.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
        rw.min_graph_nodes = -1
        inlined = tf_optimizer.OptimizeGraph(cfg, meta)
        graph_def = tf.compat.v1.graph_util.convert_variables_to_constants(
            sess, inlined, sorted({t.split(":")[0] for t in outputs.values()})
        )
    same = [
        k for k, s in mg.signature_def.items() if k != key
        and {n: v.name for n, v in s.inputs.items()} == inputs
        and {n: v.name for n, v in s.outputs.items()} == outputs
    ]
    others = [k for k in mg.signature_def if k != key and not k.startswith("__")]  # "__saved_model_init_op"
    return graph_def, inputs, outputs, specs, same, others, {k: tf.as_dtype(v.dtype) for k, v in sig.outputs.items()}


def save_graph_def(frozen: FrozenSignature, graph_def: tf.compat.v1.GraphDef, dst_dir: str) -> None:
    """Save ``graph_def`` as a SavedModel with ``frozen``'s signatures, input and output names."""
    names = sorted(frozen.inputs)
    keys = sorted(frozen.outputs)
    # TF 2 signatures are called with keyword arguments named like the inputs; other names (a TF1 model's
    # "images:0") only a TF1 SavedModel can hold
    if not all(n.isidentifier() and not keyword.iskeyword(n) for n in names):
        _save_graph_def_v1(frozen, graph_def, dst_dir)
        return
    specs = [tf.TensorSpec(frozen.specs[n].shape, frozen.specs[n].dtype, name=n) for n in names]

    # placeholders cannot stay inside a function: every reader is re-wired through input_map, so the
    # placeholder nodes only need to exist (as a small constant) for the import to validate
    graph_def = _without_placeholders(graph_def)
    # weights become variables, stored once in variables/ and shared by every signature's function
    # (as graph constants they would be copied into each function of saved_model.pb)
    # (a weight that freezing copied for every call of its layer, e.g. each time step of a TimeDistributed
    # layer, is stored once)
    module = tf.Module()
    module.weights = []
    weight_map = {}
    by_value = {}
    for n in graph_def.node:
        if _stored_as_variable(n):
            key = _value_key(n)
            if key not in by_value:
                value = tf.make_ndarray(n.attr["value"].tensor)
                by_value[key] = tf.Variable(value, trainable=False, name=f"w{len(module.weights)}")
                module.weights.append(by_value[key])
            weight_map[n.name + ":0"] = by_value[key]
            # every reader is re-wired to the variable: leave a scalar stub, not a second copy
            dtype = tf.as_dtype(n.attr["dtype"].type).as_numpy_dtype
            n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.zeros((), dtype)))

    def body(args):
        feeds = {frozen.inputs[n]: a for n, a in zip(names, args)}
        feeds.update({t: v.read_value() for t, v in weight_map.items()})
        outs = tf.compat.v1.import_graph_def(
            graph_def,
            input_map=feeds,
            return_elements=[frozen.outputs[k] for k in keys],
            name="stripped",
        )
        return {k: tf.identity(t, name=_op_name(k)) for k, t in zip(keys, outs)}

    # signatures are called with keyword arguments named like the inputs: give the function those names
    namespace = {"body": body}
    exec(f"def serve({', '.join(names)}):\n    return body([{', '.join(names)}])\n", namespace)
    # traced (the graph imported, seconds for a large one) once, and the same function under every key, as
    # Keras's model.export does: saved_model.pb then holds the graph once
    fn = tf.function(namespace["serve"], input_signature=specs, autograph=False).get_concrete_function()
    signatures = {key: fn for key in [frozen.signature_key] + frozen.other_signatures}
    # an inference graph: custom gradients (e.g. of swish) are neither needed nor savable once frozen
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, dst_dir, signatures=signatures, options=options)


def _stored_as_variable(node) -> bool:
    """Whether :func:`save_graph_def` stores the node's value in ``variables/``: a float constant of at least
    16 values (a weight; smaller ones stay in the graph)."""
    return (node.op == "Const" and tf.as_dtype(node.attr["dtype"].type).is_floating
            and np.prod([d.size for d in node.attr["value"].tensor.tensor_shape.dim]) >= 16)


def _value_key(node) -> bytes:
    """A digest of a Const node's dtype, shape and value: equal for the copies freezing makes of one weight."""
    return hashlib.sha256(node.attr["value"].tensor.SerializeToString(deterministic=True)).digest()


def variable_bytes(graph_def) -> int:
    """Bytes of the values :func:`save_graph_def` stores in ``variables/`` (its weights, unpadded; equal ones, as
    the copies freezing makes of one weight, once)."""
    stored = {_value_key(n): n for n in graph_def.node if _stored_as_variable(n)}
    return int(sum(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim], dtype=np.int64)
                   * tf.as_dtype(n.attr["dtype"].type).size for n in stored.values()))


def _save_graph_def_v1(frozen: FrozenSignature, graph_def: tf.compat.v1.GraphDef, dst_dir: str) -> None:
    """Save ``graph_def`` as a TF1 SavedModel (one graph, weights as its constants) whose signatures map
    ``frozen``'s input and output names, whatever they are, to its tensors."""
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            signature = tf.compat.v1.saved_model.predict_signature_def(
                {n: g.get_tensor_by_name(t) for n, t in frozen.inputs.items()},
                {k: g.get_tensor_by_name(t) for k, t in frozen.outputs.items()})
            builder = tf.compat.v1.saved_model.Builder(dst_dir)
            builder.add_meta_graph_and_variables(
                sess, [tf.saved_model.SERVING],
                signature_def_map={key: signature for key in [frozen.signature_key] + frozen.other_signatures})
            builder.save()


def _op_name(key: str) -> str:
    """A TensorFlow op name for the signature output ``key``: the key itself where TensorFlow allows it,
    otherwise with each character it refuses (``:``, non-ASCII letters ...) replaced by ``_``. Signature keys
    may be any string (``logits:0``, ``ausgabe_ü``); op names may not."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", key)
    return name if re.match(r"[A-Za-z0-9.]", name) else "output" + name


def _without_placeholders(graph_def):
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    for n in out.node:
        if n.op == "Placeholder":
            dtype = n.attr["dtype"].type
            n.op = "Const"
            n.ClearField("attr")
            n.attr["dtype"].type = dtype
            n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.zeros((), tf.as_dtype(dtype).as_numpy_dtype)))
    return out


def run_frozen(frozen: FrozenSignature, graph_def, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a frozen signature graph (the original, whatever TF version wrote it) on named inputs."""
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=g) as sess:
        keys = sorted(frozen.outputs)
        vals = sess.run([frozen.outputs[k] for k in keys], {frozen.inputs[n]: a for n, a in inputs.items()})
    return dict(zip(keys, vals))


def call_signature(fn, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A loaded SavedModel signature's outputs on named inputs, as numpy arrays."""
    return {k: v.numpy() for k, v in fn(**{n: tf.constant(a) for n, a in inputs.items()}).items()}


def sample_inputs(specs: dict[str, tf.TensorSpec], batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the signature (unknown non-batch dimensions become 32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in specs.items():
        shape = [batch if i == 0 and d is None else (d if d is not None else 32)
                 for i, d in enumerate(spec.shape.as_list())]
        if spec.dtype.is_floating:
            out[name] = rng.uniform(0, 1, shape).astype(spec.dtype.as_numpy_dtype)
        else:
            out[name] = rng.integers(0, 2, shape).astype(spec.dtype.as_numpy_dtype)
    return out


def _params(graph_def) -> int:
    """Values of the float constants. Equal copies of a non-uniform constant count once: freezing copies a
    weight once for every call of its layer (each time step of a ``TimeDistributed`` layer, a shared layer),
    and two different trained or random weights are never equal. Uniform constants (an untrained layer's zero
    bias, a fresh BatchNormalization's scale) count every time: different layers have equal ones."""
    seen, total = set(), 0
    for n in graph_def.node:
        if n.op != "Const" or not tf.as_dtype(n.attr["dtype"].type).is_floating:
            continue
        size = int(np.prod([d.size for d in n.attr["value"].tensor.tensor_shape.dim]))
        if size > 1:
            value = tf.make_ndarray(n.attr["value"].tensor)
            if value.min() != value.max():
                key = _value_key(n)
                if key in seen:
                    continue
                seen.add(key)
        total += size
    return total


def strip_saved_model(
    src_dir: str,
    dst_dir: str,
    signature_key: str = "serving_default",
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    frozen: FrozenSignature | None = None,
    reference: dict[str, np.ndarray] | None = None,
) -> StripResult:
    """Write to ``dst_dir`` a SavedModel without the channels that are zero across their coupled group.

    Args:
        src_dir: a SavedModel with a ``signature_key`` signature (from ``model.export``,
            ``tf.saved_model.save`` or TF/Keras 2). Never modified.
        dst_dir: where to write; must not exist or be empty (unless ``overwrite``). Written atomically.
        signature_key: the signature to strip; other signatures with the same interface are kept too.
        check_inputs: inputs for the numeric check (default: random data matching the signature).
        tolerance: largest relative max error allowed between original and stripped outputs.
        overwrite: replace a non-empty ``dst_dir``.
        frozen: ``src_dir``'s ``signature_key`` signature as :func:`freeze_saved_model` returns it, when the
            caller already has it (freezing a large model takes as long as stripping it).
        reference: the original signature's outputs on ``check_inputs`` (as :func:`run_frozen` gives them),
            when the caller has run it already; the stripped SavedModel is checked against them.

    Returns:
        A :class:`StripResult` (per-layer channels, FLOPs, parameters, the measured error, and the written
        SavedModel's signature as loaded back with its outputs on the check inputs).

    Raises:
        ExportError: bad input, or outputs that differ by more than ``tolerance`` (nothing is written).
    """
    check_output_dir(dst_dir, [src_dir], overwrite)
    if frozen is None:
        frozen = freeze_saved_model(src_dir, signature_key)
    elif frozen.signature_key != signature_key:
        raise ValueError(f"frozen is the {frozen.signature_key!r} signature, not {signature_key!r}")
    try:
        gg = GraphDefGraph(frozen.graph_def, list(frozen.inputs.values()), list(frozen.outputs.values()))
        removable, consts = gg.graph.plan_removal()
        removed = {k: v for k, v in removable.items() if v.any()}
        new_gd = gg.rewrite(removed, consts)
        layers = _layer_rows(gg, removable, consts)
    except Exception as e:  # a graph the adapter misreads must not surface as a raw numpy/TF error
        raise ExportError(
            f"cannot strip {src_dir!r}: analysing its {signature_key!r} graph failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); please report this model"
        ) from e
    with staged_output(dst_dir, overwrite) as tmp:
        x = check_inputs if check_inputs is not None else sample_inputs(frozen.specs)
        check_reference(reference, check_inputs)
        ref = reference if reference is not None else _run_original(frozen, x)
        got, signature = _save_and_run(frozen, new_gd, tmp, x)
        err = check_outputs(got, ref, tolerance, "stripped model outputs differ from the original",
                            "; nothing written")
    counter = FlopsCounter(gg.graph)
    return StripResult(
        layers=layers, flops_before=counter.flops(), flops_after=counter.flops(removed),
        params_before=_params(frozen.graph_def), params_after=_params(new_gd), max_rel_error=err,
        signatures=[signature_key] + frozen.other_signatures, stripped=dataclasses.replace(frozen, graph_def=new_gd),
        inputs=x, outputs=got, signature=signature,
    )


def check_reference(reference: dict | None, check_inputs: dict | None) -> None:
    """ValueError when reference outputs come without the check inputs they were computed on."""
    if reference is not None and check_inputs is None:
        raise ValueError("reference needs the check_inputs it was computed on")


def _run_original(frozen: FrozenSignature, x: dict) -> dict:
    """The original graph's outputs on the check inputs ``x``; ExportError when they do not fit it."""
    try:
        return run_frozen(frozen, frozen.graph_def, x)
    except Exception as e:
        raise ExportError(f"the check inputs do not fit the {frozen.signature_key!r} signature "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _save_and_run(frozen: FrozenSignature, new_gd, dst_dir: str, x: dict) -> tuple[dict, object]:
    """Save the stripped graph to ``dst_dir``, load it back and run it: its outputs on ``x`` and its signature
    as loaded."""
    try:
        save_graph_def(frozen, new_gd, dst_dir)
        signature = tf.saved_model.load(dst_dir).signatures[frozen.signature_key]
        return call_signature(signature, x), signature
    except ExportError:
        raise
    except Exception as e:  # a rewrite TensorFlow refuses: a bug to report, not a raw traceback
        raise ExportError(f"the stripped graph cannot be saved or run ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); nothing written") from e


def _layer_rows(gg: GraphDefGraph, removable: dict, consts: dict) -> list[dict]:
    """Per producing op: channels before and after, how many were zeroed, and why zeroed ones were kept."""
    graph = gg.graph
    why_kept = graph.kept_reasons(removable, consts)
    rows = []
    for op in gg.ops:
        if op.rule is not Rule.PRODUCER or not op.semantics.weighted:  # rows are weighted layers
            continue
        out = op.outputs[0]
        keep = graph.keep_mask(out, removable)
        zeroed = op.semantics.const_out([consts[t] for t in op.inputs])[0] == 0
        reasons: dict[str, int] = {}
        roots, chans = graph.owners(out)
        for r, c in zip(roots[zeroed & keep], chans[zeroed & keep]):
            why = why_kept.get(int(r), {}).get(int(c)) or graph.block_reason(int(r)) or "not removable"
            reasons[why] = reasons.get(why, 0) + 1
        rows.append({"name": op.name, "op": gg.nodes[op.name].op, "channels_before": int(keep.size),
                     "channels_after": int(keep.sum()), "zeroed": int(zeroed.sum()), "kept_reasons": reasons})
    return rows


def check_outputs(got: dict, ref: dict, tolerance: float, what: str, suffix: str = "") -> float:
    """Largest relative max error over the outputs ``ref`` names; ExportError if it exceeds ``tolerance``
    (naming the output, when there are several)."""
    errors = rel_errors(got, ref)
    worst = max(errors, key=errors.get)
    err = errors[worst]
    if not err <= tolerance:
        of = f" on output {worst!r}" if len(errors) > 1 else ""
        raise ExportError(f"{what} (relative error {err:.2e} > {tolerance:.0e}{of}){suffix}")
    return err


def rel_errors(got: dict, ref: dict) -> dict[str, float]:
    """Relative max error (max |got - ref| / max |ref|) of each output ``ref`` names."""
    return {k: _rel(got[k], ref[k]) for k in ref}


def max_rel_error(got: dict, ref: dict) -> float:
    """Largest relative max error (max |got - ref| / max |ref|) over the outputs ``ref`` names."""
    return max(rel_errors(got, ref).values())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if a.size else 0.0

"""Preparing a frozen GraphDef for the channel rules: calls of its own functions inlined, every subgraph that does
not depend on an input folded into a constant, unused nodes dropped.

Keras 3 compiles some layers through XLA (``Conv2D(groups>1)``, as in ConvNeXt's depthwise layers); a frozen
SavedModel keeps them as ``StatefulPartitionedCall`` nodes marked ``_noinline``, which neither grappler nor
tf2onnx inlines. Inside a call the ops are invisible to the channel rules and to converters; inlined, they are
ordinary nodes (TensorFlow runs a grouped ``Conv2D`` without XLA).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry
from tensorflow.python.framework.function_def_to_graph import function_def_to_graph_def

from tfcompress.errors import ExportError

__all__ = [
    "FAKE_QUANT_OPS", "RANDOM_OPS", "calls_functions", "const_node", "fold_constants", "has_cycle",
    "inline_function_calls", "keep_library_functions_in_use", "node_name", "prune_unused", "tensor_name",
    "topological_order", "unfusable_grouped_biases",
]

FAKE_QUANT_OPS = {"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs"}
_STATEFUL_OR_INPUT = {"Placeholder", "PlaceholderWithDefault", "VarHandleOp", "ReadVariableOp", "NoOp"}
# ops that draw new random numbers on every run (stateless ones with a constant seed are deterministic): never
# folded, a constant would hold one draw
RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "Multinomial", "RandomShuffle",
    "RandomGamma", "RandomPoisson", "RandomPoissonV2", "ParameterizedTruncatedNormal", "StatefulUniform",
    "StatefulUniformInt", "StatefulUniformFullInt", "StatefulStandardNormal", "StatefulStandardNormalV2",
    "StatefulTruncatedNormal", "RandomIndexShuffle", "RngReadAndSkip", "RngSkip",
})


_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")
_INPUT_CONTROL = "tfcompress_input_control"  # the NoOp holding an inlined call's control inputs


def inline_function_calls(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    """A copy of ``graph_def`` with every call of a function of its library replaced by the function's body
    (nested calls included). The library itself is kept.

    Raises:
        ExportError: a node calls a function the library does not define.
    """
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    functions = {f.signature.name: f for f in out.library.function}
    while _inline_calls(out, functions):
        pass
    return out


def calls_functions(graph_def: tf.compat.v1.GraphDef) -> bool:
    """Whether a node of ``graph_def`` calls a function (a call op, or an op named after a function of its
    library): whether :func:`inline_function_calls` has work."""
    functions = {f.signature.name for f in graph_def.library.function}
    return any(_called_function(n, functions) is not None for n in graph_def.node)


def _referenced_functions(nodes) -> set[str]:
    """The functions named by the nodes' attributes (a While loop's ``body`` and ``cond``, an If's branches)."""
    names = set()
    for n in nodes:
        for a in n.attr.values():
            if a.HasField("func"):
                names.add(a.func.name)
            elif a.HasField("list"):
                names.update(f.name for f in a.list.func)
    return names


def keep_library_functions_in_use(graph_def: tf.compat.v1.GraphDef) -> None:
    """Drop from ``graph_def``'s library every function that no node, nor a function in use, refers to."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    used: set[str] = set()
    todo = _referenced_functions(graph_def.node)
    while todo:
        name = todo.pop()
        if name not in used and name in functions:
            used.add(name)
            todo |= _referenced_functions(functions[name].node_def)
    keep = [f for f in graph_def.library.function if f.signature.name in used]
    gradients = [g for g in graph_def.library.gradient if g.function_name in used]
    del graph_def.library.function[:], graph_def.library.gradient[:]
    graph_def.library.function.extend(keep)
    graph_def.library.gradient.extend(gradients)


def _called_function(node: node_def_pb2.NodeDef, functions: dict) -> str | None:
    """The function ``node`` calls (a call op, or an op named after a library function), else None."""
    if node.op in _CALL_OPS:
        return node.attr["f"].func.name
    return node.op if node.op in functions else None


def _inline_calls(graph_def, functions: dict) -> bool:
    """Inline one level of function calls in ``graph_def`` (in place); True if any call was inlined."""
    kept, added = [], []
    taken = {node.name for node in graph_def.node}
    for node in graph_def.node:
        name = _called_function(node, functions)
        if name is None:
            kept.append(node)
            continue
        if name not in functions:
            raise ExportError(f"node {node.name!r} calls function {name!r}, which the SavedModel does not define")
        nodes = _inlined(node, functions[name], taken)
        taken.update(n.name for n in nodes)
        added.extend(nodes)
    if not added:
        return False
    del graph_def.node[:]
    graph_def.node.extend(kept + added)
    return True


def _inlined(call: node_def_pb2.NodeDef, fdef, taken: set[str]) -> list[node_def_pb2.NodeDef]:
    """The nodes that replace ``call``: the function body under ``<call>/`` (``<call>/_1/`` ... where a body
    name would repeat one of the ``taken`` node names), its arguments bound to the call's inputs, and an
    ``IdentityN`` under the call's own name, so its consumers and control edges stay valid.

    The call's control inputs hold for the whole body, as they did for the call: they go to a ``NoOp`` that
    every body node without a data input (arguments, constants, variable handles, stateful sources) waits for;
    the other nodes wait for it through their inputs (TensorFlow's own inliner does the same)."""
    body, flat = function_def_to_graph_def(fdef)
    control_name = _INPUT_CONTROL
    while any(node.name == control_name for node in body.node):
        control_name = "_" + control_name
    prefix, k = call.name + "/", 0
    while any(prefix + name in taken for name in [node.name for node in body.node] + [control_name]):
        k += 1
        prefix = f"{call.name}/_{k}/"
    data_inputs = [i for i in call.input if not i.startswith("^")]
    controls = [i for i in call.input if i.startswith("^")]
    args = {a.name: k for k, a in enumerate(fdef.signature.input_arg)}
    nodes = []
    if controls:
        nodes.append(node_def_pb2.NodeDef(name=prefix + control_name, op="NoOp", input=controls))
    for node in body.node:
        new = node_def_pb2.NodeDef()
        new.CopyFrom(node)
        new.name = prefix + node.name
        new.attr.pop("_class", None)
        is_arg = node.op == "Placeholder" and node.name in args
        if is_arg:  # bound to the call's input
            new.op = "Identity"
            dtype = new.attr["dtype"]
            new.ClearField("attr")
            new.attr["T"].CopyFrom(dtype)
            new.input[:] = [data_inputs[args[node.name]]]
        else:
            new.input[:] = [("^" + prefix + i[1:]) if i.startswith("^") else prefix + i for i in node.input]
        if controls and (is_arg or all(i.startswith("^") for i in new.input)):  # a source of the body
            new.input.append("^" + prefix + control_name)
        nodes.append(new)
    results = [prefix + flat.get(fdef.ret[a.name], fdef.ret[a.name]) for a in fdef.signature.output_arg]
    join = node_def_pb2.NodeDef(name=call.name, op="IdentityN", input=results)
    join.attr["T"].CopyFrom(attr_value_pb2.AttrValue(
        list=attr_value_pb2.AttrValue.ListValue(type=[a.type for a in fdef.signature.output_arg])))
    return nodes + [join]


def _makes_handles(op: str) -> bool:
    """An op with a variant or resource output (an RNN loop's TensorList): no constant can hold its value."""
    op_def = op_def_registry.get(op)
    return op_def is not None and any(a.type in (types_pb2.DT_VARIANT, types_pb2.DT_RESOURCE)
                                      for a in op_def.output_arg)


def fold_constants(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Evaluate every subgraph that does not depend on an input into a ``Const``; drop unused nodes.

    FakeQuant ops are kept (grappler's constant folding would bake weight quantization into float
    constants, and OpenVINO then runs those layers in float): only their inputs are folded. Random ops are kept
    too (a constant would hold one draw of them).
    ``IdentityN`` (how custom gradients such as swish's appear) becomes one ``Identity`` per output, and calls
    of the graph's own functions are inlined (:func:`inline_function_calls`).
    """
    graph_def = _split_identity_n(inline_function_calls(graph_def), outputs)
    nodes = {n.name: n for n in graph_def.node}
    order = topological_order(graph_def)
    foldable: set[str] = set()
    for name in order:
        n = nodes[name]
        if n.op == "Const":
            foldable.add(name)
        elif (n.op not in _STATEFUL_OR_INPUT and n.op not in FAKE_QUANT_OPS and n.op not in RANDOM_OPS
              and not n.op.startswith("Stateful") and not _makes_handles(n.op)):
            data = [i for i in n.input if not i.startswith("^")]
            if data and all(node_name(i) in foldable for i in data):
                foldable.add(name)
    # evaluate the foldable nodes that something non-foldable (or an output) reads
    needed: dict[str, None] = {}
    for n in graph_def.node:
        if n.name in foldable:
            continue
        for i in n.input:
            if not i.startswith("^") and node_name(i) in foldable and nodes[node_name(i)].op != "Const":
                needed[tensor_name(i)] = None
    for o in outputs:
        if node_name(o) in foldable and nodes[node_name(o)].op != "Const":
            needed[tensor_name(o)] = None
    values = {}
    if needed:
        g = tf.Graph()
        with g.as_default():
            tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            results = sess.run(list(needed))
        values = dict(zip(needed, results))
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    renamed: dict[str, str] = {}
    for t, v in values.items():
        name = node_name(t) if t.endswith(":0") else node_name(t) + "/output_" + t.split(":")[1]
        renamed[t] = name
    for n in graph_def.node:
        if n.name in foldable and n.op != "Const" and tensor_name(n.name) not in values:
            continue
        if n.name in foldable and n.op != "Const":
            new = out.node.add()
            new.CopyFrom(const_node(renamed[tensor_name(n.name)], values[tensor_name(n.name)]))
            continue
        new = out.node.add()
        new.CopyFrom(n)
        new.input[:] = [
            renamed.get(tensor_name(i), i) if not i.startswith("^") else i
            for i in n.input if not (i.startswith("^") and i[1:] in foldable)
        ]
    for t, name in renamed.items():
        if not t.endswith(":0"):
            out.node.add().CopyFrom(const_node(name, values[t]))
    return unfusable_grouped_biases(prune_unused(out, outputs))


def unfusable_grouped_biases(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    """``graph_def`` with the ``BiasAdd`` after each grouped convolution written as ``AddV2`` (the same sum).

    Grappler's remapper fuses ``Conv2D`` (directly, through the ``Squeeze`` of a Conv1D or through the
    ``Identity`` an inlined function call leaves) + ``BiasAdd`` into
    ``_FusedConv2D``, which TensorFlow's own CPU kernels cannot run for grouped convolutions ("Fused conv
    implementation does not support grouped convolutions"); only its oneDNN build, on by default on AVX-512
    CPUs alone, can. Keras avoids the fusion by compiling grouped convolutions with XLA, which inlining
    removes; the remapper leaves ``AddV2`` alone, so the frozen and the stripped graphs run on every CPU.
    Returns ``graph_def`` itself when it has no grouped convolution.
    """
    convs = [n for n in graph_def.node if n.op == "Conv2D"]
    if not convs:
        return graph_def
    nodes = {n.name: n for n in graph_def.node}
    g = tf.Graph()
    with g.as_default():
        tf.import_graph_def(graph_def, name="")
    grouped = set()
    for n in convs:
        x, w = (g.get_operation_by_name(n.name).inputs[i].shape for i in (0, 1))
        channels_last = n.attr["data_format"].s in (b"", b"NHWC")
        c = x[-1] if channels_last else (x[1] if x.rank else None)
        if x.rank and w.rank == 4 and c is not None and w[2] is not None and c != w[2]:
            grouped.add(n.name)
    if not grouped:
        return graph_def
    passed = set(grouped)  # the convolutions and what only passes their output on (an inlined call's Identity)
    for name in topological_order(graph_def):
        n = nodes[name]
        if n.op in ("Identity", "Squeeze") and n.input and node_name(n.input[0]) in passed:
            passed.add(name)
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    for n in out.node:
        if (n.op == "BiasAdd" and node_name(n.input[0]) in passed
                and n.attr["data_format"].s in (b"", b"NHWC")):
            n.op = "AddV2"
            del n.attr["data_format"]
    return out


def _split_identity_n(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """One ``Identity`` per output of each ``IdentityN`` (the first under its name), except where a later output
    is one of the graph's ``outputs`` (it keeps its name)."""
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    rename: dict[str, str] = {}
    new_nodes = []
    fetched = {tensor_name(o) for o in outputs}
    for n in out.node:
        if n.op != "IdentityN" or any(f"{n.name}:{k}" in fetched for k in range(1, len(n.input))):
            continue
        data = [i for i in n.input if not i.startswith("^")]
        ctrl = [i for i in n.input if i.startswith("^")]
        dtypes = list(n.attr["T"].list.type)
        for k, src in enumerate(data):
            name = n.name if k == 0 else f"{n.name}/tfcompress_out_{k}"
            ident = tf.compat.v1.NodeDef(name=name, op="Identity", input=[src] + ctrl)
            ident.attr["T"].type = dtypes[k]
            new_nodes.append(ident)
            rename[f"{n.name}:{k}"] = name
    if not new_nodes:
        return graph_def
    split = {n.name for n in new_nodes}
    kept = [n for n in out.node if n.name not in split]
    del out.node[:]
    out.node.extend(kept + new_nodes)
    for n in out.node:
        n.input[:] = [rename.get(i, rename.get(i + ":0", i) if ":" not in i else i)
                      if not i.startswith("^") else i for i in n.input]
    return out


def prune_unused(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Keep only the nodes the outputs depend on."""
    nodes = {n.name: n for n in graph_def.node}
    keep, stack = set(), [node_name(o) for o in outputs]
    while stack:
        name = stack.pop()
        if name in keep or name not in nodes:
            continue
        keep.add(name)
        stack.extend(node_name(i.lstrip("^")) for i in nodes[name].input)
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for n in graph_def.node:
        if n.name in keep:
            out.node.add().CopyFrom(n)
    return out


def const_node(name: str, value: np.ndarray) -> tf.compat.v1.NodeDef:
    """A ``Const`` node holding ``value``."""
    value = np.asarray(value)
    n = tf.compat.v1.NodeDef(name=name, op="Const")
    n.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return n


def node_name(t: str) -> str:
    """The node of a tensor or control input name (``"^a"``, ``"a:1"`` -> ``"a"``)."""
    return t.lstrip("^").split(":")[0]


def tensor_name(t: str) -> str:
    """A tensor name with its output index (``"a"`` -> ``"a:0"``)."""
    return t if ":" in t else t + ":0"


def has_cycle(graph_def: tf.compat.v1.GraphDef) -> bool:
    """Whether the graph holds lowered control flow (a loop's back edge)."""
    try:
        topological_order(graph_def)
    except ValueError:
        return True
    return False


def topological_order(graph_def: tf.compat.v1.GraphDef) -> list[str]:
    """Node names, each after every node it reads (data or control); ValueError for a cycle."""
    nodes = {n.name: n for n in graph_def.node}
    indeg = {n.name: 0 for n in graph_def.node}
    users: dict[str, list[str]] = {n.name: [] for n in graph_def.node}
    for n in graph_def.node:
        for i in n.input:
            src = node_name(i)
            if src in nodes:
                indeg[n.name] += 1
                users[src].append(n.name)
    ready = [n.name for n in graph_def.node if indeg[n.name] == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for u in users[name]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle (control flow): only feed-forward graphs can be stripped")
    return order

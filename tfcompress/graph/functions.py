"""Inlining the calls of a frozen graph's own functions.

Keras 3 compiles some layers through XLA (``Conv2D(groups>1)``, as in ConvNeXt's depthwise layers); a frozen
SavedModel keeps them as ``StatefulPartitionedCall`` nodes marked ``_noinline``, which neither grappler nor
tf2onnx inlines. Inside a call the ops are invisible to the channel rules and to converters; inlined, they are
ordinary nodes (TensorFlow runs a grouped ``Conv2D`` without XLA).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, node_def_pb2
from tensorflow.python.framework.function_def_to_graph import function_def_to_graph_def

from tfcompress.errors import ExportError

__all__ = ["inline_function_calls"]

_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")


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


def _called_function(node, functions: dict) -> str | None:
    if node.op in _CALL_OPS:
        return node.attr["f"].func.name
    return node.op if node.op in functions else None


def _inline_calls(graph_def, functions: dict) -> bool:
    """Inline one level of function calls in ``graph_def`` (in place); True if any call was inlined."""
    kept, added = [], []
    for node in graph_def.node:
        name = _called_function(node, functions)
        if name is None:
            kept.append(node)
            continue
        if name not in functions:
            raise ExportError(f"node {node.name!r} calls function {name!r}, which the SavedModel does not define")
        added.extend(_inlined(node, functions[name]))
    if not added:
        return False
    del graph_def.node[:]
    graph_def.node.extend(kept + added)
    return True


def _inlined(call, fdef) -> list:
    """The nodes that replace ``call``: the function body under ``<call>/``, its arguments bound to the call's
    inputs, and an ``IdentityN`` under the call's own name, so its consumers and control edges stay valid."""
    body, flat = function_def_to_graph_def(fdef)
    prefix = call.name + "/"
    data_inputs = [i for i in call.input if not i.startswith("^")]
    controls = [i for i in call.input if i.startswith("^")]
    args = {a.name: k for k, a in enumerate(fdef.signature.input_arg)}
    nodes = []
    for node in body.node:
        new = node_def_pb2.NodeDef()
        new.CopyFrom(node)
        new.name = prefix + node.name
        new.attr.pop("_class", None)
        if node.op == "Placeholder" and node.name in args:
            new.op = "Identity"
            dtype = new.attr["dtype"]
            new.ClearField("attr")
            new.attr["T"].CopyFrom(dtype)
            new.input[:] = [data_inputs[args[node.name]]] + controls
        else:
            new.input[:] = [("^" + prefix + i[1:]) if i.startswith("^") else prefix + i for i in node.input]
        nodes.append(new)
    results = [prefix + flat.get(fdef.ret[a.name], fdef.ret[a.name]) for a in fdef.signature.output_arg]
    join = node_def_pb2.NodeDef(name=call.name, op="IdentityN", input=results)
    join.attr["T"].CopyFrom(attr_value_pb2.AttrValue(
        list=attr_value_pb2.AttrValue.ListValue(type=[a.type for a in fdef.signature.output_arg])))
    return nodes + [join]

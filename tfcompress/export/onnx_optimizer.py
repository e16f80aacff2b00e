"""The ONNX optimizer passes tf2onnx runs after converting a graph, with its transpose pass in linear time.

tf2onnx converts TensorFlow's NHWC convolutions to ONNX's NCHW ones by wrapping each in Transposes, then its
``TransposeOptimizer`` pushes them through the graph until they cancel. That pass is quadratic in the graph's
size, twice over: after every single transpose it moves, it scans the graph again from its first node, and it
sorts the whole graph once for every constant Reshape it folds. On a graph of thousands of nodes (NASNet,
Inception-ResNet, any quantization-aware model: each quantizer adds nodes) it takes minutes. The pass here is
tf2onnx's, with its own handlers doing every rewrite; only the two loops differ:

- after a transpose is moved the scan goes on from where it was, over the nodes still in the graph, and starts
  again from the top until a full scan moves nothing (tf2onnx's stopping rule);
- constant Reshapes are all folded first, and the graph sorted once.

The result is a fixed point of the same rewrites, so the same kinds of graphs come out; the order of the moves
may differ, and with it a few node counts. The export checks every conversion numerically, as it always does.
When the installed tf2onnx lacks a method this pass relies on, its own pass runs instead.
"""

from __future__ import annotations

import gc

import numpy as np

__all__ = ["onnx_optimizer_passes"]

# tf2onnx 1.17's default ONNX optimizer passes, in its order (tf2onnx.optimizer._optimizers)
_PASSES = (
    ("optimize_transpose", "TransposeOptimizer"), ("remove_redundant_upsample", "UpsampleOptimizer"),
    ("fold_constants", "ConstFoldOptimizer"), ("const_dequantize_optimizer", "ConstDequantizeOptimizer"),
    ("loop_optimizer", "LoopOptimizer"), ("merge_duplication", "MergeDuplicatedNodesOptimizer"),
    ("reshape_optimizer", "ReshapeOptimizer"), ("global_pool_optimizer", "GlobalPoolOptimizer"),
    ("q_dq_optimizer", "QDQOptimizer"), ("remove_identity", "IdentityOptimizer"),
    ("remove_back_to_back", "BackToBackOptimizer"), ("einsum_optimizer", "EinsumOptimizer"),
)

# what the linear pass uses of tf2onnx's TransposeOptimizer besides its handlers
_USED = ("_handle_nhwc_tranpose", "_remove_useless_tranpose", "merge_duplicated_transposes", "post_optimize_action",
         "nodes")


def onnx_optimizer_passes(collect_garbage: bool = False) -> dict:
    """tf2onnx's default passes (name -> factory) for ``tf2onnx.optimizer.optimize_graph``, in its order.

    ``collect_garbage``: run the garbage collector before making each pass. tf2onnx's graphs hold reference
    cycles, so on large graphs what a pass replaces (weights it transposes or folds, and with tf2onnx's
    ``catch_errors`` the copy of the whole graph it makes before every pass to roll a failed one back) piles up
    without a collection.
    """
    from tf2onnx import optimizer

    passes = {name: getattr(optimizer, cls) for name, cls in _PASSES}
    linear = _linear_transpose_optimizer()
    if linear is not None:
        passes["optimize_transpose"] = linear
    if not collect_garbage:
        return passes

    def collecting(cls):
        def make():
            gc.collect()
            return cls()
        return make

    return {name: collecting(cls) for name, cls in passes.items()}


def _linear_transpose_optimizer():
    """tf2onnx's TransposeOptimizer with the two loops above replaced; None if tf2onnx lacks what it uses."""
    from tf2onnx.optimizer import transpose_optimizer as tp

    base = tp.TransposeOptimizer
    if not all(hasattr(base, name) for name in _USED) or not all(
            hasattr(tp, f) for f in ("is_transpose", "is_useless_transpose")):
        return None

    class LinearTransposeOptimizer(base):
        def pre_optimize_action(self):
            # a Reshape of a constant by a constant becomes the reshaped constant (it can then fold into a
            # convolution's weights); tf2onnx sorts the graph after each one, once is enough
            graph = self._g
            self._output_names = [graph.get_node_by_output(out).name for out in graph.outputs]
            foldable = [n for n in self.nodes
                        if n.type == "Reshape" and n.inputs[0].is_const() and n.inputs[1].is_const()]
            for reshape in foldable:
                value = reshape.inputs[0].get_tensor_value(as_list=False)
                shape = [value.shape[i] if d == 0 else d  # 0 keeps the dimension (ONNX Reshape)
                         for i, d in enumerate(reshape.inputs[1].get_tensor_value(as_list=True))]
                graph.remove_node(reshape.name)
                graph.make_const(reshape.output[0], np.reshape(value, shape))  # same output name: no rewiring
            if foldable:
                graph.topological_sort(graph.get_nodes())

        def _optimize_at_current_graph_level(self, graph):
            self._g = graph
            self.pre_optimize_action()
            moved = True
            while moved:
                moved = False
                self._force_stop = {}
                for node in list(self.nodes):
                    if graph.get_node_by_name(node.name) is not node:
                        continue  # removed (or replaced) by an earlier move of this scan
                    if tp.is_transpose(node) and self._handle_nhwc_tranpose(node):
                        moved = self.graph_been_opt = True
                    elif graph.get_node_by_name(node.name) is node and tp.is_useless_transpose(node):
                        self._remove_useless_tranpose(node)
                        moved = True
            self.merge_duplicated_transposes()
            self.post_optimize_action()
            return self._g

    return LinearTransposeOptimizer

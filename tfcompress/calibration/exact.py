"""An INT8 IR's own function, free of the CPU's INT8 kernels.

An INT8 IR (FakeQuantize ops, int8 weight constants) is compiled by the CPU plugin into INT8 kernels. On a CPU
without VNNI those add pairs of u8 x i8 products in int16 (``cpu_saturates_int8``), which can saturate: the
same IR then computes other values there than on a CPU that accumulates in int32. Written out as float
arithmetic, the IR runs in f32 on any CPU and computes what the int32-accumulating kernels compute, up to float
summation order: the right reference for checking a conversion, and for measuring how far one CPU's kernels
land from the model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exact_arithmetic", "is_quantized"]

_INT8 = ("i8", "u8")


def is_quantized(model) -> bool:
    """Whether ``model`` (an ``openvino.Model``) holds FakeQuantize ops or int8 / uint8 constants (what the
    CPU plugin runs in INT8)."""
    return any(op.get_type_name() == "FakeQuantize" or _int8_constant(op) for op in model.get_ordered_ops())


def exact_arithmetic(model, activation_scale: float = 1.0):
    """A clone of the INT8 IR ``model`` that the CPU plugin runs in float only.

    Each FakeQuantize becomes float ops computing its definition (clamp to the input range, scale to
    ``levels - 1`` steps, round half to even, scale to the output range) and each int8 / uint8 constant is
    stored as the float type it is converted to, so no layer is left for an INT8 kernel (int8 weights alone
    would still run a fully-connected layer with i8 weights). ``activation_scale`` multiplies the input of every
    FakeQuantize whose input is not a constant (the activation quantizers): a factor of ``1 +- 1e-6`` measures
    how far a float rounding at the quantizers carries to the outputs.
    """
    import openvino.opset13 as ops

    m = model.clone()
    for convert in [op for op in m.get_ordered_ops() if op.get_type_name() == "Convert"]:
        src = convert.input_value(0).get_node()
        if _int8_constant(src):
            dtype = convert.get_output_element_type(0).to_dtype()
            const = ops.constant(src.get_data().astype(dtype)).output(0)
            for target in convert.output(0).get_target_inputs():
                target.replace_source_output(const)
    constant = _constant_ops(m)
    for fq in [op for op in m.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        x, low, high, out_low, out_high = fq.input_values()
        dtype = x.get_element_type().to_dtype()
        if activation_scale != 1.0 and x.get_node().get_name() not in constant:
            x = ops.multiply(x, ops.constant(np.asarray(activation_scale, dtype))).output(0)
        steps = ops.constant(np.asarray(fq.get_attributes()["levels"] - 1, dtype))
        clamped = ops.maximum(ops.minimum(x, high), low)
        levels = ops.round(ops.multiply(ops.divide(ops.subtract(clamped, low), ops.subtract(high, low)), steps),
                           "half_to_even")
        y = ops.add(ops.multiply(ops.divide(levels, steps), ops.subtract(out_high, out_low)), out_low)
        for target in fq.output(0).get_target_inputs():
            target.replace_source_output(y.output(0))
    m.validate_nodes_and_infer_types()
    return m


def _int8_constant(op) -> bool:
    return op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in _INT8


def _constant_ops(model) -> set[str]:
    """The names of the ops of ``model`` that compute from constants only (a weight and its conversions)."""
    found: set[str] = set()
    for op in model.get_ordered_ops():  # topological: an op's inputs come before it
        kind = op.get_type_name()
        if kind == "Constant" or (kind not in ("Parameter", "ReadValue") and op.get_input_size() > 0 and all(
                v.get_node().get_name() in found for v in op.input_values())):
            found.add(op.get_name())
    return found

"""SavedModel -> ONNX (tf2onnx) -> OpenVINO IR, each step checked numerically against the previous one."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from tfcompress.output_dir import STAGING_PREFIX, write_file_atomic
from tfcompress.stripping.savedmodel_strip import (
    ExportError, FrozenSignature, check_outputs, freeze_saved_model, run_frozen, sample_inputs,
)

__all__ = ["to_onnx", "to_openvino", "ConversionCheck", "restore_weight_quantization"]


class ConversionCheck(dict):
    """What a conversion measured: ``max_rel_error`` vs the reference, ``quantized_weights`` restored, ..."""


def _has_weight_fake_quant(frozen: FrozenSignature) -> bool:
    nodes = {n.name: n for n in frozen.graph_def.node}
    for n in frozen.graph_def.node:
        if n.op.startswith("FakeQuantWithMinMax"):
            src = nodes.get(n.input[0].split(":")[0])
            if src is not None and src.op == "Const":
                return True
    return False


def to_onnx(
    saved_model_dir: str,
    onnx_path: str,
    opset: int = 17,
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    signature_key: str = "serving_default",
) -> ConversionCheck:
    """Convert a SavedModel signature to ONNX with tf2onnx, then check it.

    The checks tf2onnx does not do: a graph still holding TensorFlow ops (tf2onnx logs an error and returns
    it anyway) is refused; onnxruntime's outputs must match TensorFlow's within ``tolerance`` (relative max
    error). For quantization-aware models, the per-channel int8 weight quantization that TF's constant folding
    bakes into float weights is restored as int8 initializers with ``DequantizeLinear``, so that OpenVINO runs
    those layers in INT8. Inputs and outputs keep the signature's names.

    Returns:
        A :class:`ConversionCheck` with ``max_rel_error``, ``quantized_weights`` and ``opset``.
    """
    import onnx
    import tf2onnx

    if not isinstance(opset, int) or not 13 <= opset <= 18:
        raise ExportError(f"opset must be an integer in 13..18 (tf2onnx 1.17 supports no newer), got {opset!r}")
    frozen = freeze_saved_model(saved_model_dir, signature_key)
    rename = {t: n for n, t in frozen.inputs.items()}
    rename.update({t: n for n, t in frozen.outputs.items()})
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model, _ = tf2onnx.convert.from_graph_def(
            frozen.graph_def,
            input_names=list(frozen.inputs.values()),
            output_names=list(frozen.outputs.values()),
            opset=opset,
            tensors_to_rename=rename,
        )
    except Exception as e:
        raise ExportError(f"tf2onnx could not convert {saved_model_dir!r}: {str(e).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)
    foreign = sorted({
        f"{n.op_type}" for n in model.graph.node
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    } | {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")})
    if foreign:
        raise ExportError(
            f"tf2onnx left operations ONNX does not define in the graph: {foreign} (see the tf2onnx messages "
            "above; e.g. FakeQuant with narrow_range or num_bits != 8 is not convertible)"
        )
    restored = restore_weight_quantization(model) if _has_weight_fake_quant(frozen) else 0
    onnx.checker.check_model(model)
    data = model.SerializeToString()

    x = check_inputs if check_inputs is not None else sample_inputs(frozen.specs)
    ref = run_frozen(frozen, frozen.graph_def, x)
    got = _run_onnx(data, x)
    err = check_outputs(got, ref, tolerance, "ONNX outputs differ from TensorFlow's")
    write_file_atomic(onnx_path, data)
    return ConversionCheck(max_rel_error=err, quantized_weights=restored, opset=opset)


def _run_onnx(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    # onnxruntime 1.31's PadFusion merges Pad(0) into a following MaxPool, which pads with -inf: wrong
    # results whenever the padded values are negative (fixed in 1.32). The reference check runs unoptimised.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {k: v for k, v in inputs.items()})))


def restore_weight_quantization(model) -> int:
    """Re-insert per-channel int8 ``DequantizeLinear`` for Conv/ConvTranspose/MatMul/Gemm weights on an int8 grid.

    tf2onnx hands the graph to grappler, which folds ``FakeQuantWithMinMaxVarsPerChannel(weights)`` into float
    constants whose values are exactly ``q * scale`` with ``q`` in [-127, 127] (or [-63, 63] with the overflow
    fix). Storing ``q`` as int8 with its scale gives identical outputs and lets OpenVINO's low-precision
    transformations run the layer in INT8.
    Returns the number of weights restored.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    restored = 0
    new_nodes = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or users.get(name, 0) != 1:
            continue
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":  # weights (in, out / group, ...): output channels on axis 1
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if trans_b else 1
        else:
            axis = w.ndim - 1
        q, scale = _on_int8_grid(w, axis)
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
            name=base + "_DequantizeLinear", axis=axis))
        node.input[1] = deq_out
        restored += 1
    if new_nodes:
        nodes = list(new_nodes) + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return restored


def _on_int8_grid(w: np.ndarray, axis: int):
    """(q, scale) if every slice along ``axis`` is ``q * scale`` with integer q in [-127, 127], else (None, None).

    A slice's largest |q| is 127 (the full grid), or 63 where the weights were trained on the overflow fix's
    7-bit grid (``quantize_model(overflow_fix=...)``)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    if not np.all(amax > 0):
        amax = np.where(amax > 0, amax, 1.0)
    found = np.zeros(len(amax), dtype=bool)
    scale = np.zeros_like(amax)
    for top in (127.0, 63.0):
        q = moved / (amax / top)[:, None]
        fits = ~found & np.all(np.abs(q - np.round(q)) < 1e-3, axis=1)
        scale[fits] = amax[fits] / top
        found |= fits
    if not found.all():
        return None, None
    q = np.round(moved / scale[:, None])
    return np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis), scale


def to_openvino(
    onnx_path: str,
    xml_path: str,
    check_inputs: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
) -> ConversionCheck:
    """Convert ONNX to OpenVINO IR (FP32 weights) and compare OpenVINO (f32 precision) with onnxruntime."""
    import openvino as ov

    if not os.path.isfile(onnx_path):
        raise ExportError(f"ONNX file {onnx_path!r} does not exist")
    if not xml_path.endswith(".xml"):
        raise ExportError(f"the IR path must end in .xml, got {xml_path!r}")
    try:
        model = ov.convert_model(onnx_path)
    except Exception as e:
        raise ExportError(f"OpenVINO could not convert {onnx_path!r}: {str(e).splitlines()[0]}") from None
    if check_inputs is None:
        check_inputs = _random_inputs_for(model)
    with open(onnx_path, "rb") as f:
        ref = _run_onnx(f.read(), check_inputs)
    got = run_openvino(model, check_inputs, precision="f32")
    try:
        err = check_outputs(got, ref, tolerance, "OpenVINO outputs differ from onnxruntime's")
    except ExportError as e:
        raise ExportError(str(e) + _saturation_hint(model)) from None
    folder = os.path.dirname(os.path.abspath(xml_path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder)
    try:
        tmp_xml = os.path.join(tmp, "model.xml")
        ov.save_model(model, tmp_xml, compress_to_fp16=False)
        os.replace(tmp_xml[:-4] + ".bin", xml_path[:-4] + ".bin")
        os.replace(tmp_xml, xml_path)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionCheck(max_rel_error=err)


def _saturation_hint(model) -> str:
    """Why INT8 layers may compute wrong values on this CPU (for the error message of a failed check)."""
    import openvino as ov

    from tfcompress.calibration import cpu_saturates_int8

    quantized = any(op.get_type_name() == "FakeQuantize" or (op.get_type_name() == "Constant"
                    and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8)) for op in model.get_ordered_ops())
    if not quantized or not cpu_saturates_int8():
        return ""
    return ("; this CPU has no VNNI, so its INT8 kernels add pairs of u8 x i8 products in int16, which weights "
            "using the whole int8 range can overflow: keep them on 7 bits (quantize_model / calibrate "
            "overflow_fix='first_layer' or 'enable')")


def run_openvino(model, inputs: dict[str, np.ndarray], precision: str = "f32") -> dict[str, np.ndarray]:
    """Run an OpenVINO model (or IR path) on CPU; ``precision`` "f32" or "default" (BF16 on AMX CPUs)."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, str):
        model = core.read_model(model)
    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    compiled = core.compile_model(model, "CPU", config)
    by_name = {}
    for port in compiled.inputs:
        name = next((n for n in port.get_names() if n in inputs), None)
        if name is None:
            raise ExportError(f"no input given for model input {port.get_any_name()!r}")
        by_name[port] = inputs[name]
    res = compiled(by_name)
    return {out.get_any_name(): np.asarray(res[out]) for out in compiled.outputs}


def _random_inputs_for(model) -> dict[str, np.ndarray]:
    import tensorflow as tf

    specs = {port.get_any_name(): tf.TensorSpec([d.get_length() if d.is_static else None
                                                 for d in port.get_partial_shape()], tf.float32)
             for port in model.inputs}
    return sample_inputs(specs)

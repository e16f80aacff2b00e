"""Output checks of quantized (FakeQuant) graphs, scaled by the reference's own rounding noise.

A value that lands within a float rounding of a quantizer's half step moves by a whole step when another
runtime sums in another order, and every later quantizer can turn that step into more steps. How far this
carries to the outputs is a property of the model: a trained or shallow network damps it, a deep random-weight
one amplifies it until its logits differ as much as a broken conversion's would. A fixed limit then refuses
good models or passes bad ones. So the export measures the noise first: it runs the reference graph with every
activation quantizer's input scaled by ``1 +- PERTURBATION`` (far below any real change, about the size of a
float32 summation-order difference) and takes the largest change of the outputs as the floor of what any other
runtime can be expected to match.
"""

from __future__ import annotations

import numpy as np

from tfcompress.errors import ExportError

__all__ = [
    "PERTURBATION", "QuantizedCheck", "half_precision_tolerance", "mean_rel_error", "quantized_check",
    "saved_model_check",
]

PERTURBATION = 1e-6

# Keras mixed precision ("mixed_float16", "mixed_bfloat16") computes layers in a 16-bit float: TensorFlow rounds
# every layer's output to it, other runtimes round elsewhere or not at all, so outputs differ by about that
# type's precision (2^-10, 2^-7) times what the layers amplify, not by float32's 1e-4. A broken conversion
# (channels swapped, a weight lost) moves outputs by order 1.
HALF_EPS = {"DT_HALF": ("float16", 2.0 ** -10), "DT_BFLOAT16": ("bfloat16", 2.0 ** -7)}
HALF_K = 16

# Limits, from measured errors against the reference (the quantized-check tests in tests/test_export.py;
# the keras.applications families in BENCHMARKS.md, section 7c):
# stable QAT models (the demo's residual CNN, VGG16; random weights, 1 QAT step) differ by 1.4-1.5e-2 (max)
# at the ONNX step and show a noise of 0; a dequantization scale off by 2 (one FakeQuantize's output range
# doubled) moves them by 0.58-1.4 (max) and 0.61-1.18 (mean). Chaotic models (random-weight MobileNetV2,
# ResNet50V2, EfficientNetV2B0, InceptionV3) differ at most K times their measured noise.
MAX_FLOOR = 0.05
MEAN_FLOOR = 0.05
K = 3.0
# A mean limit this wide would pass a doubled dequantization scale (0.61-1.18 above): on such a graph the checks
# show only that the conversion ran, and the export says so instead of calling the graph verified.
DISCERNING = 0.5


class QuantizedCheck:
    """The limits of one quantized graph's output checks: ``noise`` (max and mean relative change of the
    reference's outputs under the perturbation) and the ``tolerance`` / ``mean_tolerance`` derived from it.

    ``verified`` says whether these limits can tell a broken conversion from a correct one: a graph whose
    outputs move by half their size under a float rounding cannot be checked by its outputs at all.
    """

    def __init__(self, noise: float, noise_mean: float, reference: dict[str, np.ndarray] | None = None):
        self.noise = noise
        self.reference = reference  # the unperturbed graph's outputs on the inputs measured
        self.noise_mean = noise_mean
        self.tolerance = max(MAX_FLOOR, K * noise)
        self.mean_tolerance = max(MEAN_FLOOR, K * noise_mean)
        self.verified = self.mean_tolerance < DISCERNING

    def report(self) -> dict:
        """What report.json records of it for each step."""
        return {"noise_floor": self.noise, "tolerance": self.tolerance}

    def warning(self) -> str | None:
        """One line for the user when the outputs cannot verify the conversion, else None."""
        if self.verified:
            return None
        return (f"this quantized graph's outputs move by {self.noise_mean:.0%} (mean) when its quantizers' inputs "
                f"move by {PERTURBATION:g}: output checks cannot tell a correct conversion from a broken one "
                f"(report.json: quantized_check.verified = false). A trained model, or --validation_data with "
                f"real samples, usually gives a graph that can be checked")

    def check_mean(self, got: dict, ref: dict, what: str) -> float:
        """Mean relative error of ``got`` against ``ref``; ExportError naming ``what`` above ``mean_tolerance``."""
        err = max(mean_rel_error(got[k], ref[k]) for k in ref)
        if not err <= self.mean_tolerance:
            raise ExportError(
                f"{what} (mean relative error {err:.2e} > {self.mean_tolerance:.2e}, the limit for this quantized "
                f"graph: its own rounding noise is {self.noise_mean:.2e}); the conversion changed the model")
        return err


def mean_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """mean |got - ref| / mean |ref| (0 when both are 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).mean()
    diff = np.abs(got - ref).mean()
    return float(diff / scale) if scale > 0 else float(diff > 0)


def _max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    diff = np.abs(got - ref).max()
    return float(diff / scale) if scale > 0 else float(diff > 0)


def perturbed_graph_def(graph_def, factor: float):
    """A copy of ``graph_def`` whose activation quantizers (``FakeQuantWithMinMaxVars``) read their input
    multiplied by ``factor``."""
    from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, tensor_pb2, types_pb2

    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    added = []
    for i, node in enumerate(out.node):
        if node.op != "FakeQuantWithMinMaxVars":
            continue
        const = node_def_pb2.NodeDef(name=f"{node.name}/noise_factor_{i}", op="Const")
        const.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT))
        const.attr["value"].CopyFrom(attr_value_pb2.AttrValue(tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape={}, float_val=[factor])))
        mul = node_def_pb2.NodeDef(name=f"{node.name}/noise_{i}", op="Mul", input=[node.input[0], const.name])
        mul.attr["T"].CopyFrom(attr_value_pb2.AttrValue(type=types_pb2.DT_FLOAT))
        node.input[0] = mul.name
        added += [const, mul]
    out.node.extend(added)
    return out


def quantized_check(run, graph_def, inputs: dict[str, np.ndarray]) -> QuantizedCheck:
    """Measure the rounding noise of the quantized ``graph_def`` on ``inputs``: ``run(graph_def, inputs)``
    returns its outputs by name; each activation quantizer's input is scaled by ``1 + PERTURBATION`` and by
    ``1 - PERTURBATION`` (a value on or near a half step moves one way or the other) and the largest relative
    change of the outputs is the noise."""
    ref = run(graph_def, inputs)
    noise, noise_mean = 0.0, 0.0
    for factor in (1 + PERTURBATION, 1 - PERTURBATION):
        got = run(perturbed_graph_def(graph_def, factor), inputs)
        noise = max(noise, max(_max_rel(got[k], ref[k]) for k in ref))
        noise_mean = max(noise_mean, max(mean_rel_error(got[k], ref[k]) for k in ref))
    return QuantizedCheck(noise, noise_mean, ref)


def saved_model_check(saved_model_dir: str, inputs: dict[str, np.ndarray] | np.ndarray,
                      signature_key: str = "serving_default") -> QuantizedCheck:
    """The limits the export holds a quantized SavedModel's conversions to, on ``inputs`` (by input name, or
    one array for a single-input signature)."""
    from tfcompress.export.convert import freeze_for_export
    from tfcompress.stripping.savedmodel_strip import run_frozen

    frozen = freeze_for_export(saved_model_dir, signature_key)
    if not isinstance(inputs, dict):
        if len(frozen.specs) != 1:
            raise ExportError(f"signature {signature_key!r} has {len(frozen.specs)} inputs: pass them by name")
        inputs = {next(iter(frozen.specs)): np.asarray(inputs)}
    return quantized_check(lambda gd, x: run_frozen(frozen, gd, x), frozen.graph_def, inputs)


def half_precision_tolerance(graph_def) -> tuple[str, float] | None:
    """The 16-bit float type a graph computes in (the coarsest met in its ops' types and casts) and the
    relative max error its output checks allow (``HALF_K`` x its precision); ``None`` for float32 graphs."""
    from tensorflow.core.framework import types_pb2

    found = {types_pb2.DataType.Name(n.attr[k].type) for n in graph_def.node for k in ("T", "DstT", "dtype")
             if k in n.attr}
    eps = [HALF_EPS[t] for t in found if t in HALF_EPS]
    if not eps:
        return None
    name, precision = max(eps, key=lambda e: e[1])
    return name, HALF_K * precision

"""Running OpenVINO models for the export's checks: as this CPU's kernels compute them, and in the exact
arithmetic of their quantizers; and how far apart the two land on an INT8 IR.

A conversion is checked in exact arithmetic (:func:`tfcompress.calibration.exact_arithmetic`): that is the IR's
function wherever it runs, so a broken conversion fails on every CPU and a correct one passes on every CPU. The
INT8 kernels are then measured against it separately: on a CPU without VNNI (``cpu_saturates_int8``) they add
pairs of u8 x i8 products in int16, which weights on the whole int8 grid can saturate; the IR is still right
for the CPUs that accumulate in int32, and the user is told how much this CPU class loses and which overflow
fix keeps it from saturating.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tfcompress.errors import ExportError
from tfcompress.export.checks import PERTURBATION, QuantizedCheck, mean_rel_error
from tfcompress.stripping.savedmodel_strip import max_rel_error

__all__ = ["int8_kernel_check", "int8_kernel_warning", "ir_rounding_noise", "openvino_runner", "run_openvino"]


def run_openvino(model, inputs: dict[str, np.ndarray], precision: str = "f32",
                 exact: bool = False) -> dict[str, np.ndarray]:
    """Run an OpenVINO model (or IR path) on CPU; ``precision`` "f32" or "default" (BF16 on CPUs with
    AVX512-BF16 or AMX).

    ``exact``: run an INT8 model's quantizers and int8 weights as float arithmetic
    (:func:`tfcompress.calibration.exact_arithmetic`), so that no INT8 kernel of this CPU computes it (a model
    without quantizers runs as it is).

    Returns each output under every one of its tensor names (the first output's names come first)."""
    return openvino_runner(model, precision, exact)(inputs)


def openvino_runner(model, precision: str = "f32",
                    exact: bool = False) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """:func:`run_openvino` with the model compiled once, for running it on many batches; the returned
    function's ``precision`` is the precision the float layers run in as compiled (``"f32"``, or the plugin's
    default on this CPU, e.g. ``"bf16"``)."""
    import openvino as ov

    from tfcompress.calibration import exact_arithmetic, is_quantized

    core = ov.Core()
    if isinstance(model, str):
        model = core.read_model(model)
    if exact and is_quantized(model):
        model = exact_arithmetic(model)
    config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
    compiled = core.compile_model(model, "CPU", config)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        by_name = {}
        for port in compiled.inputs:
            name = next((n for n in port.get_names() if n in inputs), None)
            if name is None:
                raise ExportError(f"no input given for model input {port.get_any_name()!r}")
            by_name[port] = inputs[name]
        res = compiled(by_name)
        # every name of an output port, so callers find an output under the name their reference uses
        return {name: np.asarray(res[out]) for out in compiled.outputs for name in sorted(out.get_names())}

    run.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return run


def ir_rounding_noise(model, inputs: dict[str, np.ndarray]) -> QuantizedCheck:
    """The limits an INT8 IR's outputs can be held to on ``inputs``: its outputs in exact arithmetic with every
    activation quantizer's input scaled by ``1 +- PERTURBATION``, against them unscaled (as
    :func:`tfcompress.export.checks.quantized_check` measures a TensorFlow graph)."""
    import openvino as ov

    from tfcompress.calibration import exact_arithmetic

    if isinstance(model, str):
        model = ov.Core().read_model(model)
    ref = run_openvino(model, inputs, exact=True)
    noise = noise_mean = 0.0
    for factor in (1 + PERTURBATION, 1 - PERTURBATION):
        got = run_openvino(exact_arithmetic(model, activation_scale=factor), inputs)
        noise = max(noise, max_rel_error(got, ref))
        noise_mean = max(noise_mean, max(mean_rel_error(got[k], ref[k]) for k in ref))
    return QuantizedCheck(noise, noise_mean, ref)


def int8_kernel_check(model, inputs: dict[str, np.ndarray], exact_outputs: dict[str, np.ndarray],
                      tolerance: float) -> dict:
    """How far this CPU's INT8 kernels compute the INT8 IR ``model`` from ``exact_outputs`` (its outputs in
    exact arithmetic on ``inputs``), as report.json records it: with the f32 hint (``precision``), the INT8
    kernels alone: ``max_rel_error``, ``mean_rel_error``, ``tolerance`` (the rounding noise the IR's checks
    allow), ``within_tolerance`` and ``cpu_saturates_int8``; and, where OpenVINO's default precision on this CPU
    is not f32 (bf16 on CPUs with AVX512-BF16 or AMX), the same errors as the IR is deployed by default, its
    layers that do not run INT8 computing in that precision (``default_precision``). It raises nothing: the
    conversion is checked in exact arithmetic, and how one CPU computes a right IR is for the user to know
    (:func:`int8_kernel_warning`), not a failed conversion.
    """
    from tfcompress.calibration import cpu_saturates_int8

    record = {**_errors(run_openvino(model, inputs), exact_outputs, tolerance), "tolerance": tolerance,
              "precision": "f32", "cpu_saturates_int8": cpu_saturates_int8()}
    run = openvino_runner(model, precision="default")
    if run.precision != "f32":
        record["default_precision"] = {"precision": run.precision,
                                       **_errors(run(inputs), exact_outputs, tolerance)}
    return record


def _errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tolerance: float) -> dict:
    """Relative max and mean errors of ``got`` against ``ref`` (the largest over ``ref``'s outputs), and
    whether the max is within ``tolerance``."""
    worst = max_rel_error(got, ref)
    return {"max_rel_error": worst, "mean_rel_error": max(mean_rel_error(got[k], ref[k]) for k in ref),
            "within_tolerance": worst <= tolerance}


def int8_kernel_warning(record: dict | None, fix: str) -> str | None:
    """One line for the user when this CPU computes an INT8 IR beyond its rounding noise (an
    :func:`int8_kernel_check` record): its INT8 kernels (f32 hint), naming ``fix``, what would keep them from
    saturating; else the IR at OpenVINO's default precision, naming the f32 hint; else None."""
    if not record:
        return None
    if record["within_tolerance"]:
        default = record.get("default_precision")
        if not default or default["within_tolerance"]:
            return None
        p = default["precision"]
        return (f"on the check inputs the INT8 IR compiled at OpenVINO's default precision on this CPU ({p}) "
                f"computes {default['max_rel_error']:.2e} (max) / {default['mean_rel_error']:.2e} (mean relative "
                f"error) away from its own arithmetic, beyond its rounding noise ({record['tolerance']:.2e}): its "
                f"layers that do not run INT8 compute in {p} there (with the f32 hint: {record['max_rel_error']:.2e}"
                f"); compile it with {{'INFERENCE_PRECISION_HINT': 'f32'}} to run it as checked")
    found = (f"on the check inputs this CPU's INT8 kernels compute the INT8 IR {record['max_rel_error']:.2e} (max) / "
             f"{record['mean_rel_error']:.2e} (mean relative error) away from its own arithmetic, beyond its "
             f"rounding noise ({record['tolerance']:.2e}); the IR itself is checked in exact arithmetic")
    if record["cpu_saturates_int8"]:
        return (f"{found}. This CPU has no VNNI: its INT8 kernels add pairs of u8 x i8 products in int16, which "
                f"weights on the whole int8 grid can saturate; CPUs with VNNI or AMX accumulate in int32. To run "
                f"the IR on CPUs like this one, {fix}")
    return f"{found}, and this CPU's kernels accumulate in int32: measure the IR's accuracy on it"

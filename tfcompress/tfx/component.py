"""``CompressModel``: a TFX Python-function component around :func:`compress_trainer_model`."""

from typing import TypedDict

try:  # the DSL modules, not ``tfx.v1``, which imports every standard component and their heavy dependencies
    from tfx.dsl.component.experimental import annotations as _dsl
    from tfx.dsl.component.experimental.decorators import component as _component
    from tfx.types import standard_artifacts as _artifacts
except ImportError as e:  # pragma: no cover - exercised by the import-error test in a clean interpreter
    raise ImportError(
        "tfcompress.tfx needs TFX: pip install \"tfcompress[tfx]\" (tfx 1.21 is the release for TensorFlow "
        "2.21). See the README's TFX section for machines where pip cannot resolve it."
    ) from e

from tfcompress.tfx.serving import compress_trainer_model

_Model = _artifacts.Model
_Examples = _artifacts.Examples

__all__ = ["CompressModel", "CompressMetrics"]


class CompressMetrics(TypedDict):
    """The component's returned outputs (ratios are after / before; accuracies -1 when not measured)."""

    flops_ratio: float
    params_ratio: float
    saved_model_bytes_ratio: float
    int8_layers: int
    quantizable_layers: int
    accuracy_fp32: float
    accuracy_int8: float
    max_drop_met: int  # int8="accuracy_aware": 1 met, 0 missed (allow_drop_miss); -1 otherwise


@_component
def CompressModel(  # noqa: N802 - TFX components are classes by convention
    model: _dsl.InputArtifact[_Model],
    compressed_model: _dsl.OutputArtifact[_Model],
    examples: _dsl.InputArtifact[_Examples] = None,
    split: _dsl.Parameter[str] = "eval",
    int8: _dsl.Parameter[str] = "default",
    max_drop: _dsl.Parameter[float] = 0.01,
    opset: _dsl.Parameter[int] = 17,
    num_calibration_samples: _dsl.Parameter[int] = 300,
    module_file: _dsl.Parameter[str] = "",
    preprocessing_fn: _dsl.Parameter[str] = "preprocessing_fn",
    label_key: _dsl.Parameter[str] = "",
    signature: _dsl.Parameter[str] = "serving_default",
    parsing_signature: _dsl.Parameter[str] = "",
    range_estimator: _dsl.Parameter[str] = "auto",
    max_iterations: _dsl.Parameter[int] = 50,
    allow_drop_miss: _dsl.Parameter[bool] = False,
    overflow_fix: _dsl.Parameter[str] = "first_layer",
) -> CompressMetrics:
    """Strip, convert (ONNX, OpenVINO FP32) and calibrate (OpenVINO INT8) the Trainer's model.

    Inputs: ``model`` (its ``Format-Serving`` SavedModel), optionally ``examples`` (split ``split``) for
    calibration and, with ``label_key``, accuracy. ``module_file``/``preprocessing_fn``: a function
    ``features -> model inputs`` (features are the parsed ``tf.train.Example`` arrays). Output:
    ``compressed_model``, a Model artifact with the stripped SavedModel in ``Format-Serving/`` and ONNX, IRs
    and the report in ``tfcompress/``; the returned metrics become the component's outputs too.

    ``signature`` is the network signature that is compressed. A Trainer whose ``serving_default`` parses
    serialized examples (what the Evaluator feeds) also saves the network alone (e.g. ``serving_image``) and
    the parsing alone: name them ``signature`` and ``parsing_signature``, and the compressed SavedModel gets
    ``serving_default`` back as the parsing followed by the compressed network
    (:func:`tfcompress.tfx.serving.attach_parsing`).

    ``range_estimator``, ``max_iterations`` and ``overflow_fix`` are the export command's ``--range_estimator``,
    ``--max_iterations`` and ``--overflow_fix``. With ``int8="accuracy_aware"`` the component fails when ``max_drop`` is not reached
    (so nothing downstream pushes the model), unless ``allow_drop_miss``; ``max_drop_met`` records the outcome.
    """
    metrics = compress_trainer_model(
        model.uri, compressed_model.uri, examples.uri if examples is not None else None,
        parsing_signature=parsing_signature, split=split, int8=int8, max_drop=max_drop, opset=opset,
        num_calibration_samples=num_calibration_samples, module_file=module_file or None,
        preprocessing_fn=preprocessing_fn, label_key=label_key, signature=signature,
        range_estimator=range_estimator, max_iterations=max_iterations, allow_drop_miss=allow_drop_miss,
        overflow_fix=overflow_fix)
    for key, value in metrics.items():  # also on the artifact, where TFX UIs and MLMD queries see them
        if CompressMetrics.__annotations__[key] is int:  # as the component's Integer output artifacts
            compressed_model.set_int_custom_property(key, int(value))
        else:
            compressed_model.set_float_custom_property(key, float(value))
    return CompressMetrics(**metrics)

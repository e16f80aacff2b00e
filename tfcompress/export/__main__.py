"""``python -m tfcompress.export``: SavedModel -> stripped SavedModel, ONNX, OpenVINO IR and a report."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from tfcompress.calibration.quantize import RANGE_ESTIMATORS  # noqa: E402 - numpy only, no TensorFlow
from tfcompress.int8_policy import OVERFLOW_FIX  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model_dir", None, "The SavedModel to export (read only, never modified).")
flags.DEFINE_string("output_dir", None, "Where to write stripped/, model.onnx, model_fp32.xml/.bin, "
                    "model_int8.xml/.bin and report.json/.md. Must not exist or be empty (see --overwrite).")
flags.DEFINE_string("calibration_data", None, "Samples for INT8 calibration (the first 300 are used): .npy, .npz "
                    "(x[, y], or one array per signature input under its name) or a directory of images in class "
                    "sub-folders. Given, model_int8.xml/.bin is written.")
flags.DEFINE_enum("int8", "default", ["default", "accuracy_aware", "none"],
                  "INT8 calibration mode (with --calibration_data): default (ranges + bias correction), "
                  "accuracy_aware (also reverts layers to float until the drop <= --max_drop; needs --calibration_data "
                  "and --validation_data, see --max_drop) or none.")
flags.DEFINE_enum("range_estimator", "auto", list(RANGE_ESTIMATORS),
                  "How INT8 calibration estimates activation ranges: minmax (the mean over samples of each sample's "
                  "largest value, NNCF's default), max (the largest value seen), quantile (the mean of per-sample "
                  "1e-4 quantiles) or auto: minmax for models with 2-D feature maps (image / spectrogram CNNs), "
                  "max for others (dense, Conv1D, embedding, attention models).")
flags.DEFINE_enum("overflow_fix", "first_layer", list(OVERFLOW_FIX),
                  "Which layers INT8 calibration keeps on 7-bit weights (-63..63), so that the INT8 kernels of CPUs "
                  "without VNNI (AVX2, AVX-512 before VNNI), which add pairs of u8 x i8 products in int16, cannot "
                  "saturate: first_layer (the first layers that read the input, where raw data fills the u8 range), "
                  "enable (every layer; one bit of weight precision less everywhere) or disable. The report says "
                  "how far this CPU's INT8 kernels land from the INT8 IR's exact arithmetic.")
flags.DEFINE_float("max_drop", 0.01, "Largest drop allowed by --int8=accuracy_aware: of accuracy with labelled "
                   "--validation_data; with unlabelled --validation_data (a regression or autoencoder output), the "
                   "INT8 outputs' relative RMS error against FP32.")
flags.DEFINE_integer("max_iterations", 50, "With --int8=accuracy_aware, the most layers reverted to float; "
                     "the search stops there even if --max_drop is not reached.")
flags.DEFINE_bool("allow_drop_miss", False, "With --int8=accuracy_aware, exit 0 even when --max_drop was not "
                  "reached (by default the export is written, the miss reported and the exit code is 3).")
flags.DEFINE_string("validation_data", None, "Labelled samples (.npz with x and y, or one array per signature "
                    "input under its name and y; or an image directory); the report then gives the accuracy of "
                    "every artifact.")
flags.DEFINE_integer("opset", 17, "ONNX opset, 13..18.")
flags.DEFINE_string("signature", "serving_default", "The SavedModel signature to export.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
flags.DEFINE_bool("require_onnx", False, "Fail if the model cannot be converted to ONNX (by default the OpenVINO IR "
                  "is then built from the SavedModel and the report says why model.onnx is absent).")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --flag=value", file=sys.stderr)
        return 2
    missing = [f"--{n}" for n in ("saved_model_dir", "output_dir") if not getattr(FLAGS, n)]
    if missing:
        print(f"error: {' and '.join(missing)} required (see --help)", file=sys.stderr)
        return 2
    unused = [f"--{n}" for n in ("max_drop", "max_iterations", "allow_drop_miss") if FLAGS[n].present]
    if unused and FLAGS.int8 != "accuracy_aware":
        verb = "applies" if len(unused) == 1 else "apply"
        print(f"error: {', '.join(unused)} only {verb} to --int8=accuracy_aware", file=sys.stderr)
        return 2
    calibrating = [f"--{n}" for n in ("range_estimator", "overflow_fix") if FLAGS[n].present]
    if calibrating and (FLAGS.calibration_data is None or FLAGS.int8 == "none"):
        verb = "applies" if len(calibrating) == 1 else "apply"
        print(f"error: {' and '.join(calibrating)} only {verb} with --calibration_data and --int8 other than none",
              file=sys.stderr)
        return 2
    from tfcompress._cli import import_tensorflow_quietly
    from tfcompress.export.data import check_data_files
    from tfcompress.export.options import check_args

    # the paths and options first: importing the pipeline imports TensorFlow, which takes seconds
    data = {"--calibration_data": FLAGS.calibration_data, "--validation_data": FLAGS.validation_data}
    serving = check_args(
        FLAGS.saved_model_dir, FLAGS.output_dir, FLAGS.int8, FLAGS.max_drop, FLAGS.opset, FLAGS.overwrite,
        FLAGS.max_iterations, data, calibration_data=FLAGS.calibration_data is not None, range_estimator=FLAGS.range_estimator,
        overflow_fix=FLAGS.overflow_fix, validation_data=FLAGS.validation_data is not None,
        signature_key=FLAGS.signature)
    check_data_files(FLAGS.saved_model_dir, FLAGS.signature, data, scored="--validation_data", serving=serving)
    import_tensorflow_quietly()
    from tfcompress.export.pipeline import export_saved_model

    report = export_saved_model(
        FLAGS.saved_model_dir, FLAGS.output_dir, calibration_data=FLAGS.calibration_data, int8=FLAGS.int8,
        max_drop=FLAGS.max_drop, max_iterations=FLAGS.max_iterations, range_estimator=FLAGS.range_estimator,
        overflow_fix=FLAGS.overflow_fix,
        validation_data=FLAGS.validation_data, opset=FLAGS.opset,
        overwrite=FLAGS.overwrite, signature_key=FLAGS.signature, require_onnx=FLAGS.require_onnx,
    )
    int8 = report["steps"].get("int8", {})
    if int8.get("max_drop_met") is False and not FLAGS.allow_drop_miss:
        print(f"error: {int8['warning']} (the export is written; --allow_drop_miss accepts it)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from tfcompress._cli import run

    run(main)

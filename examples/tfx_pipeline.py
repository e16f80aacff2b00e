"""A TFX pipeline that prunes while training and compresses the result, run with LocalDagRunner.

    pip install "tfcompress[tfx]"
    python examples/tfx_pipeline.py [--root /tmp/tfcompress_tfx]

CsvExampleGen (on scikit-learn's digits, written as CSV by this script) -> Trainer (``run_fn`` in
``tfx_digits_module.py`` trains with ``FilterPruning``; its ``serving_default`` parses serialized examples)
-> ``tfcompress.tfx.CompressModel`` (strips the network signature, ONNX, OpenVINO FP32 and INT8, report; puts
the example parsing back in front) -> Evaluator (TFMA: the compressed model's accuracy against the Trainer's
model as baseline) -> Pusher, which pushes the compressed Model artifact's ``Format-Serving`` (the stripped
SavedModel) to ``ROOT/serving/<version>`` only if the Evaluator blessed it.
"""

from __future__ import annotations

import argparse
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "tfx_digits_module.py")


def write_csv(data_dir: str) -> None:
    from sklearn.datasets import load_digits

    path = os.path.join(data_dir, "digits.csv")
    if os.path.exists(path):  # unchanged input: a rerun reuses the cached ExampleGen, Trainer and CompressModel
        return
    d = load_digits()
    os.makedirs(data_dir, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"p{i:02d}" for i in range(64)] + ["label"])
        for img, label in zip(d.data.astype(int), d.target):
            w.writerow(list(img) + [int(label)])


def eval_config(max_drop: float, min_accuracy: float):
    """TFMA: accuracy on the eval split; the candidate (compressed) model may lose at most ``max_drop`` of the
    baseline's (the Trainer's) and must reach ``min_accuracy``."""
    import tensorflow_model_analysis as tfma

    threshold = tfma.MetricThreshold(
        value_threshold=tfma.GenericValueThreshold(lower_bound={"value": min_accuracy}),
        change_threshold=tfma.GenericChangeThreshold(direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                                                     absolute={"value": -max_drop}))
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(name="candidate", signature_name="serving_default", label_key="label"),
                     tfma.ModelSpec(name="baseline", signature_name="serving_default", label_key="label",
                                    is_baseline=True)],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy", threshold=threshold),
            tfma.MetricConfig(class_name="ExampleCount")])],
        slicing_specs=[tfma.SlicingSpec()])


def create_pipeline(root: str, epochs: int = 4, target: float = 0.5, max_drop: float = 0.02,
                    min_accuracy: float = 0.8):
    from tfx import v1 as tfx

    from tfcompress.tfx import CompressModel

    data_dir = os.path.join(root, "data")
    write_csv(data_dir)
    example_gen = tfx.components.CsvExampleGen(input_base=data_dir)
    trainer = tfx.components.Trainer(
        module_file=MODULE, examples=example_gen.outputs["examples"],
        train_args=tfx.proto.TrainArgs(num_steps=40 * epochs), eval_args=tfx.proto.EvalArgs(num_steps=2),
        custom_config={"epochs": epochs, "target": target})
    compress = CompressModel(
        model=trainer.outputs["model"], examples=example_gen.outputs["examples"], module_file=MODULE,
        preprocessing_fn="preprocessing_fn", label_key="label", num_calibration_samples=300,
        int8="accuracy_aware", max_drop=max_drop,  # layers that cost accuracy stay float
        signature="serving_image", parsing_signature="parse_examples")  # serving_default parses examples
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"], model=compress.outputs["compressed_model"],
        baseline_model=trainer.outputs["model"], eval_config=eval_config(max_drop, min_accuracy))
    pusher = tfx.components.Pusher(
        model=compress.outputs["compressed_model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(filesystem=tfx.proto.PushDestination.Filesystem(
            base_directory=os.path.join(root, "serving"))))
    return tfx.dsl.Pipeline(
        pipeline_name="tfcompress_digits", pipeline_root=os.path.join(root, "pipeline"),
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            os.path.join(root, "metadata.db")),
        components=[example_gen, trainer, compress, evaluator, pusher], enable_cache=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/tfcompress_tfx")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--min_accuracy", type=float, default=0.8,
                    help="the Evaluator blesses (and the Pusher pushes) only a model at least this accurate")
    args = ap.parse_args()
    from tfx import v1 as tfx

    tfx.orchestration.LocalDagRunner().run(create_pipeline(args.root, args.epochs, min_accuracy=args.min_accuracy))
    print(f"done: the compressed model's report is in "
          f"{args.root}/pipeline/CompressModel/compressed_model/*/tfcompress/report.md; the model is in "
          f"{args.root}/serving/ if the Evaluator blessed it ({args.root}/pipeline/Evaluator/blessing/*/BLESSED)")


if __name__ == "__main__":
    main()

"""The example TFX pipeline, run for real (LocalDagRunner): CsvExampleGen -> Trainer -> CompressModel -> Evaluator
-> Pusher.

Needs tfx 1.21 with its real dependencies, which pip installs only on glibc >= 2.39: `.ci/tfx-env` builds that
environment (a Debian 13 root) and runs this file there with ``pytest -m tfx_real``.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest
import tensorflow as tf

from conftest import ROOT
from tfcompress import calibration
from tfcompress.export.artifacts import read_examples, serving_model_path
from tfcompress.tfx.serving import read_records

pytestmark = pytest.mark.tfx_real

PIPELINE = ROOT / "examples" / "tfx_pipeline.py"


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs the example pipeline as a user would (its own command line), then again with an accuracy threshold
    no model meets (ExampleGen, Trainer and CompressModel come from the cache), and opens the MLMD store."""
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    root = tmp_path_factory.mktemp("tfx_real")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    for min_accuracy in ("0.8", "1.01"):
        proc = subprocess.run([sys.executable, str(PIPELINE), "--root", str(root), "--epochs", "6",
                               "--min_accuracy", min_accuracy], capture_output=True, text=True, env=env,
                              timeout=1500)
        assert proc.returncode == 0, proc.stderr[-5000:]
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = str(root / "metadata.db")
    return root, metadata_store.MetadataStore(config)


def artifacts_of(store, node: str, key: str, inputs: bool = False, run: int = 0):
    """The output (or input) artifacts ``key`` of the pipeline node ``node`` in pipeline run ``run`` (0: the
    first), as MLMD recorded them."""
    context = store.get_context_by_type_and_name("node", f"tfcompress_digits.{node}")
    assert context is not None, f"MLMD has no node {node}"
    runs = sorted(store.get_contexts_by_type("pipeline_run"), key=lambda c: c.id)
    in_run = {e.id for e in store.get_executions_by_context(runs[run].id)}
    [execution] = [e for e in store.get_executions_by_context(context.id) if e.id in in_run]
    assert execution.last_known_state in (execution.COMPLETE, execution.CACHED)
    events = store.get_events_by_execution_ids([execution.id])
    ids = [ev.artifact_id for ev in events
           if ev.type == (ev.INPUT if inputs else ev.OUTPUT) and any(step.key == key for step in ev.path.steps)]
    return store.get_artifacts_by_id(ids)


def serve_examples(saved_model_dir, records) -> np.ndarray:
    """The SavedModel's ``serving_default`` on serialized examples (the logits)."""
    fn = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    return fn(examples=tf.constant(records))["output_0"].numpy()


def test_pushed_model_is_the_compressed_one_serves_examples_like_the_trainers_and_is_smaller(run):
    root, store = run
    [trainer_model] = artifacts_of(store, "Trainer", "model")
    [compressed] = artifacts_of(store, "CompressModel", "compressed_model")
    [pushed] = artifacts_of(store, "Pusher", "pushed_model")
    assert pushed.custom_properties["pushed"].int_value == 1
    destination = pathlib.Path(pushed.custom_properties["pushed_destination"].string_value)
    assert destination.parent == root / "serving"
    compressed_serving = pathlib.Path(serving_model_path(compressed.uri))
    assert (destination / "saved_model.pb").read_bytes() == (compressed_serving / "saved_model.pb").read_bytes()
    # gated by the Evaluator: its blessing (of the compressed model) is the Pusher's model_blessing input
    [blessing] = artifacts_of(store, "Pusher", "model_blessing", inputs=True)
    [evaluator_blessing] = artifacts_of(store, "Evaluator", "blessing")
    assert blessing.id == evaluator_blessing.id and blessing.custom_properties["blessed"].int_value == 1

    # the pushed SavedModel serves serialized examples (CsvExampleGen's eval records) as the Trainer's does
    [examples] = artifacts_of(store, "CsvExampleGen", "examples")
    records = read_records(examples.uri, "eval", 128)
    ref = serve_examples(serving_model_path(trainer_model.uri), records)
    got = serve_examples(destination, records)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.mean(ref.argmax(1) == got.argmax(1)) == 1.0
    # and the network signature serves the image tensor (what CompressModel's preprocessing_fn makes)
    sys.path.insert(0, str(ROOT / "examples"))
    from tfx_digits_module import preprocessing_fn

    x = tf.constant(preprocessing_fn(read_examples(examples.uri, "eval", 128)))
    network = tf.saved_model.load(str(destination)).signatures["serving_image"]
    np.testing.assert_allclose(network(image=x)["output_0"].numpy(), ref, rtol=1e-4, atol=1e-4)

    # smaller: the pruned channels are gone from the pushed SavedModel
    assert dir_bytes(destination) < 0.8 * dir_bytes(pathlib.Path(serving_model_path(trainer_model.uri)))

    # the compressed artifact's INT8 IR runs INT8 on the CPU plugin
    int8_ir = pathlib.Path(compressed.uri) / "tfcompress" / "model_int8.xml"
    compiled = ov.Core().compile_model(str(int8_ir), "CPU")
    layers = calibration.int8_layers(compiled)
    recorded = compressed.custom_properties
    assert layers["int8"] == recorded["int8_layers"].int_value > 0
    assert layers["total"] == recorded["quantizable_layers"].int_value


def test_compressed_artifact_records_its_metrics_in_mlmd(run):
    _, store = run
    [compressed] = artifacts_of(store, "CompressModel", "compressed_model")
    custom = compressed.custom_properties
    props = {k: v.double_value for k, v in custom.items() if v.HasField("double_value")}
    counts = {k: v.int_value for k, v in custom.items() if v.HasField("int_value")}
    assert {"flops_ratio", "params_ratio", "saved_model_bytes_ratio", "accuracy_fp32", "accuracy_int8"} <= set(props)
    assert {"int8_layers", "quantizable_layers"} <= set(counts)  # counts are integers, as their output artifacts
    props.update(counts)
    assert 0 < props["flops_ratio"] < 0.6 and 0 < props["params_ratio"] < 0.7
    assert 0 < props["saved_model_bytes_ratio"] < 1
    assert 0 < props["int8_layers"] <= props["quantizable_layers"]
    # measured on the eval split minus the 300 calibration samples (~300 examples); the example asks for
    # int8="accuracy_aware" with max_drop=0.02, which keeps layers float until the INT8 drop is within it
    assert props["accuracy_fp32"] > 0.8 and props["accuracy_fp32"] - props["accuracy_int8"] <= 0.02 + 1e-6

    # the returned metrics are output artifacts too, with the same values
    for key in ("flops_ratio", "int8_layers", "accuracy_int8"):
        [artifact] = artifacts_of(store, "CompressModel", key)
        value = float(pathlib.Path(artifact.uri).read_text())  # a value artifact's uri is its file
        assert value == pytest.approx(props[key])


def tfma_metrics(evaluation_uri: str) -> dict:
    """``{(metric, model_name, is_diff): value}`` for the overall slice of a TFMA evaluation."""
    import tensorflow_model_analysis as tfma

    [overall] = [m for m in tfma.load_metrics(evaluation_uri) if not m.slice_key.single_slice_keys]
    return {(kv.key.name, kv.key.model_name, kv.key.is_diff): kv.value.double_value.value
            for kv in overall.metric_keys_and_values}


def test_evaluator_blesses_the_compressed_model_against_the_trainers(run):
    _, store = run
    [trainer_model] = artifacts_of(store, "Trainer", "model")
    [compressed] = artifacts_of(store, "CompressModel", "compressed_model")
    [blessing] = artifacts_of(store, "Evaluator", "blessing")
    [evaluation] = artifacts_of(store, "Evaluator", "evaluation")
    props = blessing.custom_properties
    assert props["blessed"].int_value == 1 and (pathlib.Path(blessing.uri) / "BLESSED").exists()
    assert props["current_model_id"].int_value == compressed.id
    assert props["baseline_model_id"].int_value == trainer_model.id

    # TFMA evaluated the compressed model (candidate) and the Trainer's (baseline) on the whole eval split
    [examples] = artifacts_of(store, "CsvExampleGen", "examples")
    records = read_records(examples.uri, "eval", 10_000)
    labels = read_examples(examples.uri, "eval", 10_000)["label"][:, 0]
    metrics = tfma_metrics(evaluation.uri)
    accuracy = {name: metrics[("sparse_categorical_accuracy", name, False)] for name in ("candidate", "baseline")}
    assert metrics[("example_count", "candidate", False)] == len(records)
    served = np.mean(serve_examples(serving_model_path(compressed.uri), records).argmax(1) == labels)
    assert accuracy["candidate"] == pytest.approx(served, abs=1e-6)  # the compressed SavedModel's accuracy
    assert accuracy["candidate"] - accuracy["baseline"] == pytest.approx(
        metrics[("sparse_categorical_accuracy", "candidate", True)], abs=1e-6)
    # the example's thresholds: at least 0.8, at most 0.02 below the Trainer's model
    assert accuracy["candidate"] >= 0.8 and accuracy["candidate"] - accuracy["baseline"] >= -0.02
    # close to what the component's report measured (its validation samples: the eval split after the first
    # 300, which calibrated; the FP32 IR computes what the stripped SavedModel does)
    report = json.loads((pathlib.Path(compressed.uri) / "tfcompress" / "report.json").read_text())
    assert report["accuracy"]["stripped"] == pytest.approx(compressed.custom_properties["accuracy_fp32"]
                                                           .double_value, abs=0.01)
    assert accuracy["candidate"] == pytest.approx(report["accuracy"]["stripped"], abs=0.03)


def test_a_model_the_evaluator_does_not_bless_is_not_pushed(run):
    root, store = run
    [compressed] = artifacts_of(store, "CompressModel", "compressed_model")
    assert artifacts_of(store, "CompressModel", "compressed_model", run=1) == [compressed]  # from the cache
    [blessing] = artifacts_of(store, "Evaluator", "blessing", run=1)
    assert blessing.custom_properties["blessed"].int_value == 0
    assert (pathlib.Path(blessing.uri) / "NOT_BLESSED").exists()
    assert blessing.custom_properties["current_model_id"].int_value == compressed.id
    [pushed] = artifacts_of(store, "Pusher", "pushed_model", run=1)
    assert pushed.custom_properties["pushed"].int_value == 0
    [first_push] = artifacts_of(store, "Pusher", "pushed_model")
    assert sorted((root / "serving").iterdir()) == [
        pathlib.Path(first_push.custom_properties["pushed_destination"].string_value)]  # only the first run's

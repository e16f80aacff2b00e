"""The example TFX pipeline, run for real: CsvExampleGen -> Trainer -> CompressModel -> Pusher (LocalDagRunner).

Needs tfx 1.21 with its real dependencies, which pip installs only on glibc >= 2.39: `.ci/tfx-env` builds that
environment (a Debian 13 root) and runs this file there with ``pytest -m tfx_real``.
"""

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

pytestmark = pytest.mark.tfx_real

PIPELINE = ROOT / "examples" / "tfx_pipeline.py"


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs the example pipeline as a user would (its own command line) and opens the run's MLMD store."""
    from ml_metadata import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    root = tmp_path_factory.mktemp("tfx_real")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(PIPELINE), "--root", str(root), "--epochs", "6"],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = str(root / "metadata.db")
    return root, metadata_store.MetadataStore(config)


def artifacts_of(store, node: str, key: str):
    """The output artifacts ``key`` of the pipeline node ``node``'s run, as MLMD recorded them."""
    context = store.get_context_by_type_and_name("node", f"tfcompress_digits.{node}")
    assert context is not None, f"MLMD has no node {node}"
    [execution] = store.get_executions_by_context(context.id)
    assert execution.last_known_state == execution.COMPLETE
    events = store.get_events_by_execution_ids([execution.id])
    ids = [ev.artifact_id for ev in events
           if ev.type == ev.OUTPUT and any(step.key == key for step in ev.path.steps)]
    return store.get_artifacts_by_id(ids)


def test_pushed_model_serves_like_the_trainers_and_is_smaller(run):
    root, store = run
    [trainer_model] = artifacts_of(store, "Trainer", "model")
    [compressed] = artifacts_of(store, "CompressModel", "compressed_model")
    [pushed] = artifacts_of(store, "Pusher", "pushed_model")
    assert pushed.custom_properties["pushed"].int_value == 1
    destination = pathlib.Path(pushed.custom_properties["pushed_destination"].string_value)
    assert destination.parent == root / "serving"

    # the pushed SavedModel serves the Trainer model's predictions on the examples CsvExampleGen wrote
    [examples] = artifacts_of(store, "CsvExampleGen", "examples")
    sys.path.insert(0, str(ROOT / "examples"))
    from tfx_digits_module import preprocessing_fn

    x = tf.constant(preprocessing_fn(read_examples(examples.uri, "eval", 128)))
    before = tf.saved_model.load(serving_model_path(trainer_model.uri)).signatures["serving_default"]
    after = tf.saved_model.load(str(destination)).signatures["serving_default"]
    ref, got = list(before(image=x).values())[0].numpy(), list(after(image=x).values())[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.mean(ref.argmax(1) == got.argmax(1)) == 1.0

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

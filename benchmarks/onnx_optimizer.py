"""Time of tf2onnx's ONNX optimizer passes on a converted graph: tf2onnx's own against the export's
(tfcompress.export.onnx_optimizer: its transpose pass in linear time), interleaved rounds in one process.

    python benchmarks/onnx_optimizer.py --families NASNetMobile-32,InceptionResNetV2-75,ResNet50-32 --rounds 2

Each family is a keras.applications model with random weights (speed does not depend on them), quantized by
``quantize_model`` with ranges from one batch of random images (``--qat``, the default; ``--noqat`` converts
the float model), exported with ``model.export``, frozen as the export freezes it and converted by tf2onnx
once; each round then optimizes a copy of that graph with both pass sets and prints the seconds (wall and
this process's CPU), the node and Transpose counts after, and whether the two ONNX models compute the same
outputs on the check images (OpenVINO at f32).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from absl import app, flags

flags.DEFINE_string("families", "NASNetMobile-32,InceptionResNetV2-75,ResNet50-32", "NAME-PIXELS, comma separated")
flags.DEFINE_integer("rounds", 2, "interleaved rounds")
flags.DEFINE_bool("qat", True, "quantize the model first (each quantizer adds nodes, as users' QAT exports have)")
FLAGS = flags.FLAGS


def _graph(name: str, px: int, qat: bool, work: str):
    """tf2onnx's graph of the family (before its ONNX passes) and check inputs by input tensor name."""
    import keras

    from tfcompress.export import convert
    from tfcompress.quantization import quantize_model

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(px, px, 3), classes=10)
    x = np.random.default_rng(0).uniform(0, 255, (4, px, px, 3)).astype("float32")
    if qat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = quantize_model(model)
        model(x, training=True)  # ranges from one batch
    sm = os.path.join(work, name)
    model.export(sm, verbose=False)
    frozen = convert.freeze_for_export(sm)
    inputs, outputs = list(frozen.inputs.values()), list(frozen.outputs.values())
    return convert.tf2onnx_graph(convert.prepare_for_tf2onnx(frozen.graph_def), inputs, outputs), {inputs[0]: x}


def _run(graph, passes, x: dict, path: str) -> tuple[float, float, int, int, dict]:
    import onnx
    from tf2onnx import optimizer

    from tfcompress.export import convert

    g = copy.deepcopy(graph)
    t, c = time.perf_counter(), time.process_time()
    g = optimizer.optimize_graph(g, catch_errors=True, optimizers=passes)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    model = g.make_model("benchmark")
    onnx.save_model(model, path)
    nodes = len(model.graph.node)
    transposes = sum(n.op_type == "Transpose" for n in model.graph.node)
    return wall, cpu, nodes, transposes, convert.run_onnx(path, x)


def main(_):
    import logging

    from absl import logging as absl_logging

    from tfcompress.export.onnx_optimizer import onnx_optimizer_passes

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.WARNING)  # model.export's INFO lines
    print(f"qat={FLAGS.qat}, rounds={FLAGS.rounds}; seconds wall (CPU of this process)")
    print("| model | tf2onnx nodes in | tf2onnx's passes s | ours s | ours / tf2onnx's | nodes after (theirs, ours) "
          "| Transposes after | max output difference |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for family in FLAGS.families.split(","):
            name, px = family.rsplit("-", 1)
            graph, x = _graph(name, int(px), FLAGS.qat, work)
            times = {"theirs": [], "ours": []}
            for r in range(FLAGS.rounds):
                results = {}
                for label, passes in (("theirs", None), ("ours", onnx_optimizer_passes())):
                    results[label] = _run(graph, passes, x, os.path.join(work, f"{label}.onnx"))
                    times[label].append(results[label][:2])
                diff = max(float(np.abs(results["ours"][4][k] - results["theirs"][4][k]).max()
                                 / max(np.abs(results["theirs"][4][k]).max(), 1e-12)) for k in results["theirs"][4])
                (tw, tc, tn, tt, _), (ow, oc, on, ot, _) = results["theirs"], results["ours"]
                print(f"| {family} (round {r + 1}, load {os.getloadavg()[0]:.1f}) | {len(graph.get_nodes())} "
                      f"| {tw:.1f} ({tc:.1f}) | {ow:.1f} ({oc:.1f}) | {ow / tw:.2f} ({oc / tc:.2f}) | {tn}, {on} "
                      f"| {tt}, {ot} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    app.run(main)

"""keras.applications coverage: channel groups, exact stripping and QAT INT8 export, one row per model.

    python benchmarks/applications.py coverage [MODEL:PX ...]
    python benchmarks/applications.py qat [MODEL:PX ...]

``coverage``: weights=None, BatchNorm statistics and biases random (as tests/conftest.py sets them), 25 % of
every group's channels zeroed, Keras ``strip``. Reported: prunable groups, the coverage (fraction of the
conv/dense output channels that lie in prunable groups), the strip's relative max error and the parameters
before / after, the non-prunable groups' reasons (``tfcompress.explain``).
``qat``: ``quantize_model``, one QAT epoch (Adam 1e-4, ``RangeInit(4)``) on 256 CIFAR-10 test images resized,
``model.export``, ``python -m tfcompress.export``; reported: exit status, convolution / fully-connected layers
running INT8 in the compiled IR (``calibration.int8_layers``), the IR's relative max and mean error against
the Keras QAT model on 32 of the images, and the limits the export derived from the graph's own rounding
noise (report.json: ``noise_floor``, ``tolerance``, ``mean_tolerance``).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import numpy as np  # noqa: E402

import common  # noqa: E402

COVERAGE = [
    "ConvNeXtTiny:32", "ConvNeXtSmall:32", "DenseNet121:32", "DenseNet201:32", "EfficientNetB0:32",
    "EfficientNetB3:32", "EfficientNetV2B0:32", "EfficientNetV2S:32", "InceptionResNetV2:75", "InceptionV3:75",
    "MobileNet:32", "MobileNetV2:32", "MobileNetV3Small:32", "MobileNetV3Large:32", "NASNetMobile:32",
    "NASNetLarge:331", "ResNet50:32", "ResNet101:32", "ResNet50V2:32", "ResNet152V2:32", "VGG16:32", "VGG19:32",
    "Xception:71",
]
QAT = ["ConvNeXtTiny:32", "DenseNet121:32", "EfficientNetB0:32", "EfficientNetV2B0:32", "InceptionResNetV2:75",
       "InceptionV3:75", "MobileNet:32", "MobileNetV2:32", "MobileNetV3Small:32", "NASNetMobile:32", "ResNet50:32",
       "ResNet50V2:32", "VGG16:32", "Xception:71"]


def _model(name: str, px: int):
    import keras

    return getattr(keras.applications, name)(weights=None, input_shape=(px, px, 3), classes=10,
                                             classifier_activation=None)


def coverage(name: str, px: int) -> dict:
    import tfcompress
    from conftest import randomize_batchnorm, randomize_biases, rel_error
    from tfcompress.graph import Rule, build_graph

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    model = _model(name, px)
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    kg = build_graph(model)
    everything = kg.graph.all_groups()
    groups = [g for g in everything if not g.reason]
    # per output channel (a convolution added to a concatenation has one group per part of its channels)
    ids = [g.id for g in groups]
    produced = {r.op.layer: r.op.outputs[0] for r in kg.records if r.op.rule is Rule.PRODUCER}
    covered = (sum(int(np.isin(kg.graph.owners(t)[0], ids).sum()) for t in produced.values())
               / sum(kg.graph.tensor_width[t] for t in produced.values()))
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    x = rng.uniform(0, 255, (2, px, px, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    reasons = collections.Counter(g.reason.split("'")[0] + ("'" if "'" in g.reason else "")
                                  for g in everything if g.reason)
    return {"model": name, "px": px, "groups": len(groups), "coverage": covered,
            "error": rel_error(stripped(x), model(x)), "params": (model.count_params(), stripped.count_params()),
            "seconds": time.perf_counter() - t, "reasons": dict(reasons)}


def qat(name: str, px: int) -> dict:
    import json

    import keras
    import openvino as ov

    from tfcompress.calibration import int8_layers
    from tfcompress.export.checks import mean_rel_error
    from tfcompress.quantization import RangeInit, quantize_model

    keras.utils.set_random_seed(0)
    x, y = common.cifar10_test()
    x = keras.ops.convert_to_numpy(keras.ops.image.resize(x[:256].astype("float32"), (px, px)))
    y = y[:256]
    q = quantize_model(_model(name, px))
    q.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=1, batch_size=32, callbacks=[RangeInit(4)], verbose=0)
    with tempfile.TemporaryDirectory() as d:
        q.export(f"{d}/sm", verbose=False)
        np.savez(f"{d}/val.npz", x=x[:32], y=y[:32])
        proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={d}/sm",
                               f"--output_dir={d}/out", f"--validation_data={d}/val.npz"],
                              capture_output=True, text=True)
        row = {"model": name, "px": px, "exit": proc.returncode}
        if proc.returncode:
            row["error"] = proc.stderr.strip().splitlines()[-1][:300]
            return row
        compiled = ov.Core().compile_model(f"{d}/out/model_fp32.xml", "CPU")
        counts = int8_layers(compiled)
        out = compiled({0: x[:32]})[compiled.outputs[0]]
        ref = q.predict(x[:32], verbose=0)
        with open(f"{d}/out/report.json") as f:
            step = json.load(f)["steps"]["openvino"]
        row.update(int8=counts["int8"], total=counts["total"],
                   rel_error=float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)),
                   mean_error=mean_rel_error(out, ref),
                   **{k: step[k] for k in ("noise_floor", "tolerance", "mean_tolerance")})
        return row


def main() -> None:
    mode, *models = sys.argv[1:] or ["coverage"]
    if mode not in ("coverage", "qat"):
        sys.exit(__doc__)
    fn = {"coverage": coverage, "qat": qat}[mode]
    for spec in models or (COVERAGE if mode == "coverage" else QAT):
        name, px = spec.split(":")
        try:
            print(fn(name, int(px)), flush=True)
        except Exception as e:  # one row per model: a failure is a result too
            print({"model": name, "px": int(px), "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"},
                  flush=True)


if __name__ == "__main__":
    main()

"""Coverage benchmark: how many zeroed channels the SavedModel stripper removes, per keras.applications family,
beside OpenVINO's own offline pruning pass on the same zeroed model.

    python benchmarks/coverage.py [--models MobileNetV2,ResNet50] [--fraction 0.25] [--json coverage.json]

Each model (weights=None, a small input, 10 classes, BatchNorm statistics and biases randomised) gets
``fraction`` of every channel group that :func:`tfcompress.channel_groups` finds zeroed, is exported with
``model.export`` and then
- stripped by :func:`tfcompress.export.strip_saved_model` (checked against the original: rel. error < 1e-4);
- read by OpenVINO (``openvino.convert_model`` of the same SavedModel) and passed through
  ``openvino._offline_transformations.apply_pruning_transformation`` (a peer to measure against, not a
  dependency of tfcompress).
Reported per model: conv / dense / transposed-conv output channels in all, the fraction of them in prunable
groups of the SavedModel's graph, how many were zeroed, and how many each tool removes. Each model runs in its
own process (memory), one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

# constructor -> input size (the smallest each accepts comfortably)
MODELS = {
    "VGG16": 32, "ResNet50": 64, "ResNet50V2": 64, "DenseNet121": 64, "MobileNet": 64, "MobileNetV2": 64,
    "MobileNetV3Small": 64, "MobileNetV3Large": 64, "EfficientNetB0": 64, "EfficientNetV2B0": 64,
    "InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71, "NASNetMobile": 64, "ConvNeXtTiny": 64,
    "DeepLabStyle": 64,
}


def deeplab_style(size: int):
    """A small DeepLabV3-style network: dilated convolutions, an ASPP head, bilinear upsampling, a decoder."""
    import keras
    from keras import layers as L

    def block(x, filters, k=3, **kw):
        return L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, k, padding="same", use_bias=False, **kw)(x)))

    inp = keras.Input((size, size, 3))
    low = block(block(inp, 16, strides=2), 24)
    x = block(block(low, 32, strides=2), 32, dilation_rate=2)
    aspp = [block(x, 16, 1)] + [block(x, 16, dilation_rate=r) for r in (2, 4)]
    x = block(L.Concatenate()(aspp), 32, 1)
    x = L.UpSampling2D(2, interpolation="bilinear")(x)
    x = block(L.Concatenate()([x, block(low, 8, 1)]), 32)
    x = L.Conv2DTranspose(16, 3, strides=2, padding="same")(x)
    return keras.Model(inp, L.Conv2D(5, 1)(L.ReLU()(x)))


def _ov_channels(model) -> int:
    """Output channels of OpenVINO's Convolution, ConvolutionBackpropData and constant-weight MatMul ops."""
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "ConvolutionBackpropData"):
            total += int(op.get_output_partial_shape(0)[1].get_length())
        elif kind == "MatMul" and op.input_value(1).get_node().get_type_name() in ("Constant", "Convert"):
            total += int(op.get_output_partial_shape(0)[-1].get_length())
    return total


def run_one(name: str, size: int, fraction: float, work: str) -> dict:
    import keras
    import numpy as np
    import openvino as ov
    from openvino._offline_transformations import apply_pruning_transformation

    import tfcompress
    from tfcompress.export import strip_saved_model
    from tfcompress.graph.graphdef_adapter import GraphDefGraph
    from tfcompress.stripping.savedmodel_strip import freeze_saved_model

    rng = np.random.default_rng(0)
    if name == "DeepLabStyle":
        model = deeplab_style(size)
    else:
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                                  classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            ws = ([rng.uniform(0.5, 1.5, n)] if layer.scale else []) + ([rng.uniform(-0.2, 0.2, n)]
                                                                       if layer.center else [])
            layer.set_weights(ws + [rng.uniform(-0.1, 0.1, n), rng.uniform(0.5, 1.5, n)])
    groups = tfcompress.channel_groups(model)
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, int(g.size * fraction), replace=False))
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    model.export(src, verbose=False)
    row = {"model": name, "size": size, "keras_groups": len(groups)}
    t = time.perf_counter()
    try:
        result = strip_saved_model(src, dst)
    except Exception as e:  # noqa: BLE001 - a benchmark row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        row["strip_seconds"] = time.perf_counter() - t
        row["channels"] = sum(r["channels_before"] for r in result.layers)
        row["zeroed"] = sum(r["zeroed"] for r in result.layers)
        row["removed_ours"] = row["channels"] - sum(r["channels_after"] for r in result.layers)
        row["kept_reasons"] = result.kept_reasons
        row["max_rel_error"] = result.max_rel_error
        frozen = freeze_saved_model(src)
        gg = GraphDefGraph(frozen.graph_def, list(frozen.inputs.values()), list(frozen.outputs.values()))
        prunable = {g.id for g in gg.graph.groups()}
        row["in_prunable_groups"] = int(sum(
            np.isin(gg.graph.owners(op.outputs[0])[0], list(prunable)).sum()
            for op in gg.ops if op.name in {r["name"] for r in result.layers}))
    ov_model = ov.convert_model(src)
    row["channels_ov"] = _ov_channels(ov_model)
    t = time.perf_counter()
    apply_pruning_transformation(ov_model)
    row["ov_seconds"] = time.perf_counter() - t
    row["removed_ov"] = row["channels_ov"] - _ov_channels(ov_model)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| model | input | conv/dense channels | in prunable groups | zeroed | removed: tfcompress | "
             "removed: OpenVINO | strip s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r.get('channels_ov', '')} | error: {r['error']} | | | "
                         f"{r.get('removed_ov', '')} | |")
            continue
        c = r["channels"]
        lines.append(
            f"| {r['model']} | {r['size']} | {c:,} | {100 * r['in_prunable_groups'] / c:.1f} % | {r['zeroed']:,} | "
            f"{r['removed_ours']:,} ({100 * r['removed_ours'] / c:.1f} %) | "
            f"{r['removed_ov']:,} ({100 * r['removed_ov'] / r['channels_ov']:.1f} %) | {r['strip_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--json", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one model in this process
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="tfcompress-coverage-") as work:
            print("RESULT" + json.dumps(run_one(args.one, MODELS[args.one], args.fraction, work)))
        return
    rows = []
    for name in args.models.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--fraction", str(args.fraction)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        row = json.loads(lines[-1][6:]) if lines else {
            "model": name, "size": MODELS[name], "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

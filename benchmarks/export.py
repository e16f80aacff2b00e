"""Export benchmark: ResNet50 with 30 % of every group's channels zeroed, through every export step.

    python benchmarks/export.py [--size 224]

Each step runs in its own process so that its peak memory (max RSS) is its own. Reported: time and peak
memory per step, FLOPs / parameters / file sizes before and after stripping, and the channels our stripper
removes vs OpenVINO's own offline pruning pass (openvino._offline_transformations.apply_pruning_transformation)
on the same unstripped model.
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

import common  # noqa: E402

STEP = r"""
import json, os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
step, a, b = sys.argv[1:4]
t = time.perf_counter()
if step == "strip":
    from tfcompress.export import strip_saved_model
    r = strip_saved_model(a, b)
    extra = {"flops_before": r.flops_before, "flops_after": r.flops_after,
             "params_before": r.params_before, "params_after": r.params_after, "error": r.max_rel_error}
elif step == "onnx":
    from tfcompress.export import to_onnx
    extra = dict(to_onnx(a, b))
elif step == "openvino":
    from tfcompress.export import to_openvino
    extra = dict(to_openvino(a, b))
elif step == "openvino_direct":
    import openvino as ov
    ov.save_model(ov.convert_model(a), b, compress_to_fp16=False)
    extra = {}
print("RESULT" + json.dumps({"seconds": time.perf_counter() - t,
                             "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def run_step(step: str, a: str, b: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP, step, a, b], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def conv_channels(xml: str) -> dict[str, int]:
    import openvino as ov

    model = ov.Core().read_model(xml)
    return _conv_channels(model)


def _conv_channels(model) -> dict[str, int]:
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            out[op.get_friendly_name()] = int(op.get_output_partial_shape(0)[1].get_length())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import keras
    import numpy as np
    import openvino as ov
    from openvino._offline_transformations import apply_pruning_transformation

    import tfcompress

    work = tempfile.mkdtemp(prefix="tfcompress-bench-")
    rng = np.random.default_rng(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
    for layer in model.layers:  # realistic BatchNorm statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(-0.1, 0.1, n), rng.uniform(0.5, 1.5, n)])
    groups = tfcompress.channel_groups(model)
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, int(g.size * args.fraction), replace=False))
    src = os.path.join(work, "resnet50")
    model.export(src, verbose=False)
    del model

    steps = {}
    steps["strip"] = run_step("strip", src, os.path.join(work, "stripped"))
    steps["onnx"] = run_step("onnx", os.path.join(work, "stripped"), os.path.join(work, "m.onnx"))
    steps["openvino"] = run_step("openvino", os.path.join(work, "m.onnx"), os.path.join(work, "m.xml"))
    # the peer: OpenVINO reads the unstripped SavedModel and runs its own pruning pass
    steps["openvino_direct_unstripped"] = run_step("openvino_direct", src, os.path.join(work, "full.xml"))
    full = ov.Core().read_model(os.path.join(work, "full.xml"))
    before = _conv_channels(full)
    t = time.perf_counter()
    apply_pruning_transformation(full)
    ov_seconds = time.perf_counter() - t
    after_ov = _conv_channels(full)
    ours = conv_channels(os.path.join(work, "m.xml"))
    total = sum(before.values())
    removed_ov = total - sum(after_ov.values())
    removed_ours = total - sum(ours.values())

    def size(p):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)

    s = steps["strip"]
    print(f"machine: {common.machine()}")
    print(f"\nResNet50 {args.size}x{args.size}, {int(100 * args.fraction)} % of every group's channels zeroed "
          f"({len(groups)} groups)\n")
    print("| step | seconds | peak RSS MiB |\n|---|---|---|")
    for k, v in steps.items():
        print(f"| {k} | {v['seconds']:.1f} | {v['peak_mib']:.0f} |")
    print("\n| | before | after | ratio |\n|---|---|---|---|")
    print(f"| FLOPs | {s['flops_before'] / 1e9:.2f} G | {s['flops_after'] / 1e9:.2f} G | "
          f"{s['flops_after'] / s['flops_before']:.3f} |")
    print(f"| parameters | {s['params_before']:,} | {s['params_after']:,} | "
          f"{s['params_after'] / s['params_before']:.3f} |")
    print(f"| SavedModel bytes | {size(src):,} | {size(os.path.join(work, 'stripped')):,} | "
          f"{size(os.path.join(work, 'stripped')) / size(src):.3f} |")
    ir_full = os.path.getsize(os.path.join(work, "full.bin"))
    ir_ours = os.path.getsize(os.path.join(work, "m.bin"))
    print(f"| OpenVINO FP32 .bin bytes | {ir_full:,} | {ir_ours:,} | {ir_ours / ir_full:.3f} |")
    print(f"\nConvolution output channels: {total:,} in all; removed by tfcompress: {removed_ours:,} "
          f"({100 * removed_ours / total:.1f} %); by OpenVINO apply_pruning_transformation: {removed_ov:,} "
          f"({100 * removed_ov / total:.1f} %, {ov_seconds:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "channels_total": total, "removed_tfcompress": removed_ours,
                       "removed_openvino": removed_ov, "ir_bytes": [ir_full, ir_ours]}, f, indent=2)


if __name__ == "__main__":
    main()

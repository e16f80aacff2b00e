"""Accuracy control on VWW MobileNetV1-0.25: error-only vs speed-aware ranking, and its peak memory.

    /work/venv/bin/python benchmarks/accuracy_control.py [--max_drop 0.005] [--work /tmp/vww]
    /work/venv/bin/python benchmarks/accuracy_control.py --model MobileNetV2 [--size 224] [--max_iterations 3]

``--model MobileNetV2``: peak memory only, on keras.applications MobileNetV2 (random weights, BN statistics from
real images, as benchmarks/calibration.py section 2) with 300 calibration and 200 validation images, FP32 argmax
as labels; the drop is never met on this untrained model, so every run does ``--max_iterations`` full steps.

The FP32 IR and data of benchmarks/vww_int8.py; validation: the 2,000 evaluation images with the FP32 (f32 hint)
argmax as labels, so the drop is the share of images whose class INT8 changes. Each calibration runs in its own
process so its peak RSS is its own. Reported per ranking: reverted layers, INT8 layers kept (runtime), INT8
share of the MACs, agreement, batch-32 throughput (accuracy-controlled models compiled with the f32 hint they
were measured with) and calibration time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402
import vww_int8  # noqa: E402


def agreement(compiled, data) -> float:
    x, y = data
    return float(np.mean(common.outputs(compiled, x, 100).argmax(axis=1) == y))


def run_one(mode: str, work: str, max_drop: float, max_iterations: int = 50) -> None:
    """One calibration in this process; writes the IR and a JSON line (time, peak RSS, info) to ``work``."""
    import openvino as ov

    from tfcompress import calibration

    app = os.path.exists(os.path.join(work, "app.xml"))  # written by main for --model MobileNetV2
    if app:
        fp = ov.Core().read_model(os.path.join(work, "app.xml"))
        calib, held_out = np.load(os.path.join(work, "calib.npy")), np.load(os.path.join(work, "held_out.npy"))
        names = None
    else:
        fp = ov.Core().read_model(vww_int8.vww_ir(work))
        calib, held_out = vww_int8.vww_data()
        names = [layer.name for layer in vww_int8.load_vww().layers]
    t = time.perf_counter()
    info = {}
    if mode == "default":
        q = calibration.calibrate(fp, calib, verbose=False)
    else:
        labels = np.load(os.path.join(work, "labels.npy"))
        q, info = calibration.calibrate_with_accuracy_control(
            fp, calib, (held_out, labels), agreement, max_drop=max_drop, ranking=mode, verbose=False,
            layer_names=names, max_iterations=max_iterations, ranking_subset_size=32 if app else 100)
    seconds = time.perf_counter() - t
    ov.save_model(q, os.path.join(work, f"ac_{mode}.xml"), compress_to_fp16=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "info": {k: v for k, v in info.items() if k != "drops"}}))


def mobilenet_memory(work: str, args) -> None:
    """Peak RSS and time of default calibration and of accuracy control (both rankings) on MobileNetV2."""
    import importlib.util

    import openvino as ov

    spec = importlib.util.spec_from_file_location("bench_calibration", os.path.join(os.path.dirname(__file__),
                                                                                    "calibration.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fp, calib, held_out = bench.app_ir("MobileNetV2", work, args.size)
    held_out = held_out[:200]
    ov.save_model(fp, os.path.join(work, "app.xml"), compress_to_fp16=False)
    np.save(os.path.join(work, "calib.npy"), calib)
    np.save(os.path.join(work, "held_out.npy"), held_out)
    compiled = ov.Core().compile_model(fp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.save(os.path.join(work, "labels.npy"), common.outputs(compiled, held_out, batch=20).argmax(axis=1))
    del compiled
    print(f"machine: {common.machine()}\nMobileNetV2 {args.size}x{args.size}, max_iterations {args.max_iterations}")
    print("| run | seconds | peak RSS MiB | reverted | drop |\n|---|---|---|---|---|")
    for mode in ("default", "error", "speed"):
        res = subprocess.run([sys.executable, __file__, "--one", mode, "--work", work, "--max_drop",
                              str(args.max_drop), "--max_iterations", str(args.max_iterations)],
                             capture_output=True, text=True, check=True)
        run = json.loads(res.stdout.strip().splitlines()[-1])
        info = run["info"]
        print(f"| {mode} | {run['seconds']:.1f} | {run['peak_mib']:.0f} | {len(info.get('reverted_ir', []))} | "
              f"{info.get('drop', float('nan')):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_drop", type=float, default=0.005)
    ap.add_argument("--work", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="VWW", choices=["VWW", "MobileNetV2"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--max_iterations", type=int, default=50)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="tfcompress-ac-")
    os.makedirs(work, exist_ok=True)
    if args.one:
        return run_one(args.one, work, args.max_drop, args.max_iterations)
    if args.model == "MobileNetV2":
        return mobilenet_memory(work, args)
    import openvino as ov

    from tfcompress import calibration
    from tfcompress.export.speed import measure_speed

    core = ov.Core()
    print(f"machine: {common.machine()}\n")
    xml = vww_int8.vww_ir(work)
    calib, held_out = vww_int8.vww_data()
    fp = core.read_model(xml)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    labels = common.outputs(core.compile_model(fp, "CPU", f32), held_out, 100).argmax(axis=1)
    np.save(os.path.join(work, "labels.npy"), labels)
    runs = {}
    for mode in ("default", "error", "speed"):
        res = subprocess.run([sys.executable, __file__, "--one", mode, "--work", work, "--max_drop", str(args.max_drop)],
                             capture_output=True, text=True, check=True)
        runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    variants = {"FP32 (f32 hint)": (xml, f32), "INT8, no accuracy control": (os.path.join(work, "ac_default.xml"), {}),
                "accuracy control, error ranking": (os.path.join(work, "ac_error.xml"), f32),
                "accuracy control, speed ranking": (os.path.join(work, "ac_speed.xml"), f32)}
    x1 = held_out[:1]
    speeds = measure_speed(variants, x1, rounds=args.rounds, iters_b1=50, iters_b32=10)
    macs = calibration.layer_macs(fp)
    print(f"VWW MobileNetV1-0.25, validation: 2,000 images, labels = FP32 argmax, max_drop {args.max_drop}; "
          f"{sum(macs.values()) / 1e6:.1f} M MACs in {len(macs)} layers")
    print("| model | reverted layers | INT8 layers (runtime) | INT8 MAC share | agreement % | b32 img/s | "
          "calibration s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    keys = {"INT8, no accuracy control": "default", "accuracy control, error ranking": "error",
            "accuracy control, speed ranking": "speed"}
    for name, (path, cfg) in variants.items():
        compiled = core.compile_model(path, "CPU", cfg)
        run = runs.get(keys.get(name), {})
        info = run.get("info", {})
        share = info.get("int8_mac_share", 1.0 if name.startswith("INT8") else 0.0)
        reverted = ", ".join(info.get("reverted", [])) or "-"
        layers = calibration.int8_layers(compiled)
        print(f"| {name} | {reverted} | {layers['int8']}/{layers['total']} | {100 * share:.1f} % | "
              f"{100 * agreement(compiled, (held_out, labels)):.2f} | {speeds[name]['b32_ips']:.0f} | "
              f"{run.get('seconds', 0):.1f} | {run.get('peak_mib', 0):.0f} |")
    for mode in ("error", "speed"):
        info = runs[mode]["info"]
        print(f"{mode}: drop {info['drop']:.4f}, max_drop met: {info['max_drop_met']}, reverted on the way and put "
              f"back to INT8: {', '.join(info.get('restored', [])) or '-'}")


if __name__ == "__main__":
    main()

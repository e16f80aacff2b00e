"""Calibration time and peak memory against the statistics pass's samples per batch, each run in its own process.

    python benchmarks/calibration_batch.py --ir R50.xml --images calib.npy --batches auto,16,4,1 --rounds 2
    python benchmarks/calibration_batch.py --unet 512 --work W --samples 64 --batches auto,16,1 --nncf_python P

``--batches``: ``auto`` is the product's choice (``statistics.samples_per_batch``: up to 16 samples, fewer where a
sample's activations are large); a number forces that many samples per batch. ``--unet SIZE`` first writes a
U-Net (4 levels, 32 to 256 channels, transposed convolutions and skip concatenations) at SIZE x SIZE to
``--work`` with random images, the kind of model whose activations a batch of 16 multiplies into gigabytes.
``--nncf_python``: also time ``nncf.quantize`` (one sample at a time) in that interpreter. Each run prints wall
and CPU seconds of ``calibrate`` and the process's peak RSS (which includes reading the IR and the images).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PEAK = """
def peak():  # this process's peak RSS in KiB (getrusage's ru_maxrss keeps the parent's across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
"""
OURS = PEAK + """
import sys, time, numpy as np, openvino as ov
from tfcompress import calibration
from tfcompress.calibration import statistics
if sys.argv[3] != "auto":
    statistics.PASS_BATCH, statistics.PASS_ACTIVATIONS = int(sys.argv[3]), 2**62
model, x = ov.Core().read_model(sys.argv[1]), np.load(sys.argv[2])[:int(sys.argv[4])]
batch = statistics.samples_per_batch(model, [x[:1]])
t, c = time.perf_counter(), time.process_time()
calibration.calibrate(model, x, subset_size=len(x), verbose=False)
print(batch, time.perf_counter() - t, time.process_time() - c, peak())
"""
NNCF = PEAK + """
import sys, time, numpy as np, openvino as ov, nncf
model, x = ov.Core().read_model(sys.argv[1]), np.load(sys.argv[2])[:int(sys.argv[4])]
t, c = time.perf_counter(), time.process_time()
nncf.quantize(model, nncf.Dataset(list(x[:, None])), subset_size=len(x))
print(1, time.perf_counter() - t, time.process_time() - c, peak())
"""


def write_unet(size: int, work: str, samples: int) -> tuple[str, str]:
    """A U-Net IR at ``size`` x ``size`` and ``samples`` random images in ``work``; returns their paths."""
    import keras
    import numpy as np
    import openvino as ov
    from keras import layers as L

    os.makedirs(work, exist_ok=True)
    inp = keras.Input((size, size, 3))
    x, skips = inp, []
    for k in range(4):
        for _ in range(2):
            x = L.Conv2D(32 * 2**k, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = L.MaxPooling2D()(x)
    x = L.Conv2D(512, 3, padding="same", activation="relu")(x)
    for k in reversed(range(4)):
        x = L.Concatenate()([L.Conv2DTranspose(32 * 2**k, 2, strides=2)(x), skips[k]])
        x = L.Conv2D(32 * 2**k, 3, padding="same", activation="relu")(x)
    model = keras.Model(inp, L.Conv2D(2, 1)(x))
    model.export(os.path.join(work, "sm"), verbose=False)
    xml, images = os.path.join(work, f"unet{size}.xml"), os.path.join(work, f"unet{size}.npy")
    ov.save_model(ov.convert_model(os.path.join(work, "sm")), xml, compress_to_fp16=False)
    np.save(images, np.random.default_rng(0).uniform(0, 1, (samples, size, size, 3)).astype("float32"))
    return xml, images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ir", help="an FP32 IR (or --unet)")
    ap.add_argument("--images", help=".npy of float32 calibration samples")
    ap.add_argument("--unet", type=int, default=0, help="write and use a U-Net IR at this size instead")
    ap.add_argument("--work", default="calibration_batch_work")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--batches", default="auto,16,4,1")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nncf_python", default="")
    args = ap.parse_args()
    ir, images = write_unet(args.unet, args.work, args.samples) if args.unet else (args.ir, args.images)
    if not ir or not images:
        ap.error("give --ir and --images, or --unet")
    runs = [("ours", b, sys.executable, OURS) for b in args.batches.split(",")]
    if args.nncf_python:
        runs.append(("nncf", "1", args.nncf_python, NNCF))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for r in range(args.rounds):
        print(f"round {r + 1}, load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
        for who, batch, python, script in runs:
            out = subprocess.run([python, "-c", script, ir, images, batch, str(args.samples)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            used, wall, cpu, rss = int(out[-4]), float(out[-3]), float(out[-2]), int(out[-1])
            print(f"  {who:4} batches {batch:>4} ({used:2d} samples): {wall:6.1f} s wall, {cpu:6.1f} s CPU, "
                  f"peak RSS {rss // 1024:6d} MiB", flush=True)
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()

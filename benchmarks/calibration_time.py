"""Calibration time of several versions of tfcompress and of nncf, interleaved, on one saved FP32 IR and one
set of samples; each calibration in its own process, timed there without imports or reading the IR.

    python benchmarks/calibration_time.py --ir R50.xml --images calib.npy \
        --code before=/tmp/tfcompress-75a2cb3^ --code now=. \
        --nncf_python /work/scratch/calib/nncfvenv/bin/python --rounds 2

``--code LABEL=DIR``: a directory holding a ``tfcompress`` package (e.g. ``git archive REV tfcompress | tar -x
-C DIR``), put first on PYTHONPATH. Every round runs each version once, then nncf, and prints the load average
before it: on a shared machine only runs in the same round compare. Each time is printed as wall seconds and,
in brackets, the CPU seconds of the calibrating process (all its threads): when other jobs take cores, wall time
grows with the time spent waiting for a core, CPU time only with the work the process does (its thread pool's
spinning included), so the two ratios together tell the work from the wait.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

OURS = """
import sys, time, numpy as np, openvino as ov
from tfcompress import calibration
model, calib = ov.Core().read_model(sys.argv[1]), np.load(sys.argv[2])
t, c = time.perf_counter(), time.process_time()
calibration.calibrate(model, calib, subset_size=len(calib), verbose=False)
print(time.perf_counter() - t, time.process_time() - c)
"""
NNCF = """
import sys, time, numpy as np, openvino as ov, nncf
model, calib = ov.Core().read_model(sys.argv[1]), np.load(sys.argv[2])
t, c = time.perf_counter(), time.process_time()
nncf.quantize(model, nncf.Dataset(list(calib[:, None])), subset_size=len(calib))
print(time.perf_counter() - t, time.process_time() - c)
"""


def seconds(python: str, script: str, ir: str, images: str, code: str | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of one calibration, in a fresh process."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.path.abspath(code)
    res = subprocess.run([python, "-c", script, ir, images], capture_output=True, text=True, check=True, env=env)
    wall, cpu = res.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def _line(t: dict) -> str:
    """``label wall s (cpu s)`` per label, then each version's wall (cpu) ratio against nncf."""
    n = t["nncf"]
    return (", ".join(f"{k} {w:.1f} s ({c:.1f})" for k, (w, c) in t.items()) + "; vs nncf "
            + ", ".join(f"{k} {w / n[0]:.2f} ({c / n[1]:.2f})" for k, (w, c) in t.items() if k != "nncf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ir", required=True)
    ap.add_argument("--images", required=True, help=".npy of float32 calibration samples")
    ap.add_argument("--code", action="append", default=[], help="LABEL=DIR holding a tfcompress package")
    ap.add_argument("--nncf_python", default="/work/venv-nncf/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    versions = dict(c.split("=", 1) for c in args.code) or {"tfcompress": "."}
    times: dict = {k: [] for k in [*versions, "nncf"]}  # label -> [(wall, cpu), ...]
    for r in range(args.rounds):
        print(f"round {r + 1}, load average {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
        for label, code in versions.items():
            times[label].append(seconds(sys.executable, OURS, args.ir, args.images, code))
        times["nncf"].append(seconds(args.nncf_python, NNCF, args.ir, args.images))
        last = {k: v[-1] for k, v in times.items()}
        print("  " + _line(last), flush=True)
    med = {k: tuple(np.median(np.array(v), axis=0)) for k, v in times.items()}
    print("medians: " + _line(med) + " (ratio of medians)")
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()

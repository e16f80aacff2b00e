"""Export wall time by stage, this checkout against another one, on the keras.applications test models.

    PYTHONPATH=$PWD python benchmarks/export_stages.py --before /path/to/older/checkout [--after DIR] \
        [--models qat:NASNetMobile:32,qat:InceptionResNetV2:75,float:ResNet50:32] [--rounds 2] [--work DIR]

Each model is built as the export tests build it (tests/test_qat_applications.py: random weights, BatchNorm
statistics of CIFAR-10 images, quantize_model, one QAT step, exported with the images as unlabelled validation
data; tests/test_export_applications.py: 25 % of every group zeroed, exported with calibration data), saved once
into ``--work`` and reused. Every export runs in its own process, importing ``tfcompress`` from one checkout or
the other; the two alternate within each round (round 1 before first, round 2 after first), so both see the
same load. Stages are timed by wrapping the pipeline's functions (``freeze_for_export``, ``quantized_check``,
``strip_saved_model``; ONNX / OpenVINO / INT8 from the report); ``rest`` is the total minus those (input
checks, sizes, accuracy, writing the report). Peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402

HERE = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

BUILD = r"""
import os, sys
sys.path.insert(0, sys.argv[4])
import numpy as np
from conftest import SHARED_DATA
from test_export_applications import _images, _zeroed_application
from test_qat_applications import _qat_application
kind, name, px, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5]
if kind == "qat":
    images = _images(24, px)
    labels = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["y_test"][:16].reshape(-1)
    _qat_application(name, px, images[:16], labels).export(out, verbose=False)
    np.save(out + "_data.npy", images[16:])
else:
    images = _images(72, px)
    _zeroed_application(name, px, images[:32], np.random.default_rng(0)).export(out, verbose=False)
    np.save(out + "_data.npy", images[32:64])
"""

EXPORT = r"""
import json, os, resource, shutil, sys, tempfile, time
import numpy as np
from tfcompress.export import export_saved_model, pipeline
sm, kind = sys.argv[1], sys.argv[2]
stages = {}

def timed(name, fn):
    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
    return wrapped

for stage, fn in (("freeze", "freeze_for_export"), ("noise", "quantized_check"), ("strip", "strip_saved_model")):
    setattr(pipeline, fn, timed(stage, getattr(pipeline, fn)))
data = np.load(sm + "_data.npy")
kw = {"validation_data": data} if kind == "qat" else {"calibration_data": data}
out = tempfile.mkdtemp()
t = time.perf_counter()
report = export_saved_model(sm, os.path.join(out, "out"), verbose=False, **kw)
total = time.perf_counter() - t
shutil.rmtree(out)
for step in ("onnx", "openvino", "int8"):
    if step in report["steps"]:
        stages[step] = report["steps"][step]["seconds"]
stages["rest"] = total - sum(stages.values())
print("RESULT" + json.dumps({
    "stages": stages, "total": total, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "errors": {k: s.get("max_rel_error") for k, s in report["steps"].items()}, "sizes": report["sizes"],
    "tfcompress": os.path.dirname(pipeline.__file__)}))
"""

STAGES = ("freeze", "noise", "strip", "onnx", "openvino", "int8", "rest")


def _child(code: str, args: list[str], pythonpath: str, cwd: str) -> str:
    env = dict(os.environ, PYTHONPATH=pythonpath, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def build(spec: str, work: str) -> str:
    kind, name, px = spec.split(":")
    sm = os.path.join(work, f"{kind}_{name}_{px}")
    if not os.path.exists(sm + "_data.npy"):
        print(f"building {spec}", flush=True)
        _child(BUILD, [kind, name, px, os.path.join(HERE, "tests"), sm], HERE, work)
    return sm


def export(sm: str, kind: str, checkout: str, work: str) -> dict:
    out = _child(EXPORT, [sm, kind], checkout, work)
    return json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of the code to compare with (its root directory)")
    ap.add_argument("--after", default=HERE, help="the code compared (default: this checkout)")
    ap.add_argument("--models", default="qat:NASNetMobile:32,qat:InceptionResNetV2:75,float:ResNet50:32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(HERE, ".export_stages"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print(common.machine(), flush=True)
    models = [(spec, build(spec, args.work)) for spec in args.models.split(",")]
    rows = []
    print("| model | code | round | " + " | ".join(STAGES) + " | total s | peak MiB |", flush=True)
    print("|---" * (len(STAGES) + 5) + "|", flush=True)
    for r in range(args.rounds):
        for spec, sm in models:
            order = [("before", os.path.abspath(args.before)), ("after", os.path.abspath(args.after))]
            for code, checkout in (order if r % 2 == 0 else order[::-1]):
                res = export(sm, spec.split(":")[0], checkout, args.work)
                rows.append({"model": spec, "code": code, "round": r + 1, **res})
                cells = [f"{res['stages'][s]:.1f}" if s in res["stages"] else "-" for s in STAGES]
                print(f"| {spec} | {code} | {r + 1} | " + " | ".join(cells)
                      + f" | {res['total']:.1f} | {res['peak_mib']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

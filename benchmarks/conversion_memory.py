"""Where ``to_onnx``'s time and memory go: ResNet50 (keras.applications, weights=None) SavedModel -> ONNX.

    python benchmarks/conversion_memory.py [--size 224] [--saved_model DIR]

Runs the real :func:`tfcompress.export.to_onnx` in this process while a thread samples the resident set size
(/proc/self/statm, every 10 ms). The functions ``to_onnx`` calls are wrapped to mark phases (freeze, rewrite
for tf2onnx, tf2onnx, TensorFlow reference run, saving, the OpenVINO check); each phase reports its seconds,
the RSS when it starts and its peak RSS. A phase that calls measured phases reports the peak after the last of them ("the rest"). The whole
process's peak comes from getrusage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Keeps the peak RSS since the last :meth:`mark`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = False

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def mark(self) -> float:
        self.peak = now = self.rss_mib()
        return now

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss_mib())
            time.sleep(0.01)


def instrument(sampler: RssSampler, phases: list) -> None:
    """Wrap what ``to_onnx`` calls so that each call becomes a measured phase."""
    import onnx

    from tfcompress.export import convert

    def wrap(owner, attr, label):
        inner = getattr(owner, attr)

        def measured(*a, **k):
            start, t = sampler.mark(), time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                phases.append({"phase": label, "seconds": round(time.perf_counter() - t, 1),
                               "rss_start_mib": round(start), "peak_mib": round(sampler.peak)})
                sampler.mark()

        setattr(owner, attr, measured)

    wrap(convert, "freeze_for_export", "freeze SavedModel")
    wrap(convert, "prepare_for_tf2onnx", "inline calls / rewrite ops")
    from tf2onnx import optimizer, tf_loader, tfonnx

    wrap(convert, "_tf2onnx", "tf2onnx (the rest: graph import, make_model)")
    wrap(tf_loader, "tf_optimize", "tf2onnx: grappler (tf_optimize)")
    wrap(tfonnx, "process_tf_graph", "tf2onnx: TF -> ONNX ops (process_tf_graph)")
    wrap(optimizer, "optimize_graph", "tf2onnx: ONNX optimizers")
    wrap(convert, "run_frozen", "TensorFlow reference run")
    wrap(onnx, "save_model", "save ONNX")
    wrap(convert, "run_onnx", "OpenVINO runs the ONNX (check)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--saved_model", default="", help="an existing SavedModel instead of ResNet50")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tfc-convmem-")
    src = args.saved_model
    if not src:  # built in a child process, so that Keras' memory does not count here
        src = os.path.join(work, "resnet50")
        code = ("import keras, sys; keras.applications.ResNet50(weights=None, input_shape=(%d, %d, 3))"
                ".export(sys.argv[1], verbose=False)" % (args.size, args.size))
        import subprocess

        subprocess.run([sys.executable, "-c", code, src], check=True, capture_output=True)
    sampler = RssSampler()
    sampler.start()
    base = sampler.mark()
    import tensorflow  # noqa: F401  (its import is not the conversion's)

    from tfcompress.export import to_onnx

    after_import = sampler.mark()
    phases: list = []
    instrument(sampler, phases)
    t = time.perf_counter()
    check = to_onnx(src, os.path.join(work, "m.onnx"))
    total = time.perf_counter() - t
    sampler.stop = True
    result = {"source": src, "python_mib": round(base), "after_imports_mib": round(after_import),
              "to_onnx_seconds": round(total, 1), "max_rel_error": check["max_rel_error"],
              "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "phases": phases}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

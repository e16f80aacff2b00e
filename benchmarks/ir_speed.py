"""Time OpenVINO IRs side by side: batch-1 latency and batch-32 throughput, interleaved rounds.

    python benchmarks/ir_speed.py ptq=W/global_per_flop/model_int8.xml qat=W/global_per_flop_qat/model_int8.xml \
        --sample W/sample.npy --twice

Each IR is compiled at OpenVINO's default precision (``--f32``: the f32 hint) and timed by
``tfcompress.export.speed.measure_speed`` in one run. ``--twice`` compiles every IR a second time under
another name: the spread between the two copies of one IR is the run's noise, against which the differences
between IRs are read. Ratios are printed against the first IR.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from tfcompress.export.speed import measure_speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irs", nargs="+", help="NAME=PATH.xml (or PATH.xml, named by its position)")
    ap.add_argument("--sample", default="", help=".npy with one input sample (batch axis 1; default: uniform noise "
                    "of --shape)")
    ap.add_argument("--shape", default="1,224,224,3")
    ap.add_argument("--twice", action="store_true", help="compile every IR twice (noise gauge)")
    ap.add_argument("--f32", action="store_true", help="INFERENCE_PRECISION_HINT=f32 instead of the default")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters_b1", type=int, default=40)
    ap.add_argument("--iters_b32", type=int, default=4)
    args = ap.parse_args()
    irs = {}
    for i, spec in enumerate(args.irs):
        name, _, path = spec.rpartition("=")
        if not os.path.isfile(path):
            ap.error(f"no IR at {path!r}")
        irs[name or f"ir{i}"] = path
    sample = (np.load(args.sample)[:1] if args.sample else
              np.random.default_rng(0).random(tuple(int(d) for d in args.shape.split(",")), dtype=np.float32))
    config = {"INFERENCE_PRECISION_HINT": "f32"} if args.f32 else {}
    models = {}
    for name, path in irs.items():
        models[name] = (path, config)
        if args.twice:
            models[name + " (again)"] = (path, config)
    res = measure_speed(models, sample, rounds=args.rounds, iters_b1=args.iters_b1, iters_b32=args.iters_b32)
    first = next(iter(res.values()))
    print("| IR | b1 ms | b32 img/s | b1 speed vs first | b32 vs first |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['b1_ms']:.2f} | {r['b32_ips']:.1f} | {first['b1_ms'] / r['b1_ms']:.2f}x "
              f"| {r['b32_ips'] / first['b32_ips']:.2f}x |")


if __name__ == "__main__":
    main()

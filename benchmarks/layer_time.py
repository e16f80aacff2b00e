"""Where an IR's inference time goes, by kind of layer: per-node times (OpenVINO's ``PERF_COUNT``) of several IRs,
timed in interleaved rounds, summed per layer class, next to each class's multiply-accumulates.

    python benchmarks/layer_time.py unpruned=W/original/model_int8.xml pruned=W/uniform@auto/model_int8.xml \
        --sample W/sample.npy --batch 1 --rounds 7 --iters 40

Why a pruned model falls short of its FLOPs cut: the classes whose time shrinks less than their MACs (narrow
layers that stop getting cheaper, depthwise convolutions bound by memory, layers pruning cannot touch) and the
time outside any node (the runtime's per-inference overhead: wall time minus the nodes' sum). The first IR is
the reference every ratio is taken against. Each IR is compiled at OpenVINO's default precision (``--f32``: the
f32 hint) with 2 threads and one stream, as ``tfcompress.export.speed.measure_speed`` times them. Profiling adds
its own cost per node to the wall time, so "outside the nodes" is an upper bound of the runtime's overhead; at
batch 32 the plugin's node times overlap (their sum exceeds the wall time), so read batch 32 by class only. The
row "if layers scaled with MACs" is the reference's node time with each weighted class's time scaled by its MAC
ratio: what pruning would reach if convolutions got exactly as much cheaper as their MACs, all else unchanged.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

CLASSES = ("stem conv", "1x1 conv", "kxk conv", "depthwise conv", "fully connected", "eltwise / activations",
           "pooling / reduce", "reorder / convert", "other")


def layer_macs(model) -> dict[str, tuple[str, float]]:
    """Original op name -> (class, multiply-accumulates per sample) of every Convolution / GroupConvolution /
    MatMul of an ``openvino.Model`` (static shapes; the batch axis divided out)."""
    out = {}
    first = True
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        o = op.get_output_partial_shape(0)
        w = op.input(1).get_partial_shape()
        if not (o.is_static and w.is_static):
            continue
        o, w = o.to_shape(), w.to_shape()
        batch = o[0] if len(o) else 1
        if kind == "MatMul":
            k = op.get_input_partial_shape(0).to_shape()[-1]
            out[op.get_friendly_name()] = ("fully connected", float(np.prod(o)) / batch * k)
            continue
        spatial = float(np.prod(o[2:]))
        if kind == "GroupConvolution":  # weights [groups, out/g, in/g, kh, kw]
            per_out = float(np.prod(w[2:]))
            cls = "depthwise conv" if w[1] == 1 and w[2] == 1 else "kxk conv"
        else:  # weights [out, in, kh, kw]
            per_out = float(np.prod(w[1:]))
            cls = "1x1 conv" if all(d == 1 for d in w[2:]) else "kxk conv"
        if first:
            cls, first = "stem conv", False
        out[op.get_friendly_name()] = (cls, spatial * o[1] * per_out)
    return out


def node_class(info, macs: dict[str, tuple[str, float]], names: list[str]) -> str:
    """The class of one executed node: a convolution's (from the original ops it ran), else its layer type."""
    for n in names:
        if n in macs:
            return macs[n][0]
    t = info.node_type
    if t in ("Reorder", "Convert"):
        return "reorder / convert"
    if t in ("Eltwise", "Subgraph", "Multiply", "Add", "Clamp", "Relu", "Swish", "Sigmoid", "FakeQuantize"):
        return "eltwise / activations"
    if t in ("Pooling", "Reduce", "AvgPool", "MaxPool", "ReduceMean"):
        return "pooling / reduce"
    if t.startswith("FullyConnected") or t == "MatMul":
        return "fully connected"
    return "other"


def profile(irs: dict[str, str], sample: np.ndarray, batch: int, rounds: int, iters: int, config: dict):
    import openvino as ov

    core = ov.Core()
    x = np.repeat(sample, batch, axis=0)
    compiled, macs, origin = {}, {}, {}
    for name, path in irs.items():
        model = core.read_model(path)
        model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
        macs[name] = layer_macs(model)
        compiled[name] = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": 2,
                                                             "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                                                             **config})
        origin[name] = {op.get_friendly_name(): op.get_rt_info()["originalLayersNames"].astype(str).split(",")
                        for op in compiled[name].get_runtime_model().get_ordered_ops()}
    times = {k: collections.defaultdict(list) for k in irs}
    walls = {k: [] for k in irs}
    names = list(irs)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            req = compiled[k].create_infer_request()
            req.infer({0: x})
            per_class = collections.defaultdict(float)
            wall = 0.0
            for _ in range(iters):
                t0 = time.perf_counter()
                req.infer({0: x})
                wall += time.perf_counter() - t0
                for info in req.profiling_info:  # read after the clock stopped
                    if info.status == info.Status.EXECUTED:
                        cls = node_class(info, macs[k], origin[k].get(info.node_name, [info.node_name]))
                        per_class[cls] += info.real_time.total_seconds()
            walls[k].append(wall / iters)
            for cls, s in per_class.items():
                times[k][cls].append(s / iters)
    return {k: {c: float(np.median(v)) for c, v in times[k].items()} for k in irs}, \
        {k: float(np.median(v)) for k, v in walls.items()}, macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irs", nargs="+", help="NAME=PATH.xml; the first is the reference")
    ap.add_argument("--sample", required=True, help=".npy with input samples (the first is used)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=40, help="inferences per IR per round")
    ap.add_argument("--f32", action="store_true", help="INFERENCE_PRECISION_HINT=f32 instead of the default")
    args = ap.parse_args()
    irs = dict(spec.split("=", 1) for spec in args.irs)
    for path in irs.values():
        if not os.path.isfile(path):
            ap.error(f"no IR at {path!r}")
    sample = np.load(args.sample)[:1].astype(np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32"} if args.f32 else {}
    times, walls, macs = profile(irs, sample, args.batch, args.rounds, args.iters, config)
    names = list(irs)
    ref = names[0]
    mac_sums = {k: collections.defaultdict(float) for k in irs}
    for k in irs:
        for cls, m in macs[k].values():
            mac_sums[k][cls] += m
    print(f"batch {args.batch}, {args.rounds} rounds of {args.iters} inferences, median per inference (ms); "
          f"time ratio and MAC ratio against {ref!r}")
    header = "| class | " + " | ".join(f"{k} ms" for k in names) + " | " + " | ".join(
        f"{k}: time / MACs vs {ref}" for k in names[1:]) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(names) - 1))
    rows = list(CLASSES) + ["nodes' sum", "nodes' sum if layers scaled with MACs", "outside the nodes", "wall"]
    scaled = ("stem conv", "1x1 conv", "kxk conv", "depthwise conv", "fully connected")
    for cls in rows:
        if cls == "nodes' sum if layers scaled with MACs":  # the reference's, each weighted class times its MAC ratio
            vals = {k: sum(times[ref].values()) + sum(
                times[ref].get(c, 0.0) * (mac_sums[k].get(c, 0.0) / mac_sums[ref][c] - 1)
                for c in scaled if mac_sums[ref].get(c)) for k in names}
            mv = {k: sum(mac_sums[k].values()) for k in names}
        elif cls == "nodes' sum":
            vals = {k: sum(times[k].values()) for k in names}
            mv = {k: sum(mac_sums[k].values()) for k in names}
        elif cls == "outside the nodes":
            vals = {k: walls[k] - sum(times[k].values()) for k in names}
            mv = {}
        elif cls == "wall":
            vals, mv = walls, {k: sum(mac_sums[k].values()) for k in names}
        else:
            vals = {k: times[k].get(cls, 0.0) for k in names}
            mv = {k: mac_sums[k].get(cls, 0.0) for k in names}
        if not any(vals.values()):
            continue
        cells = " | ".join(f"{vals[k] * 1e3:.3f}" for k in names)
        ratios = " | ".join(
            (f"{vals[k] / vals[ref]:.2f}" if vals[ref] > 0 else "-") + " / " +
            (f"{mv[k] / mv[ref]:.2f}" if mv.get(ref) else "-") for k in names[1:])
        print(f"| {cls} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()

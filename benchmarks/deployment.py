"""Deployment speed at 224x224: pruned + INT8 OpenVINO IRs of ResNet50, MobileNetV2 and EfficientNetB0.

    python benchmarks/deployment.py --json deployment.json                 # the three models at 224x224
    python benchmarks/deployment.py --models mobilenetv2 --smoke           # 96x96, 1 round: a quick try
    python benchmarks/deployment.py --table_models resnet50 --table_only   # channel multiple vs speed only
    python benchmarks/deployment.py --allocation_table mobilenetv2         # uniform / global_per_flop / latency
    python benchmarks/deployment.py --prepare resnet50:original --work W   # one preparation step, IRs into W
    python benchmarks/deployment.py --models resnet50 --skip_table --work W   # measure, re-using W's IRs
    python benchmarks/deployment.py --models resnet50 --model_allocations global_per_flop@16,global_per_latency \
        --profile_int8 --profile_precision default --profile_batch 32 --work W   # other allocations (see below)

A model run prepares each step (original export + our INT8, nncf INT8, each allocation, each QAT route) in its
own subprocess, so that peak memory is one export's (tf2onnx of ResNet50 at 224x224 takes ~6.5 GiB; all steps
in one process reached 12 GiB), and writes the IRs with a ``<step>.json`` into ``--work``; a later run with the
same settings re-uses them, so the steps can be prepared one per run (``--prepare``) and timed afterwards. The
measuring process only loads IRs.

Each model is a keras.applications model with weights=None whose BatchNorm statistics come from one batch of
real images (CIFAR-10 test images resized to the input size), so activations have realistic ranges; speed does
not depend on trained weights. Variants:
  - the unpruned model exported with ``export_saved_model``: FP32 IR at the f32 hint and at OpenVINO's default
    precision (BF16 on CPUs with AVX512-BF16 or AMX), our post-training INT8 (``calibrate``), and nncf INT8 of
    the same FP32 IR (``nncf.quantize`` run in a separate venv, ``--nncf_python``, on the same 300 images);
  - pruned to ``--flops_target`` with the channels ``FilterPruning`` chooses (allocations "uniform" and
    "global_per_flop"; the callback is driven once on the model, no training), stripped with
    ``tfcompress.strip``, exported, INT8 by post-training ``calibrate`` and by QAT (``quantize_model``, a few
    ``RangeInit`` steps, strip, export).
An allocation is named ``alloc[@round_to][~max_group_level]`` (``--model_allocations``, ``--allocations``), e.g.
``global_per_flop@16~0.5``; "global_per_latency" is profiled by ``measure_latency_profile`` as the ``--profile_*``
options say (``--profile_int8``: the INT8 model, calibrated on the first ``--table_calib`` images).
All variants of one model are timed in one ``measure_speed`` call (interleaved rounds): read the ratios. nncf's
INT8 IR is timed twice (``nncf INT8 (again)``, unless ``--no_gauge``): how far the two copies land apart is the
run's noise, the yardstick for every ratio in its table.
The goal check: pruned INT8 b32 throughput >= 0.9 x (original FLOPs / pruned FLOPs) x nncf INT8 throughput of
the unpruned model, and the same for b1 latency.

The channel-multiple table (``--multiples``, ``--table_models``) prunes a model with ``FilterPruning(round_to=m)`` for each m
(``--table_allocation``, same FLOPs target), converts it with OpenVINO's TF frontend (no tf2onnx: faster, same
kernels), calibrates INT8, and times FP32 (f32 hint) and INT8 of all of them interleaved: throughput per FLOP
shows what OpenVINO's channel-blocked kernels make of channel counts that are no multiple of 8 or 16.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import tfcompress  # noqa: E402
from tfcompress.calibration import calibrate  # noqa: E402
from tfcompress.export import export_saved_model  # noqa: E402
from tfcompress.export.speed import DEFAULT, FP32, default_precision, measure_speed  # noqa: E402
from tfcompress.pruning import FilterPruning  # noqa: E402
from tfcompress.pruning import callback as pruning_callback  # noqa: E402
from tfcompress.pruning.latency import measure_latency_profile  # noqa: E402
from tfcompress.quantization import RangeInit, quantize_model  # noqa: E402

MODELS = {
    "resnet50": keras.applications.ResNet50,
    "mobilenetv2": keras.applications.MobileNetV2,
    "efficientnetb0": keras.applications.EfficientNetB0,
}
ALLOCATIONS = ("uniform", "global_per_flop")
GAUGE = "nncf INT8 (again)"
NNCF_SCRIPT = """
import sys, numpy as np, nncf, openvino as ov
xml, npy, out = sys.argv[1:4]
x = np.load(npy)
model = ov.Core().read_model(xml)
q = nncf.quantize(model, nncf.Dataset([x[i:i + 1] for i in range(len(x))]), subset_size=len(x))
ov.save_model(q, out)
"""


def images(size: int, n: int) -> np.ndarray:
    """``n`` CIFAR-10 test images (a class-balanced prefix of a fixed shuffle) resized to ``size``, 0..255."""
    x, _ = common.cifar10_test()
    pick = np.random.default_rng(0).permutation(len(x))[:n]
    return tf.image.resize(x[pick].astype("float32"), (size, size)).numpy()


def build(name: str, size: int, batch: np.ndarray) -> keras.Model:
    """The keras.applications model with random weights and BatchNorm statistics of ``batch``."""
    keras.utils.set_random_seed(0)
    model = MODELS[name](weights=None, input_shape=(size, size, 3))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # the moving statistics become this batch's, layer after layer
    model(batch, training=True)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model


def prune(model: keras.Model, allocation: str, flops_target: float, round_to: int | str | None,
          latency_profile: dict | None = None, max_group_level: float | None = None) -> tuple[keras.Model, float]:
    """A pruned copy with the channels FilterPruning picks at its final level (driven once, no training)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    if isinstance(round_to, str) and round_to.startswith("auto:"):  # "auto" with another smallest rounded group
        default_min = pruning_callback.AUTO_ROUND_MIN_GROUP
        pruning_callback.AUTO_ROUND_MIN_GROUP = int(round_to.partition(":")[2])
        try:
            return prune(model, allocation, flops_target, "auto", latency_profile, max_group_level)
        finally:
            pruning_callback.AUTO_ROUND_MIN_GROUP = default_min
    extra = {} if round_to is None else {"round_to": round_to}
    if max_group_level is not None:
        extra["max_group_level"] = max_group_level
    if allocation == "global_per_latency":
        extra["latency_profile"] = latency_profile
    pruner = FilterPruning(flops_target=flops_target, flops_allocation=allocation, schedule="baseline",
                           pruning_epochs=1, prune_downsample_convs=True, **extra)
    pruner.set_model(copy)
    pruner.on_train_begin()
    pruner.on_epoch_begin(0)
    pruner.on_train_end()
    return copy, pruner.flops_ratio


def qat(pruned: keras.Model, x: np.ndarray, steps: int) -> keras.Model:
    """QAT route: quantize_model, ``steps`` training steps whose activation ranges RangeInit sets, strip."""
    q = quantize_model(pruned)
    q.compile(keras.optimizers.SGD(1e-5), "sparse_categorical_crossentropy")
    n = min(len(x), 8 * steps)
    q.fit(x[:n], np.zeros(n, "int32"), batch_size=8, epochs=1, callbacks=[RangeInit(steps)], verbose=0)
    return tfcompress.strip(q)


def export(model: keras.Model, work: str, name: str, calib: np.ndarray) -> dict:
    sm = os.path.join(work, name + "_sm")
    model.export(sm, verbose=False)
    report = export_saved_model(sm, os.path.join(work, name), calibration_data=calib, int8="default",
                                verbose=False)
    return {"flops": report["flops"]["after"], "params": report["params"]["after"],
            "int8_layers": report["steps"]["int8"]["int8_layers"],
            "fp32": os.path.join(work, name, "model_fp32.xml"), "int8": os.path.join(work, name, "model_int8.xml")}


def nncf_int8(xml: str, calib: np.ndarray, python: str, work: str) -> tuple[str, float]:
    """nncf.quantize of an IR in the benchmark's own venv (tfcompress never imports nncf)."""
    npy, out = os.path.join(work, "nncf_calib.npy"), os.path.join(work, "nncf_int8.xml")
    np.save(npy, calib)
    t = time.perf_counter()
    subprocess.run([python, "-c", NNCF_SCRIPT, xml, npy, out], check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t


def speed_args(args) -> dict:
    return dict(rounds=args.rounds, iters_b1=args.iters_b1, iters_b32=args.iters_b32)


def prepare_settings(args, step: str = "") -> dict:
    """The arguments an artifact depends on: a cached step is re-used only if they match (an allocation step
    ``alloc@m`` has round_to m; a "global_per_latency" step also depends on how its profile was taken)."""
    alloc, round_to = _allocation_spec(step.removesuffix("_qat"))
    out = {"size": args.size, "calib": args.calib, "flops_target": args.flops_target,
           "round_to": round_to or args.round_to, "qat_steps": args.qat_steps}
    if _cap_of(step):
        out["max_group_level"] = _cap_of(step)
    if alloc == "global_per_latency":
        out["profile"] = [args.profile_batch, args.profile_precision, args.profile_int8]
    return out


def model_steps(args) -> list[str]:
    """The preparation steps of one model run, in order (nncf after the original export it quantizes)."""
    steps = ["original", "nncf"]
    for spec in args.model_allocations:
        steps += [spec] + ([spec + "_qat"] if spec in args.qat_allocations else [])
    return steps


def prepare_step(name: str, step: str, args, work: str) -> None:
    """One preparation step of one model in this process; writes its IRs and ``<step>.json`` under ``work/name``.

    Steps: "original" (build, export, our INT8; also saves the calibration images), "nncf" (nncf.quantize of
    the original FP32 IR), an allocation (prune, strip, export) or an allocation + "_qat" (prune, QAT, strip,
    export). Run one step per process so that peak memory is one export's (tf2onnx of ResNet50: 6.5 GiB).
    """
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    t = time.perf_counter()
    if step == "nncf":
        with open(os.path.join(d, "original.json")) as f:
            fp32 = json.load(f)["fp32"]
        xml, _ = nncf_int8(fp32, np.load(os.path.join(d, "calib.npy")), args.nncf_python, d)
        meta = {"int8": xml}
    else:
        calib = images(args.size, args.calib)
        model = build(name, args.size, calib[:32])
        if step == "original":
            np.save(os.path.join(d, "calib.npy"), calib)
            np.save(os.path.join(d, "sample.npy"), calib[:1])
            meta = export(model, d, "original", calib)
        else:
            alloc, round_to = _allocation_spec(step.removesuffix("_qat"))
            profile = None
            if alloc == "global_per_latency":
                precision = None if args.profile_precision == "default" else args.profile_precision
                profile = measure_latency_profile(model, batch_size=args.profile_batch,
                                                  iterations=args.profile_iters, precision=precision,
                                                  calibration_data=_profile_data(args, calib))
            pruned, ratio = prune(model, alloc, args.flops_target, round_to or args.round_to, profile,
                                  _cap_of(step.removesuffix("_qat")))
            small = qat(pruned, calib, args.qat_steps) if step.endswith("_qat") else tfcompress.strip(pruned)
            meta = export(small, d, step, calib)
            meta["callback_flops_ratio"] = ratio
    meta.update(settings=prepare_settings(args, step), seconds=time.perf_counter() - t, rss_gib=_peak_rss_gib())
    with open(os.path.join(d, step + ".json"), "w") as f:
        json.dump(meta, f, indent=2, default=float)
    print(f"{name}:{step}: prepared in {meta['seconds']:.0f} s, peak RSS {meta['rss_gib']:.1f} GiB", flush=True)


def _peak_rss_gib() -> float:
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)  # children: nncf's venv process
    return max(resource.getrusage(w).ru_maxrss for w in who) / 2**20


def cached_step(name: str, step: str, args, work: str) -> dict | None:
    """The step's metadata if it was prepared in ``work`` with the settings it depends on (the unpruned
    model's steps: input size and calibration images only), else None."""
    path = os.path.join(work, name, step + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    mine, theirs = prepare_settings(args, step), meta.get("settings", {})
    keys = ("size", "calib") if step in ("original", "nncf") else tuple(mine)
    return meta if all(theirs.get(k) == mine[k] for k in keys) else None


def prepare_model(name: str, args, work: str) -> dict:
    """Every artifact of one model, each step prepared in its own subprocess unless cached in ``work``, and the
    OpenVINO variants to time (IR paths: the measuring process only loads IRs)."""
    arts = {}
    for step in model_steps(args):
        if cached_step(name, step, args, work) is None:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--prepare", f"{name}:{step}",
                   "--work", work]
            subprocess.run(cmd, check=True)
        arts[step] = cached_step(name, step, args, work)
        if arts[step] is None:
            raise RuntimeError(f"{name}:{step} was prepared with other settings than this run's")
    nncf = arts.pop("nncf")
    o = arts["original"]
    variants = {
        "FP32 (f32 hint)": (o["fp32"], FP32),
        f"default ({default_precision()})": (o["fp32"], DEFAULT),
        "nncf INT8": (nncf["int8"], DEFAULT),
        "our INT8": (o["int8"], DEFAULT),
    }
    if not args.no_gauge:  # the same IR compiled again: how far two identical models land apart in this run
        variants[GAUGE] = (nncf["int8"], DEFAULT)
    for spec in args.model_allocations:
        variants[f"pruned {spec} INT8"] = (arts[spec]["int8"], DEFAULT)
        if spec in args.qat_allocations:
            variants[f"pruned {spec} QAT INT8"] = (arts[spec + "_qat"]["int8"], DEFAULT)
    prep_s = sum(a["seconds"] for a in arts.values())
    print(f"{name}: prepared in {prep_s:.0f} s of subprocesses (nncf {nncf['seconds']:.0f} s)", flush=True)
    return {"size": args.size, "prep_seconds": prep_s, "nncf_seconds": nncf["seconds"], "variants": variants,
            "sample": np.load(os.path.join(work, name, "sample.npy")),
            "artifacts": {k.replace("_qat", " QAT"): {kk: vv for kk, vv in v.items() if kk not in ("fp32", "int8")}
                          for k, v in arts.items()}}


def measure_model(name: str, prep: dict, args) -> dict:
    s = measure_speed(prep["variants"], prep["sample"], **speed_args(args))
    out = {k: v for k, v in prep.items() if k not in ("variants", "sample")}
    out["speed"] = s
    print_model(name, out, default_precision())
    return out


def goal(row: dict, nncf: dict, flops_gain: float) -> tuple[float, float]:
    """Achieved fraction of the goal: pruned INT8 speed over (flops_gain x nncf INT8 speed), b32 and b1."""
    return (row["b32_ips"] / (flops_gain * nncf["b32_ips"]), nncf["b1_ms"] / (flops_gain * row["b1_ms"]))


def print_model(name: str, out: dict, prec: str) -> None:
    s, arts = out["speed"], out["artifacts"]
    base, nncf = s["FP32 (f32 hint)"], s["nncf INT8"]
    bf = s[f"default ({prec})"]
    print(f"\n## {name} {out['size']}x{out['size']}: original {arts['original']['flops'] / 1e9:.2f} GFLOPs "
          f"(prep {out['prep_seconds']:.0f} s, nncf.quantize {out['nncf_seconds']:.0f} s)")
    print("| variant | FLOPs ratio | b1 ms | b1 vs FP32 | b1 vs default | b32 img/s | b32 vs FP32 | b32 vs default "
          "| goal b32 | goal b1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, v in s.items():
        art = next((a for n, a in arts.items() if k.startswith("pruned") and n == _art_key(k)), arts["original"])
        ratio = art["flops"] / arts["original"]["flops"]
        g = goal(v, nncf, 1 / ratio) if k.startswith("pruned") else None
        gtxt = f"{g[0]:.2f} | {g[1]:.2f}" if g else "|"
        print(f"| {k} | {ratio:.3f} | {v['b1_ms']:.2f} | {base['b1_ms'] / v['b1_ms']:.2f}x | "
              f"{bf['b1_ms'] / v['b1_ms']:.2f}x | {v['b32_ips']:.1f} | {v['b32_ips'] / base['b32_ips']:.2f}x | "
              f"{v['b32_ips'] / bf['b32_ips']:.2f}x | {gtxt} |")
    print("goal columns: achieved / required (>= 0.90 meets the goal: 0.9 x FLOPs gain x nncf INT8 speed)")
    if GAUGE in s:
        g = s[GAUGE]
        print(f"noise gauge: the nncf INT8 IR compiled and timed twice ran {g['b32_ips'] / nncf['b32_ips']:.2f}x "
              f"at b32 and {nncf['b1_ms'] / g['b1_ms']:.2f}x at b1; ratios in this table are good to about that")


def _art_key(variant: str) -> str:
    """"pruned global_per_flop@16 QAT INT8" -> "global_per_flop@16 QAT"."""
    spec = variant.split(" ")[1]
    return spec + " QAT" if "QAT" in variant else spec


def prepare_table(name: str, args, work: str) -> dict:
    """One pruned model per channel multiple (round_to=m), FP32 and INT8 IRs via OpenVINO's TF frontend."""
    size = args.size
    calib = images(size, args.table_calib)
    model = build(name, size, calib[:32])
    sm = os.path.join(work, "unpruned_sm")
    model.export(sm, verbose=False)
    xml = os.path.join(work, "unpruned_fp32.xml")
    ov.save_model(ov.convert_model(sm), xml, compress_to_fp16=False)
    variants, flops = {"unpruned FP32": (xml, FP32)}, {}
    if not args.table_without_nncf:
        variants["unpruned nncf INT8"] = (nncf_int8(xml, calib, args.nncf_python, work)[0], DEFAULT)
    for m in args.multiples:
        pruned, ratio = prune(model, args.table_allocation, args.flops_target, m)
        sm = os.path.join(work, f"round{m}_sm")
        tfcompress.strip(pruned).export(sm, verbose=False)
        fp = ov.convert_model(sm)
        int8 = calibrate(fp, calib, subset_size=len(calib), verbose=False)
        flops[m] = ratio
        variants[f"round_to={m} FP32"] = (fp, FP32)
        variants[f"round_to={m} INT8"] = (int8, DEFAULT)
    print(f"table {name}: prepared", flush=True)
    return {"model": name, "size": size, "flops_ratio": flops, "variants": variants, "sample": calib[:1]}


def _round_to(text: str) -> int | str:
    """A FilterPruning round_to from the command line: ``"auto"``, an integer, or ``"auto:N"``: "auto" with
    groups of at least N channels rounded (benchmark-only, to compare thresholds in one run)."""
    return text if text == "auto" or text.startswith("auto:") else int(text)


def _allocation_spec(spec: str) -> tuple[str, int | str | None]:
    """``"global_per_latency@16"`` -> ("global_per_latency", 16), ``"uniform@auto"`` -> ("uniform", "auto");
    without ``@m`` the run's --round_to (a ``~cap`` suffix, the max_group_level, is read by :func:`_cap_of`)."""
    alloc, _, m = spec.split("~")[0].partition("@")
    return alloc, _round_to(m) if m else None


def _profile_data(args, calib: np.ndarray) -> np.ndarray | None:
    """The samples the latency profile's INT8 model is calibrated on (--profile_int8), else None (float)."""
    return calib[:args.table_calib] if args.profile_int8 else None


def _cap_of(spec: str) -> float | None:
    """``"global_per_flop@16~0.6"`` -> 0.6 (FilterPruning's max_group_level); None: its default."""
    _, _, cap = spec.partition("~")
    return float(cap) if cap else None


def prepare_allocations(name: str, args, work: str) -> dict:
    """One pruned model per allocation (--allocations, each optionally ``@round_to``) at the same FLOPs target,
    FP32 and INT8 IRs via OpenVINO's TF frontend; "global_per_latency" gets the unpruned model's measured
    per-layer profile (of its INT8 model with --profile_int8). With --allocation_nncf the unpruned model's nncf
    INT8 and our INT8 (same TF-frontend IR) are timed in the same run, for the goal columns."""
    size = args.size
    calib = images(size, args.table_calib)
    model = build(name, size, calib[:32])
    t = time.perf_counter()
    precision = None if args.profile_precision == "default" else args.profile_precision
    profile = measure_latency_profile(model, batch_size=args.profile_batch, iterations=args.profile_iters,
                                      precision=precision, calibration_data=_profile_data(args, calib))
    print(f"profile ({args.profile_batch}, {args.profile_precision}, int8={args.profile_int8}): "
          f"{time.perf_counter() - t:.0f} s, {len(profile)} layers, {sum(profile.values()) * 1e3:.2f} ms in them",
          flush=True)
    variants, flops, kept = {}, {}, {}
    if args.allocation_nncf:
        sm = os.path.join(work, "unpruned_sm")
        model.export(sm, verbose=False)
        xml = os.path.join(work, "unpruned_fp32.xml")
        ov.save_model(ov.convert_model(sm), xml, compress_to_fp16=False)
        variants["unpruned nncf INT8"] = (nncf_int8(xml, calib, args.nncf_python, work)[0], DEFAULT)
        variants["unpruned our INT8"] = (calibrate(ov.Core().read_model(xml), calib, subset_size=len(calib),
                                                   verbose=False), DEFAULT)
    for spec in args.allocations:
        alloc, round_to = _allocation_spec(spec)
        pruned, ratio = prune(model, alloc, args.flops_target, round_to if round_to else args.round_to, profile,
                              _cap_of(spec))
        small = tfcompress.strip(pruned)
        kept[spec] = {layer.name: int(layer.filters) for layer in small.layers
                      if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D)}
        sm = os.path.join(work, spec + "_sm")
        small.export(sm, verbose=False)
        fp = ov.convert_model(sm)
        flops[spec] = ratio
        if not args.allocation_int8_only:
            variants[f"{spec} FP32"] = (fp, FP32)
        variants[f"{spec} INT8"] = (calibrate(fp, calib, subset_size=len(calib), verbose=False), DEFAULT)
        print(f"{spec}: FLOPs ratio {ratio:.3f}", flush=True)
    print(f"allocations {name}: prepared", flush=True)
    return {"model": name, "size": size, "flops_ratio": flops, "kept": kept, "variants": variants,
            "sample": calib[:1], "profile": profile}


def measure_allocations(prep: dict, args) -> dict:
    """Time every allocation's INT8 (and FP32) interleaved; print speed relative to the first allocation and,
    with the unpruned nncf INT8 in the run, the goal columns."""
    s = measure_speed(prep["variants"], prep["sample"], **speed_args(args))
    flops, allocs = prep["flops_ratio"], list(prep["flops_ratio"])
    first = allocs[0]
    fp32 = not args.allocation_int8_only
    print(f"\n## allocation vs speed: {prep['model']} {prep['size']}x{prep['size']}, flops_target {args.flops_target}, "
          f"profile batch {args.profile_batch} {args.profile_precision} int8={args.profile_int8}")
    nncf = s.get("unpruned nncf INT8")
    if nncf:
        ours = s["unpruned our INT8"]
        print(f"unpruned: nncf INT8 b1 {nncf['b1_ms']:.2f} ms, b32 {nncf['b32_ips']:.1f} img/s; our INT8 b1 "
              f"{ours['b1_ms']:.2f} ms, b32 {ours['b32_ips']:.1f} img/s")
    print("| allocation | FLOPs ratio | " + ("FP32 b1 ms | FP32 b32 img/s | " if fp32 else "")
          + f"INT8 b1 ms | INT8 b32 img/s | INT8 b1 / b32 vs {first}"
          + (" | b32 vs nncf | goal b32 | b1 vs nncf | goal b1 |" if nncf else " |"))
    print("|---" * (5 + 2 * fp32 + 4 * bool(nncf)) + "|")
    for a in allocs:
        i, i0 = s[f"{a} INT8"], s[f"{first} INT8"]
        row = f"| {a} | {flops[a]:.3f} | "
        if fp32:
            row += f"{s[f'{a} FP32']['b1_ms']:.2f} | {s[f'{a} FP32']['b32_ips']:.1f} | "
        row += (f"{i['b1_ms']:.2f} | {i['b32_ips']:.1f} | {i0['b1_ms'] / i['b1_ms']:.2f}x / "
                f"{i['b32_ips'] / i0['b32_ips']:.2f}x |")
        if nncf:
            g32, g1 = goal(i, nncf, 1 / flops[a])
            row += (f" {i['b32_ips'] / nncf['b32_ips']:.2f}x | {g32:.2f} | {nncf['b1_ms'] / i['b1_ms']:.2f}x | "
                    f"{g1:.2f} |")
        print(row)
    return {"model": prep["model"], "size": prep["size"], "flops_ratio": flops, "kept": prep["kept"], "speed": s,
            "profile": prep["profile"]}


def measure_table(prep: dict, args) -> dict:
    """Time FP32 and INT8 of every channel multiple interleaved; print throughput per FLOP against round_to=1."""
    s = measure_speed(prep["variants"], prep["sample"], **speed_args(args))
    flops, multiples = prep["flops_ratio"], list(prep["flops_ratio"])
    print(f"\n## channel multiple vs speed: {prep['model']} {prep['size']}x{prep['size']}, {args.table_allocation}, "
          f"flops_target {args.flops_target}")
    print("| round_to | FLOPs ratio | FP32 b32 img/s | FP32 b32 per FLOP (rel.) | FP32 b1 ms | INT8 b32 img/s "
          "| INT8 b32 per FLOP (rel.) | INT8 b1 ms | INT8 b1 per FLOP (rel.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = multiples[0]
    per_flop = lambda m, p: s[f"round_to={m} {p}"]["b32_ips"] * flops[m]  # noqa: E731
    b1_per_flop = lambda m: flops[m] / s[f"round_to={m} INT8"]["b1_ms"]  # noqa: E731
    for m in multiples:
        f, i = s[f"round_to={m} FP32"], s[f"round_to={m} INT8"]
        print(f"| {m} | {flops[m]:.3f} | {f['b32_ips']:.1f} | {per_flop(m, 'FP32') / per_flop(first, 'FP32'):.2f} | "
              f"{f['b1_ms']:.2f} | {i['b32_ips']:.1f} | {per_flop(m, 'INT8') / per_flop(first, 'INT8'):.2f} | "
              f"{i['b1_ms']:.2f} | {b1_per_flop(m) / b1_per_flop(first):.2f} |")
    if "unpruned nncf INT8" not in s:
        return {"model": prep["model"], "size": prep["size"], "flops_ratio": flops, "speed": s}
    nncf, fp32 = s["unpruned nncf INT8"], s["unpruned FP32"]
    print(f"\nunpruned: FP32 b1 {fp32['b1_ms']:.2f} ms, b32 {fp32['b32_ips']:.1f} img/s; nncf INT8 b1 "
          f"{nncf['b1_ms']:.2f} ms, b32 {nncf['b32_ips']:.1f} img/s")
    print("goal: pruned INT8 speed / (FLOPs gain x unpruned nncf INT8 speed); >= 0.90 meets it")
    print("| round_to | pruned INT8 b32 vs nncf INT8 | goal b32 | pruned INT8 b1 vs nncf INT8 | goal b1 |")
    print("|---|---|---|---|---|")
    for m in multiples:
        i = s[f"round_to={m} INT8"]
        g32, g1 = goal(i, nncf, 1 / flops[m])
        print(f"| {m} | {i['b32_ips'] / nncf['b32_ips']:.2f}x | {g32:.2f} | {nncf['b1_ms'] / i['b1_ms']:.2f}x | "
              f"{g1:.2f} |")
    return {"model": prep["model"], "size": prep["size"], "flops_ratio": flops, "speed": s}


def conv_stack(width: int, size: int, depth: int = 4, stem: int = 64) -> ov.Model:
    """An OpenVINO model: a stem conv to ``width`` channels, then ``depth`` 3x3 conv + ReLU layers of ``width``
    channels (what a stripped, pruned layer looks like to the CPU plugin), random weights."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(width)
    x = ops.parameter([-1, 3, size, size], np.float32, name="input")
    h, c_in = x, 3
    for c_out in [stem] + [width] * depth:
        w = ops.constant((rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32))
        h = ops.relu(ops.convolution(h, w, [1, 1], [1, 1], [1, 1], [1, 1]))
        c_in = c_out
    return ov.Model([h], [x], f"conv_stack_{width}")


def micro_table(args) -> dict:
    """Channel count vs speed of a conv stack, FP32 (f32 hint) and INT8, all timed interleaved."""
    size = 28 if not args.smoke else 14
    x = np.random.default_rng(0).uniform(0, 1, (32, 3, size, size)).astype(np.float32)
    variants = {}
    for c in args.widths:
        fp = conv_stack(c, size)
        variants[f"{c} FP32"] = (fp, FP32)
        variants[f"{c} INT8"] = (calibrate(fp, x, subset_size=len(x), verbose=False), DEFAULT)
    s = measure_speed(variants, x[:1], **speed_args(args))
    ref = args.widths[-1]
    print(f"\n## conv stack: 4 x (3x3 conv, c -> c channels, ReLU) at {size}x{size}, speed per FLOP relative to "
          f"c={ref} (1.00 = time proportional to c^2)")
    print("| c | c mod 16 | FP32 b32 img/s | FP32 per FLOP | INT8 b32 img/s | INT8 per FLOP | FP32 b1 ms | INT8 b1 ms "
          "| INT8 b1 per FLOP |")
    print("|---|---|---|---|---|---|---|---|---|")
    flops = {c: 64 * c + 4 * c * c for c in args.widths}  # per pixel, up to the common 9 x 2 factor

    def per_flop(c, p, key="b32_ips"):
        v = s[f"{c} {p}"][key]
        v = v if key == "b32_ips" else 1 / v
        return v * flops[c] / ((s[f"{ref} {p}"][key] if key == "b32_ips" else 1 / s[f"{ref} {p}"][key]) * flops[ref])

    for c in args.widths:
        f, i = s[f"{c} FP32"], s[f"{c} INT8"]
        print(f"| {c} | {c % 16} | {f['b32_ips']:.0f} | {per_flop(c, 'FP32'):.2f} | {i['b32_ips']:.0f} | "
              f"{per_flop(c, 'INT8'):.2f} | {f['b1_ms']:.3f} | {i['b1_ms']:.3f} | {per_flop(c, 'INT8', 'b1_ms'):.2f} |")
    return {"size": size, "speed": s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--smoke", action="store_true", help="96x96 inputs, 1 round, few iterations")
    ap.add_argument("--flops_target", type=float, default=0.45)
    ap.add_argument("--round_to", type=_round_to, default=None,
                    help='FilterPruning round_to, "auto" or an integer (default: its default)')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no_gauge", action="store_true",
                    help="do not time nncf's INT8 IR a second time as a noise gauge")
    ap.add_argument("--iters_b1", type=int, default=100)
    ap.add_argument("--iters_b32", type=int, default=10)
    ap.add_argument("--calib", type=int, default=300, help="calibration images (also for nncf)")
    ap.add_argument("--qat_steps", type=int, default=4)
    ap.add_argument("--model_allocations", default=",".join(ALLOCATIONS),
                    help="allocations of a model run, each optionally @round_to and ~max_group_level")
    ap.add_argument("--qat_allocations", default="global_per_flop", help="allocations that also take the QAT route")
    ap.add_argument("--multiples", default="1,4,8,16,32",
                    help='round_to values of the channel table ("auto" or integers)')
    ap.add_argument("--table_models", default="resnet50,mobilenetv2")
    ap.add_argument("--table_calib", type=int, default=64, help="calibration images of the table's INT8 IRs")
    ap.add_argument("--table_only", action="store_true")
    ap.add_argument("--table_allocation", default="global_per_flop", choices=ALLOCATIONS)
    ap.add_argument("--table_without_nncf", action="store_true", help="leave nncf INT8 out of the channel table")
    ap.add_argument("--micro", action="store_true", help="only the conv-stack table: channel count vs speed")
    ap.add_argument("--widths", default="32,33,36,40,44,48,52,56,60,63,64")
    ap.add_argument("--skip_table", action="store_true")
    ap.add_argument("--allocation_table", default="", help="only the allocation table, for these models")
    ap.add_argument("--allocations", default="uniform,global_per_flop,global_per_latency",
                    help="allocations of the allocation table, each optionally @round_to and ~max_group_level "
                    "(global_per_flop@16~0.6)")
    ap.add_argument("--profile_batch", type=int, default=1, help="batch size of the latency profile")
    ap.add_argument("--profile_precision", default="f32",
                    help="inference precision of the latency profile (\"default\": the device's)")
    ap.add_argument("--profile_int8", action="store_true", help="profile the INT8 model (calibrated on the table's "
                    "images) instead of the float one")
    ap.add_argument("--allocation_nncf", action="store_true",
                    help="allocation table: also time the unpruned nncf INT8 and our INT8, with goal columns")
    ap.add_argument("--allocation_int8_only", action="store_true", help="allocation table: INT8 variants only")
    ap.add_argument("--profile_iters", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--work", default="", help="directory of the prepared IRs, kept and re-used by later runs "
                    "with the same settings (default: a temporary directory)")
    ap.add_argument("--prepare", default="", help="MODEL:STEP: only run this preparation step (into --work); "
                    "steps: original, nncf, uniform, global_per_flop, global_per_flop_qat")
    ap.add_argument("--nncf_python", default="/work/venv-nncf/bin/python",
                    help="a Python with nncf and openvino installed")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    args.size = 96 if args.smoke else args.size
    if args.smoke:
        args.rounds, args.iters_b1, args.iters_b32, args.calib, args.qat_steps, args.table_calib = 1, 10, 2, 32, 2, 16
    args.multiples = [_round_to(m) for m in args.multiples.split(",")]
    args.widths = [int(m) for m in args.widths.split(",")]
    args.qat_allocations = [a for a in args.qat_allocations.split(",") if a]
    args.model_allocations = [a for a in args.model_allocations.split(",") if a]
    args.allocations = [a for a in args.allocations.split(",") if a]
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; choose from {list(MODELS)}")
    if args.prepare:
        if not args.work:
            ap.error("--prepare needs --work")
        name, _, step = args.prepare.partition(":")
        prepare_step(name, step, args, args.work)
        return
    print(f"machine: {common.machine()}; openvino {ov.__version__}; default precision {default_precision()}")
    results = {"command": "python benchmarks/deployment.py " + " ".join(sys.argv[1:]), "machine": common.machine()}
    if args.micro:
        results["micro"] = micro_table(args)
        _dump(results, args.json)
        return
    tables = [] if args.skip_table else [m for m in args.table_models.split(",") if m]
    models = [] if args.table_only else names
    if args.allocation_table:
        with tempfile.TemporaryDirectory(prefix="tfcompress-alloc-") as work:
            for m in args.allocation_table.split(","):
                prep = prepare_allocations(m, args, os.path.join(work, m))
                results.setdefault("allocation_table", {})[m] = measure_allocations(prep, args)
                _dump(results, args.json)
        return
    with tempfile.TemporaryDirectory(prefix="tfcompress-deploy-") as tmp:
        work = args.work or tmp
        for m in tables:
            prep = prepare_table(m, args, os.path.join(work, "table_" + m))
            results.setdefault("channel_table", {})[m] = measure_table(prep, args)
            _dump(results, args.json)
        for m in models:
            results[m] = measure_model(m, prepare_model(m, args, work), args)
            _dump(results, args.json)


def _dump(results: dict, path: str) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()

"""Which INT8 layers OpenVINO's CPU plugin computes differently on several threads than on one.

Builds tiny INT8 models with the OpenVINO API (``openvino.opset13``): an input FakeQuantize (u8, [0, 4], 256
levels), a layer with int8 weights on the 7-bit grid [-63, 63] (so ``vpmaddubsw`` saturation cannot explain a
difference), per-output-channel weight scales, and a random tail the plugin fuses (bias, ReLU / clamp, output
FakeQuantize). Each configuration is compiled twice at ``INFERENCE_PRECISION_HINT=f32``, with the default
number of threads and with ``INFERENCE_NUM_THREADS=1``; the multi-threaded model runs ``--calls`` times on one
batch of inputs that lie on the quantization grid. An output is wrong when it differs from the other by more
than 1.5 quanta of the output (the integer accumulator's unit, or the output FakeQuantize's step) plus 4e-6
relative. Where the two differ, a numpy reference of the quantized arithmetic (float64, exact on these
integers) says which one is right; the first batch item is always checked against the reference too.

Families: strided and unstrided 1x1 convolutions over every input channel count 1..64; random samples of 2-D
convolutions (kernels 1/3/5/7, 1xk, kx1, strides 1-4, dilations 1-2, no or "same" padding), 1-D and 3-D
convolutions, depthwise (every channel count 1..64 x kernels 3/5 x strides 1/2) and grouped convolutions,
MatMul on 2-D and 3-D inputs, transposed convolutions with static shapes, residual sums of two INT8
convolutions, AvgPool / ReduceMean / MaxPool on u8. Prints one line per configuration that differs (and a
summary per family and primitive); ``--out`` writes every configuration as JSON lines. ``--rewrite`` first applies
tfcompress' ``rewrite_for_cpu`` (what every INT8 IR it writes gets) to each model.

    PYTHONPATH=$PWD python benchmarks/int8_kernel_sweep.py [--seed 0] [--calls 5] [--families conv1x1,...]
        [--scale 1.0] [--out sweep.jsonl] [--rewrite]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import math
import sys
import time
from typing import Callable

import numpy as np

SX = 4.0 / 255  # the input quantizer's step: u8 on [0, 4]
BATCH = 32
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclasses.dataclass
class Built:
    """A layer's OpenVINO output, its numpy reference (u8 input integers -> float64 outputs) and the quantum
    of its outputs."""

    node: object
    ref: Callable[[np.ndarray], np.ndarray]
    unit: float
    channel_axis: int = 1


@dataclasses.dataclass
class Config:
    family: str
    params: dict
    in_shape: tuple[int, ...]
    build: Callable  # (input FakeQuantize node, rng) -> Built
    tail: bool = True  # random bias / activation / output FakeQuantize


# ---------------------------------------------------------------- numpy references of the integer arithmetic

def conv_ref(x, w, strides, dil, pb, pe):
    """Grouped N-d convolution: x [N, C, *S] integers, w [G, O/G, C/G, *K] integers -> [N, O, *OS] float64."""
    n, c = x.shape[:2]
    g, og, ig = w.shape[:3]
    kernel = w.shape[3:]
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + list(zip(pb, pe)))
    out = [(xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(len(kernel))]
    p = int(np.prod(out))
    acc = np.zeros((g, n, p, og))
    for off in itertools.product(*[range(k) for k in kernel]):
        sl = xp[(slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(off, dil, out, strides))]
        sl = sl.reshape(n, g, ig, p).transpose(1, 0, 3, 2)  # [G, N, P, Ig]
        acc += sl @ w[(slice(None),) * 3 + off].astype(np.float64).transpose(0, 2, 1)[:, None]
    return acc.transpose(1, 0, 3, 2).reshape(n, g * og, *out)


def deconv_ref(x, w, strides, dil, pb, pe, outpad):
    """Transposed N-d convolution: x [N, Ci, *S], w [Ci, Co, *K] -> [N, Co, *OS] float64."""
    n, ci = x.shape[:2]
    co, kernel, spatial = w.shape[1], w.shape[2:], x.shape[2:]
    full = [(s_ - 1) * st + d * (k - 1) + 1 + op for s_, st, d, k, op in zip(spatial, strides, dil, kernel, outpad)]
    out = np.zeros((n, co, *full))
    xf = x.astype(np.float64)
    for off in itertools.product(*[range(k) for k in kernel]):
        contrib = np.einsum("nc...,co->no...", xf, w[(slice(None), slice(None)) + off].astype(np.float64))
        out[(slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (s_ - 1) * st + 1, st) for o, d, s_, st in zip(off, dil, spatial, strides))] += contrib
    return out[(slice(None), slice(None)) + tuple(slice(b, f - e) for b, e, f in zip(pb, pe, full))]


def avg_pool_ref(x, kernel, strides, pb, pe, exclude_pad):
    xf = x.astype(np.float64)
    xp = np.pad(xf, [(0, 0), (0, 0)] + list(zip(pb, pe)))
    ones = np.pad(np.ones_like(xf), [(0, 0), (0, 0)] + list(zip(pb, pe)))
    out = [(xp.shape[2 + i] - kernel[i]) // strides[i] + 1 for i in range(len(kernel))]
    total, count = 0.0, 0.0
    for off in itertools.product(*[range(k) for k in kernel]):
        idx = (slice(None), slice(None)) + tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(off, out, strides))
        total = total + xp[idx]
        count = count + ones[idx]
    return total / (count if exclude_pad else np.prod(kernel))


def max_pool_ref(x, kernel, strides):
    out = [(x.shape[2 + i] - kernel[i]) // strides[i] + 1 for i in range(len(kernel))]
    res = None
    for off in itertools.product(*[range(k) for k in kernel]):
        v = x[(slice(None), slice(None)) + tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(off, out, strides))]
        res = v.astype(np.float64) if res is None else np.maximum(res, v)
    return res


def fq_ref(y, lo, hi):
    q = np.round((np.clip(y, lo, hi) - lo) / (hi - lo) * 255)
    return q * (hi - lo) / 255 + lo


# ---------------------------------------------------------------------------------------------- model parts

def _ops():
    import openvino.opset13 as ops
    return ops


def _output(node):
    """A node's first output (max_pool's values), or the output itself."""
    return node.output(0) if hasattr(node, "output") else node


def _fq(x, lo, hi):
    ops = _ops()
    return ops.fake_quantize(x, np.float32(lo), np.float32(hi), np.float32(lo), np.float32(hi), 256)


def _decompressed(q, scale):
    """int8 constant -> f32 -> times ``scale`` (broadcast over the weights' output-channel axes)."""
    ops = _ops()
    return ops.multiply(ops.convert(ops.constant(q.astype(np.int8)), np.float32), ops.constant(scale.astype(np.float32)))


def same_pads(spatial, kernel, strides, dil):
    pb, pe = [], []
    for s_, k, st, d in zip(spatial, kernel, strides, dil):
        total = max((math.ceil(s_ / st) - 1) * st + (k - 1) * d + 1 - s_, 0)
        pb.append(total // 2)
        pe.append(total - total // 2)
    return pb, pe


def conv(cin, cout, kernel, strides, dil, pb, pe, groups=1, grouped_op=False):
    """A (group) convolution with int8 weights [-63, 63] and a scale per output channel."""
    def build(x, rng):
        ops = _ops()
        g, ig, og = groups, cin // groups, cout // groups
        wq = rng.integers(-63, 64, (g, og, ig, *kernel))
        ws = rng.uniform(0.5, 2, (g, og)) / (63 * 128 * math.sqrt(ig * np.prod(kernel)))
        if grouped_op:
            node = ops.group_convolution(x, _decompressed(wq, ws.reshape(g, og, 1, *(1,) * len(kernel))),
                                         list(strides), list(pb), list(pe), list(dil))
        else:
            node = ops.convolution(x, _decompressed(wq[0], ws[0].reshape(og, 1, *(1,) * len(kernel))),
                                   list(strides), list(pb), list(pe), list(dil))
        scale = ws.reshape(1, cout, *(1,) * len(kernel))
        return Built(node, lambda xq: conv_ref(xq, wq, strides, dil, pb, pe) * SX * scale, SX * ws.min())
    return build


def deconv(cin, cout, kernel, strides, pb, pe, outpad):
    def build(x, rng):
        ops = _ops()
        wq = rng.integers(-63, 64, (cin, cout, *kernel))
        ws = rng.uniform(0.5, 2, cout) / (63 * 128 * math.sqrt(cin * np.prod(kernel) / np.prod(strides)))
        node = ops.convolution_backprop_data(x, _decompressed(wq, ws.reshape(1, cout, *(1,) * len(kernel))),
                                             list(strides), pads_begin=list(pb), pads_end=list(pe),
                                             dilations=[1] * len(kernel), output_padding=list(outpad))
        scale = ws.reshape(1, cout, *(1,) * len(kernel))
        return Built(node, lambda xq: deconv_ref(xq, wq, strides, [1] * len(kernel), pb, pe, outpad) * SX * scale,
                     SX * ws.min())
    return build


def matmul(k, n, transpose_b):
    def build(x, rng):
        ops = _ops()
        wq = rng.integers(-63, 64, (k, n))
        ws = rng.uniform(0.5, 2, n) / (63 * 128 * math.sqrt(k))
        w = _decompressed(wq.T, ws.reshape(n, 1)) if transpose_b else _decompressed(wq, ws.reshape(1, n))
        node = ops.matmul(x, w, False, transpose_b)
        return Built(node, lambda xq: (xq.astype(np.float64) @ wq) * SX * ws, SX * ws.min(), channel_axis=-1)
    return build


def residual(first, second, quantize_second):
    """The sum of two INT8 layers' outputs on the same input (the plugin fuses it into one as a "sum" post-op);
    with ``quantize_second`` the second output goes through a FakeQuantize first."""
    def build(x, rng):
        ops = _ops()
        a, b = first(x, rng), second(x, rng)
        b_node, b_ref, unit = b.node, b.ref, min(a.unit, b.unit)
        if quantize_second:
            lo, hi = _range_of(b.ref, rng, x.get_output_partial_shape(0).to_shape())
            b_node = _fq(b.node, lo, hi)
            b_ref = lambda xq, f=b.ref, lo=lo, hi=hi: fq_ref(f(xq), lo, hi)
            unit = min(unit, (hi - lo) / 255)
        return Built(ops.add(a.node, b_node), lambda xq: a.ref(xq) + b_ref(xq), unit)
    return build


def identity_residual(layer):
    """A layer's output plus its own quantized input (cin == cout, shape-preserving)."""
    def build(x, rng):
        ops = _ops()
        a = layer(x, rng)
        return Built(ops.add(a.node, x), lambda xq: a.ref(xq) + xq * SX, min(a.unit, SX))
    return build


def avg_pool(kernel, strides, pb, pe, exclude_pad):
    def build(x, rng):
        ops = _ops()
        node = ops.avg_pool(x, list(strides), list(pb), list(pe), list(kernel), exclude_pad)
        return Built(node, lambda xq: avg_pool_ref(xq, kernel, strides, pb, pe, exclude_pad) * SX,
                     SX / np.prod(kernel))
    return build


def max_pool(kernel, strides):
    def build(x, rng):
        ops = _ops()
        node = ops.max_pool(x, list(strides), [1] * len(kernel), [0] * len(kernel), [0] * len(kernel),
                            list(kernel)).output(0)
        return Built(node, lambda xq: max_pool_ref(xq, kernel, strides) * SX, SX)
    return build


def reduce_mean(axes, keep_dims):
    def build(x, rng):
        ops = _ops()
        node = ops.reduce_mean(x, ops.constant(np.array(axes, np.int64)), keep_dims)
        return Built(node, lambda xq: xq.astype(np.float64).mean(axis=tuple(axes), keepdims=keep_dims) * SX, SX / 64)
    return build


def _range_of(ref, rng, shape, lo_zero=False):
    """An output FakeQuantize range: from the reference outputs of one random u8 input of ``shape``."""
    probe = ref(rng.integers(0, 256, (1,) + tuple(shape[1:])))
    lo = 0.0 if lo_zero else float(np.quantile(probe, 0.01))
    hi = float(np.quantile(probe, 0.99))
    return lo, max(hi, lo + 1e-3)


def with_tail(built: Built, rng, shape) -> tuple[Built, str]:
    """A random fused tail: bias (per channel), ReLU or clamp, output FakeQuantize."""
    ops = _ops()
    node, ref, unit, axis = built.node, built.ref, built.unit, built.channel_axis
    parts = []
    out_shape = _output(node).get_partial_shape()
    rank, channels = len(out_shape), out_shape[axis].get_length()
    if rng.random() < 0.5:
        bshape = [1] * rank
        bshape[axis] = channels
        bias = rng.normal(0, 0.3, bshape)
        node = ops.add(node, ops.constant(bias.astype(np.float32)))
        ref = lambda xq, f=ref, b=bias: f(xq) + b
        parts.append("bias")
    act = rng.choice(["none", "relu", "clamp"])
    if act == "relu":
        node = ops.relu(node)
        ref = lambda xq, f=ref: np.maximum(f(xq), 0)
    elif act == "clamp":
        hi = max(_range_of(ref, rng, shape)[1] * 0.6, 1e-3)
        node = ops.clamp(node, 0.0, hi)
        ref = lambda xq, f=ref, hi=hi: np.clip(f(xq), 0, np.float32(hi))
    if act != "none":
        parts.append(str(act))
    if rng.random() < 0.6:
        lo, hi = _range_of(ref, rng, shape, lo_zero=act != "none")
        node = _fq(node, lo, hi)
        ref = lambda xq, f=ref, lo=lo, hi=hi: fq_ref(f(xq), lo, hi)
        unit = (hi - lo) / 255
        parts.append("outFQ")
    return Built(node, ref, unit, axis), "+".join(parts) or "-"


# --------------------------------------------------------------------------------------------- the families

def _pick(rng, values):
    return values[int(rng.integers(len(values)))]


def _conv_config(rng, family, cin, cout, kernel, strides, dil, padding, spatial, batch=BATCH):
    pb, pe = (same_pads(spatial, kernel, strides, dil) if padding == "same" else ([0] * len(kernel),) * 2)
    params = dict(cin=cin, cout=cout, kernel=list(kernel), strides=list(strides), dil=list(dil), pad=padding,
                  spatial=list(spatial))
    return Config(family, params, (batch, cin, *spatial), conv(cin, cout, kernel, strides, dil, pb, pe))


def _divisible(rng, stride, low=28, high=56):
    """A size in [low, high] that ``stride`` divides: the CPU plugin takes its 1x1 kernel (which copies strided
    inputs to a unit-stride buffer) for strided 1x1 convolutions only then; otherwise its generic kernel."""
    return stride * int(rng.integers(-(-low // stride), high // stride + 1))


def family_conv1x1(rng, scale):
    """Every input channel count 1..64 at strides 2, 3, 4 on sizes the stride divides (the 1x1 kernel) and on
    sizes it does not (the generic kernel); samples at stride 1, with unequal strides, in 1-D and 3-D."""
    out = []
    for stride in (2, 3, 4):
        for cin in range(1, 65):
            hw = _divisible(rng, stride)
            out.append(_conv_config(rng, "conv1x1", cin, int(rng.integers(1, 65)), (1, 1), (stride, stride),
                                    (1, 1), "valid", (hw, hw)))
        for _ in range(int(16 * scale)):
            hw = _divisible(rng, stride) + int(rng.integers(1, stride))
            out.append(_conv_config(rng, "conv1x1", int(rng.integers(1, 65)), int(rng.integers(1, 65)), (1, 1),
                                    (stride, stride), (1, 1), "valid", (hw, hw)))
    for _ in range(int(24 * scale)):
        hw = int(rng.integers(28, 57))
        out.append(_conv_config(rng, "conv1x1", int(rng.integers(1, 65)), int(rng.integers(1, 65)), (1, 1),
                                (1, 1), (1, 1), "valid", (hw, hw)))
    for strides in ((1, 2), (2, 1), (2, 4), (4, 2)):
        for _ in range(int(10 * scale)):
            hw = _divisible(rng, max(strides))
            out.append(_conv_config(rng, "conv1x1", int(rng.integers(1, 65)), int(rng.integers(1, 65)), (1, 1),
                                    strides, (1, 1), "valid", (hw, hw)))
    for _ in range(int(24 * scale)):  # half of them with an odd multiple of 8 input channels
        cin = 8 * int(rng.integers(0, 4)) * 2 + 8 if rng.random() < 0.5 else int(rng.integers(1, 65))
        s = _pick(rng, [2, 4])
        out.append(_conv_config(rng, "conv1x1-1d", cin, int(rng.integers(1, 65)), (1,), (s,), (1,), "valid",
                                (_divisible(rng, s, 64, 256),)))
        d = _divisible(rng, s, 4, 12)
        out.append(_conv_config(rng, "conv1x1-3d", cin, int(rng.integers(1, 33)), (1, 1, 1), (s, s, s), (1, 1, 1),
                                "valid", (d, *(_divisible(rng, s, 12, 28),) * 2), batch=16))
    return out


KERNELS_2D = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1), (1, 5), (5, 1), (1, 7), (7, 1)]


def family_conv2d(rng, scale):
    out = []
    for _ in range(int(240 * scale)):
        kernel = _pick(rng, KERNELS_2D)
        s = int(rng.integers(1, 5))
        strides = (s, s) if rng.random() < 0.8 else (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        dil = (1, 1) if rng.random() < 0.6 else (2, 2)
        hw = int(rng.integers(28, 57))
        out.append(_conv_config(rng, "conv2d", int(rng.integers(1, 65)), int(rng.integers(1, 65)), kernel,
                                strides, dil, _pick(rng, ["valid", "same"]), (hw, hw)))
    return out


def family_conv1d(rng, scale):
    out = []
    for _ in range(int(60 * scale)):
        k = _pick(rng, [1, 3, 5, 7])
        out.append(_conv_config(rng, "conv1d", int(rng.integers(1, 65)), int(rng.integers(1, 65)), (k,),
                                (int(rng.integers(1, 5)),), (int(rng.integers(1, 3)),), _pick(rng, ["valid", "same"]),
                                (int(rng.integers(64, 257)),)))
    return out


def family_conv3d(rng, scale):
    out = []
    for _ in range(int(40 * scale)):
        kernel = _pick(rng, [(1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1)])
        s = int(rng.integers(1, 3))
        spatial = (int(rng.integers(4, 13)), *(int(rng.integers(12, 29)),) * 2)
        out.append(_conv_config(rng, "conv3d", int(rng.integers(1, 33)), int(rng.integers(1, 33)), kernel,
                                (1 if kernel[0] == 1 and rng.random() < 0.5 else s, s, s), (1, 1, 1),
                                _pick(rng, ["valid", "same"]), spatial, batch=16))
    return out


def _group_config(family, c_in, c_out, groups, k, s, padding, hw):
    kernel, strides, dil = (k, k), (s, s), (1, 1)
    pb, pe = same_pads((hw, hw), kernel, strides, dil) if padding == "same" else ([0, 0], [0, 0])
    params = dict(cin=c_in, cout=c_out, groups=groups, kernel=list(kernel), strides=list(strides), pad=padding,
                  spatial=[hw, hw])
    return Config(family, params, (BATCH, c_in, hw, hw), conv(c_in, c_out, kernel, strides, dil, pb, pe, groups, True))


def family_depthwise(rng, scale):
    out = []
    for c in range(1, 65):
        for k, s in itertools.product((3, 5), (1, 2)):
            if rng.random() < scale:
                out.append(_group_config("depthwise", c, c, c, k, s, _pick(rng, ["valid", "same"]),
                                         int(rng.integers(28, 57))))
    return out


def family_grouped(rng, scale):
    out = []
    for groups in (2, 4, 32):
        for _ in range(int(15 * scale)):
            ig, og = _pick(rng, [1, 2, 3, 4, 8, 16]), _pick(rng, [1, 2, 3, 4, 8, 16])
            if groups == 32:
                ig, og = min(ig, 4), min(og, 4)
            out.append(_group_config("grouped", groups * ig, groups * og, groups, _pick(rng, [1, 3]),
                                     _pick(rng, [1, 2]), _pick(rng, ["valid", "same"]), int(rng.integers(28, 57))))
    return out


def _dim(rng, top):
    """1..top, log-uniform, half the time a multiple of 8 (the kernels' blocking)."""
    v = int(round(math.exp(rng.uniform(0, math.log(top)))))
    if rng.random() < 0.5:
        v = max(8, v - v % 8)
    return min(max(v, 1), top)


def family_matmul(rng, scale):
    out = []
    for _ in range(int(150 * scale)):
        k, n, b = _dim(rng, 256), _dim(rng, 256), _dim(rng, 64)
        three_d = rng.random() < 0.4
        shape = (b, _dim(rng, 32), k) if three_d else (b, k)
        tb = bool(rng.random() < 0.5)
        out.append(Config("matmul3d" if three_d else "matmul", dict(shape=list(shape), n=n, transpose_b=tb), shape,
                          matmul(k, n, tb)))
    return out


def family_deconv(rng, scale):
    out = []
    for _ in range(int(40 * scale)):
        k = _pick(rng, [2, 3, 4])
        pad = int(rng.integers(0, 2)) if k > 2 else 0
        outpad = int(rng.integers(0, 2)) if k == 3 else 0
        cin, cout, hw = int(rng.integers(1, 65)), int(rng.integers(1, 65)), int(rng.integers(8, 29))
        params = dict(cin=cin, cout=cout, kernel=[k, k], strides=[2, 2], pads=pad, output_padding=outpad,
                      spatial=[hw, hw])
        out.append(Config("deconv", params, (BATCH, cin, hw, hw),
                          deconv(cin, cout, (k, k), (2, 2), (pad, pad), (pad, pad), (outpad, outpad))))
    return out


def family_residual(rng, scale):
    out = []
    for _ in range(int(40 * scale)):
        cin, cout, hw = int(rng.integers(1, 65)), int(rng.integers(1, 65)), int(rng.integers(28, 57))
        s = _pick(rng, [1, 2])
        k = _pick(rng, [1, 3])
        pb, pe = same_pads((hw, hw), (k, k), (s, s), (1, 1))
        first = conv(cin, cout, (k, k), (s, s), (1, 1), pb, pe)
        kind = _pick(rng, ["conv+conv1x1", "conv+conv1x1(FQ)", "conv+input"])
        if kind == "conv+input":
            cout, s = cin, 1
            first = conv(cin, cin, (k, k), (1, 1), (1, 1), *same_pads((hw, hw), (k, k), (1, 1), (1, 1)))
            build = identity_residual(first)
        else:
            second = conv(cin, cout, (1, 1), (s, s), (1, 1), [0, 0], [0, 0])
            if (hw + s - 1) // s != (hw - 1) // s + 1:
                continue
            build = residual(first, second, kind.endswith("(FQ)"))
        out.append(Config("residual", dict(kind=kind, cin=cin, cout=cout, kernel=[k, k], strides=[s, s],
                                           spatial=[hw, hw]), (BATCH, cin, hw, hw), build))
    return out


def family_pool(rng, scale):
    out = []
    for _ in range(int(40 * scale)):
        k, s = _pick(rng, [2, 3, 7]), _pick(rng, [1, 2])
        pad = int(rng.integers(0, 2)) if k == 3 else 0
        c, hw = int(rng.integers(1, 65)), int(rng.integers(28, 57))
        excl = bool(rng.random() < 0.5)
        out.append(Config("avgpool", dict(c=c, kernel=[k, k], strides=[s, s], pads=pad, exclude_pad=excl,
                                          spatial=[hw, hw]), (BATCH, c, hw, hw),
                          avg_pool((k, k), (s, s), (pad, pad), (pad, pad), excl)))
    for _ in range(int(20 * scale)):
        k = _pick(rng, [2, 3])
        c, hw = int(rng.integers(1, 65)), int(rng.integers(28, 57))
        out.append(Config("maxpool", dict(c=c, kernel=[k, k], strides=[2, 2], spatial=[hw, hw]), (BATCH, c, hw, hw),
                          max_pool((k, k), (2, 2))))
    for _ in range(int(20 * scale)):
        c, hw = int(rng.integers(1, 65)), int(rng.integers(7, 57))
        axes = _pick(rng, [[2, 3], [1], [1, 2, 3]])
        keep = bool(rng.random() < 0.5) or axes == [1]
        out.append(Config("reducemean", dict(c=c, axes=axes, keep_dims=keep, spatial=[hw, hw]), (BATCH, c, hw, hw),
                          reduce_mean(axes, keep), tail=axes != [1, 2, 3] or keep))
    return out


FAMILIES = {"conv1x1": family_conv1x1, "conv2d": family_conv2d, "conv1d": family_conv1d, "conv3d": family_conv3d,
            "depthwise": family_depthwise, "grouped": family_grouped, "matmul": family_matmul,
            "deconv": family_deconv, "residual": family_residual, "pool": family_pool}


# ------------------------------------------------------------------------------------------------ the check

_SKIP_LAYERS = {"Input", "Output", "Reorder", "Const", "Parameter", "Result", "Constant"}


def primitives(compiled) -> list[str]:
    found = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str)
        if layer not in _SKIP_LAYERS:
            found.append(f"{layer}:{rt['primitiveType'].astype(str)}")
    return found


def wrong(a, b, unit):
    return np.abs(a - b) > 1.5 * unit + 4e-6 * np.maximum(np.abs(a), np.abs(b))


def run_config(core, cfg: Config, rng, calls: int, rewrite: Callable | None = None) -> dict:
    import openvino as ov

    ops = _ops()
    p = ops.parameter(list(cfg.in_shape), np.float32, name="x")
    x_fq = _fq(p, 0.0, 4.0)
    built = cfg.build(x_fq, rng)
    tail = "-"
    if cfg.tail:
        built, tail = with_tail(built, rng, cfg.in_shape)
    model = ov.Model([_output(built.node)], [p])
    if rewrite is not None:
        rewrite(model)
        model.validate_nodes_and_infer_types()
    xq = rng.integers(0, 256, cfg.in_shape)
    x = (xq * SX).astype(np.float32)
    multi = core.compile_model(model, "CPU", F32)
    single = core.compile_model(model, "CPU", {**F32, "INFERENCE_NUM_THREADS": 1})
    one = single({0: x})[0].astype(np.float64)
    runs = [multi({0: x})[0].astype(np.float64) for _ in range(calls)]
    bad = [wrong(r, one, built.unit) for r in runs]
    fracs = [float(b.mean()) for b in bad]
    exact = max(float(np.mean(r != one)) for r in runs)
    differing = np.any(np.stack(bad).reshape(calls, one.shape[0], -1), axis=(0, 2))  # per batch item
    items = sorted({0} | set(np.nonzero(differing)[0][:3].tolist()))
    ref = built.ref(xq[items])
    worst = int(np.argmax(fracs))
    result = dict(family=cfg.family, params=cfg.params, tail=tail, outputs=int(one.size),
                  frac_wrong=fracs, exact_diff=exact,
                  max_diff_units=float(np.max(np.abs(np.stack(runs) - one)) / built.unit),
                  single_vs_ref=float(wrong(one[items], ref, built.unit).mean()),
                  multi_vs_ref=float(wrong(runs[worst][items], ref, built.unit).mean()),
                  prim_multi=primitives(multi), prim_single=primitives(single))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each family's sample")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--rewrite", action="store_true",
                    help="apply tfcompress' rewrite_for_cpu to each model first (needs tfcompress on PYTHONPATH)")
    args = ap.parse_args()
    names = args.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; choose from {sorted(FAMILIES)}", file=sys.stderr)
        sys.exit(2)

    import openvino as ov

    rewrite = None
    if args.rewrite:
        from tfcompress.calibration.placement import rewrite_for_cpu as rewrite
    core = ov.Core()
    rng = np.random.default_rng(args.seed)
    configs = [c for n in names for c in FAMILIES[n](rng, args.scale)]
    print(f"openvino {ov.get_version()}, {len(configs)} configurations, {args.calls} calls each", flush=True)
    out = open(args.out, "w") if args.out else None
    summary = collections.defaultdict(lambda: [0, 0, 0.0])  # (family, primitive) -> [configs, failing, max frac]
    start = time.perf_counter()
    for k, cfg in enumerate(configs):
        res = run_config(core, cfg, np.random.default_rng([args.seed, k]), args.calls, rewrite)
        failing = max(res["frac_wrong"]) > 0 or res["single_vs_ref"] > 0 or res["multi_vs_ref"] > 0
        main_prims = tuple(sorted({p for p in res["prim_multi"] if not p.startswith(("FakeQuantize", "Eltwise"))}))
        strides = cfg.params.get("strides")
        key = (cfg.family + ("" if strides is None else " stride>1" if max(strides) > 1 else " stride 1"), main_prims)
        summary[key][0] += 1
        summary[key][1] += failing
        summary[key][2] = max(summary[key][2], max(res["frac_wrong"]))
        if failing:
            print(json.dumps(res), flush=True)
        if out:
            out.write(json.dumps(res) + "\n")
            out.flush()
    print(f"\n{len(configs)} configurations in {time.perf_counter() - start:.0f} s\n", flush=True)
    print("| family | primitives (multi-threaded) | configs | differing | max fraction wrong |")
    print("|---|---|---|---|---|")
    for (family, prims), (n, f, frac) in sorted(summary.items()):
        print(f"| {family} | {', '.join(prims)} | {n} | {f} | {frac:.2e} |")


if __name__ == "__main__":
    main()

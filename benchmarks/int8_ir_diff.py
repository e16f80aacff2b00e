"""Two INT8 IRs of the same FP32 IR (ours and nncf's), constant by constant, and how far apart their outputs'
distances from FP32 can be from float rounding alone.

    python benchmarks/int8_ir_diff.py OURS.xml NNCF.xml
    python benchmarks/int8_ir_diff.py OURS.xml NNCF.xml --fp32 FP32.xml --images HELD.npy [--jitter 4]

(1) Under every op of the original model (matched by friendly name, which both calibrators keep), the two
    IRs' subgraphs are walked in parallel and every constant is compared bitwise: activation FakeQuantize
    ranges, int8 weights and their scales, bias constants after bias correction. A different op type or
    shape on the way is reported too (a quantizer one IR has and the other has not).
(2) With ``--fp32`` and ``--images`` (N, ...) float32 samples: per image KL(FP32 || INT8) of the softmax
    outputs (FP32 compiled with the f32 hint; each INT8 IR with the f32 hint and with the plugin's default),
    the mean difference ours - nncf and its paired standard error. ``--jitter K`` adds K copies of nncf's IR
    with every bias multiplied by (1 + 1e-6 N(0, 1)), a float-rounding-sized change: the spread of their KL
    is how much two IRs equal up to rounding can differ (activations near a rounding boundary of a quantizer
    flip to the next level), the resolution below which a KL difference says nothing about a calibrator.
"""

from __future__ import annotations

import argparse

import numpy as np

import common  # benchmarks/common.py (the script's directory is on sys.path)

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def constant_differences(ours, theirs) -> list[tuple[float, str]]:
    """(largest difference relative to nncf's largest value, description) per constant that differs."""
    by_name = {op.get_friendly_name(): op for op in theirs.get_ordered_ops()}
    rows: list[tuple[float, str]] = []

    def walk(x, y, path: str, top: bool) -> None:
        nx, ny = x.get_node(), y.get_node()
        if nx.get_type_name() != ny.get_type_name():
            rows.append((np.inf, f"{path}: {nx.get_type_name()} vs {ny.get_type_name()}"))
        elif nx.get_type_name() == "Constant":
            a, b = nx.get_data(), ny.get_data()
            if a.shape != b.shape or a.dtype != b.dtype:
                rows.append((np.inf, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"))
            elif not np.array_equal(a, b):
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                rows.append((float(d.max() / max(float(np.abs(b).max()), 1e-30)),
                             f"{path}: {a.dtype}{a.shape}, {int((d > 0).sum())}/{d.size} differ, max {d.max():.3g}"))
        elif top or nx.get_friendly_name() not in by_name:  # another original op is compared on its own
            for i, (u, v) in enumerate(zip(nx.input_values(), ny.input_values())):
                walk(u, v, f"{path}/{nx.get_type_name()}[{i}]", False)

    for op in ours.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() not in ("Constant", "Parameter") and name in by_name:
            walk(op.output(0), by_name[name].output(0), name, True)
    return sorted(rows, key=lambda r: -r[0])


def jittered(model, seed: int):
    """A copy of ``model`` with each constant bias of a weighted op times (1 + 1e-6 N(0, 1))."""
    import openvino.opset13 as ops

    m, rng = model.clone(), np.random.default_rng(seed)
    for op in m.get_ordered_ops():
        readers = list(op.output(0).get_target_inputs()) if op.get_output_size() == 1 else []
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul") or len(readers) != 1:
            continue
        add = readers[0].get_node()
        if add.get_type_name() != "Add" or add.input_value(1).get_node().get_type_name() != "Constant":
            continue
        b = add.input_value(1).get_node().get_data().astype(np.float32)
        noisy = (b * (1 + 1e-6 * rng.standard_normal(b.shape))).astype(np.float32)
        add.input(1).replace_source_output(ops.constant(noisy).output(0))
    return m


def kl_per_image(core, model, config: dict, x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The model's softmax outputs over ``x`` or, with ``reference``, KL(reference || outputs) per image."""
    out = common.outputs(core.compile_model(model, "CPU", config), x, 25).astype(np.float64)
    return out if reference is None else common.kl_per_row(reference, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours")
    ap.add_argument("nncf")
    ap.add_argument("--fp32", help="the FP32 IR both were calibrated from")
    ap.add_argument("--images", help=".npy of held-out float32 samples")
    ap.add_argument("--jitter", type=int, default=0, help="copies of nncf's IR with rounding-sized bias noise")
    ap.add_argument("--show", type=int, default=20, help="differing constants to list")
    args = ap.parse_args()
    import openvino as ov

    core = ov.Core()
    ours, nncf = core.read_model(args.ours), core.read_model(args.nncf)
    rows = constant_differences(ours, nncf)
    print(f"{len(rows)} constants differ (largest relative difference first)")
    for rel, text in rows[:args.show]:
        print(f"  {rel:.2e}  {text}")
    if not (args.fp32 and args.images):
        return
    x = np.load(args.images)
    ref = kl_per_image(core, core.read_model(args.fp32), F32, x)
    models = {"ours": ours, "nncf": nncf} | {f"nncf jitter {k}": jittered(nncf, k) for k in range(args.jitter)}
    for hint, config in (("f32 hint", F32), ("default precision", {})):
        kl = {name: kl_per_image(core, m, config, x, ref) for name, m in models.items()}
        print(f"{hint}: KL x1e-3 on {len(x)} images: " + ", ".join(f"{k} {1e3 * v.mean():.3f}" for k, v in kl.items()))
        d = kl["ours"] - kl["nncf"]
        print(f"  ours - nncf {1e3 * d.mean():+.3f} +- {1e3 * d.std(ddof=1) / np.sqrt(len(d)):.3f} (paired SE)")
        if args.jitter:
            spread = [1e3 * v.mean() for k, v in kl.items() if k.startswith("nncf")]
            print(f"  nncf and its {args.jitter} jittered copies: {min(spread):.3f} .. {max(spread):.3f}")


if __name__ == "__main__":
    main()

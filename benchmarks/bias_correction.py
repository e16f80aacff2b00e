"""Fast bias correction's rules side by side: which layers and channels receive their shift, against nncf and FP32.

    /work/venv/bin/python benchmarks/bias_correction.py --models resnet8,vww,pruned,mobilenetv2
        [--sets 0,1,2,3,4] [--variants sens_e2_p1,gpf_e2_p1] [--n_eval 2000] [--work DIR]
        [--nncf_python /work/venv-nncf/bin/python]

Every rule calibrates the same FP32 IR on the same samples in one run (``calibration.calibrate`` with the rule
swapped in), nncf.quantize calibrates it once per calibration set (in its own environment), and each INT8 model
is compared with the FP32 IR (f32 hint): agreement of the argmax, mean KL(FP32 || INT8) of the softmax outputs,
and the accuracy on real labels where the model has them. Each INT8 model is compiled with the f32 hint and at
the plugin's default precision (bf16 for the float layers on CPUs with AVX512-BF16 or AMX).

Rules (``all+dw`` is ``calibrate``'s own):
- ``layer``: a layer is shifted only when every channel's shift is below twice its bias and no bias is 0 (NNCF's
  rule).
- ``channel``: each channel is shifted when its shift is below twice its bias; the others keep their bias.
- ``all``: every channel is shifted.
- ``+dw``: grouped and depthwise convolutions are corrected too (``GroupConvolution``).

Models:
- ``resnet8``: MLPerf Tiny ResNet-8; calibration sets of 300 random CIFAR-10 training JPEGs
  (``benchmarks/calibration.py``'s five sets; ``--sets`` picks some), evaluation on the 10,000 test JPEGs.
- ``vww``: MLPerf Tiny VWW MobileNetV1-0.25 (``benchmarks/vww_int8.py``): calibration on CIFAR-10 test images
  [0:300] at 96x96, evaluation on [300:300 + n_eval], no labels.
- ``pruned``: ResNet-8s pruned to 40 % fewer FLOPs as in ``benchmarks/pruned_int8.py`` (``--variants``);
  calibration on 300 fine-tuning images, evaluation on the 2,000 held-out ones. The pruned models' IRs are kept
  in ``--work`` and reused.
- ``mobilenetv2_trained``: keras.applications MobileNetV2 (alpha 0.5) at 32x32 trained from scratch on the
  first ``--train_images`` shuffled CIFAR-10 training JPEGs (``--epochs``, Adam 1e-3, BatchNorm momentum 0.9);
  calibration sets of 300 of the training images after those (``--sets``), evaluation on the 10,000 test JPEGs.
- ``mobilenetv2``: keras.applications MobileNetV2 at 96x96 (random weights, BatchNorm statistics from CIFAR-10
  images: ``benchmarks/calibration.py``'s ``app_ir``): calibration on 300 test images, evaluation on 500 others,
  no labels.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402
import vww_int8  # noqa: E402

NNCF_PYTHON = "/work/venv-nncf/bin/python"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _layer_rule(shift, bias):
    """NNCF's: the whole layer, when no bias is 0 and every channel's shift is below twice its bias."""
    return shift if np.all(bias != 0) and np.max(np.abs(shift / bias)) < 2.0 else None


def _channel_rule(shift, bias):
    """Each channel whose shift is below twice its bias."""
    return np.where(np.abs(shift) < 2.0 * np.abs(bias), shift, np.float32(0)).astype(np.float32)


RULES = {"layer": _layer_rule, "channel": _channel_rule, "all": lambda shift, bias: shift}


def calibrate_with(fp, calib, rule: str):
    """``calibration.calibrate`` (defaults) with the shifts ``rule`` accepts, on Convolution and MatMul layers
    or (``+dw``) on GroupConvolution layers too (``"none"``: no bias correction); and (layers shifted, channels
    shifted)."""
    from tfcompress import calibration
    from tfcompress.calibration import quantize

    if rule == "none":
        return calibration.calibrate(fp, calib, bias_correction=False, verbose=False), (0, 0)
    name, dw = rule.removesuffix("+dw"), rule.endswith("+dw")
    counts = [0, 0]
    kept = quantize.fast_bias_shifts, quantize.BIAS_CORRECTED_OPS

    def shifts(points, stats):
        accepted, raw = {}, kept[0](points, stats)
        for wp, _, _ in points:
            shift = raw.get(wp.key)
            out = None if shift is None else RULES[name](shift, quantize._bias_value(wp.op).reshape(-1))
            if out is not None and np.any(out != 0):
                accepted[wp.key] = out
                counts[0] += 1
                counts[1] += int(np.count_nonzero(out))
        return accepted

    quantize.fast_bias_shifts = shifts
    quantize.BIAS_CORRECTED_OPS = frozenset({"Convolution", "MatMul"} | ({"GroupConvolution"} if dw else set()))
    try:
        return calibration.calibrate(fp, calib, verbose=False), tuple(counts)
    finally:
        quantize.fast_bias_shifts, quantize.BIAS_CORRECTED_OPS = kept


def nncf_model(fp, calib, work: str, name: str):
    import openvino as ov

    xml = os.path.join(work, name + "_fp32.xml")
    ov.save_model(fp, xml, compress_to_fp16=False)
    out, _ = vww_int8.run_nncf(NNCF_PYTHON, xml, np.ascontiguousarray(calib, np.float32), work, name=name + "_nncf")
    return ov.Core().read_model(out)


def compare(title: str, fp, calib_sets: list, x, y, rules: list[str], work: str, batch: int = 100) -> None:
    """Every rule and nncf on each calibration set; the table of means over the sets."""
    import openvino as ov

    core = ov.Core()
    ref = common.outputs(core.compile_model(fp, "CPU", F32), x, batch)
    rows: dict = {}
    counts: dict = {}

    def add(label, q):
        for hint, config in (("f32 hint", F32), ("default", {})):
            out = common.outputs(core.compile_model(q, "CPU", config), x, batch)
            r = rows.setdefault(f"{label} ({hint})", {"acc": [], "agree": [], "kl": []})
            if y is not None:
                r["acc"].append(float((out.argmax(1) == y).mean()))
            r["agree"].append(float((out.argmax(1) == ref.argmax(1)).mean()))
            r["kl"].append(common.kl_divergence(ref, out))

    for k, calib in enumerate(calib_sets):
        add("nncf.quantize", nncf_model(fp, calib, work, f"{title.split()[0]}_{k}"))
        for rule in rules:
            q, n = calibrate_with(fp, calib, rule)
            counts.setdefault(rule, []).append(n)
            add(f"ours, {rule}", q)
        print(f"  {title}: set {k} done", file=sys.stderr, flush=True)
    fp_acc = f", FP32 accuracy {100 * float((ref.argmax(1) == y).mean()):.2f} %" if y is not None else ""
    print(f"\n{title}: {len(calib_sets)} calibration set(s), {len(x)} evaluation samples{fp_acc}")
    print("| model | accuracy % | std | agreement with FP32 % | KL from FP32 (x1e-3) | layers / channels shifted |\n"
          "|---|---|---|---|---|---|")
    for label, r in rows.items():
        acc = (f"{100 * np.mean(r['acc']):.2f} | {100 * np.std(r['acc']):.2f}" if r["acc"] else "- | -")
        rule = label.removeprefix("ours, ").rsplit(" (", 1)[0]
        n = "/".join(f"{np.mean([c[i] for c in counts[rule]]):.0f}" for i in (0, 1)) if rule in counts else "-"
        print(f"| {label} | {acc} | {100 * np.mean(r['agree']):.2f} | {1000 * np.mean(r['kl']):.3f} | {n} |")
    if len(calib_sets) > 1:
        for label in rows:
            if label.startswith("ours") and rows[label]["acc"]:
                base = rows[label.replace(label.split(" (")[0], "nncf.quantize")]["acc"]
                diff = 100 * (np.asarray(rows[label]["acc"]) - np.asarray(base))
                print(f"per set, {label} - nncf (points): " + ", ".join(f"{d:+.2f}" for d in diff))
    sys.stdout.flush()


def resnet8(args, work: str, rules: list[str]) -> None:
    import keras
    import openvino as ov

    from tfcompress.export import to_onnx, to_openvino

    x, y = common.cifar10_test()
    xml = os.path.join(work, "r8.xml")
    if not os.path.exists(xml):
        keras.models.load_model(common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet.h5",
                                compile=False).export(os.path.join(work, "r8_sm"), verbose=False)
        to_onnx(os.path.join(work, "r8_sm"), os.path.join(work, "r8.onnx"))
        to_openvino(os.path.join(work, "r8.onnx"), xml)
    x_train, _ = common.cifar10_train()
    rng = np.random.default_rng(0)  # benchmarks/calibration.py's five sets, in its order
    sets = [x_train[rng.choice(len(x_train), 300, replace=False)].astype(np.float32) for _ in range(5)]
    picked = [sets[int(k)] for k in args.sets.split(",")]
    compare(f"resnet8 (sets {args.sets})", ov.Core().read_model(xml), picked, x.astype(np.float32), y, rules, work,
            500)


def vww(args, work: str, rules: list[str]) -> None:
    import openvino as ov

    calib, held_out = vww_int8.vww_data(n_eval=args.n_eval)
    compare("vww", ov.Core().read_model(vww_int8.vww_ir(work)), [calib], held_out, None, rules, work)


def pruned(args, work: str, rules: list[str]) -> None:
    import openvino as ov

    import pruned_int8

    data = pruned_int8.split()
    for variant in args.variants.split(","):
        xml = os.path.join(work, variant + ".xml")
        if not os.path.exists(xml):
            pruned_int8.to_ir(pruned_int8.pruned(variant, data), work, variant)
        compare(f"pruned {variant}", ov.Core().read_model(xml), [np.ascontiguousarray(data[0][:300])], data[2],
                data[3], rules, work, 200)


def mobilenetv2(args, work: str, rules: list[str]) -> None:
    import calibration

    fp, calib, held_out = calibration.app_ir("MobileNetV2", work, 96)
    compare("mobilenetv2 96x96", fp, [calib], held_out, None, rules, work)


def mobilenetv2_trained(args, work: str, rules: list[str]) -> None:
    """keras.applications MobileNetV2 (alpha 0.5) at 32x32 trained from scratch on CIFAR-10 training JPEGs."""
    import keras
    import openvino as ov

    import pruned_int8

    x_train, y_train = common.cifar10_train_shuffled()
    prep = lambda a: (a.astype(np.float32) / 127.5 - 1.0)  # noqa: E731
    xml = os.path.join(work, "mnv2_trained.xml")
    if not os.path.exists(xml):
        keras.utils.set_random_seed(0)
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.5, classes=10)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        model.fit(prep(x_train[:args.train_images]), y_train[:args.train_images], epochs=args.epochs, batch_size=64,
                  verbose=0)
        pruned_int8.to_ir(model, work, "mnv2_trained")
    x, y = common.cifar10_test()
    sets = [prep(x_train[args.train_images + 300 * int(k):][:300]) for k in args.sets.split(",")]
    compare(f"mobilenetv2 trained 32x32 (sets {args.sets})", ov.Core().read_model(xml), sets, prep(x), y, rules,
            work, 500)


def main() -> None:
    global NNCF_PYTHON
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet8,vww,pruned,mobilenetv2")
    ap.add_argument("--rules", default="none,layer,channel,all,layer+dw,channel+dw,all+dw")
    ap.add_argument("--sets", default="0,1,2,3,4", help="ResNet-8 (of 5) and trained MobileNetV2 calibration sets")
    ap.add_argument("--variants", default="sens_e2_p1,gpf_e2_p1", help="pruned ResNet-8s (pruned_int8.py's names)")
    ap.add_argument("--n_eval", type=int, default=2000, help="VWW evaluation images (at most 9,700)")
    ap.add_argument("--epochs", type=int, default=4, help="mobilenetv2_trained: training epochs")
    ap.add_argument("--train_images", type=int, default=20000, help="mobilenetv2_trained: training images")
    ap.add_argument("--work", default=None, help="directory for IRs, reused between runs")
    ap.add_argument("--nncf_python", default=NNCF_PYTHON)
    args = ap.parse_args()
    NNCF_PYTHON = args.nncf_python
    import tempfile

    work = args.work or tempfile.mkdtemp(prefix="tfcompress-bias-")
    os.makedirs(work, exist_ok=True)
    print(common.machine())
    rules = args.rules.split(",")
    for name in args.models.split(","):
        {"resnet8": resnet8, "vww": vww, "pruned": pruned, "mobilenetv2": mobilenetv2,
         "mobilenetv2_trained": mobilenetv2_trained}[name](args, work, rules)


if __name__ == "__main__":
    main()

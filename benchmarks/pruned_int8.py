"""INT8 calibration of pruned ResNet-8s: ours (with and without bias correction) vs nncf.quantize, side by side.

    /work/venv/bin/python benchmarks/pruned_int8.py [--variants unpruned,sens_e2_p1,gpf_e2_p1,sens_e5_p3,gpf_e5_p3]
        [--qat_epochs 2] [--nncf_python /work/venv-nncf/bin/python] [--baseline_src /path/to/older/checkout]

The MLPerf Tiny ResNet-8 (pretrained) is pruned to 40 % fewer FLOPs during a short fine-tune, as a user would
(``FilterPruning(flops_target=0.4, criterion="l1", prune_downsample_convs=True)``, Adam 1e-4, batch 64): the
CIFAR-10 JPEG test images in a fixed random order, [0:8000] to fine-tune, [8000:10000] held out. Variants are
``<allocation>_e<epochs>_p<pruning_epochs>``: ``sens`` is ``flops_allocation="sensitivity"`` with the held-out
images as ``sensitivity_data``, ``gpf`` is ``"global_per_flop"`` with ``compensation_data`` (512 fine-tuning
images). Each stripped model goes SavedModel -> ONNX -> OpenVINO FP32 IR; the IR is calibrated on the first 300
fine-tuning images by ``calibration.calibrate`` (default options; and ``bias_correction=False``) and by
``nncf.quantize`` (defaults, in its own environment), and every model is measured on the 2,000 held-out images:
accuracy, agreement of the argmax with the FP32 IR's, mean KL(FP32 || INT8). INT8 models are compiled with the
f32 hint and at the plugin's default precision. With ``--qat_epochs``, each pruned model is also fine-tuned
quantization-aware (``quantize_model``, ``RangeInit``, Adam 1e-4) and its IR measured (it runs INT8 itself).
With ``--baseline_src``, the same IR is also calibrated by the ``tfcompress`` of another checkout (a subprocess
with that checkout on its path), to compare two versions of the calibration on the same models.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402
import vww_int8  # noqa: E402

RESNET8 = common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet.h5"
NNCF_PYTHON = "/work/venv-nncf/bin/python"

BASELINE_SCRIPT = """
import sys, numpy as np, openvino as ov
sys.path.insert(0, sys.argv[1])
from tfcompress import calibration
q = calibration.calibrate(sys.argv[2], np.load(sys.argv[3]), verbose=False)
ov.save_model(q, sys.argv[4])
"""


def baseline_calibrate(src: str, xml: str, calib: np.ndarray, work: str):
    """``calibration.calibrate`` (defaults) of the checkout at ``src``, in a subprocess: the INT8 model."""
    import subprocess

    import openvino as ov

    npy, out = os.path.join(work, "baseline_calib.npy"), os.path.join(work, "baseline.xml")
    np.save(npy, calib)
    subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, src, xml, npy, out], check=True, capture_output=True)
    return ov.Core().read_model(out)


def split():
    """(fine-tuning x, y, held-out x, y): the test JPEGs in a fixed random order, 8,000 / 2,000."""
    x, y = common.cifar10_test()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int64")
    return x[:8000], y[:8000], x[8000:], y[8000:]


def pruned(variant: str, data):
    """The stripped Keras model of ``variant`` (``unpruned`` or ``<allocation>_e<epochs>_p<pruning_epochs>``)."""
    import keras

    import tfcompress
    from tfcompress.pruning import FilterPruning

    xtr, ytr, xva, yva = data
    keras.utils.set_random_seed(0)
    model = keras.models.load_model(RESNET8, compile=False)
    if variant == "unpruned":
        return model
    allocation, epochs, pruning_epochs = variant.split("_")
    options = dict(flops_target=0.4, criterion="l1", prune_downsample_convs=True,
                   pruning_epochs=int(pruning_epochs[1:]))
    if allocation == "sens":
        options.update(flops_allocation="sensitivity", sensitivity_data=(xva, yva))
    else:
        options.update(flops_allocation="global_per_flop", compensation_data=xtr[:512])
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=int(epochs[1:]), batch_size=64, callbacks=[FilterPruning(**options)], verbose=0)
    return tfcompress.strip(model)


def to_ir(model, work: str, name: str) -> str:
    """``model`` exported as a SavedModel, converted to ONNX and to an OpenVINO FP32 IR: the IR's path."""
    from tfcompress.export import to_onnx, to_openvino

    sm, onnx, xml = (os.path.join(work, name + ext) for ext in ("_sm", ".onnx", ".xml"))
    model.export(sm, verbose=False)
    to_onnx(sm, onnx)
    to_openvino(onnx, xml)
    return xml


def qat(model, data, epochs: int):
    """A quantization-aware copy of ``model`` fine-tuned ``epochs`` epochs on the fine-tuning images."""
    import keras

    import tfcompress.quantization as tq

    xtr, ytr, _, _ = data
    q = tq.quantize_model(model, preset="performance", per_channel_weights=True)
    q.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    q.fit(xtr, ytr, epochs=epochs, batch_size=64, callbacks=[tq.RangeInit(num_batches=16)], verbose=0)
    return q


def row(label: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> str:
    """A table row: accuracy, argmax agreement with ``ref`` (the FP32 outputs) and mean KL(ref || out)."""
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    return (f"| {label} | {100 * float((out.argmax(1) == y).mean()):.2f} | {100 * agree:.2f} | "
            f"{common.kl_divergence(ref, out):.4f} |")


def measure(variant: str, data, work: str, nncf_python: str, qat_epochs: int, baseline_src: str | None) -> None:
    """Prune (or not), convert, calibrate every way and print the variant's table."""
    import openvino as ov

    from tfcompress import calibration

    xtr, _, xva, yva = data
    model = pruned(variant, data)
    core = ov.Core()
    fp = core.read_model(to_ir(model, work, variant))
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    ref = common.outputs(core.compile_model(fp, "CPU", f32), xva, 200)
    calib = np.ascontiguousarray(xtr[:300])
    xml = os.path.join(work, variant + ".xml")
    nncf_xml, _ = vww_int8.run_nncf(nncf_python, xml, calib, work, name=variant + "_nncf")
    int8 = {
        "tfcompress INT8": calibration.calibrate(fp, calib, verbose=False),
        "tfcompress INT8, no bias correction": calibration.calibrate(fp, calib, bias_correction=False, verbose=False),
        "nncf.quantize INT8": core.read_model(nncf_xml),
    }
    if baseline_src:
        int8[f"tfcompress INT8 of {baseline_src}"] = baseline_calibrate(baseline_src, xml, calib, work)
    print(f"\n{variant}: {model.count_params():,} parameters\n")
    print("| model | accuracy % | agreement with FP32 % | KL from FP32 |\n|---|---|---|---|")
    print(row("OpenVINO FP32 (f32 hint)", ref, ref, yva))
    for label, q in int8.items():
        for hint, config in (("f32 hint", f32), ("default precision", {})):
            print(row(f"{label} ({hint})", common.outputs(core.compile_model(q, "CPU", config), xva, 200), ref, yva))
    if qat_epochs and variant != "unpruned":
        qir = core.read_model(to_ir(qat(model, data, qat_epochs), work, variant + "_qat"))
        print(row(f"QAT {qat_epochs} epochs after pruning, its IR (default precision)",
                  common.outputs(core.compile_model(qir, "CPU"), xva, 200), ref, yva))
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="unpruned,sens_e2_p1,gpf_e2_p1,sens_e5_p3,gpf_e5_p3")
    ap.add_argument("--qat_epochs", type=int, default=0, help="also QAT each pruned model for this many epochs")
    ap.add_argument("--nncf_python", default=NNCF_PYTHON, help="a Python with nncf installed")
    ap.add_argument("--baseline_src", help="also calibrate with the tfcompress of this checkout")
    args = ap.parse_args()
    print(common.machine())
    data = split()
    with tempfile.TemporaryDirectory(prefix="tfcompress-pruned-int8-") as work:
        for variant in args.variants.split(","):
            measure(variant, data, work, args.nncf_python, args.qat_epochs, args.baseline_src)


if __name__ == "__main__":
    main()

"""INT8 calibration of models that are not image classifiers: tfcompress vs nncf on the same FP32 IR.

    flock /work/scratch/heavy.lock timeout 1800 /work/venv/bin/python benchmarks/int8_nonimage.py \
        [--nncf_python /work/scratch/calib/nncfvenv/bin/python] [--models ad01,cancer,...] [--work DIR] [--cli]
        [--accuracy_aware MAX_DROP]

Models (each Keras model -> ``model.export`` -> ONNX -> OpenVINO IR, as the export command makes it):
``ad01`` MLPerf Tiny anomaly-detection dense autoencoder (640 -> 640, regression; synthetic log-mel frames),
``cancer`` / ``wine`` / ``diabetes`` tabular MLPs trained on scikit-learn's bundled datasets (standardized
features; diabetes is a regression), ``signal`` a Conv1D classifier of synthetic 1-D signals, ``text`` an
Embedding + Conv1D classifier of synthetic token sequences, ``transformer`` a small encoder (MultiHeadAttention +
LayerNormalization + Dense) on the same tokens, ``masked_transformer`` the same on sequences padded with token 0
and ``Embedding(mask_zero=True)`` (a padding mask from the token ids), ``kws`` the MLPerf Tiny DS-CNN keyword-spotting SavedModel
(synthetic MFCC-like inputs), and ``resnet8`` (MLPerf Tiny, CIFAR-10 JPEG test images) as the image reference.

Every INT8 model is compared with the FP32 IR compiled with ``INFERENCE_PRECISION_HINT=f32`` on held-out samples:
relative RMS output error (RMS of the difference over RMS of the FP32 outputs) and, for classifiers, argmax
agreement. nncf runs in its own venv, in a subprocess, on the saved FP32 IR and the same calibration samples:
tfcompress never imports it. ``--cli`` also runs ``python -m tfcompress.export --calibration_data`` on each
SavedModel and reports its INT8 IR's error; ``--accuracy_aware MAX_DROP`` exports the regression models with
``int8="accuracy_aware"`` on unlabelled validation samples (the drop is then the relative RMS error against FP32),
with NNCF's estimator and with the default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import common  # noqa: E402

MLPERF = common.SHARED / "models" / "mlperf_tiny"
N_CALIB = 300

NNCF_SCRIPT = """
import sys, numpy as np, openvino as ov, nncf
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
from nncf.quantization.range_estimator import RangeEstimatorParametersSet
model = ov.Core().read_model(sys.argv[1])
calib = np.load(sys.argv[2])
variant = sys.argv[4]
kw = {}
if variant == "minmax":
    kw["advanced_parameters"] = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
elif variant == "mixed":
    kw["preset"] = nncf.QuantizationPreset.MIXED
elif variant == "transformer":
    kw["model_type"] = nncf.ModelType.TRANSFORMER
q = nncf.quantize(model, nncf.Dataset(list(calib[:, None])), subset_size=len(calib), **kw)
ov.save_model(q, sys.argv[3])
"""

NNCF_VARIANTS = ("default", "minmax", "mixed", "transformer")


# ---------------------------------------------------------------------------------------------------- models

def _fit(model, x, y, loss: str, epochs: int):
    model.compile("adam", loss)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def ad01(rng):
    """The pretrained autoencoder and log-mel-like frames: 5 frames x 128 mel bins in dB (the MLPerf Tiny
    reference features, ``10 log10`` of a mel power spectrogram), each clip a falling spectral envelope with
    its own level and tilt, frames correlated in time, 1 dB of noise. Level and tilt are the grid values that
    bring the first BatchNormalization's inputs closest to its moving statistics (mean 0, std ~1.5 after it)."""
    import keras

    model = keras.models.load_model(MLPERF / "ad01.h5", compile=False)
    n = 2 * N_CALIB + 700
    bins = np.arange(128)
    level = rng.normal(-10, 6, (n, 1, 1))
    tilt = rng.normal(-0.25, 0.08, (n, 1, 1))
    x = level + tilt * bins[None, None] + rng.normal(0, 1, (n, 1, 128)) + rng.normal(0, 0.7, (n, 5, 128))
    return model, x.reshape(n, 640).astype("float32"), None


def _tabular(loader, classes: int, rng):
    import keras
    from keras import layers as L

    data = loader()
    x = data.data.astype("float32")
    x = (x - x.mean(0)) / x.std(0)
    y = data.target.astype("float32" if classes == 0 else "int32")
    if classes == 0:
        y = (y - y.mean()) / y.std()
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    inp = keras.Input(x.shape[1:])
    h = L.Dense(64, activation="relu")(inp)
    h = L.Dense(32, activation="relu")(h)
    out = L.Dense(1 if classes == 0 else classes)(h)
    model = _fit(keras.Model(inp, out), x, y, "mse" if classes == 0 else
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True), 60)
    return model, x, y


def cancer(rng):
    from sklearn.datasets import load_breast_cancer

    return _tabular(load_breast_cancer, 2, rng)


def wine(rng):
    from sklearn.datasets import load_wine

    return _tabular(load_wine, 3, rng)


def diabetes(rng):
    from sklearn.datasets import load_diabetes

    return _tabular(load_diabetes, 0, rng)


def signal(rng):
    """Four classes of noisy 2-channel signals (128 steps): a sine of one of four frequencies, random phase."""
    import keras
    from keras import layers as L

    n = 2000
    y = rng.integers(0, 4, n)
    t = np.arange(128)[None, :, None]
    freq = (0.03 + 0.04 * y)[:, None, None]
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.3, (n, 1, 2))) * rng.uniform(0.5, 2, (n, 1, 2))
    x = (x + rng.normal(0, 0.5, x.shape)).astype("float32")
    inp = keras.Input((128, 2))
    h = L.Conv1D(16, 5, activation="relu")(inp)
    h = L.MaxPooling1D()(h)
    h = L.Conv1D(32, 3, padding="same", activation="relu")(h)
    out = L.Dense(4)(L.GlobalAveragePooling1D()(h))
    model = _fit(keras.Model(inp, out), x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 5)
    return model, x, y


def _tokens(rng, n: int = 2000, vocab: int = 200, length: int = 40):
    """Token sequences whose class is which of three marker token sets occurs most."""
    x = rng.integers(3 * 10, vocab, (n, length))
    y = rng.integers(0, 3, n)
    for i in range(n):
        pos = rng.choice(length, 4, replace=False)
        x[i, pos] = y[i] * 10 + rng.integers(0, 10, 4)
    return x.astype("int32"), y


def text(rng):
    import keras
    from keras import layers as L

    x, y = _tokens(rng)
    inp = keras.Input((40,), dtype="int32")
    h = L.Conv1D(32, 3, activation="relu")(L.Embedding(200, 16)(inp))
    out = L.Dense(3)(L.GlobalMaxPooling1D()(h))
    model = _fit(keras.Model(inp, out), x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 5)
    return model, x, y


def _encoder(x, y, mask_zero: bool):
    """One transformer encoder block on token ids ``x`` (0 = padding with ``mask_zero``), trained on ``y``."""
    import keras
    from keras import layers as L

    inp = keras.Input((40,), dtype="int32")
    h = L.Embedding(int(x.max()) + 1, 32, mask_zero=mask_zero)(inp)
    a = L.MultiHeadAttention(2, 16)(h, h)
    h = L.LayerNormalization()(h + a)
    f = L.Dense(32)(L.Dense(64, activation="relu")(h))
    h = L.LayerNormalization()(h + f)
    out = L.Dense(3)(L.GlobalAveragePooling1D()(h))
    return _fit(keras.Model(inp, out), x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 5)


def transformer(rng):
    x, y = _tokens(rng)
    return _encoder(x, y, mask_zero=False), x, y


def masked_transformer(rng):
    """``transformer`` on sequences padded with token 0 at random lengths, with ``Embedding(mask_zero=True)``: the
    attention gets a padding mask computed from the token ids."""
    x, y = _tokens(rng)
    x = x + 1
    for row, n in zip(x, rng.integers(20, 41, len(x))):
        row[n:] = 0
    return _encoder(x, y, mask_zero=True), x, y


def kws(rng):
    """The DS-CNN SavedModel (TF/Keras 2) and MFCC-like inputs: 49 frames x 10 coefficients, the first
    coefficient (log energy) large and varying per clip, the others shrinking with their index."""
    n = 2 * N_CALIB + 700
    scale = np.array([20.0] + [8.0 / k for k in range(1, 10)])
    x = rng.normal(0, 1, (n, 49, 10)) * scale + rng.normal(0, 1, (n, 1, 10)) * scale
    return str(MLPERF / "kws_ref_model_savedmodel" / "kws_ref_model"), x[..., None].astype("float32"), None


def resnet8(rng):
    import keras

    model = keras.models.load_model(MLPERF / "pretrainedResnet.h5", compile=False)
    x, y = common.cifar10_test()
    order = rng.permutation(len(x))[:2 * N_CALIB + 1000]
    return model, x[order].astype("float32"), y[order]


MODELS = {f.__name__: f for f in (ad01, cancer, wine, diabetes, signal, text, transformer, masked_transformer, kws,
                                   resnet8)}
CLASSIFIERS = {"cancer", "wine", "signal", "text", "transformer", "masked_transformer", "kws", "resnet8"}


# ------------------------------------------------------------------------------------------------- measuring

def ir_of(name: str, work: str, rng) -> tuple[str, str, np.ndarray]:
    """(SavedModel dir, FP32 IR path, samples) of a model, built once per ``work`` directory."""
    from tfcompress.export import to_onnx, to_openvino

    d = os.path.join(work, name)
    sm, xml, npy = os.path.join(d, "sm"), os.path.join(d, "fp32.xml"), os.path.join(d, "x.npy")
    if not os.path.exists(xml):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        model, x, y = MODELS[name](rng)
        if isinstance(model, str):
            shutil.copytree(model, sm)
        else:
            model.export(sm, verbose=False)
        to_onnx(sm, os.path.join(d, "m.onnx"))
        to_openvino(os.path.join(d, "m.onnx"), xml)
        np.save(npy, x)
    return sm, xml, np.load(npy)


def closeness(ref: np.ndarray, out: np.ndarray, classifier: bool) -> dict:
    """Relative RMS error of ``out`` against ``ref`` and, for a classifier, argmax agreement."""
    ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    r = {"rel_rms": float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2)))}
    if classifier:
        r["agree"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
    return r


def run_nncf(python: str, xml: str, calib: np.ndarray, variant: str, work: str) -> str | None:
    npy, out = os.path.join(work, "calib.npy"), os.path.join(work, f"nncf_{variant}.xml")
    np.save(npy, calib)
    res = subprocess.run([python, "-c", NNCF_SCRIPT, xml, npy, out, variant], capture_output=True, text=True)
    if res.returncode:
        print(f"nncf {variant} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return out


def run_cli(sm: str, calib: np.ndarray, work: str) -> str:
    out, npy = os.path.join(work, "cli"), os.path.join(work, "calib.npy")
    np.save(npy, calib)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={sm}", f"--output_dir={out}",
                    f"--calibration_data={npy}"], check=True, capture_output=True, text=True)
    return os.path.join(out, "model_int8.xml")


def measure(name: str, args, rng) -> dict:
    import openvino as ov

    from tfcompress import calibration

    core = ov.Core()
    sm, xml, x = ir_of(name, args.work, rng)
    n_calib = min(N_CALIB, len(x) // 2)  # wine has 178 samples
    calib, held = x[:n_calib], x[n_calib:]
    fp = core.read_model(xml)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    ref = common.outputs(core.compile_model(fp, "CPU", f32), held)
    clf = name in CLASSIFIERS
    default = common.outputs(core.compile_model(fp, "CPU"), held)
    rows = {"OpenVINO default precision (no INT8)": closeness(ref, default, clf)}
    for est in args.estimators:
        q = calibration.calibrate(fp, calib, range_estimator=est, verbose=False)
        rows[f"tfcompress {est}"] = closeness(ref, common.outputs(core.compile_model(q, "CPU", f32), held), clf)
    work = os.path.join(args.work, name)
    for variant in args.nncf:
        if variant == "transformer" and not name.endswith("transformer"):
            continue
        out = run_nncf(args.nncf_python, xml, calib, variant, work)
        if out:
            rows[f"nncf {variant}"] = closeness(ref, common.outputs(core.compile_model(out, "CPU", f32), held), clf)
    if args.cli:
        rows["export command (CLI), default"] = closeness(
            ref, common.outputs(core.compile_model(run_cli(sm, calib, work), "CPU", f32), held), clf)
    if args.accuracy_aware is not None and not clf:
        for est in ("minmax", "auto"):
            rows[f"accuracy-aware, {est}"] = accuracy_aware(sm, calib, held, est, args.accuracy_aware, work, ref)
    return rows


def accuracy_aware(sm: str, calib, held, estimator: str, max_drop: float, work: str, ref) -> dict:
    """The export with ``int8="accuracy_aware"`` on unlabelled validation samples (the drop is the relative RMS
    error against FP32): its error, how many layers it reverted, the share of MACs left in INT8."""
    import openvino as ov

    from tfcompress.export import export_saved_model

    out = os.path.join(work, f"aa_{estimator}")
    shutil.rmtree(out, ignore_errors=True)
    step = export_saved_model(sm, out, calibration_data=calib, validation_data=held, int8="accuracy_aware",
                              max_drop=max_drop, range_estimator=estimator, verbose=False)["steps"]["int8"]
    compiled = ov.Core().compile_model(os.path.join(out, "model_int8.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    r = closeness(ref, common.outputs(compiled, held), False)
    r.update(reverted=len(step["reverted"]), int8_mac_share=step["int8_mac_share"], max_drop_met=step["max_drop_met"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nncf_python", default="/work/scratch/calib/nncfvenv/bin/python")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--estimators", default="auto,minmax,max")
    ap.add_argument("--accuracy_aware", type=float, default=None, metavar="MAX_DROP",
                    help="also export the regression models with int8=accuracy_aware and this max_drop")
    ap.add_argument("--nncf", default=",".join(NNCF_VARIANTS), help="nncf variants to run ('' for none)")
    ap.add_argument("--work", default="/tmp/int8_nonimage")
    ap.add_argument("--cli", action="store_true")
    args = ap.parse_args()
    args.estimators = [e for e in args.estimators.split(",") if e]
    args.nncf = [v for v in args.nncf.split(",") if v]
    print(common.machine())
    results = {}
    for name in args.models.split(","):
        rng = np.random.default_rng(0)
        import keras

        keras.utils.set_random_seed(0)
        results[name] = measure(name, args, rng)
        print(f"\n## {name}")
        print("| calibration | rel. RMS error % | argmax agreement % |\n|---|---|---|")
        for row, r in results[name].items():
            agree = f"{100 * r['agree']:.2f}" if "agree" in r else "-"
            extra = (f" ({r['reverted']} layers reverted, {100 * r['int8_mac_share']:.0f} % of the MACs INT8"
                     f"{'' if r['max_drop_met'] else ', max_drop missed'})") if "reverted" in r else ""
            print(f"| {row}{extra} | {100 * r['rel_rms']:.2f} | {agree} |", flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

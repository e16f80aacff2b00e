"""The whole product on one small model: prune in ``model.fit``, QAT, strip, export, INT8, measure."""

from __future__ import annotations

import json
import os
import shutil
import time

import keras
import numpy as np

import tfcompress
from tfcompress.demo import report, workload
from tfcompress.demo.options import MARKER, check_args
from tfcompress.export.pipeline import export_saved_model
from tfcompress.export.speed import compression_variants, measure_speed
from tfcompress.quantization import RangeInit, quantize_model
from tfcompress.output_dir import staged_output

__all__ = ["run_demo", "MARKER"]

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _accuracy(model: keras.Model, x, y) -> float:
    # a direct call: model.predict would trace one more tf.function per model
    logits = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    return float(np.mean(np.argmax(logits, axis=1) == y))


def _ir_bytes(xml: str) -> int:
    return os.path.getsize(xml) + os.path.getsize(xml[:-4] + ".bin")


def _conv_widths(model: keras.Model) -> dict[str, int]:
    return {layer.name: int(layer.kernel.shape[-1]) for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}


def run_demo(output_dir: str = "tfcompress_demo", epochs: int = 8, target: float = 0.5, seed: int = 0,
             verbose: int = 2) -> dict:
    """Train, compress and measure the digits CNN; write ``report.md``, plots and all artifacts to ``output_dir``.

    The stages are those of the product, in order: the float model is trained (``epochs``), then fine-tuned
    for ``epochs`` with :class:`~tfcompress.pruning.FilterPruning` removing ``target`` of every group's filters
    (ramping up over the first epochs), then quantization-aware trained (``max(1, epochs // 4)`` epochs),
    stripped, exported to ONNX and OpenVINO IR and turned into an INT8 IR. The original model goes through
    the same export with post-training INT8 so both can be compared. Output is written atomically.

    Returns:
        The summary also written to ``summary.json``.
    """
    replace = check_args(output_dir, epochs, target, seed)
    t0 = time.perf_counter()
    fit_verbose = verbose if verbose in (0, 1, 2) else 2
    with staged_output(output_dir, overwrite=replace) as tmp:
        keras.utils.set_random_seed(seed)
        x, y, xt, yt = workload.digits(seed=seed)
        calib = x[:300]
        steps = 7

        _say(f"[1/{steps}] training the original model ({epochs} epochs, {len(x)} images of digits)")
        model = workload.residual_cnn(x.shape[1:])
        steps_per_epoch = -(-len(x) // 32)

        def cosine(lr: float, n_epochs: int):  # decays to 0: each stage ends converged, not mid-step
            return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, n_epochs * steps_per_epoch))

        model.compile(cosine(3e-3, epochs), LOSS, metrics=["accuracy"])
        hist0 = model.fit(workload.augmented(x, y, 32, seed), epochs=epochs, validation_data=(xt, yt),
                          shuffle=False, verbose=fit_verbose)
        original_acc = _accuracy(model, xt, yt)
        os.makedirs(os.path.join(tmp, "models"))
        model.save(os.path.join(tmp, "models", "original.keras"))

        _say(f"[2/{steps}] fine-tuning with FilterPruning(target={target}) for {epochs} epochs")
        pruned = keras.models.clone_model(model)
        pruned.set_weights(model.get_weights())
        pruned.compile(cosine(1e-3, epochs), LOSS, metrics=["accuracy"])
        pruner = tfcompress.pruning.FilterPruning(
            target=target, criterion="geometric_median", pruning_epochs=max(1, epochs - 2),
            prune_first_conv=True, prune_downsample_convs=True)
        hist1 = pruned.fit(workload.augmented(x, y, 32, seed + 1), epochs=epochs, validation_data=(xt, yt),
                          shuffle=False, callbacks=[pruner], verbose=fit_verbose)
        pruned_acc = _accuracy(pruned, xt, yt)

        qat_epochs = max(1, epochs // 4)
        _say(f"[3/{steps}] quantization-aware training ({qat_epochs} epochs)")
        q = quantize_model(pruned)
        q.compile(cosine(2e-4, qat_epochs), LOSS, metrics=["accuracy"])
        hist2 = q.fit(workload.augmented(x, y, 32, seed + 2), epochs=qat_epochs, validation_data=(xt, yt),
                          shuffle=False, callbacks=[RangeInit(16)], verbose=fit_verbose)
        qat_acc = _accuracy(q, xt, yt)
        q.save(os.path.join(tmp, "models", "pruned_qat.keras"))

        _say(f"[4/{steps}] stripping the pruned filters")
        small = tfcompress.strip(q)
        small.save(os.path.join(tmp, "models", "compressed_qat_stripped.keras"))
        small_acc = _accuracy(small, xt, yt)

        _say(f"[5/{steps}] exporting (SavedModel -> stripped SavedModel -> ONNX -> OpenVINO IR -> INT8)")
        work = os.path.join(tmp, "savedmodels")
        for name, m in (("original", model), ("pruned_float", pruned), ("compressed", q)):
            m.export(os.path.join(work, name), verbose=False)

        def export(name: str, **kwargs) -> dict:
            return export_saved_model(os.path.join(work, name), os.path.join(tmp, name), validation_data=(xt, yt),
                                      verbose=False, source_name=f"model.export() of the demo's {name} model",
                                      **kwargs)

        exports = {
            "original": export("original", calibration_data=calib),
            "pruned_float": export("pruned_float", int8="none"),
            "compressed": export("compressed", calibration_data=calib),
        }
        shutil.rmtree(work)  # the stripped SavedModels are in each export directory

        _say(f"[6/{steps}] measuring OpenVINO latency (batch 1) and throughput (batch 32), interleaved")
        irs = compression_variants(*(os.path.join(tmp, d) for d in ("original", "pruned_float", "compressed")))
        speed = measure_speed(irs, xt[:1], rounds=3, iters_b1=200, iters_b32=20)

        _say(f"[7/{steps}] writing the report and plots")
        summary = {
            "epochs": epochs, "target": target, "seed": seed,
            "samples": {"train": int(len(x)), "test": int(len(xt)), "calibration": int(len(calib))},
            "accuracy": {
                "original": original_acc, "pruned": pruned_acc, "qat": qat_acc, "compressed_stripped": small_acc,
                "original_openvino_int8": exports["original"]["accuracy"]["openvino_int8"],
                "compressed_openvino_int8": exports["compressed"]["accuracy"]["openvino_int8"],
            },
            "params": {"original": model.count_params(), "compressed": small.count_params()},
            "flops": {"original": tfcompress.count_flops(model), "compressed": tfcompress.count_flops(small)},
            "ir_bytes": {
                "original_fp32": _ir_bytes(irs["original FP32"][0]),
                "original_int8": _ir_bytes(irs["original INT8 (post-training)"][0]),
                "compressed_fp32": _ir_bytes(irs["compressed FP32"][0]),
                "compressed_int8": _ir_bytes(irs["compressed INT8 (QAT)"][0]),
            },
            "int8_layers": {k: exports[k]["steps"]["int8"]["int8_layers"] for k in ("original", "compressed")},
            "speed": speed,
            "filters": {"original": _conv_widths(model), "compressed": _conv_widths(small)},
            "history": {
                "original": {k: [float(v) for v in vs] for k, vs in hist0.history.items()},
                "pruning": {k: [float(v) for v in vs] for k, vs in hist1.history.items()},
                "qat": {k: [float(v) for v in vs] for k, vs in hist2.history.items()},
            },
        }
        summary["seconds"] = time.perf_counter() - t0
        report.write(tmp, summary)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        open(os.path.join(tmp, MARKER), "w").close()
    _say("\n" + report.table(summary))
    _say(f"\nwrote {os.path.abspath(output_dir)} (report.md, plots, models, ONNX, OpenVINO IRs) "
         f"in {summary['seconds']:.0f} s")
    return summary

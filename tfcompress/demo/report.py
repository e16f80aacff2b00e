"""The demo's table, ``report.md`` and plots (matplotlib, written as PNG)."""

from __future__ import annotations

import os

__all__ = ["table", "write"]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(s: dict) -> str:
    """Original vs compressed, one metric per row, as a Markdown table."""
    a, sp = s["accuracy"], s["speed"]
    default = _default_label(sp)
    rows = [
        ("accuracy, Keras float / QAT (%)", f"{100 * a['original']:.2f}", f"{100 * a['qat']:.2f}",
         f"{100 * (a['qat'] - a['original']):+.2f} pts"),
        ("accuracy, OpenVINO INT8 (%)", f"{100 * a['original_openvino_int8']:.2f} (post-training)",
         f"{100 * a['compressed_openvino_int8']:.2f} (QAT)",
         f"{100 * (a['compressed_openvino_int8'] - a['original_openvino_int8']):+.2f} pts"),
        ("parameters", f"{s['params']['original']:,}", f"{s['params']['compressed']:,}",
         _ratio(s["params"]["compressed"], s["params"]["original"])),
        ("FLOPs", f"{s['flops']['original']:,.0f}", f"{s['flops']['compressed']:,.0f}",
         _ratio(s["flops"]["compressed"], s["flops"]["original"])),
        ("IR size, float (bytes; compressed: pruned, not quantized)", f"{s['ir_bytes']['original_fp32']:,}",
         f"{s['ir_bytes']['compressed_fp32']:,}",
         _ratio(s["ir_bytes"]["compressed_fp32"], s["ir_bytes"]["original_fp32"])),
        ("IR size, INT8 (bytes; original: post-training, compressed: QAT)", f"{s['ir_bytes']['original_int8']:,}",
         f"{s['ir_bytes']['compressed_int8']:,}",
         _ratio(s["ir_bytes"]["compressed_int8"], s["ir_bytes"]["original_int8"])),
    ]
    for label, o, c in (("FP32 (f32 hint)", "original FP32", "compressed FP32"),
                        (default, f"original {default}", f"compressed {default}"),
                        ("INT8", "original INT8 (post-training)", "compressed INT8 (QAT)")):
        rows.append((f"latency b1, {label} (ms)", f"{sp[o]['b1_ms']:.3f}", f"{sp[c]['b1_ms']:.3f}",
                     _ratio(sp[c]["b1_ms"], sp[o]["b1_ms"])))
    for label, o, c in (("FP32 (f32 hint)", "original FP32", "compressed FP32"),
                        (default, f"original {default}", f"compressed {default}"),
                        ("INT8", "original INT8 (post-training)", "compressed INT8 (QAT)")):
        rows.append((f"throughput b32, {label} (img/s)", f"{sp[o]['b32_ips']:.0f}", f"{sp[c]['b32_ips']:.0f}",
                     _ratio(sp[c]["b32_ips"], sp[o]["b32_ips"])))
    rows.append(("compressed INT8 vs original FP32 latency", "", "",
                 _ratio(sp["compressed INT8 (QAT)"]["b1_ms"], sp["original FP32"]["b1_ms"])))
    lines = ["| | original | compressed | compressed / original |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    return "\n".join(lines)


def _default_label(speed: dict) -> str:
    """``"default (bf16)"`` or ``"default (f32)"``: the default-precision variants are named for what ran."""
    return next(k for k in speed if k.startswith("original default")).removeprefix("original ")


def write(out_dir: str, s: dict) -> None:
    """``report.md`` and ``filters.png``, ``training.png``, ``latency.png`` into ``out_dir``."""
    _plots(out_dir, s)
    n = s["samples"]
    i8 = s["int8_layers"]
    text = f"""# tfcompress demo report

A residual CNN on scikit-learn's handwritten digits (upsampled to 32x32; {n['train']} training and
{n['test']} test images) trained for {s['epochs']} epochs, fine-tuned {s['epochs']} epochs with
`FilterPruning(target={s['target']})`, quantization-aware trained, stripped, exported to ONNX and OpenVINO
IR and turned into INT8 ({n['calibration']} calibration images). The original goes through the same export
with post-training INT8 calibration. Note that the compressed model has been trained longer (the pruning
fine-tune and QAT epochs come on top of the original's), which on data this small can show as a gain. Accuracy is on the {n['test']} test images. Latency is the median of
interleaved rounds on this machine; FP32 means `INFERENCE_PRECISION_HINT=f32`, "default" is OpenVINO's own
choice, named for what it was here (bf16 on CPUs with AVX512-BF16/AMX, f32 on others).

{table(s)}

INT8 layers (convolutions / fully connected running in INT8): original {i8['original']['int8']} of
{i8['original']['total']}, compressed {i8['compressed']['int8']} of {i8['compressed']['total']}.

![filters per layer](filters.png)

![accuracy vs FLOPs during pruning](training.png)

![latency](latency.png)

## Files

- `models/`: the Keras models (original, pruned + QAT, stripped).
- `original/`, `pruned_float/`, `compressed/`: each an export (`stripped/` SavedModel, `model.onnx`,
  `model_fp32.xml/.bin`, `model_int8.xml/.bin` where calibrated, its own `report.md`). The QAT model's
  IR carries its own quantization (it runs INT8 as converted), so calibrating it changes nothing: in
  `compressed/` both IRs hold the same INT8 model.
- `summary.json`: every number above, plus the training histories.

Took {s['seconds']:.0f} s.
"""
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)


def _plots(out_dir: str, s: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError('the demo needs matplotlib: pip install "tfcompress[demo]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # filters per layer, before and after
    names = list(s["filters"]["original"])
    before = [s["filters"]["original"][k] for k in names]
    after = [s["filters"]["compressed"].get(k, 0) for k in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    pos = range(len(names))
    ax.bar([p - 0.2 for p in pos], before, 0.4, label="original")
    ax.bar([p + 0.2 for p in pos], after, 0.4, label="compressed (stripped)")
    ax.set_xticks(list(pos), names, rotation=45, ha="right")
    ax.set_ylabel("output channels")
    ax.set_title("Filters per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "filters.png"), dpi=100)
    plt.close(fig)

    # accuracy vs FLOPs while pruning
    h = s["history"]["pruning"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(h["flops_ratio"], [100 * v for v in h["val_accuracy"]], "o-", label="pruning fine-tune (per epoch)")
    for i, (f, a) in enumerate(zip(h["flops_ratio"], h["val_accuracy"])):
        ax.annotate(str(i + 1), (f, 100 * a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([1.0], [100 * s["accuracy"]["original"]], "s", label="original")
    ratio = s["flops"]["compressed"] / s["flops"]["original"]
    ax.plot([ratio], [100 * s["accuracy"]["compressed_openvino_int8"]], "*", markersize=12,
            label="compressed (QAT), OpenVINO INT8")
    ax.invert_xaxis()
    ax.set_xlabel("FLOPs / original FLOPs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs FLOPs during training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "training.png"), dpi=100)
    plt.close(fig)

    # latency bars
    sp = s["speed"]
    default = _default_label(sp)
    labels = ["FP32 (f32)", default, "INT8"]
    orig = [sp[k]["b1_ms"] for k in ("original FP32", f"original {default}", "original INT8 (post-training)")]
    comp = [sp[k]["b1_ms"] for k in ("compressed FP32", f"compressed {default}", "compressed INT8 (QAT)")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([p - 0.2 for p in range(3)], orig, 0.4, label="original")
    ax.bar([p + 0.2 for p in range(3)], comp, 0.4, label="compressed")
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("OpenVINO latency, batch 1 (ms)")
    ax.set_title("Latency (median of interleaved rounds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency.png"), dpi=100)
    plt.close(fig)

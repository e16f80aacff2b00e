"""MultiHeadAttention head pruning on a small ViT for CIFAR-10: FLOPs, parameters, accuracy and OpenVINO
throughput of FilterPruning(target) with the heads pruned and with them kept (``ignored_layers`` naming every
``"<mha>:heads"``), each stripped and exported the same way.

    python benchmarks/attention_heads.py --train 10000 --epochs 2 --prune_epochs 3 --rounds 5

The ViT: 32x32 images, 4x4 patches (64 tokens) embedded by a convolution, ``--blocks`` pre-norm encoder blocks of
``--dim`` channels (self-attention of ``--heads`` heads, a ReLU MLP of 2 x dim; each added to the residual
stream), a LayerNormalization and a pooled Dense head. One model is trained for ``--epochs`` on the first
``--train`` shuffled training images (the JPEG split, scaled to [0, 1]); each variant then fine-tunes a copy with
FilterPruning for ``--prune_epochs`` (``pruning_epochs`` = prune_epochs - 1, l2 criterion). Accuracy on ``--test`` test
images (a fixed random choice); speed of the stripped SavedModels exported to FP32 IRs (``export_saved_model``), batch 32,
measured by ``measure_speed`` in interleaved rounds with the f32 hint and at the device's default precision.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from common import cifar10_test, cifar10_train_shuffled, machine  # noqa: E402


def vit(blocks: int, heads: int, dim: int):
    import keras
    from keras import layers as L

    inp = keras.Input((32, 32, 3), name="image")
    x = L.Reshape((64, dim), name="tokens")(L.Conv2D(dim, 4, strides=4, name="patch")(inp))
    for b in range(blocks):
        y = L.LayerNormalization(name=f"b{b}_ln1")(x)
        x = L.Add(name=f"b{b}_add1")([x, L.MultiHeadAttention(heads, dim // heads, name=f"b{b}_mha")(y, y)])
        y = L.Dense(2 * dim, activation="relu", name=f"b{b}_fc1")(L.LayerNormalization(name=f"b{b}_ln2")(x))
        x = L.Add(name=f"b{b}_add2")([x, L.Dense(dim, name=f"b{b}_fc2")(y)])
    x = L.GlobalAveragePooling1D(name="pool")(L.LayerNormalization(name="ln")(x))
    return keras.Model(inp, L.Dense(10, name="logits")(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--prune_epochs", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import keras

    import tfcompress
    from tfcompress.export import export_saved_model
    from tfcompress.export.speed import DEFAULT, FP32, measure_speed
    from tfcompress.pruning import FilterPruning

    start = datetime.datetime.now(datetime.timezone.utc)
    x, y = cifar10_train_shuffled()
    x, y = x[:args.train].astype("float32") / 255.0, y[:args.train]
    xt, yt = cifar10_test()
    pick = np.random.default_rng(0).permutation(len(xt))[:args.test]  # the split is sorted by class
    xt, yt = xt[pick].astype("float32") / 255.0, yt[pick]
    keras.utils.set_random_seed(0)
    base = vit(args.blocks, args.heads, args.dim)
    base.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    base.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0)
    weights = base.get_weights()
    heads = [f"b{b}_mha:heads" for b in range(args.blocks)]

    def accuracy(model) -> float:
        return float(np.mean(np.argmax(model.predict(xt, batch_size=256, verbose=0), -1) == yt))

    rows = {"unpruned": (base, accuracy(base))}
    for name, ignored in (("heads pruned", ()), ("heads kept", heads)):
        keras.utils.set_random_seed(1)
        model = vit(args.blocks, args.heads, args.dim)
        model.set_weights(weights)
        model.compile(keras.optimizers.Adam(5e-4), "sparse_categorical_crossentropy")
        pruner = FilterPruning(target=args.target, criterion="l2", pruning_epochs=max(1, args.prune_epochs - 1),
                               ignored_layers=list(ignored))
        model.fit(x, y, epochs=args.prune_epochs, batch_size=64, callbacks=[pruner], verbose=0)
        stripped = tfcompress.strip(model)
        rows[name] = (stripped, accuracy(stripped))

    irs = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for name, (model, _) in rows.items():
            sm, out = os.path.join(tmp, f"{len(irs)}_sm"), os.path.join(tmp, f"{len(irs)}_ir")
            model.export(sm, verbose=False)
            export_saved_model(sm, out, verbose=False)
            irs[name] = os.path.join(out, "model_fp32.xml")
        sample, load = xt[:1], os.getloadavg()[0]
        speed = measure_speed({f"{n}|{p}": (ir, cfg) for n, ir in irs.items()
                               for p, cfg in (("f32", FP32), ("default", DEFAULT))}, sample, rounds=args.rounds)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{start:%Y-%m-%d %H:%M} UTC, commit {commit}, load average {load:.2f} at start of speed, "
          f"{machine()}")
    print(f"ViT {args.blocks} blocks x {args.heads} heads, d={args.dim}; trained {args.epochs} epochs on "
          f"{args.train} images, pruned (target {args.target}) over {args.prune_epochs}; accuracy on {args.test} "
          "test images; b32 images/s (median of rounds)")
    print("| model | heads per block | MFLOPs | params | accuracy | FP32 b32 img/s | default b32 img/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, acc) in rows.items():
        n_heads = [model.get_layer(f"b{b}_mha").num_heads for b in range(args.blocks)]
        print(f"| {name} | {n_heads} | {tfcompress.count_flops(model) / 1e6:.1f} | {model.count_params():,} | "
              f"{acc:.3f} | {speed[f'{name}|f32']['b32_ips']:.0f} | {speed[f'{name}|default']['b32_ips']:.0f} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

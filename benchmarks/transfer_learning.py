"""Transfer learning end to end: prune a pretrained backbone while fine-tuning it on a new task (issue 30).

    python benchmarks/transfer_learning.py                                   # the recorded run (BENCHMARKS 1d)
    python benchmarks/transfer_learning.py --pretrain_epochs 1 --pretrain_epoch_images 640 \\
        --finetune_epochs 2 --epoch_images 640 --pruning_epochs 1 --criteria l1,l1+distill --cache /tmp/tl  # quick check
    python benchmarks/transfer_learning.py --resume_epochs 6 --criteria emitted,l1,emitted+distill   # converged
    python benchmarks/transfer_learning.py --resume_epochs 6 --criteria emitted+distill --allocation global_per_flop

1. The "pretrained" model: the MLPerf Tiny VWW MobileNetV1-0.25 backbone (96x96, everything up to its
   ``flatten``) with a new 10-class softmax head, fine-tuned on CIFAR-10 resized to 96x96 (45,000 training
   images; the last 5,000 of the shuffled training split are held out to watch convergence) with Adam and a
   cosine schedule with warm-up. The model is cached (``--cache``) and reused by later runs;
   ``--resume_epochs N`` trains the cached model N more epochs (a second cosine from ``--resume_lr``) and caches
   that one too, so a model that had not converged can be carried on without starting over.
2. From it, fine-tunes of the same length (``--finetune_epochs`` epochs of ``--epoch_images`` images, Adam
   with a cosine schedule from ``--lr``): once without pruning (the reference) and once per criterion with
   ``FilterPruning(flops_target=0.4, criterion=..., pruning_epochs=..., compensation_data=512 training images)``.
   A criterion written ``name+distill`` also lets the unpruned pretrained model teach the pruned one
   (``DistillationLoss(alpha=0.5, temperature=4.0)`` on ``with_teacher`` batches, as the README recommends).
3. Each model is stripped (:func:`tfcompress.strip`) and evaluated on the 10,000 CIFAR-10 test JPEGs; the
   table gives accuracy, the drop against the reference, FLOPs and parameters after strip.

Every finished run is appended to ``<cache>/transfer_learning.json``, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import tfcompress  # noqa: E402
from pretrained_pruning import _DepthwiseConv2D, load_vww  # noqa: E402
from tfcompress.pruning import DistillationAccuracy, DistillationLoss, FilterPruning, with_teacher  # noqa: E402

SIZE = 96
HELD_OUT = 5000


def backbone_with_head(classes: int = 10) -> keras.Model:
    """The VWW network up to its flatten (the 256 pooled features), then a new softmax classifier."""
    vww = load_vww()
    out = keras.layers.Dense(classes, activation="softmax", name="head")(vww.get_layer("flatten").output)
    return keras.Model(vww.inputs, out, name="vww_cifar10")


def to_96(x: tf.Tensor) -> tf.Tensor:
    """uint8 32x32 images -> float 96x96 in [0, 1] (bilinear), as the VWW model was trained on [0, 1] inputs."""
    return tf.image.resize(tf.cast(x, tf.float32) / 255.0, (SIZE, SIZE))


def train_dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int) -> tf.data.Dataset:
    """Endless shuffled batches with random horizontal flips, resized on the fly."""
    def prep(img, label):
        return tf.image.random_flip_left_right(to_96(img), seed=seed), label

    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(10_000, seed=seed)
    return ds.batch(batch).map(prep, num_parallel_calls=2).prefetch(2)


def eval_dataset(x: np.ndarray, y: np.ndarray, batch: int = 250) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).map(lambda a, b: (to_96(a), b)).prefetch(2)


def load(path: pathlib.Path) -> keras.Model:
    return keras.models.load_model(path, custom_objects={"_DepthwiseConv2D": _DepthwiseConv2D})


def compile_with(model: keras.Model, peak_lr: float, steps: int, warmup: int) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(steps - warmup, 1), warmup_target=peak_lr,
                                                      warmup_steps=warmup)
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])


def accuracy(model: keras.Model, ds: tf.data.Dataset) -> float:
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return float(model.evaluate(ds, verbose=0)[1])


def pretrain(args, train: tf.data.Dataset, val: tf.data.Dataset, path: pathlib.Path) -> tuple[keras.Model, list]:
    """The "pretrained" model (cached at ``path``) and its per-epoch held-out accuracies."""
    log = path.with_suffix(".json")
    if path.exists():
        return load(path), json.loads(log.read_text())
    keras.utils.set_random_seed(args.seed)
    model = backbone_with_head()
    curve = train_epochs(model, train, val, args.pretrain_epochs, args.pretrain_lr, args)
    model.save(path)
    log.write_text(json.dumps(curve))
    return model, curve


def resume(args, train: tf.data.Dataset, val: tf.data.Dataset, base: pathlib.Path,
           path: pathlib.Path) -> tuple[keras.Model, list]:
    """The cached model at ``base`` trained ``--resume_epochs`` more epochs (cached at ``path``); the curve
    covers both runs."""
    log = path.with_suffix(".json")
    if path.exists():
        return load(path), json.loads(log.read_text())
    keras.utils.set_random_seed(args.seed + 2)
    model = load(base)
    curve = json.loads(base.with_suffix(".json").read_text())
    curve += train_epochs(model, train, val, args.resume_epochs, args.resume_lr, args)
    model.save(path)
    log.write_text(json.dumps(curve))
    return model, curve


def train_epochs(model: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset, epochs: int, peak_lr: float,
                 args) -> list:
    """Train ``epochs`` epochs of ``--pretrain_epoch_images`` images (Adam, cosine with warm-up); the held-out
    accuracy (%) after each epoch."""
    steps = args.pretrain_epoch_images // args.batch
    compile_with(model, peak_lr, steps * epochs, warmup=steps // 4)
    hist = model.fit(train, steps_per_epoch=steps, epochs=epochs, validation_data=val, verbose=2)
    return [round(100 * a, 2) for a in hist.history["val_accuracy"]]


def finetune(args, pretrained: pathlib.Path, train: tf.data.Dataset, stats: np.ndarray,
             criterion: str | None, distill: bool = False) -> tuple[keras.Model, float, float]:
    """Fine-tune a fresh copy of the pretrained model (pruning with ``criterion`` unless None, taught by the
    unpruned pretrained model if ``distill``); returns the stripped model, the pruner's final FLOPs ratio and the
    training time."""
    keras.utils.set_random_seed(args.seed + 1)
    model = load(pretrained)
    steps = args.epoch_images // args.batch
    compile_with(model, args.lr, steps * args.finetune_epochs, warmup=steps // 10)
    if distill:
        model.compile(model.optimizer, DistillationLoss(alpha=0.5, temperature=4.0, from_logits=False),
                      metrics=[DistillationAccuracy()])
        train = with_teacher(train, load(pretrained))
    callbacks, pruner = [], None
    if criterion is not None:
        allocation = {} if args.allocation == "uniform" else {"flops_allocation": args.allocation,
                                                              "max_group_level": 0.95}
        pruner = FilterPruning(flops_target=args.flops_target, criterion=criterion,
                               pruning_epochs=args.pruning_epochs, compensation_data=stats, **allocation)
        callbacks.append(pruner)
    t0 = time.time()
    model.fit(train, steps_per_epoch=steps, epochs=args.finetune_epochs, callbacks=callbacks, verbose=2)
    seconds = time.time() - t0
    ratio = pruner.flops_ratio if pruner is not None else 1.0
    return tfcompress.strip(model), ratio, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/work/cache/transfer_learning")
    ap.add_argument("--criteria", default="emitted,l1,geometric_median,l2")
    ap.add_argument("--pretrain_epochs", type=int, default=4)
    ap.add_argument("--pretrain_epoch_images", type=int, default=50_000 - HELD_OUT)
    ap.add_argument("--pretrain_lr", type=float, default=1e-3)
    ap.add_argument("--resume_epochs", type=int, default=0, help="train the cached pretrained model this many "
                    "more epochs before the fine-tunes")
    ap.add_argument("--resume_lr", type=float, default=5e-4, help="peak learning rate of the resumed training")
    ap.add_argument("--finetune_epochs", type=int, default=6)
    ap.add_argument("--epoch_images", type=int, default=15_000, help="images per fine-tuning epoch")
    ap.add_argument("--pruning_epochs", type=int, default=3)
    ap.add_argument("--flops_target", type=float, default=0.4)
    ap.add_argument("--allocation", default="uniform", help="flops_allocation (max_group_level=0.95 unless uniform)")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the fine-tunes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    x, y = common.cifar10_train_shuffled()
    x_train, y_train, x_val, y_val = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    x_test, y_test = common.cifar10_test()
    train = train_dataset(x_train, y_train, args.batch, args.seed)
    stats = to_96(x_train[:512]).numpy()
    test = eval_dataset(x_test, y_test)
    print(f"# {common.machine()}; {vars(args)}", flush=True)

    pretrained = cache / f"pretrained_{args.pretrain_epochs}x{args.pretrain_epoch_images}_seed{args.seed}.keras"
    val = eval_dataset(x_val, y_val)
    model, curve = pretrain(args, train, val, pretrained)
    if args.resume_epochs:
        base = pretrained
        pretrained = cache / f"{base.stem}+{args.resume_epochs}_lr{args.resume_lr}.keras"
        model, curve = resume(args, train, val, base, pretrained)
    print(f"pretrained: held-out accuracy per epoch {curve}; test {100 * accuracy(model, test):.2f} %; "
          f"FLOPs {tfcompress.count_flops(model):,}; params {model.count_params():,}", flush=True)

    results_path = cache / "transfer_learning.json"
    key = f"{pretrained.stem}_f{args.finetune_epochs}x{args.epoch_images}_r{args.pruning_epochs}" \
          f"_lr{args.lr}_t{args.flops_target}_s{args.seed}"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    runs = results.setdefault(key if args.allocation == "uniform" else f"{key}_{args.allocation}", {})
    if "none" in results.get(key, {}):
        runs.setdefault("none", results[key]["none"])  # the unpruned reference does not depend on the allocation
    for criterion in ["none", *args.criteria.split(",")]:
        if criterion not in runs:
            name, _, extra = criterion.partition("+")
            if extra not in ("", "distill"):
                raise ValueError(f"unknown criterion suffix {extra!r} in {criterion!r}: only '+distill'")
            small, ratio, seconds = finetune(args, pretrained, train, stats, None if name == "none" else name,
                                             distill=extra == "distill")
            runs[criterion] = {"accuracy": 100 * accuracy(small, test), "flops": tfcompress.count_flops(small),
                               "params": small.count_params(), "flops_ratio": ratio, "seconds": round(seconds)}
            results_path.write_text(json.dumps(results, indent=1))
        r = runs[criterion]
        print(f"{criterion}: {r['accuracy']:.2f} %, drop {runs['none']['accuracy'] - r['accuracy']:.2f} pts, "
              f"FLOPs {r['flops']:,} ({r['flops'] / runs['none']['flops']:.3f}), params {r['params']:,}, "
              f"{r['seconds']} s", flush=True)

    print("\n| criterion | test accuracy % | drop vs unpruned fine-tune (pts) | FLOPs after strip | FLOPs ratio "
          "| params after strip |\n|---|---|---|---|---|---|")
    base = runs["none"]
    for criterion, r in runs.items():
        print(f"| {criterion} | {r['accuracy']:.2f} | {base['accuracy'] - r['accuracy']:.2f} | {r['flops']:,} "
              f"| {r['flops'] / base['flops']:.3f} | {r['params']:,} |")


if __name__ == "__main__":
    main()

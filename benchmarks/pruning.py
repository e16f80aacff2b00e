"""Pruning benchmark: callback overhead, and accuracy of MLPerf Tiny ResNet-8 with 40 % of its FLOPs removed.

    python benchmarks/pruning.py                      # full run (~1 h on 2 cores)
    python benchmarks/pruning.py --epochs 2 --train_samples 5000   # quick check
    python benchmarks/pruning.py ... --reference ref.keras   # fine-tune the unpruned model once, reuse it after
    python benchmarks/pruning.py --overhead_only --overhead_pruning_epochs 4   # (1) only, masks changing every epoch

(1) Epoch time of the same model with and without FilterPruning, epochs interleaved (with, without, with ...)
    so that machine noise hits both; the callback re-selects masks at every epoch (the worst case); and with
    ``average_batchnorm=False``, which shows what the BatchNorm averaging after mask changes costs.
(2) The pretrained ResNet-8 fine-tuned on CIFAR-10 (JPEG train split) for the same number of epochs without
    pruning and with FilterPruning(flops_target=0.4) for each criterion; accuracy on the 10,000 JPEG test
    images of the stripped model vs the unpruned fine-tuned one. ``--distill`` (or ``--distill only``) also
    trains each pruned model against the unpruned fine-tuned one (knowledge distillation, same batches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import tfcompress  # noqa: E402

RESNET8 = common.SHARED / "models" / "mlperf_tiny" / "pretrainedResnet.h5"


def load_resnet8(lr: float) -> keras.Model:
    model = keras.models.load_model(RESNET8, compile=False)
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train_dataset(x, y, batch: int, seed: int) -> tf.data.Dataset:
    """Random flips and 4-pixel shifts, as in the MLPerf Tiny training script."""
    def augment(img, label):
        img = tf.image.random_flip_left_right(img)
        img = tf.image.pad_to_bounding_box(img, 4, 4, 40, 40)
        img = tf.image.random_crop(img, (32, 32, 3))
        return img, label

    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y))
    ds = ds.shuffle(len(x), seed=seed).map(augment, num_parallel_calls=2)
    return ds.batch(batch).prefetch(2)


def with_mixed_teacher(ds: tf.data.Dataset, teacher: keras.Model, mixup: float = 0.0, flip: bool = False) -> tf.data.Dataset:
    """tfcompress.pruning.with_teacher with mixup and a flip-averaged teacher: labels become [one-hot label, teacher
    probabilities] for DistillationLoss (the teacher sees the same augmented batch).

    ``mixup`` > 0 mixes each image with another of its batch (ratio ~ Beta(mixup, mixup), labels mixed alike)
    before the teacher sees it: the student then matches the teacher between the training images too
    ("function matching", Beyer et al. 2022). ``flip``: the teacher's probabilities are averaged over the image
    and its mirror image (a slightly better teacher)."""
    classes = teacher.output_shape[-1]

    def targets(img, label):
        onehot = tf.one_hot(label, classes)
        if mixup > 0:
            n = tf.shape(img)[0]
            a = tf.random.gamma((n,), mixup)
            lam = a / (a + tf.random.gamma((n,), mixup))
            perm = tf.random.shuffle(tf.range(n))
            img = lam[:, None, None, None] * img + (1 - lam[:, None, None, None]) * tf.gather(img, perm)
            onehot = lam[:, None] * onehot + (1 - lam[:, None]) * tf.gather(onehot, perm)
        soft = teacher(img, training=False)
        if flip:
            soft = 0.5 * (soft + teacher(tf.reverse(img, axis=[2]), training=False))
        return img, tf.concat([onehot, soft], -1)

    return ds.map(targets)


# Feature distillation matches the student's activations to the teacher's at these ResNet-8 layers: the end of the
# first stage and the last stage's output before pooling. A model output is never pruned, so only tensors whose
# channels the pruning leaves alone are taken (the stem's residual stream is excluded by prune_first_conv=False;
# the per-FLOP allocation takes nothing from the last stage's residual stream).
FEATURE_LAYERS = ("activation_2", "activation_6")


def with_features(model: keras.Model) -> keras.Model:
    """The same layers, with FEATURE_LAYERS' outputs as extra model outputs (weights shared with ``model``)."""
    return keras.Model(model.inputs, list(model.outputs) + [model.get_layer(n).output for n in FEATURE_LAYERS])


def with_teacher_features(ds: tf.data.Dataset, teacher: keras.Model) -> tf.data.Dataset:
    """Targets become ([one-hot label, teacher probabilities], teacher feature 1, teacher feature 2 ...)."""
    classes = teacher.output_shape[-1]
    t = with_features(teacher)

    def targets(img, label):
        out = t(img, training=False)
        return img, (tf.concat([tf.one_hot(label, classes), out[0]], -1), *out[1:])

    return ds.map(targets)


def overhead(x, y, rounds: int, batch: int, pruning_epochs: int = 10_000) -> dict:
    """Median epoch wall time with / without the callback, measured in alternation; also with the callback's
    BatchNorm averaging off (``average_batchnorm=False``), which runs in the 100 steps after each epoch whose
    masks change (every epoch when ``pruning_epochs`` is at most ``rounds + 1``)."""
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(batch).cache().prefetch(2)
    runs = [("without", load_resnet8(1e-4), None)]
    for name, average in (("with", True), ("with_no_average", False)):
        runs.append((name, load_resnet8(1e-4), tfcompress.pruning.FilterPruning(
            flops_target=0.4, criterion="geometric_median", pruning_epochs=pruning_epochs,
            prune_downsample_convs=True, average_batchnorm=average)))
    times = {name: [] for name, _, _ in runs}
    for r in range(rounds + 1):  # round 0 traces the train functions: not timed
        for name, model, pruner in runs:
            t = time.perf_counter()
            model.fit(ds, epochs=r + 1, initial_epoch=r, callbacks=[pruner] if pruner else [], verbose=0)
            if r:
                times[name].append(time.perf_counter() - t)
    w, wo, wn = (common.median(times[n]) for n in ("with", "without", "with_no_average"))
    return {"epoch_s_without": wo, "epoch_s_with": w, "overhead": w / wo - 1.0, "epoch_s_with_no_average": wn,
            "average_overhead": w / wn - 1.0, "rounds": rounds, "pruning_epochs": pruning_epochs,
            "steps_per_epoch": int(np.ceil(len(x) / batch))}


def finetune(criterion: str | None, data, epochs: int, pruning_epochs: int, batch: int, lr: float,
             teacher: keras.Model | None = None, distill_options: dict | None = None, seed: int = 1,
             init: keras.Model | None = None, **pruning_options) -> tuple[dict, keras.Model]:
    """Fine-tune the pretrained ResNet-8 (or ``init``'s weights) for ``epochs`` (cosine learning rate), pruning
    with ``criterion`` unless it is None, distilling from ``teacher`` if given."""
    x, y, xt, yt = data
    keras.utils.set_random_seed(seed)
    model = load_resnet8(lr)
    if init is not None:
        model.set_weights(init.get_weights())
    ds = train_dataset(x, y, batch, seed=seed)
    trained = model  # what fit() sees: the model itself, or the model with its features as extra outputs
    distill_options = dict(distill_options or {})
    beta = distill_options.pop("feature_weight", 0.0)
    mixup = distill_options.pop("mixup", 0.0)
    flip = distill_options.pop("teacher_flip", False)
    if teacher is not None and beta > 0:
        # each feature's MSE divided by the teacher's mean square of it (measured on a batch): a relative error
        sample = with_features(teacher).predict(x[:512].astype("float32"), verbose=0)[1:]
        trained = with_features(model)
        trained.compile(keras.optimizers.Adam(lr), [tfcompress.pruning.DistillationLoss(**distill_options)] + ["mse"] * len(sample),
                        loss_weights=[1.0] + [beta / float(np.mean(f ** 2)) for f in sample])
        ds = with_teacher_features(ds, teacher)
    elif teacher is not None:
        model.compile(keras.optimizers.Adam(lr), tfcompress.pruning.DistillationLoss(**distill_options))
        ds = with_mixed_teacher(ds, teacher, mixup, flip) if mixup > 0 or flip else tfcompress.pruning.with_teacher(
            ds, teacher)
    sens = pruning_options.get("sensitivity_data")
    if sens is not None and teacher is not None:  # the compiled loss wants [one-hot label, teacher probabilities]
        xs, ys = sens
        soft = teacher.predict(xs, batch_size=256, verbose=0)
        pruning_options["sensitivity_data"] = (xs, np.concatenate([np.eye(soft.shape[-1])[ys], soft], -1))
    flops0 = tfcompress.count_flops(model)
    callbacks = [keras.callbacks.LearningRateScheduler(
        lambda e: lr * 0.5 * (1 + np.cos(np.pi * e / epochs)))]
    if criterion:
        callbacks.insert(0, tfcompress.pruning.FilterPruning(
            flops_target=0.4, criterion=criterion, pruning_epochs=pruning_epochs,
            prune_downsample_convs=True, **pruning_options))
    t = time.perf_counter()
    trained.fit(ds, epochs=epochs, callbacks=callbacks, verbose=0)
    name = (criterion or "none (fine-tuned, unpruned)") + (" + distillation" if teacher is not None else "")
    name += f" + features (weight {beta:g})" if teacher is not None and beta > 0 else ""
    name += f" + mixup {mixup:g}" if teacher is not None and mixup > 0 else ""
    name += " + flip-averaged teacher" if teacher is not None and flip else ""
    return evaluate(model, name, xt, yt, flops0, time.perf_counter() - t), model


def evaluate(model: keras.Model, name: str, xt, yt, flops0: float, seconds: float) -> dict:
    """Test accuracy of the model and of its stripped copy (they must agree), FLOPs ratio and parameters."""
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    acc = model.evaluate(xt.astype("float32"), yt, batch_size=256, verbose=0)[1]
    small = tfcompress.strip(model)
    small.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
    acc_small = small.evaluate(xt.astype("float32"), yt, batch_size=256, verbose=0)[1]
    return {
        "criterion": name, "accuracy": acc_small, "accuracy_before_strip": acc,
        "flops_ratio": tfcompress.count_flops(small) / flops0,
        "params": small.count_params(), "params_original": model.count_params(),
        "train_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--pruning_epochs", type=int, default=5)
    ap.add_argument("--train_samples", type=int, default=50_000)
    ap.add_argument("--overhead_samples", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--criteria", default="l1,l2,geometric_median")
    ap.add_argument("--skip_overhead", action="store_true")
    ap.add_argument("--overhead_only", action="store_true", help="measure the callback overhead only")
    ap.add_argument("--overhead_pruning_epochs", type=int, default=10_000,
                    help="the overhead run's ramp (at most --rounds + 1: the masks change every epoch)")
    ap.add_argument("--prune_first_conv", action="store_true", help="also prune the stem convolution's group")
    ap.add_argument("--ignored_layers", default="",
                    help="comma-separated layers never to prune (their whole group stays), e.g. conv2d_5")
    ap.add_argument("--max_group_level", type=float, default=0.8,
                    help="with a global or sensitivity allocation: the largest fraction taken from one group")
    ap.add_argument("--flops_allocation", default="uniform", choices=("uniform", "global", "global_per_flop", "sensitivity"))
    ap.add_argument("--sensitivity_samples", type=int, default=5_000,
                    help='with --flops_allocation sensitivity: the last N training images (not augmented) on '
                         "which the loss of pruning each group is measured")
    ap.add_argument("--distill", nargs="?", const="also", default="no", choices=("no", "also", "only"),
                    help="train each criterion also (or only) with distillation from the unpruned fine-tuned model")
    ap.add_argument("--alpha", type=float, default=0.5,
                    help="with --distill: weight of the label cross-entropy (1 - alpha goes to the teacher)")
    ap.add_argument("--temperature", type=float, default=4.0, help="with --distill: softmax temperature")
    ap.add_argument("--feature_distill", type=float, default=0.0,
                    help="with --distill: also match FEATURE_LAYERS' activations to the teacher's, with this weight "
                         "on each one's relative squared error (0: logits only)")
    ap.add_argument("--mixup", type=float, default=0.0,
                    help="with --distill: mix image pairs (ratio ~ Beta(m, m)) before the teacher labels them (0: off)")
    ap.add_argument("--teacher_flip", action="store_true",
                    help="with --distill: average the teacher's probabilities over each image and its mirror image")
    ap.add_argument("--from_reference", action="store_true",
                    help="prune the unpruned fine-tuned model (--epochs more epochs, the schedule restarted) instead "
                         "of the pretrained one; the drop is then against the unpruned model fine-tuned as long "
                         "(the reference, fine-tuned --epochs more with the same schedule)")
    ap.add_argument("--reference", default="",
                    help="a .keras file: load the unpruned fine-tuned model from it if it exists (it must come "
                         "from a run with the same --epochs and data), else fine-tune it and save it there")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the pruned runs (weights order, batches)")
    ap.add_argument("--reference_seed", type=int, default=1,
                    help="random seed of the unpruned fine-tuning (when it is not loaded from --reference)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()

    print(f"machine: {common.machine()}")
    x, y = common.cifar10_train_shuffled()
    xt, yt = common.cifar10_test()
    x, y = x[: args.train_samples], y[: args.train_samples]
    results: dict = {"command": "python benchmarks/pruning.py " + " ".join(sys.argv[1:]), "machine": common.machine()}

    if not args.skip_overhead:
        o = overhead(x[: args.overhead_samples], y[: args.overhead_samples], args.rounds, args.batch,
                     args.overhead_pruning_epochs)
        results["overhead"] = o
        print(f"\n(1) epoch time, ResNet-8, {o['steps_per_epoch']} steps, median of {o['rounds']} interleaved rounds")
        print(f"    without callback {o['epoch_s_without']:.2f} s | with FilterPruning {o['epoch_s_with']:.2f} s"
              f" | overhead {100 * o['overhead']:+.1f} % | with average_batchnorm=False "
              f"{o['epoch_s_with_no_average']:.2f} s: the averaging costs {100 * o['average_overhead']:+.1f} %")
        if args.overhead_only:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
            return

    rows, teacher = [], None
    modes = {"no": (False,), "also": (False, True), "only": (True,)}[args.distill]
    runs = [(None, False)] + [(c, d) for c in args.criteria.split(",") if c for d in modes]
    options = dict(prune_first_conv=args.prune_first_conv, flops_allocation=args.flops_allocation,
                   max_group_level=args.max_group_level,
                   ignored_layers=tuple(n for n in args.ignored_layers.split(",") if n))
    if args.flops_allocation == "sensitivity":
        options["sensitivity_data"] = (x[-args.sensitivity_samples:].astype("float32"), y[-args.sensitivity_samples:])
    distill_options = dict(alpha=args.alpha, temperature=args.temperature, feature_weight=args.feature_distill,
                           mixup=args.mixup, teacher_flip=args.teacher_flip)
    def show(r):
        rows.append(r)
        print(f"    {r['criterion']}: acc {100 * r['accuracy']:.2f} %, FLOPs x{r['flops_ratio']:.3f}, "
              f"params {r['params']:,}, {r['train_seconds']:.0f} s", flush=True)

    data = (x, y, xt, yt)
    for criterion, distill in runs:
        if criterion is None and args.reference and os.path.exists(args.reference):
            teacher = keras.models.load_model(args.reference)
            show(evaluate(teacher, f"none (fine-tuned, unpruned; loaded from {args.reference})", xt, yt,
                          tfcompress.count_flops(teacher), float("nan")))
        else:
            r, model = finetune(criterion, data, args.epochs, args.pruning_epochs, args.batch, args.lr,
                                teacher=teacher if distill else None, distill_options=distill_options,
                                seed=args.seed if criterion else args.reference_seed,
                                init=teacher if criterion and args.from_reference else None, **options)
            if teacher is None:
                teacher = model
                if args.reference:
                    teacher.save(args.reference)
            show(r)
        if criterion is None and args.from_reference:
            # the comparison: the unpruned model fine-tuned as long as the pruned one (--epochs more, same schedule)
            cont = args.reference[: -len(".keras")] + ".continued.keras" if args.reference else ""
            if cont and os.path.exists(cont):
                show(evaluate(keras.models.load_model(cont), f"none (fine-tuned 2 x {args.epochs} epochs; loaded "
                              f"from {cont})", xt, yt, tfcompress.count_flops(teacher), float("nan")))
            else:
                r, longer = finetune(None, data, args.epochs, args.pruning_epochs, args.batch, args.lr, init=teacher)
                r["criterion"] = f"none (fine-tuned 2 x {args.epochs} epochs)"
                show(r)
                if cont:
                    longer.save(cont)
    base = rows[1 if args.from_reference else 0]["accuracy"]
    pre = load_resnet8(1e-3).evaluate(xt.astype("float32"), yt, batch_size=256, verbose=0)[1]
    print(f"\n(2) ResNet-8, CIFAR-10 JPEG test (10,000 images), {args.epochs} fine-tuning epochs on "
          f"{len(x)} images; pretrained (no fine-tuning): {100 * pre:.2f} %")
    print("| criterion | accuracy % | drop vs unpruned (pts) | FLOPs ratio | params |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['criterion']} | {100 * r['accuracy']:.2f} | {100 * (base - r['accuracy']):+.2f} | "
              f"{r['flops_ratio']:.3f} | {r['params']:,} |")
    results.update(pretrained_accuracy=pre, finetune=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

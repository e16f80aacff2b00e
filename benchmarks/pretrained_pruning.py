"""One-shot damage of pruning a pretrained network, with and without handing pruned channels to consumers.

    python benchmarks/pretrained_pruning.py                     # 2,000 eval images, 512 statistics images
    python benchmarks/pretrained_pruning.py --eval 500 --stats 128   # quick check

The pretrained MLPerf Tiny VWW MobileNetV1-0.25 (96x96, ReLU6, BatchNorm) on CIFAR-10 test images resized to
96x96 (images 0..eval-1 are evaluated, the statistics come from the last ``--stats`` test images, disjoint).
For each criterion and FLOPs reduction, the channels ``FilterPruning(flops_target=...)`` selects at that level
are zeroed with :func:`tfcompress.zero_channels`, without any training:

* ``plain``: ``compensate=False`` (what pruning did before compensation existed);
* ``exact``: ``compensate=True`` without data (only provably constant channels are handed over);
* ``mean``: ``compensate=True, data=stats`` (constant or mean contribution folded into the consumers).

Criterion ``emitted`` ranks channels by what they emit once their mean is handed over: the standard deviation of
the channel at each consumer's input (on the statistics images) times the norm of the consumer's weights reading
it (``FilterPruning(criterion="emitted", compensation_data=...)``).

Reported: argmax agreement with the unpruned model and mean KL(unpruned || pruned) of the softmax outputs, and
the share of images each model calls "person" (class 1): on CIFAR-10 the unpruned model says "person" for about
1 % of them, so agreement alone is dominated by the majority class.
"""

from __future__ import annotations

import argparse
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
from tfcompress.pruning import FilterPruning  # noqa: E402

VWW = common.SHARED / "models" / "mlperf_tiny" / "vww_96.h5"


class _DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """The h5 file's legacy config carries ``groups``, which Keras 3 refuses."""

    def __init__(self, *args, groups=None, **kwargs):
        super().__init__(*args, **kwargs)


def load_vww() -> keras.Model:
    return keras.models.load_model(VWW, compile=False, custom_objects={"DepthwiseConv2D": _DepthwiseConv2D})


def images(n_eval: int, n_stats: int) -> tuple[np.ndarray, np.ndarray]:
    x, _ = common.cifar10_test()
    resize = lambda a: tf.image.resize(a.astype("float32") / 255.0, (96, 96)).numpy()  # noqa: E731
    return resize(x[:n_eval]), resize(x[-n_stats:])


def selection(model: keras.Model, criterion: str, flops: float, round_to: int | str = "auto",
              x_stats: np.ndarray | None = None) -> list[tuple[tfcompress.ChannelGroup, np.ndarray]]:
    """The (group, channels) FilterPruning removes at ``flops`` with ``criterion`` on the current weights
    (``x_stats``: the statistics images of criterion "emitted"). Its callback hooks run once, as in a first
    epoch of ``model.fit`` with the one-step "baseline" schedule; the model's weights are left pruned."""
    pruner = FilterPruning(flops_target=flops, criterion=criterion, round_to=round_to, schedule="baseline",
                           pruning_epochs=1, compensate=x_stats is not None, compensation_data=x_stats)
    pruner.set_model(model)
    pruner.on_train_begin()
    pruner.on_epoch_begin(0)
    masks = pruner.masks
    return [(g, np.nonzero(~masks[g.layers])[0]) for g in pruner.groups]


def damage(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    agree = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
    p, q = np.clip(ref, 1e-7, 1), np.clip(out, 1e-7, 1)
    return agree, float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--stats", type=int, default=512)
    ap.add_argument("--criteria", default="l1,l2,geometric_median,emitted")
    ap.add_argument("--levels", default="0.1,0.2,0.3")
    ap.add_argument("--round_to", default="auto", help='FilterPruning round_to: "auto" (its default) or an integer')
    args = ap.parse_args()
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    x_eval, x_stats = images(args.eval, args.stats)
    model = load_vww()
    weights = model.get_weights()
    ref = model.predict(x_eval, batch_size=250, verbose=0)
    kg = tfcompress.graph.build_graph(model)
    print(f"# {common.machine()}; round_to {args.round_to}; eval {args.eval} images, statistics {args.stats} images; "
          f"unpruned 'person' share {100 * np.mean(ref.argmax(-1) == 1):.1f} %")
    print("| criterion | FLOPs removed | plain agree / KL / person | exact agree / KL / person "
          "| mean agree / KL / person | max consumer err |")
    print("|---|---|---|---|---|---|")
    for criterion in args.criteria.split(","):
        for level in [float(v) for v in args.levels.split(",")]:
            model.set_weights(weights)
            chosen = selection(model, criterion, level, round_to, x_stats if criterion == "emitted" else None)
            row, worst = [], 0.0
            for mode in ("plain", "exact", "mean"):
                model.set_weights(weights)
                t0 = time.time()
                for g, idx in chosen:
                    rep = tfcompress.zero_channels(model, g, idx, graph=kg, compensate=mode != "plain",
                                                   data=x_stats if mode == "mean" else None)
                    if mode == "mean":
                        worst = max(worst, rep.max_error)
                out = model.predict(x_eval, batch_size=250, verbose=0)
                agree, kl = damage(ref, out)
                row.append(f"{100 * agree:.1f} % / {kl:.3f} / {100 * np.mean(out.argmax(-1) == 1):.1f} %")
                print(f"  {criterion} {level} {mode}: {time.time() - t0:.1f} s", file=sys.stderr)
            print(f"| {criterion} | {level:.0%} | " + " | ".join(row) + f" | {worst:.3f} |", flush=True)


if __name__ == "__main__":
    main()

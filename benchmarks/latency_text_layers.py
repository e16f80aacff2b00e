"""What a latency profile says of a text classifier's layers: seconds per inference, multiply-accumulates and
seconds per MAC of each Keras layer with weights, against the mean rate of its convolution and Dense layers
(what ``channel_seconds`` priced every layer a profile lacked at, before Embedding, attention and recurrent
layers were measured).

    python benchmarks/latency_text_layers.py --length 64 --batch 1 32 --rounds 3 --iters 20

Embedding(2000, 128) -> Conv1D(128, 5) -> MultiHeadAttention(4 x 32) with a residual add and LayerNormalization
-> Bidirectional(LSTM(64)) -> Dense(64) -> Dense(10), at a fixed sequence length (so that the MAC counts are
those of the profiled shape). Each round profiles every batch size once (interleaved); a layer's time is its
median over rounds. Precision: the f32 hint (``--default``: the device's default; on an AVX2 CPU without BF16
the two are the same setting).
"""

from __future__ import annotations

import argparse
import datetime
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from common import machine  # noqa: E402

CONV_DENSE = ("conv", "dense", "logits")


def text_model(length: int):
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(0)
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = L.Conv1D(128, 5, padding="same", activation="relu", name="conv")(L.Embedding(2000, 128, name="emb")(tokens))
    x = L.LayerNormalization(name="norm")(L.Add()([x, L.MultiHeadAttention(4, 32, name="mha")(x, x)]))
    x = L.Bidirectional(L.LSTM(64), name="bilstm")(x)
    return keras.Model(tokens, L.Dense(10, name="logits")(L.Dense(64, activation="relu", name="dense")(x)))


def layer_macs(model) -> dict[str, float]:
    from tfcompress.graph import build_graph
    from tfcompress.graph.flops import FlopsCounter

    counter = FlopsCounter(build_graph(model).graph)
    macs: dict[str, float] = {}
    for op, m in zip(counter.ops, counter.op_macs()):
        macs[op.layer] = macs.get(op.layer, 0.0) + float(m)
    return macs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--default", action="store_true", help="the device's default precision instead of f32")
    args = ap.parse_args()
    from tfcompress.pruning.latency import measure_latency_profile

    model = text_model(args.length)
    macs = layer_macs(model)
    precision = None if args.default else "f32"
    runs: dict[int, list[dict]] = {b: [] for b in args.batch}
    for _ in range(args.rounds):
        for b in args.batch:
            runs[b].append(measure_latency_profile(model, batch_size=b, iterations=args.iters, precision=precision))
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, "
          f"length {args.length}, precision {precision or 'default'}, {args.rounds} rounds x {args.iters} iterations")
    for b in args.batch:
        profile = {k: float(np.median([r[k] for r in runs[b]])) for k in runs[b][0]}
        mean_rate = sum(profile[k] for k in CONV_DENSE) / sum(macs[k] for k in CONV_DENSE)  # as channel_seconds
        total = sum(profile.values())
        print(f"\nbatch {b}: layers' time {total * 1e3:.3f} ms; conv/dense mean {mean_rate / b * 1e12:.2f} ps per MAC")
        print("| layer | ms | share | MACs / sample | ps / MAC | rate / conv-dense mean |")
        print("|---|---|---|---|---|---|")
        for k, s in profile.items():
            m = macs.get(k, 0.0)
            if not m:
                print(f"| {k} | {s * 1e3:.3f} | {s / total:.1%} | 0 (no channel) | - | - |")
                continue
            print(f"| {k} | {s * 1e3:.3f} | {s / total:.1%} | {m:,.0f} | {s / m / b * 1e12:.2f} | "
                  f"{s / m / mean_rate:.2f} |")

if __name__ == "__main__":
    main()

"""Zero a quarter of MobileNetV2's filters with the channel engine, strip them, check the outputs.

    python examples/strip_mobilenet.py
"""

import numpy as np
import keras

import tfcompress


def main() -> None:
    rng = np.random.default_rng(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10,
                                           classifier_activation=None)
    groups = tfcompress.channel_groups(model)
    print(f"{len(groups)} groups of coupled channels, e.g. {groups[1]}")
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))
    small = tfcompress.strip(model)
    x = rng.uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    err = float(np.abs(small(x) - model(x)).max())
    print(f"parameters {model.count_params():,} -> {small.count_params():,}; max output difference {err:.2e}")


if __name__ == "__main__":
    main()

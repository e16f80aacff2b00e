"""Without compensation_data, FilterPruning sets the moving statistics of the BatchNorms after changed channels
to Keras' moving average of the batch statistics training computed since the change only (debiased, recovered
from Keras' update)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

from tfcompress.pruning import FilterPruning
from conftest import randomize_batchnorm, run_mirrored


def _model(rng, batchnorm: bool = True, **after) -> keras.Model:
    """conv -> BN -> relu -> conv -> BN "after" (options ``after``) -> relu -> pool -> dense: pruning the first
    conv's channels changes what "after" receives."""
    norm = (lambda name, **kw: L.BatchNormalization(name=name, **kw)) if batchnorm else \
        (lambda name, **kw: L.Identity(name=name))
    x = keras.Input((8, 8, 3))
    h = L.Activation("relu")(norm("own")(L.Conv2D(8, 3, padding="same", name="c1")(x)))
    h = L.Activation("relu")(norm("after", **after)(L.Conv2D(6, 3, padding="same", name="c2")(h)))
    model = keras.Model(x, L.Dense(3)(L.GlobalAveragePooling2D()(h)))
    randomize_batchnorm(model, rng)
    return model


def _pruner(**kw) -> FilterPruning:
    return FilterPruning(target=0.75, schedule="baseline", pruning_epochs=1, criterion="l1", prune_first_conv=True,
                         ignored_layers=["c2"],
                         **kw)


class _BatchStatistics(keras.callbacks.Callback):
    """Before each execution, the mean and (biased) variance of the input of BatchNorm "after" on each of its
    batches, computed by Keras in training mode with the weights that execution starts from."""

    def __init__(self, x: np.ndarray, batch_size: int) -> None:
        super().__init__()
        self.x, self.batch_size, self.stats = x, batch_size, []

    def on_train_batch_begin(self, batch, logs=None):
        steps = getattr(self.model, "steps_per_execution", 1)
        f = keras.Model(self.model.input, self.model.get_layer("after").input)
        saved = [v.numpy() for v in self.model.non_trainable_variables]
        for b in range(batch, min(batch + steps, -(-len(self.x) // self.batch_size))):
            z = np.asarray(f(self.x[b * self.batch_size:(b + 1) * self.batch_size], training=True), np.float64)
            z = z.reshape(-1, z.shape[-1])
            self.stats.append((z.mean(0), z.var(0)))
        for v, value in zip(self.model.non_trainable_variables, saved):  # the "own" BatchNorm moved: put back
            v.assign(value)


def _fit(model, x, y, pruner, lr=0.05, steps_per_execution=1, batch_size=16, record=True):
    model.compile(keras.optimizers.SGD(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    stats = _BatchStatistics(x, batch_size)
    history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
                        callbacks=[stats, pruner] if record else [pruner])
    return stats.stats, history


def _expected(batches: list[np.ndarray], m: float) -> np.ndarray:
    """Keras' moving average (momentum ``m``) of ``batches`` alone, divided by the weight they hold, until the
    weight left to what came before falls to 1 % (``m ** n <= 0.01``); Keras' own update after."""
    acc = total = 0.0
    moving = None
    for n, b in enumerate(batches):
        if moving is None or m ** n > 0.01:
            acc, total = m * acc + (1 - m) * b, m * total + (1 - m)
            moving = acc / total
        else:
            moving = m * moving + (1 - m) * b
    return moving


def _data(rng, n):
    return rng.normal(0.5, 2.0, (n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("momentum, batches, policy", [(0.99, 20, "float32"), (0.5, 16, "float32"),
                                                       (0.99, 20, "mixed_float16")], indirect=["policy"])
def test_moving_statistics_are_the_average_of_the_batches_since_the_change(momentum, batches, policy, rng):
    """With momentum 0.99 all 20 batches are averaged; with 0.5 the first 7 are, then Keras' moving average
    takes over. Under mixed_float16 the BatchNorm computes its statistics in float32 from float16 inputs.
    Tolerance: 1e-4 relative (float32 moving statistics, inverted at 1 / (1 - momentum))."""
    model = _model(rng, momentum=momentum)
    x, y = _data(rng, 16 * batches)
    pruner = _pruner()
    stats, _ = _fit(model, x, y, pruner)
    assert pruner.pruning_level == 0.75
    bn = model.get_layer("after")
    for k, moving in enumerate((bn.moving_mean, bn.moving_variance)):
        np.testing.assert_allclose(np.asarray(moving), _expected([s[k] for s in stats], momentum), rtol=1e-4,
                                   atol=1e-6)


def test_training_is_the_same_with_and_without_the_average(rng):
    """The moving statistics do not enter training: weights and losses are identical, bit for bit."""
    x, y = _data(rng, 16 * 12)
    first = _model(rng)
    second = keras.models.clone_model(first)
    second.set_weights(first.get_weights())
    _, h1 = _fit(first, x, y, _pruner(), record=False)
    _, h2 = _fit(second, x, y, _pruner(average_batchnorm=False), record=False)
    assert h1.history["loss"] == h2.history["loss"]
    for a, b in zip(first.trainable_variables, second.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(first.get_layer("after").moving_variance.numpy(),
                           second.get_layer("after").moving_variance.numpy(), rtol=0.01)


def test_several_steps_per_execution(rng):
    """steps_per_execution=4 over 22 batches (the last execution runs 2): the same average as step by step.
    Learning rate 0, so that the weights stay those measured before each execution; tolerance 1e-4 relative."""
    model = _model(rng)
    x, y = _data(rng, 16 * 22)
    with pytest.warns(UserWarning, match="steps_per_execution=4"):
        stats, _ = _fit(model, x, y, _pruner(), lr=0.0, steps_per_execution=4)
    assert len(stats) == 22
    bn = model.get_layer("after")
    for k, moving in enumerate((bn.moving_mean, bn.moving_variance)):
        np.testing.assert_allclose(np.asarray(moving), _expected([s[k] for s in stats], 0.99), rtol=1e-4, atol=1e-6)


def test_several_steps_per_execution_on_data_of_unknown_length(rng):
    """The last execution of an epoch may run fewer steps, how many is not known: left to Keras, and said."""
    model = _model(rng)
    x, y = _data(rng, 16 * 6)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).filter(lambda *_: True)  # length unknown
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    with pytest.warns(UserWarning, match="average_batchnorm"):
        model.fit(data, epochs=1, verbose=0, callbacks=[_pruner()])
    bn = model.get_layer("after")
    assert np.isfinite(bn.moving_variance.numpy()).all()


def test_a_model_without_batchnorm(rng):
    model = _model(rng, batchnorm=False)
    x, y = _data(rng, 16 * 4)
    pruner = _pruner()
    _fit(model, x, y, pruner, record=False)
    assert pruner.pruning_level == 0.75
    assert np.isfinite(model.predict(x, verbose=0)).all()


MIRRORED = """
    from test_batchnorm_average import _data, _expected, _model, _pruner
    for synchronized in (False, True):
        rng = np.random.default_rng(0)
        with strategy.scope():
            model = _model(rng, synchronized=synchronized)
            model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = _data(rng, 16 * 12)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[_pruner()])
        f = keras.Model(model.input, model.get_layer("after").input)
        stats = []
        for b in range(12):  # each replica normalises its 8 samples; "own" is not synchronised
            halves = [np.asarray(f(x[b * 16 + o:b * 16 + o + 8], training=True), np.float64).reshape(-1, 6)
                      for o in (0, 8)]
            z = np.concatenate(halves) if synchronized else halves[0]
            stats.append((z.mean(0), z.var(0)))
        bn = model.get_layer("after")
        for k, v in enumerate((bn.moving_mean, bn.moving_variance)):
            np.testing.assert_allclose(np.asarray(v), _expected([s[k] for s in stats], 0.99), rtol=1e-4, atol=1e-6)
    print("AVERAGED")
"""


def test_mirrored_strategy(tmp_path):
    """Under MirroredStrategy (two CPU replicas, learning rate 0) the moving statistics Keras keeps are the first
    replica's batch statistics, or with ``synchronized=True`` the whole batch's: the average is of those."""
    assert "AVERAGED" in run_mirrored(tmp_path, MIRRORED)


def test_the_option_is_checked_and_configured():
    with pytest.raises(ValueError, match="average_batchnorm must be true or false"):
        FilterPruning(average_batchnorm=1)
    assert FilterPruning.from_config({"average_batchnorm": False}).average_batchnorm is False
    assert FilterPruning().get_config()["average_batchnorm"] is True

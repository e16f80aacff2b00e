"""Distillation while pruning: the loss against Keras' own losses, and a pruned MNIST run that uses it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfcompress
from tfcompress.pruning import DistillationAccuracy, DistillationLoss, FilterPruning, with_teacher
from conftest import run_mirrored
from data import mnist
from test_pruning import residual_cnn


def _probs(rng, n=32, classes=10, scale=3.0):
    z = rng.normal(size=(n, classes)) * scale
    return z, keras.ops.convert_to_numpy(keras.ops.softmax(z)).astype("float32")


@pytest.mark.parametrize("alpha, temperature", [(0.5, 4.0), (0.2, 2.0), (1.0, 1.0), (0.0, 8.0)])
def test_loss_equals_keras_crossentropy_plus_scaled_kl(rng, alpha, temperature):
    """Matches keras.losses.CategoricalCrossentropy + T^2 * keras.losses.KLDivergence of the softened outputs,
    for probability outputs and for logits (relative tolerance 1e-4, float32)."""
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 32)]
    zs, ps = _probs(rng)
    zt, pt = _probs(rng)
    soft = lambda z: keras.ops.softmax(keras.ops.convert_to_tensor(z / temperature, "float32"))  # noqa: E731
    ce = keras.losses.CategoricalCrossentropy(from_logits=True)(labels, zs.astype("float32"))
    kl = keras.losses.KLDivergence()(soft(zt), soft(zs))
    expected = float(alpha * ce + (1 - alpha) * temperature ** 2 * kl)
    y_true = np.concatenate([labels, pt], -1)
    from_probs = float(DistillationLoss(alpha, temperature)(y_true, ps))
    from_logits = float(DistillationLoss(alpha, temperature, from_logits=True)(
        np.concatenate([labels, zt.astype("float32")], -1), zs.astype("float32")))
    assert from_logits == pytest.approx(expected, rel=1e-4)
    assert from_probs == pytest.approx(expected, rel=1e-4)


def test_loss_is_the_crossentropy_when_the_student_is_the_teacher(rng):
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 16)]
    _, p = _probs(rng, n=16)
    loss = float(DistillationLoss(alpha=0.3)(np.concatenate([labels, p], -1), p))
    assert loss == pytest.approx(0.3 * float(keras.losses.CategoricalCrossentropy()(labels, p)), rel=1e-4)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="with_teacher"):
        DistillationLoss()(np.zeros((4, 10), "float32"), np.full((4, 10), 0.1, "float32"))
    teacher = residual_cnn()
    x, y = np.zeros((8, 28, 28, 1), "float32"), np.zeros(8, "int32")
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        with_teacher((x, y), teacher)
    with pytest.raises(ValueError, match="batch the dataset"):
        with_teacher(tf.data.Dataset.from_tensor_slices((x, y)), teacher)
    with pytest.raises(ValueError, match="one-hot or soft labels"):
        with_teacher(tf.data.Dataset.from_tensor_slices((x, np.zeros((8, 3), "float32"))).batch(4), teacher)
    two_heads = keras.Model(teacher.inputs, [teacher.output, teacher.output])
    with pytest.raises(ValueError, match="single output"):
        with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), two_heads)


def test_with_teacher_targets_and_sample_weights():
    x, y, _, _ = mnist(n_train=64, n_test=0)
    net = residual_cnn()
    listed = keras.Model(net.input, [net.output])  # outputs given as a list, as in models loaded from .h5
    w = np.linspace(0.5, 1.5, 64).astype("float32")
    for teacher, labels in ((net, y), (net, y[:, None]), (listed, np.eye(10, dtype="float32")[y])):
        ds = with_teacher(tf.data.Dataset.from_tensor_slices((x, labels, w)).batch(16), teacher)
        xb, target, wb = next(iter(ds))
        np.testing.assert_array_equal(target[:, :10].numpy(), np.eye(10)[y[:16]])
        np.testing.assert_allclose(target[:, 10:].numpy(), teacher(x[:16], training=False).numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(wb.numpy(), w[:16])


class DictInputTeacher(keras.Model):
    """A teacher written as a subclassed model taking a dict of inputs: it has no ``inputs`` or ``outputs``."""

    def __init__(self):
        super().__init__()
        self.flatten, self.head = keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")

    def call(self, inputs, training=False):
        return self.head(keras.ops.concatenate([self.flatten(inputs["image"]), inputs["extra"]], -1))


def test_with_teacher_takes_subclassed_teachers_and_dict_inputs(rng):
    """The teacher's classes come from tracing it on the dataset's inputs, so a subclassed model (built or not)
    with dict inputs works; a teacher that cannot take the inputs gets a clear error, not a trace from Keras."""
    x = {"image": rng.random((8, 4, 4, 1), dtype="float32"), "extra": rng.random((8, 3), dtype="float32")}
    y = np.arange(8) % 10
    for built in (False, True):
        teacher = DictInputTeacher()
        if built:
            teacher({k: v[:1] for k, v in x.items()})
        _, target = next(iter(with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), teacher)))
        np.testing.assert_array_equal(target[:, :10].numpy(), np.eye(10)[y[:4]])
        np.testing.assert_allclose(target[:, 10:].numpy(), teacher({k: v[:4] for k, v in x.items()}).numpy(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot take the dataset's inputs"):
        with_teacher(tf.data.Dataset.from_tensor_slices((x["image"], y)).batch(4), DictInputTeacher())
    with pytest.raises(ValueError, match="batch the dataset"):
        with_teacher(tf.data.Dataset.from_tensor_slices((x, y)), DictInputTeacher())


def test_pruning_with_distillation_on_mnist_saves_and_strips(tmp_path):
    """A teacher trained two epochs teaches its copy while FilterPruning removes half of every group's channels:
    the logs carry the label accuracy and the pruning level, the saved model (with its compiled loss) reloads,
    and the stripped model agrees with the pruned one."""
    x, y, xt, yt = mnist()
    teacher = residual_cnn()
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # a lower rate in the second epoch lets the BatchNorm moving statistics catch up (see test_pruning)
    lr = keras.callbacks.LearningRateScheduler(lambda epoch: [3e-3, 5e-4][epoch])
    teacher.fit(x, y, epochs=2, batch_size=64, callbacks=[lr], verbose=0)
    student = keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    student.compile(keras.optimizers.Adam(1e-3), DistillationLoss(alpha=0.5, temperature=4.0, from_logits=True),
                    metrics=[DistillationAccuracy()])
    train = with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=1).batch(64), teacher)
    val = with_teacher(tf.data.Dataset.from_tensor_slices((xt, yt)).batch(256), teacher)
    pruner = FilterPruning(target=0.5, pruning_epochs=1, criterion="l2")
    hist = student.fit(train, validation_data=val, epochs=2, callbacks=[pruner], verbose=0)
    assert hist.history["pruning_level"][-1] == pytest.approx(0.5)
    assert {"loss", "accuracy", "val_accuracy"} <= set(hist.history)
    # the metric is the label accuracy: the same as Keras' own on the test set
    probe = keras.models.clone_model(student)
    probe.set_weights(student.get_weights())
    probe.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    keras_acc = probe.evaluate(xt, yt, batch_size=256, verbose=0)[1]
    assert hist.history["val_accuracy"][-1] == pytest.approx(keras_acc, abs=1e-6)
    assert keras_acc > 0.85
    student.save(tmp_path / "pruned.keras")
    reloaded = keras.models.load_model(tmp_path / "pruned.keras")
    assert reloaded.loss.get_config()["temperature"] == 4.0 and reloaded.loss.from_logits
    assert reloaded.evaluate(val, verbose=0)[1] == pytest.approx(keras_acc, abs=1e-6)
    small = tfcompress.strip(reloaded)
    assert tfcompress.count_flops(small) < 0.7 * tfcompress.count_flops(student)
    np.testing.assert_allclose(small.predict(xt[:256], verbose=0), student.predict(xt[:256], verbose=0),
                               rtol=1e-4, atol=1e-4)



def test_sensitivity_allocation_measures_the_distillation_loss():
    """With ``flops_allocation="sensitivity"`` the probes evaluate the compiled DistillationLoss, so the
    held-out data goes through with_teacher too; the FLOPs goal is still reached."""
    x, y, _, _ = mnist(n_train=768, n_test=0)
    teacher = residual_cnn()
    student = keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    student.compile(keras.optimizers.Adam(1e-3), DistillationLoss(from_logits=True))
    batches = lambda a, b: tf.data.Dataset.from_tensor_slices((a, b)).batch(128)  # noqa: E731
    pruner = FilterPruning(flops_target=0.3, flops_allocation="sensitivity", pruning_epochs=1, criterion="l1",
                           sensitivity_data=with_teacher(batches(x[512:], y[512:]), teacher))
    hist = student.fit(with_teacher(batches(x[:512], y[:512]), teacher), epochs=1, callbacks=[pruner], verbose=0)
    assert hist.history["flops_ratio"][-1] <= 0.7 + 1e-6
    assert np.isfinite(hist.history["loss"][-1])
    # raw labels for a distillation loss: a clear error when training starts, the weights untouched
    before = [w.copy() for w in student.get_weights()]
    pruner = FilterPruning(flops_target=0.3, flops_allocation="sensitivity", pruning_epochs=1, criterion="l1",
                           start_epoch=1, sensitivity_data=(x[512:], y[512:]))
    with pytest.raises(ValueError, match="sensitivity_data does not fit .* through with_teacher") as info:
        student.fit(with_teacher(batches(x[:512], y[:512]), teacher), epochs=2, callbacks=[pruner], verbose=0)
    assert "distillation targets must have 2 x 10 columns" in str(info.value)
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))

MIRRORED = """
    from tfcompress.pruning import DistillationAccuracy, DistillationLoss, FilterPruning, with_teacher
    from test_pruning import residual_cnn
    x, y, xt, yt = mnist(2048, 512)
    with strategy.scope():
        teacher = residual_cnn()
        student = residual_cnn()
        student.set_weights(teacher.get_weights())
        student.compile(keras.optimizers.Adam(1e-3), DistillationLoss(from_logits=True),
                        metrics=[DistillationAccuracy()])
    ds = with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(128), teacher)
    pruner = FilterPruning(target=0.5, criterion="l2", pruning_epochs=1)
    hist = student.fit(ds, epochs=1, callbacks=[pruner], verbose=0)
    loss = hist.history["loss"][-1]
    assert np.isfinite(loss) and 0.0 <= hist.history["accuracy"][-1] <= 1.0, hist.history
    small = tfcompress.strip(student)
    a, b = student(xt).numpy(), small(xt).numpy()
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    print("LEVEL", hist.history["pruning_level"][-1])
"""


def test_distillation_under_mirrored_strategy(tmp_path):
    assert "LEVEL 0.5" in run_mirrored(tmp_path, MIRRORED)

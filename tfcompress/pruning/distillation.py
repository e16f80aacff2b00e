"""Knowledge distillation while pruning: the unpruned model teaches its pruned copy.

Why: a pruned network recovers more accuracy when it also learns the unpruned model's softened outputs (Hinton
et al., 2015); on ResNet-8 with 40 % of the FLOPs removed this is worth about one point (BENCHMARKS.md 1b). It is
a dataset transform and a loss, not a model wrapper, so ``FilterPruning``, ``tfcompress.strip`` and
``model.save`` keep seeing the user's own model::

    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    model.compile(optimizer, loss=DistillationLoss(alpha=0.5, temperature=4.0),
                  metrics=[DistillationAccuracy()])
    model.fit(with_teacher(train_ds, teacher), epochs=20, callbacks=[FilterPruning(flops_target=0.4)])

The targets ``with_teacher`` produces are ``[one-hot label, teacher output]`` concatenated on the last axis, which
is what ``DistillationLoss`` and ``DistillationAccuracy`` read.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

__all__ = ["DistillationAccuracy", "DistillationLoss", "with_teacher"]

_PACKAGE = "tfcompress"
_TINY = 1e-30  # float32 softmax outputs underflow to 0 near 1e-38; clipping there changes no other value


def _log(probabilities):
    """Logits standing in for softmax outputs (softmax is shift-invariant, so log-probabilities will do)."""
    return ops.log(ops.clip(probabilities, _TINY, 1.0))


def with_teacher(dataset: tf.data.Dataset, teacher: keras.Model) -> tf.data.Dataset:
    """``dataset`` with each batch's labels replaced by ``[one-hot label, teacher(x)]``.

    Args:
        dataset: a *batched* ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)``; ``y`` holds integer
            class indices (shape ``(batch,)`` or ``(batch, 1)``) or one-hot / soft labels ``(batch, classes)``.
            Augment before this transform, so that the teacher sees the same images as the student.
        teacher: a single-output classifier, ``(batch, classes)``, evaluated with ``training=False``: a
            Functional, Sequential or subclassed ``keras.Model`` that takes the dataset's ``x`` as it comes (one
            tensor, or a tuple / dict of them). Use a copy of the model, not the model being pruned: the pruned
            weights would change the teacher too.

    Returns:
        The mapped dataset; ``sample_weight`` passes through unchanged.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"with_teacher needs a tf.data.Dataset, got {type(dataset).__name__}; "
                        "wrap arrays with tf.data.Dataset.from_tensor_slices((x, y)).batch(n)")
    if not isinstance(teacher, keras.Model):
        raise TypeError(f"teacher must be a keras.Model, got {type(teacher).__name__}")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError("with_teacher needs a dataset of (x, y) or (x, y, sample_weight) pairs, got elements "
                         f"{spec}")
    x_spec, y_spec = spec[0], spec[1]
    if not all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(x_spec)) or not isinstance(y_spec, tf.TensorSpec):
        raise ValueError("with_teacher needs dense input tensors (one, or a tuple / dict of them) and one label "
                         f"tensor per element, got {spec}")
    inputs = getattr(teacher, "inputs", None) or []
    if len(inputs) == 1 and isinstance(x_spec, tf.TensorSpec) and x_spec.shape.rank != len(inputs[0].shape):
        raise ValueError(f"the dataset's inputs have rank {x_spec.shape.rank}, the teacher expects batches of rank "
                         f"{len(inputs[0].shape)}: batch the dataset before with_teacher")
    sparse = y_spec.dtype.is_integer
    if sparse and not (y_spec.shape.rank == 1 or (y_spec.shape.rank == 2 and y_spec.shape[-1] == 1)):
        hint = ": batch the dataset before with_teacher" if y_spec.shape.rank == 0 else ""
        raise ValueError(f"integer labels must have shape (batch,) or (batch, 1), got {y_spec.shape}{hint}")
    classes = _teacher_classes(teacher, x_spec)
    if not sparse and (y_spec.shape.rank != 2 or y_spec.shape[-1] != classes):
        raise ValueError(f"float labels must be one-hot or soft labels of shape (batch, {classes}), got {y_spec.shape}")

    def targets(x, y, *sample_weight):
        if sparse:
            y = tf.one_hot(tf.reshape(y, [-1]), classes)
        soft = tf.cast(_only_output(teacher(x, training=False)), tf.float32)
        return (x, tf.concat([tf.cast(y, tf.float32), soft], -1), *sample_weight)

    return dataset.map(targets, num_parallel_calls=tf.data.AUTOTUNE)


def _teacher_classes(teacher: keras.Model, x_spec) -> int:
    """The teacher's number of classes, from its output for inputs like ``x_spec`` (traced, nothing computed)."""
    symbolic = tf.nest.map_structure(lambda s: keras.KerasTensor(s.shape, s.dtype.name), x_spec)
    try:
        out = teacher.compute_output_spec(symbolic, training=False)
    except Exception as e:  # a subclassed call() may fail in any way on inputs it does not accept
        raise ValueError(f"the teacher cannot take the dataset's inputs {x_spec} ({type(e).__name__}: {e}); "
                         "is the dataset batched, and are its inputs what the teacher is called with?") from e
    out = _only_output(out)
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[-1] is None:
        got = f"shape {tuple(shape)}" if shape is not None else f"{type(out).__name__} outputs"
        raise ValueError(f"teacher must have a single output of shape (batch, classes), got {got}")
    return int(shape[-1])


def _only_output(out):
    """A model's output given as a one-element list (Functional models built with ``outputs=[y]``, models loaded
    from .h5) as the tensor itself; anything else unchanged."""
    return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out


def _split(y_true, y_pred):
    """(labels, teacher outputs) from the ``with_teacher`` targets, checked against the student's width."""
    classes = y_pred.shape[-1]
    rank = len(y_true.shape)
    if rank != 2 or (y_true.shape[-1] is not None and classes is not None and y_true.shape[-1] != 2 * classes):
        got = f"{y_true.shape[-1]}" if rank == 2 else f"targets of shape {tuple(y_true.shape)}"
        raise ValueError(f"distillation targets must have 2 x {classes} columns ([one-hot label, teacher output]), "
                         f"got {got}: build the dataset with tfcompress.pruning.with_teacher")
    return y_true[:, :classes], y_true[:, classes:]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DistillationLoss(keras.losses.Loss):
    """``alpha * CE(label, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` (Hinton et al.).

    ``teacher_T`` and ``student_T`` are the softmax of the outputs divided by ``temperature``; the ``T^2`` keeps
    the soft term's gradients on the scale of the hard one's. ``y_true`` comes from :func:`with_teacher`.

    Args:
        alpha: weight of the cross-entropy with the labels, in [0, 1]; ``1 - alpha`` goes to the teacher.
        temperature: softmax temperature, > 0 (4 is the value measured in BENCHMARKS.md 1b).
        from_logits: whether the student's and the teacher's outputs are logits; if False (outputs are
            probabilities, as after a softmax) their logarithms stand in for the logits.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, from_logits: bool = False,
                 reduction: str = "sum_over_batch_size", name: str = "distillation", dtype=None):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(reduction=reduction, name=name, dtype=dtype)
        self.alpha, self.temperature, self.from_logits = float(alpha), float(temperature), bool(from_logits)

    def call(self, y_true, y_pred):
        labels, teacher = _split(y_true, y_pred)
        student = y_pred if self.from_logits else _log(y_pred)
        teacher = teacher if self.from_logits else _log(teacher)
        ce = -ops.sum(labels * ops.log_softmax(student, axis=-1), axis=-1)
        t = self.temperature
        log_teacher = ops.log_softmax(teacher / t, axis=-1)
        kl = ops.sum(ops.exp(log_teacher) * (log_teacher - ops.log_softmax(student / t, axis=-1)), axis=-1)
        return self.alpha * ce + (1.0 - self.alpha) * t * t * kl

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "temperature": self.temperature,
                "from_logits": self.from_logits}


def _label_accuracy(y_true, y_pred):
    labels, _ = _split(y_true, y_pred)
    return ops.cast(ops.equal(ops.argmax(labels, axis=-1), ops.argmax(y_pred, axis=-1)), "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DistillationAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy of the student against the labels in :func:`with_teacher` targets (the teacher part is ignored)."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(_label_accuracy, name=name, dtype=dtype)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}

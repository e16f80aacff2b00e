"""Put a Trainer model's example parsing back in front of its compressed network (no TFX import needed).

A TFX Trainer usually saves a ``serving_default`` signature that takes serialized ``tf.train.Example``
records, parses them and runs the network: that is what the Evaluator (TFMA) and example-based serving feed.
The stripper and the converters work on the network alone (a float tensor in, no string parsing), so the
Trainer also saves the network as its own signature and the parsing as another. After compression the
compressed SavedModel holds the network only; :func:`attach_parsing` composes the Trainer's parsing signature
with it and saves the result with the example-taking signature restored, checked against the Trainer's own
example-taking signature on real records.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from tfcompress.errors import ExportError
from tfcompress.export.artifacts import SERVING_DIR, compress_model_dir, serving_model_path
from tfcompress.stripping.savedmodel_strip import check_outputs

__all__ = ["attach_parsing", "compress_trainer_model", "read_records"]


def _signature(loaded, saved_model_dir: str, key: str):
    if key not in loaded.signatures:
        raise ExportError(f"the SavedModel {saved_model_dir!r} has no signature {key!r} "
                          f"(it has {sorted(loaded.signatures)})")
    return loaded.signatures[key]


def _inputs(fn) -> dict:
    """A signature's inputs as ``{name: TensorSpec}``."""
    return dict(fn.structured_input_signature[1])


def _check_composable(parsing, network, parsing_signature: str, network_signature: str) -> None:
    produced, wanted = dict(parsing.structured_outputs), _inputs(network)
    if sorted(produced) != sorted(wanted):
        raise ExportError(f"the parsing signature {parsing_signature!r} outputs {sorted(produced)} but the "
                          f"network signature {network_signature!r} takes {sorted(wanted)}")
    for name, spec in wanted.items():
        if produced[name].dtype != spec.dtype or not spec.shape.is_compatible_with(produced[name].shape):
            raise ExportError(f"the parsing signature {parsing_signature!r} outputs {name!r} as {produced[name]} "
                              f"but the network signature {network_signature!r} takes {spec}")


def _composed_function(parsing, network):
    """``tf.function(serialized inputs -> network(**parsing(...)))`` with the parsing signature's input names."""
    import tensorflow as tf

    specs = _inputs(parsing)
    names = sorted(specs)

    def serve(*args):
        return network(**parsing(**dict(zip(names, args))))

    signature = [tf.TensorSpec(specs[n].shape, specs[n].dtype, name=n) for n in names]
    return tf.function(serve, input_signature=signature, autograph=False)


def attach_parsing(
    trainer_serving_dir: str,
    compressed_serving_dir: str,
    network_signature: str,
    parsing_signature: str,
    serving_signature: str = "serving_default",
    check_records: list[bytes] | None = None,
    tolerance: float = 1e-4,
) -> None:
    """Re-save ``compressed_serving_dir`` with ``serving_signature`` = network(parsing(examples)).

    ``parsing_signature`` comes from the Trainer's SavedModel (it has no variables, so none of the Trainer's
    weights are saved with it); ``network_signature`` from the compressed one. The result keeps the compressed
    SavedModel's signatures and adds the parsing one and ``serving_signature``. With ``check_records``
    (serialized examples) the new ``serving_signature`` must match the Trainer's ``serving_signature`` within
    ``tolerance`` (relative max error), else ExportError.
    """
    import tensorflow as tf

    if network_signature == serving_signature:
        raise ExportError(f"the network signature {network_signature!r} would be replaced by the example-taking "
                          f"{serving_signature!r}: give the network its own signature key")
    trainer = tf.saved_model.load(trainer_serving_dir)
    parsing = _signature(trainer, trainer_serving_dir, parsing_signature)
    compressed = tf.saved_model.load(compressed_serving_dir)
    network = _signature(compressed, compressed_serving_dir, network_signature)
    _check_composable(parsing, network, parsing_signature, network_signature)

    module = tf.Module()
    module.compressed = compressed  # the compressed network's variables, saved once for every signature
    module.serve = _composed_function(parsing, network)
    module.parse = parsing
    signatures = dict(compressed.signatures)
    signatures[parsing_signature] = parsing
    signatures[serving_signature] = module.serve.get_concrete_function()
    if check_records and len(_inputs(parsing)) != 1:
        raise ExportError(f"check_records need a parsing signature with one input (the serialized examples); "
                          f"{parsing_signature!r} takes {sorted(_inputs(parsing))}")
    target = os.path.abspath(compressed_serving_dir)
    tmp = tempfile.mkdtemp(prefix=".with_parsing-", dir=os.path.dirname(target))
    try:
        tf.saved_model.save(module, tmp, signatures=signatures)
        if check_records:
            records = {sorted(_inputs(parsing))[0]: tf.constant(check_records)}
            reference = _signature(trainer, trainer_serving_dir, serving_signature)(**records)
            got = tf.saved_model.load(tmp).signatures[serving_signature](**records)
            check_outputs({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in reference.items()},
                          tolerance, f"the compressed {serving_signature!r} does not match the Trainer's on examples")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # two renames, no copy: any failure above leaves the compressed model as it was
    old = tmp + ".old"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def read_records(examples_uri: str, split: str, limit: int) -> list[bytes]:
    """Up to ``limit`` serialized records of one split of an Examples artifact (gzipped TFRecords)."""
    import glob

    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    if not files:
        raise ExportError(f"no records in split {split!r} of {examples_uri!r}")
    compression = "GZIP" if files and files[0].endswith(".gz") else ""
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type=compression).take(limit)]


def _trainer_parsing(model_uri: str, signature: str, parsing_signature: str):
    """The Trainer's parsing signature, checked to feed its network signature (before any compression work)."""
    import tensorflow as tf

    if signature == "serving_default":
        raise ExportError("with parsing_signature, signature must name the network signature (not "
                          "'serving_default', which takes the serialized examples)")
    src = serving_model_path(model_uri)
    trainer = tf.saved_model.load(src)
    parsing = _signature(trainer, src, parsing_signature)
    _check_composable(parsing, _signature(trainer, src, signature), parsing_signature, signature)
    return parsing


def compress_trainer_model(model_uri: str, output_uri: str, examples_uri: str | None = None,
                           parsing_signature: str = "", **options) -> dict:
    """:func:`compress_model_dir`, then, with ``parsing_signature``, :func:`attach_parsing`.

    ``options`` are :func:`compress_model_dir`'s (``signature`` names the network signature to compress). The
    restored ``serving_default`` is checked against the Trainer's on up to 64 records of the examples' split.
    """
    signature = options.get("signature", "serving_default")
    parsing = _trainer_parsing(model_uri, signature, parsing_signature) if parsing_signature else None
    metrics = compress_model_dir(model_uri, output_uri, examples_uri, **options)
    if parsing is not None:
        records = None
        if examples_uri and len(_inputs(parsing)) == 1:
            records = read_records(examples_uri, options.get("split", "eval"), 64)
        else:
            warnings.warn(f"the restored {'serving_default'!r} is not checked against the Trainer's: "
                          + ("no examples given" if not examples_uri else
                             f"{parsing_signature!r} takes more than one input"), stacklevel=2)
        attach_parsing(serving_model_path(model_uri), os.path.join(output_uri, SERVING_DIR), signature,
                       parsing_signature, check_records=records)
    return metrics

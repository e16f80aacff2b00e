"""The one check that a path is a SavedModel directory, shared by the stripper and the export's option checks.

Imports nothing beyond the standard library, so a command can reject a wrong path before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import os

from tfcompress.errors import ExportError

__all__ = ["SAVED_MODEL_FILES", "ServingSignatures", "check_saved_model_dir", "check_signature", "is_saved_model_dir",
           "missing_signature", "read_saved_model_proto", "read_serving_signatures", "signature_inputs",
           "signature_keys", "unknown_rank"]

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")  # what tf.saved_model.contains_saved_model looks for
CHUNKED_FILE = "saved_model.cpb"  # TensorFlow's proto-splitter format, for SavedModels whose proto exceeds 2 GiB


def check_saved_model_dir(path: str | os.PathLike) -> None:
    """Raise :class:`ExportError` naming ``path`` unless it is a directory holding ``saved_model.pb`` (or
    ``.pbtxt``)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"the SavedModel directory must be a non-empty path, got {path!r}")
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise ExportError(f"SavedModel directory {os.fspath(path)!r} does not exist")
        if os.fspath(path).lower().endswith((".keras", ".h5", ".hdf5")):
            raise ExportError(f"{os.fspath(path)!r} is a Keras model file, not a SavedModel: export it first "
                              "(keras.models.load_model(path).export(DIR)) and give DIR")
        raise ExportError(f"{os.fspath(path)!r} is not a directory (give the SavedModel's directory)")
    if not is_saved_model_dir(path):
        if os.path.isfile(os.path.join(path, CHUNKED_FILE)):
            raise ExportError(f"{os.fspath(path)!r} holds a chunked SavedModel ({CHUNKED_FILE}, which TensorFlow "
                              "writes for graphs over 2 GiB): the export cannot read it, since its frozen graph and "
                              "ONNX model would exceed protocol buffers' 2 GiB limit too")
        raise ExportError(f"{os.fspath(path)!r} is not a SavedModel directory (no saved_model.pb)")


def is_saved_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds ``saved_model.pb`` or ``saved_model.pbtxt``."""
    return any(os.path.isfile(os.path.join(path, f)) for f in SAVED_MODEL_FILES)


def read_saved_model_proto(src_dir: str | os.PathLike):
    """``src_dir``'s ``saved_model.pb`` (or, written as text, ``saved_model.pbtxt``) as a ``SavedModel``
    protocol buffer, without loading the model (TensorFlow's protobuf modules are imported here, on first use)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    binary = os.path.join(src_dir, "saved_model.pb")
    if os.path.isfile(binary):
        with open(binary, "rb") as f:
            sm.ParseFromString(f.read())
    else:
        with open(os.path.join(src_dir, "saved_model.pbtxt"), encoding="utf-8") as f:
            text_format.Parse(f.read(), sm)
    return sm


# TensorFlow's DataType enum (tensorflow/core/framework/types.proto) -> numpy type name, for the types a
# signature input commonly has
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 9: "int64", 10: "bool",
           17: "uint16", 19: "float16", 22: "uint32", 23: "uint64"}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes):
    """``(field number, value)`` of a protocol buffer message's fields: ints for varints, bytes for
    length-delimited fields (fixed-width fields are skipped)."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos, value = pos + (8 if wire == 1 else 4), None
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def _map_entries(buf: bytes, number: int) -> dict[str, bytes]:
    """The entries of a ``map<string, message>`` field ``number`` of a message."""
    entries = {}
    for n, entry in _fields(buf):
        if n == number:
            fields = dict(_fields(entry))
            entries[fields.get(1, b"").decode()] = fields.get(2, b"")
    return entries


def _tensor_info(buf: bytes) -> tuple[str, list[int | None] | None] | None:
    """(numpy dtype name, dims with None where unknown, or None for an unknown rank) of a dense TensorInfo."""
    fields = list(_fields(buf))
    dtype = _DTYPES.get(next((v for n, v in fields if n == 2), 0))
    if dtype is None or any(n in (4, 5) for n, _ in fields):  # another type, a sparse or composite tensor
        return None
    shape = next((v for n, v in fields if n == 3), b"")
    dims, unknown_rank = [], False
    for n, v in _fields(shape):
        if n == 2:
            size = dict(_fields(v)).get(1, 0)
            size = size - (1 << 64) if size >= 1 << 63 else size  # int64 -1: an unknown size
            dims.append(None if size < 0 else size)
        elif n == 3:
            unknown_rank = bool(v)
    return dtype, None if unknown_rank else dims


def _serving_meta_graph(src_dir: str | os.PathLike) -> bytes | None:
    """The serialized meta graph TensorFlow loads from ``src_dir``'s ``saved_model.pb``: the only one, or of
    several the one tagged exactly ``serve`` (``tf.saved_model.load`` takes an only meta graph whatever its
    tags; of several, the stripper's TF1 loader takes the one whose tag set is ``{"serve"}``). None when it
    cannot say without TensorFlow (a text ``.pbtxt``, an unreadable or invalid file, several meta graphs none
    of which is tagged so)."""
    path = os.path.join(src_dir, "saved_model.pb")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            buf = f.read()
        meta_graphs = [mg for n, mg in _fields(buf) if n == 2]
        if len(meta_graphs) == 1:
            return meta_graphs[0]
        for mg in meta_graphs:
            info = dict(_fields(mg)).get(1, b"")
            if {v for k, v in _fields(info) if k == 4} == {b"serve"}:
                return mg
    except (OSError, IndexError, ValueError, TypeError):  # not a valid protocol buffer: TensorFlow says why
        return None
    return None


@dataclasses.dataclass(frozen=True)
class ServingSignatures:
    """The signatures of a SavedModel's serving meta graph (:func:`_serving_meta_graph`), as ``saved_model.pb``
    declares them, read once without TensorFlow: serialized ``SignatureDef`` by key, or None when they cannot be
    read so (a text ``.pbtxt``, an invalid file, several meta graphs none tagged exactly ``serve``), in which
    case TensorFlow's loader judges the SavedModel later."""

    signatures: dict[str, bytes] | None

    def keys(self) -> list[str] | None:
        """The signature keys (sorted; TensorFlow's ``__saved_model_init_op`` is no signature), or None."""
        if self.signatures is None:
            return None
        return sorted(k for k in self.signatures if not k.startswith("__"))

    def inputs(self, key: str) -> dict | None:
        """Signature ``key``'s inputs: name -> ``(numpy dtype name, dims)`` (dims None for an unknown rank, a
        dim None for an unknown size); None when not known so (no such signature, an input of another type or a
        sparse one)."""
        return self._tensors(key, 1)

    def outputs(self, key: str) -> dict | None:
        """Signature ``key``'s outputs, as :meth:`inputs` gives its inputs."""
        return self._tensors(key, 2)

    def _tensors(self, key: str, number: int) -> dict | None:
        signature = (self.signatures or {}).get(key)
        if signature is None:
            return None
        try:
            tensors = {name: _tensor_info(t) for name, t in _map_entries(signature, number).items()}
        except (IndexError, ValueError, UnicodeDecodeError):  # not a valid protocol buffer: TensorFlow says why
            return None
        return None if not tensors or None in tensors.values() else tensors


def read_serving_signatures(src_dir: str | os.PathLike) -> ServingSignatures:
    """Parse ``src_dir``'s ``saved_model.pb`` once for everything checked before TensorFlow loads."""
    meta_graph = _serving_meta_graph(src_dir)
    if meta_graph is None:
        return ServingSignatures(None)
    try:
        return ServingSignatures(_map_entries(meta_graph, 5))
    except (IndexError, ValueError, UnicodeDecodeError):
        return ServingSignatures(None)


def signature_keys(src_dir: str | os.PathLike) -> list[str] | None:
    """The signature keys of ``src_dir``'s serving meta graph, read without TensorFlow (sorted; TensorFlow's
    ``__saved_model_init_op`` is no signature), or None when they cannot be read so."""
    return read_serving_signatures(src_dir).keys()


def missing_signature(src_dir: str | os.PathLike, key: str, available) -> ExportError:
    """The error for a signature ``key`` that ``src_dir`` does not have (``available``: the keys it has)."""
    available = sorted(k for k in available if not k.startswith("__"))
    return ExportError(
        f"SavedModel {os.fspath(src_dir)!r} has no {key!r} signature (it has {available or 'none'}); "
        + ("pass one of them as --signature (signature_key= in Python)" if available else
           "export it with model.export(dir) or tf.saved_model.save(obj, dir, signatures=...)"))


def check_signature(src_dir: str | os.PathLike, key: str) -> ServingSignatures:
    """Raise :func:`missing_signature`'s error when ``saved_model.pb`` shows, read without TensorFlow, that
    ``src_dir`` has no signature ``key`` (when it cannot be read so, TensorFlow's loader judges later), and an
    :class:`ExportError` for an input of unknown rank (nothing after TensorFlow could run it). Returns the
    signatures read, for the other checks before TensorFlow loads."""
    serving = read_serving_signatures(src_dir)
    keys = serving.keys()
    if keys is not None and key not in keys:
        raise missing_signature(src_dir, key, keys)
    for name, (_, dims) in (serving.inputs(key) or {}).items():
        if dims is None:
            raise unknown_rank(name)
    return serving


def unknown_rank(name: str) -> ExportError:
    """The error for a signature input ``name`` of unknown rank."""
    return ExportError(
        f"input {name!r} has no known rank (TensorSpec(shape=None)): the checks, ONNX and OpenVINO need at least "
        "the number of its dimensions; export a signature whose input spec gives its shape, e.g. "
        "[None, 224, 224, 3]")


def signature_inputs(src_dir: str | os.PathLike, signature_key: str) -> dict | None:
    """The inputs of the serving signature ``signature_key`` of ``src_dir``'s ``saved_model.pb``, read without
    TensorFlow (:meth:`ServingSignatures.inputs`)."""
    return read_serving_signatures(src_dir).inputs(signature_key)

"""The on-disk format of a shard dataset: a TFDS dataset directory of ArrayRecord files.

    <name>-train.array_record-00000-of-00004   shard i: one serialized tf.train.Example per record
    dataset_info.json, features.json            TFDS metadata: features, split "train", shard lengths

Records are TFDS features (FEATURES below), serialized with TFDS's example serializer, so
tfds.builder_from_directory(dir).as_data_source("train"), tfds.data_source(name, data_dir=...)
and grain.sources.ArrayRecordDataSource all read them; decode_record turns one back into the record
dict the pipeline consumes (sama_jax.data.arrayrecord documents it). Reading needs no TensorFlow:
TFDS parses the protos with NumPy.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np

from sama_jax import features as features_lib

SCHEMA_VERSION = 2  # 1: msgpack records and our own index only; 2: TFDS features and metadata
VERSION = f"{SCHEMA_VERSION}.0.0"  # the TFDS dataset version; build into <data_dir>/<name>/VERSION
SPLIT = "train"
FILE_FORMAT = "array_record"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")  # a TFDS dataset name that tfds.data_source finds
SIZE_KEYS = ("source_frames", "source_height", "source_width")  # edit kinds only; 0 in t2v records

_TEXT = ("id", "kind", "text", "target_ext", "source_ext")
_BYTES = ("target", "source")
_INTS = ("frames", "height", "width") + SIZE_KEYS


def _features():
    import tensorflow_datasets as tfds

    spec = {key: tfds.features.Text() for key in _TEXT}
    spec.update({key: tfds.features.Scalar(dtype=np.object_) for key in _BYTES})
    spec.update({key: tfds.features.Scalar(dtype=np.int64) for key in _INTS})
    spec["fps"] = tfds.features.Scalar(dtype=np.float32)  # tf.train.Example floats are float32
    spec["meta"] = tfds.features.Text(doc="JSON object: the manifest sample's other keys")
    # One .npy file's bytes per precomputed feature; b"" where the sample has none.
    spec["features"] = tfds.features.FeaturesDict(
        {name: tfds.features.Scalar(dtype=np.object_) for name in features_lib.NAMES}
    )
    return tfds.features.FeaturesDict(spec)


_FEATURES = None


def features():
    """The tfds.features.FeaturesDict of a record (built once; importing TFDS costs ~0.4 s)."""
    global _FEATURES
    if _FEATURES is None:
        _FEATURES = _features()
    return _FEATURES


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_record(record: dict) -> bytes:
    """A record dict -> a serialized tf.train.Example of FEATURES."""
    unknown = set(record["features"]) - set(features_lib.NAMES)
    if unknown:
        raise ValueError(f"record {record['id']!r}: unknown features {sorted(unknown)}")
    example = {key: record[key] for key in _TEXT + _BYTES + ("frames", "height", "width", "fps")}
    example.update({key: record.get(key, 0) for key in SIZE_KEYS})
    example["meta"] = json.dumps(record["meta"], ensure_ascii=False, sort_keys=True)
    example["features"] = {
        name: _npy_bytes(record["features"][name]) if name in record["features"] else b""
        for name in features_lib.NAMES
    }
    serialized = features().serialize_example(example)
    # Protobuf writes map entries in hash order, which differs between processes; sorted keys make
    # a shard's bytes the same whichever worker built it.
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example.FromString(serialized).SerializeToString(deterministic=True)


def record_from_example(example: dict) -> dict:
    """A TFDS-decoded example (NumPy: text and bytes as bytes) -> the record dict."""
    record = {key: bytes(example[key]).decode("utf-8") for key in _TEXT}
    record.update({key: bytes(example[key]) for key in _BYTES})
    record.update({key: int(example[key]) for key in ("frames", "height", "width")})
    record["fps"] = float(example["fps"])
    if record["kind"] != "t2v":  # a t2v record has no source, so no source size
        record.update({key: int(example[key]) for key in SIZE_KEYS})
    record["meta"] = json.loads(bytes(example["meta"]).decode("utf-8"))
    record["features"] = {}
    for name, blob in example["features"].items():
        if len(blob):
            array = np.load(io.BytesIO(bytes(blob)), allow_pickle=False)
            array.flags.writeable = False
            record["features"][name] = array
    return record


def decode_record(data: bytes) -> dict:
    """A serialized record (as read from a shard file) -> the record dict."""
    return record_from_example(features().deserialize_example_np(data))


# ---------------------------------------------------------------------------------------------------
# Files


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"{what} {name!r} is not a dataset name: use lowercase letters, digits and _ "
            f"starting with a letter (TFDS names its files after it)"
        )
    return name


def default_name(manifest_path: str) -> str:
    """The manifest's file stem as a TFDS dataset name ("Video-Edits.v2" -> "video_edits_v2")."""
    stem = os.path.splitext(os.path.basename(manifest_path))[0].lower()
    name = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_")
    return name if name[:1].isalpha() else "d_" + name


def shard_names(name: str, num_shards: int) -> list[str]:
    """The TFDS file names of a split of num_shards shards (DEFAULT_FILENAME_TEMPLATE)."""
    return [f"{name}-{SPLIT}.{FILE_FORMAT}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def parse_shard_name(name: str, filename: str) -> tuple[int, int] | None:
    """(index, num_shards) of a shard file name of dataset `name`, else None."""
    match = re.fullmatch(re.escape(f"{name}-{SPLIT}.{FILE_FORMAT}-") + r"(\d{5})-of-(\d{5})", filename)
    return (int(match.group(1)), int(match.group(2))) if match else None


def write_tfds_metadata(
    out_dir: str, name: str, shard_lengths: Sequence[int], num_bytes: int, description: str
) -> None:
    """dataset_info.json and features.json, written by TFDS itself, for the shards in out_dir."""
    import tensorflow_datasets as tfds

    identity = tfds.core.DatasetIdentity(
        name=name, version=tfds.core.Version(VERSION), data_dir=os.path.abspath(out_dir), module_name=""
    )
    info = tfds.core.DatasetInfo(builder=identity, description=description, features=features())
    info.set_file_format(FILE_FORMAT)
    template = tfds.core.ShardedFileTemplate(
        data_dir=os.path.abspath(out_dir), dataset_name=name, split=SPLIT, filetype_suffix=FILE_FORMAT
    )
    info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=SPLIT,
                    shard_lengths=[int(n) for n in shard_lengths],
                    num_bytes=int(num_bytes),
                    filename_template=template,
                )
            ]
        )
    )
    # Written beside and then renamed into place, so a build killed here keeps the old metadata whole.
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".tfds-", suffix=".tmp")
    try:
        info.write_to_directory(staging)
        for f in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, f), os.path.join(out_dir, f))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Record format and reader for the ArrayRecord shards written by `deep_image.data.prepare`.

A prepared dataset is one directory:

```
DST/
  data-00000-of-00004.array_record   shards; records in sorted source-path order
  ...
  classes.json         JSON list of class names; label id = position in the list
  prepare_report.json  what was written, converted and skipped (see prepare.py)
  manifest.json        written LAST: {"format", "num_records", "num_classes",
                       "shards": [{"name", "num_records", "bytes", "sha256"}]}
```

The reader trusts only the shards that `manifest.json` lists, so an interrupted `prepare`
(which removes the old manifest before writing anything, and writes shards under temporary
names that are renamed into place after an fsync) is never mistaken for a dataset.

Record format (one ArrayRecord record per image), version 1:

```
bytes 0..3    magic b"DIR1"
bytes 4..7    H: header length, uint32 little-endian
bytes 8..8+H  header: UTF-8 JSON object, keys sorted, no spaces:
              {"format": "JPEG", "label": <int>, "path": <source path relative to SRC>}
bytes 8+H..   the encoded image (always an 8-bit RGB JPEG after prepare)
```

The image stays encoded so shards are small and the decode (and its cost) happens in the
input pipeline's workers, not on the reading thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import grain

RECORD_MAGIC = b"DIR1"
MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.json"
REPORT_NAME = "prepare_report.json"
MANIFEST_FORMAT = "deep_image.prepare/1"
_HEADER_LEN = struct.Struct("<I")


def encode_record(image: bytes, label: int, path: str, image_format: str = "JPEG") -> bytes:
  """Serializes one example.

  Args:
    image: encoded image bytes.
    label: class id, int >= 0.
    path: source path relative to the prepared folder (POSIX separators).
    image_format: Pillow format name of `image`.

  Returns:
    bytes in the version-1 record format described in the module docstring.
  """
  header = json.dumps(
    {"format": image_format, "label": int(label), "path": path},
    sort_keys=True,
    separators=(",", ":"),
  ).encode("utf-8")
  return RECORD_MAGIC + _HEADER_LEN.pack(len(header)) + header + image


def decode_record(data: bytes) -> dict[str, Any]:
  """Parses one record.

  Args:
    data: bytes written by `encode_record`.

  Returns:
    {'image': encoded image bytes, 'label': int, 'path': str, 'format': str}.

  Raises:
    ValueError: the bytes are not a version-1 record.
  """
  if data[:4] != RECORD_MAGIC or len(data) < 8:
    raise ValueError(f"not a deep_image record (magic {data[:4]!r}, expected {RECORD_MAGIC!r})")
  (header_len,) = _HEADER_LEN.unpack_from(data, 4)
  header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
  return {
    "image": data[8 + header_len :],
    "label": int(header["label"]),
    "path": header["path"],
    "format": header["format"],
  }


def sha256_file(path: str, chunk_bytes: int = 1 << 22) -> str:
  """Hex sha256 of a file, read in 4 MiB chunks so big shards need no big buffer."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def read_manifest(directory: str) -> dict[str, Any]:
  """Loads and checks `directory/manifest.json` against the shards on disk.

  Args:
    directory: a folder written by `deep_image.data.prepare.prepare`.

  Returns:
    the manifest dict.

  Raises:
    FileNotFoundError: no manifest (prepare never ran there or did not finish) or a listed
      shard is missing.
    ValueError: the manifest has another format, or a shard's size differs from it.
  """
  manifest_path = os.path.join(directory, MANIFEST_NAME)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
      f"{manifest_path} not found: {directory} is not a finished prepared dataset "
      "(prepare writes the manifest last, so a missing one means it was interrupted or never "
      "ran); re-run `python -m experiments.prepare`"
    )
  with open(manifest_path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(
      f"{manifest_path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    )
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["name"])
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: listed in {manifest_path} but missing")
    size = os.path.getsize(path)
    if size != shard["bytes"]:
      raise ValueError(
        f"{path}: {size} bytes but {manifest_path} says {shard['bytes']}; the dataset was "
        "modified or partially overwritten, re-run prepare"
      )
  return manifest


class ArrayRecordSource:
  """Random access to a prepared dataset; grain-compatible and picklable.

  `source[i]` is {'image': encoded JPEG bytes, 'label': int, 'path': str, 'format': str};
  decode with `deep_image.data.sources.decode_image`. Index order is shard order, which is
  sorted source-path order.
  """

  def __init__(self, directory: str, verify_checksums: bool = False):
    """Opens `directory`.

    Args:
      directory: folder with manifest.json, classes.json and shards.
      verify_checksums: also compare each shard's sha256 with the manifest (reads every byte:
        slow for ImageNet, meant for a one-off check after copying).
    """
    self.directory = directory
    self.manifest = read_manifest(directory)
    if verify_checksums:
      for shard in self.manifest["shards"]:
        path = os.path.join(directory, shard["name"])
        if sha256_file(path) != shard["sha256"]:
          raise ValueError(f"{path}: sha256 differs from {MANIFEST_NAME}; re-run prepare")
    with open(os.path.join(directory, CLASSES_NAME), encoding="utf-8") as f:
      self.classes: list[str] = json.load(f)
    self.num_classes = len(self.classes)
    self.class_names = tuple(self.classes)
    # Empty shards (every file of a shard skipped) hold nothing to read: leave them out.
    paths = [
      os.path.join(directory, s["name"]) for s in self.manifest["shards"] if s["num_records"]
    ]
    self._reader = grain.sources.ArrayRecordDataSource(paths) if paths else None
    self._len = len(self._reader) if self._reader is not None else 0
    if self._len != self.manifest["num_records"]:
      raise ValueError(
        f"{directory}: shards hold {self._len} records, manifest says "
        f"{self.manifest['num_records']}"
      )

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} records in {self.directory}")
    return decode_record(self._reader[index])

  def __repr__(self) -> str:
    # Grain uses the repr to tell sources apart in checkpoints and debug output.
    return f"ArrayRecordSource({self.directory!r}, num_records={self._len})"

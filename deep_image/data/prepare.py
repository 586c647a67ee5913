"""Turns an image folder into checked ArrayRecord shards (format: `array_record_source`).

One concept in one pass, which is why it stays one module of over 400 lines: a folder layout
becomes (path, label) examples, each is checked in a worker pool and written in order into
shards, and the manifest that makes the shards valid comes last; the labels, the order and
the crash-safety sequence below are one contract with the reader.

Layouts:
  * class folders: SRC/<class>/**/<image> (ImageNet's train/<wnid>/*.JPEG too). Files directly
    in SRC are reported as skipped.
  * flat folder + label file (ImageNet's val): SRC/**/<image> and a file that maps a file name
    to a class name: a JSON object {"name": "class"}, or text lines `name class` / `name,class`
    (extra fields after the class are ignored, so Kaggle's LOC_val_solution.csv works; lines
    starting with '#' are comments). `name` may be the path relative to SRC, the base name, or
    the base name without extension.

Label ids are positions in the sorted class names (numerically sorted when every name is an
integer), or in a `classes.json` passed as `classes=` so a validation folder gets the training
folder's ids. Files are visited in sorted relative-path order and assigned to shards in
contiguous runs, so the same SRC and options give byte-identical output.

Every file is read and judged by `image_check.check_image` (what is converted to an 8-bit RGB
JPEG and what is skipped is listed there); unreadable files are skipped too. Nothing is
dropped silently: `DST/prepare_report.json` lists every converted and skipped file.

Crash safety: the old manifest is removed before anything else is written, each shard is
written under a hidden temporary name, fsynced and atomically renamed, and `manifest.json`
(shard names, record counts, sizes, sha256) is written last the same way. The reader accepts
only a manifest and the shards it lists.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter

from deep_image.data import array_record_source as ars
from deep_image.data import image_check

# Auto shard count aims at shards of about this many source bytes: big enough for efficient
# sequential copies, small enough that ImageNet (~140 GB) gives hundreds of shards to spread
# over hosts.
SHARD_TARGET_BYTES = 256 << 20
# Image records are already compressed; group_size:1 keeps every record individually
# addressable, which random access (shuffling) needs.
WRITER_OPTIONS = "group_size:1,uncompressed"
_SHARD_RE = re.compile(r"^data-\d{5}-of-\d{5}\.array_record$")
_TMP_RE = re.compile(r"^\.(data-\d{5}-of-\d{5}\.array_record|[a-z_]+\.json)\.tmp$")


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  """What `prepare` did: the same content as DST/prepare_report.json, plus the summary line."""

  written: int
  converted: list[dict[str, Any]]
  skipped: list[dict[str, str]]
  shards: list[dict[str, Any]]
  classes: list[str]
  summary: str


# --------------------------------------------------------------------------- reading files


def _check_file(src: str, relpath: str, options: image_check.CheckOptions) -> tuple[str, Any, Any]:
  """Reads and checks one file: ('ok', jpeg, conversions) or ('skip', reason, None).

  Top-level so a spawn worker can unpickle it. Only a problem that is not about the file's
  content (a bug, memory) propagates, and it names the file.
  """
  path = os.path.join(src, relpath)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except PermissionError:
    return "skip", "unreadable: permission denied", None
  except OSError as e:
    return "skip", f"unreadable: {e.strerror or e}", None
  try:
    jpeg, conversions = image_check.check_image(data, options)
  except image_check.SkipImage as e:
    return "skip", str(e), None
  except Exception as e:
    raise RuntimeError(f"{path}: unexpected error while checking: {type(e).__name__}: {e}") from e
  return "ok", jpeg, conversions


# --------------------------------------------------------------------------- finding examples


def _sort_classes(names: Sequence[str]) -> list[str]:
  """Sorted class names; numeric order when every name is an integer ('2' before '10')."""
  names = sorted(set(names))
  if names and all(n.isdigit() for n in names):
    return sorted(names, key=int)
  return names


def read_labels(path: str) -> dict[str, str]:
  """Parses a label file (formats in the module docstring) into {name: class}."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise FileNotFoundError(f"--labels {path}: cannot read: {e.strerror or e}") from e
  if path.endswith(".json"):
    try:
      mapping = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"--labels {path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
      ) from e
    if not isinstance(mapping, dict):
      raise ValueError(f"--labels {path}: expected a JSON object {{file name: class}}")
    return {str(k): str(v) for k, v in mapping.items()}
  mapping = {}
  for number, line in enumerate(text.splitlines(), start=1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    fields = re.split(r"[,\s]+", line)
    if len(fields) < 2:
      raise ValueError(f"--labels {path}:{number}: expected 'name class', got {line!r}")
    mapping[fields[0]] = fields[1]
  if not mapping:
    raise ValueError(f"--labels {path}: no labels in the file")
  return mapping


def _walk_files(src: str, skipped: list[dict[str, str]]) -> list[str]:
  """All file paths under `src`, relative, POSIX, sorted; unlistable folders go to `skipped`."""

  def on_error(error: OSError):
    rel = os.path.relpath(error.filename, src).replace(os.sep, "/")
    skipped.append({"path": rel + "/", "reason": f"unreadable folder: {error.strerror}"})

  files = []
  seen = set()
  # Symlinked class folders are common (datasets assembled from several disks): follow them,
  # but visit each real folder once so a link cycle cannot loop forever.
  for root, dirs, names in os.walk(src, onerror=on_error, followlinks=True):
    real = os.path.realpath(root)
    if real in seen:
      rel = os.path.relpath(root, src).replace(os.sep, "/")
      skipped.append({"path": rel + "/", "reason": f"folder already visited (link to {real})"})
      dirs.clear()
      continue
    seen.add(real)
    dirs.sort()
    for name in names:
      files.append(os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/"))
  return sorted(files)


def find_examples(
  src: str, labels: str | None = None, classes: str | None = None
) -> tuple[list[tuple[str, int]], list[dict[str, str]], list[str], int]:
  """Lists what to check under `src`.

  Args:
    src: source folder.
    labels: optional label file; given -> flat layout, else class-folder layout.
    classes: optional classes.json (JSON list of names) fixing the label ids.

  Returns:
    (examples, skipped, class_names, num_files): (relative path, label id) pairs in sorted
    path order; files skipped before decoding ({'path', 'reason'}); the class names (index =
    label id); the number of files found.

  Raises:
    FileNotFoundError / NotADirectoryError: `src` does not exist or is not a folder.
    ValueError: `src` holds no files, or no class folders and no label file.
  """
  if not os.path.exists(src):
    raise FileNotFoundError(f"--src {src} does not exist")
  if not os.path.isdir(src):
    raise NotADirectoryError(f"--src {src} is not a folder")
  skipped: list[dict[str, str]] = []
  files = _walk_files(src, skipped)
  if not files:
    raise ValueError(f"--src {src} contains no files")
  fixed_classes = None
  if classes is not None:
    try:
      with open(classes, encoding="utf-8") as f:
        fixed_classes = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"--classes {classes}: cannot read a JSON list: {e}") from e
    if not isinstance(fixed_classes, list) or not all(isinstance(c, str) for c in fixed_classes):
      raise ValueError(f"--classes {classes}: expected a JSON list of class names")

  def is_hidden(rel: str) -> bool:
    # Editor/OS droppings (.DS_Store, .ipynb_checkpoints/) must not become classes or images.
    return any(part.startswith(".") for part in rel.split("/"))

  named: list[tuple[str, str]] = []  # (relative path, class name)
  if labels is None:
    folders = sorted(
      d for d in os.listdir(src) if not d.startswith(".") and os.path.isdir(os.path.join(src, d))
    )
    if not folders:
      raise ValueError(
        f"--src {src} has no class folders (SRC/<class>/<image>) and no --labels file maps "
        "its files to classes"
      )
    class_names = fixed_classes if fixed_classes is not None else _sort_classes(folders)
    for rel in files:
      if is_hidden(rel):
        skipped.append({"path": rel, "reason": "hidden file or folder"})
      elif "/" not in rel:
        skipped.append({"path": rel, "reason": "not inside a class folder"})
      else:
        named.append((rel, rel.split("/", 1)[0]))
  else:
    mapping = read_labels(labels)
    for rel in files:
      base = rel.rsplit("/", 1)[-1]
      name = mapping.get(rel, mapping.get(base, mapping.get(os.path.splitext(base)[0])))
      if is_hidden(rel):
        skipped.append({"path": rel, "reason": "hidden file or folder"})
      elif name is None:
        skipped.append({"path": rel, "reason": f"no label in {os.path.basename(labels)}"})
      else:
        named.append((rel, name))
    class_names = (
      fixed_classes if fixed_classes is not None else _sort_classes([n for _, n in named])
    )
  ids = {name: i for i, name in enumerate(class_names)}
  examples = []
  for rel, name in named:
    if name in ids:
      examples.append((rel, ids[name]))
    else:
      skipped.append({"path": rel, "reason": f"class {name!r} not in --classes {classes}"})
  return examples, skipped, list(class_names), len(files)


# --------------------------------------------------------------------------- writing


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON (sorted keys, so reruns are byte-identical) via temp file + fsync + rename."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync(directory)


def shard_name(index: int, num_shards: int) -> str:
  return f"data-{index:05d}-of-{num_shards:05d}.array_record"


def _clear_old_output(dst: str) -> None:
  """Invalidates a previous dataset in `dst` (manifest first), then removes its shards/temps."""
  manifest = os.path.join(dst, ars.MANIFEST_NAME)
  if os.path.exists(manifest):
    os.remove(manifest)
    _fsync(dst)
  for name in os.listdir(dst):
    if _SHARD_RE.match(name) or _TMP_RE.match(name):
      os.remove(os.path.join(dst, name))


class _Progress:
  """Logs 'done/total (pct) rate, ETA' at most every `every_s` seconds, and at the end."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s = total, every_s
    self.start = self.last = time.monotonic()

  def update(self, done: int, skipped: int) -> None:
    now = time.monotonic()
    if now - self.last < self.every_s and done < self.total:
      return
    self.last = now
    elapsed = now - self.start
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    logging.info(
      "prepare: %d/%d files (%.1f%%), %.1f files/s, elapsed %.0fs, ETA %.0fs, skipped %d",
      done,
      self.total,
      100.0 * done / max(self.total, 1),
      rate,
      elapsed,
      eta,
      skipped,
    )


def _results(
  src: str, examples: Sequence[tuple[str, int]], options: image_check.CheckOptions, num_workers: int
) -> Iterator[tuple[str, Any, Any]]:
  """`_check_file` results in `examples` order, computed by `num_workers` processes."""
  check = functools.partial(_check_file, src, options=options)
  paths = [rel for rel, _ in examples]
  if num_workers <= 1:
    yield from map(check, paths)
    return
  # spawn, not fork: the parent may hold JAX/XLA threads, which fork would copy broken.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield from pool.imap(check, paths, chunksize=16)


def prepare(
  src: str,
  dst: str,
  *,
  num_shards: int = 0,
  labels: str | None = None,
  classes: str | None = None,
  max_image_pixels: int = image_check.DEFAULT_MAX_IMAGE_PIXELS,
  min_side: int = image_check.DEFAULT_MIN_SIDE,
  jpeg_quality: int = image_check.DEFAULT_JPEG_QUALITY,
  num_workers: int = 1,
  log_every_s: float = 10.0,
) -> PrepareResult:
  """Checks every file under `src` and writes the usable ones as ArrayRecord shards in `dst`.

  Args:
    src: source folder (layouts in the module docstring).
    dst: output folder; created if missing. A previous dataset there is replaced.
    num_shards: shard count (negative: a ValueError); 0 picks ceil(source bytes / 256 MiB).
      Capped at the number of candidate files.
    labels: label file for a flat folder (module docstring); None for class folders.
    classes: classes.json fixing label ids (e.g. the train folder's, for validation).
    max_image_pixels: decompression-bomb limit (width * height).
    min_side: images with a shorter side below this are skipped.
    jpeg_quality: quality of re-encoded JPEGs.
    num_workers: processes that decode and check files (output is identical for any count).
    log_every_s: progress log interval.

  Returns:
    a PrepareResult; the same data is in DST/prepare_report.json.

  Raises:
    FileNotFoundError, NotADirectoryError, ValueError: bad `src`, `labels` or `classes`, or
      no file was usable (the report is still written then, the manifest is not).
    RuntimeError: an unexpected error while checking a file (names the file).
  """
  if num_shards < 0:
    raise ValueError(
      f"--num_shards={num_shards}: expected a shard count, or 0 for shards of about "
      f"{SHARD_TARGET_BYTES >> 20} MiB"
    )
  src = os.path.abspath(src)
  dst = os.path.abspath(dst)
  if os.path.commonpath([src, dst]) == src:
    raise ValueError(f"--dst {dst} must not be inside --src {src}: shards would be re-read")
  options = image_check.CheckOptions(max_image_pixels, min_side, jpeg_quality)
  examples, skipped, class_names, num_files = find_examples(src, labels, classes)
  if num_shards <= 0:
    total_bytes = sum(_size_or_zero(os.path.join(src, rel)) for rel, _ in examples)
    num_shards = math.ceil(total_bytes / SHARD_TARGET_BYTES)
  num_shards = max(1, min(num_shards, len(examples)))
  try:
    os.makedirs(dst, exist_ok=True)
    _clear_old_output(dst)
  except OSError as e:
    raise OSError(f"--dst {dst}: cannot prepare the output folder: {e}") from e
  logging.info(
    "prepare: %s -> %s: %d files, %d candidates, %d classes, %d shards",
    src,
    dst,
    num_files,
    len(examples),
    len(class_names),
    num_shards,
  )

  converted: list[dict[str, Any]] = []
  shards: list[dict[str, Any]] = []
  results = _results(src, examples, options, num_workers)
  progress = _Progress(len(examples), log_every_s)
  done = written = 0
  for index in range(num_shards):
    name = shard_name(index, num_shards)
    final = os.path.join(dst, name)
    tmp = os.path.join(dst, f".{name}.tmp")
    begin, end = index * len(examples) // num_shards, (index + 1) * len(examples) // num_shards
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
      for rel, label in examples[begin:end]:
        status, payload, conversions = next(results)
        if status == "skip":
          skipped.append({"path": rel, "reason": payload})
        else:
          writer.write(ars.encode_record(payload, label, rel))
          count += 1
          if conversions:
            converted.append({"path": rel, "conversions": conversions})
        done += 1
        progress.update(done, len(skipped))
      writer.close()
    except BaseException:
      # A crash must not leave a temp file that looks like output; a kill may, and the
      # reader ignores it (not in the manifest) and the next run removes it.
      writer.close()
      os.remove(tmp)
      results.close()
      raise
    _fsync(tmp)
    os.replace(tmp, final)
    shards.append(
      {
        "name": name,
        "num_records": count,
        "bytes": os.path.getsize(final),
        "sha256": ars.sha256_file(final),
      }
    )
    written += count
  results.close()  # Shuts the worker pool down now rather than at garbage collection.
  _fsync(dst)

  skipped.sort(key=lambda s: s["path"])
  report = {
    "num_files": num_files,
    "written": written,
    "converted": converted,
    "skipped": skipped,
    "options": dataclasses.asdict(options),
  }
  report_path = os.path.join(dst, ars.REPORT_NAME)
  _write_json_atomic(report_path, report)
  _write_json_atomic(os.path.join(dst, ars.CLASSES_NAME), class_names)
  if written == 0:
    raise ValueError(
      f"--src {src}: none of its {num_files} files could be used; reasons in {report_path}"
    )
  _write_json_atomic(
    os.path.join(dst, ars.MANIFEST_NAME),
    {
      "format": ars.MANIFEST_FORMAT,
      "num_records": written,
      "num_classes": len(class_names),
      "shards": shards,
    },
  )
  summary = (
    f"prepare: wrote {written} of {num_files} files to {num_shards} shards in {dst} "
    f"({len(converted)} converted, {len(skipped)} skipped, {len(class_names)} classes); "
    f"details in {report_path}"
  )
  logging.info("%s", summary)
  return PrepareResult(written, converted, skipped, shards, class_names, summary)


def _size_or_zero(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return 0  # Unreadable files are reported when checked; they only weigh on shard count.

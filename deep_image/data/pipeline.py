"""Grain input pipelines: seeded, resumable, per-process train batches and padded eval batches.

Train (`make_train_iterator`), per process:

  MapDataset.source(src), _EpochShuffle    one permutation per epoch (repeat reseeds it)
    .repeat()                              the global stream: position i of epoch i // N
    .random_map(record -> example, seed)   decode, resize shorter side to S, then either
                                             'host':   random c x c crop + augmentations
                                             'device': an S x S window + the sampled params
    _ProcessRows(B, process_index, P)      this process's rows of every global batch:
                                             global batch g is positions [g B, (g+1) B),
                                             process p reads [g B + p b, g B + (p+1) b)
    .to_iter_dataset().batch(b, drop)      b = global batch / P (with workers: batched
                                             first, so each worker makes whole batches)
    .mp_prefetch(num_workers)              when data.num_workers > 0 (`grain_workers`)

The per-record generator of `random_map` is a pure function of (seed, global position), and
the order of the global stream of (seed, epoch): the same seed gives the same global batches
and augmentations on any number of processes (process p's devices hold rows [p b, (p+1) b)
of each global batch, `global_batch.to_global`), with or without workers, and
`get_state()` / `set_state()` of the returned Grain iterator resume the exact stream (for
the same process and worker counts).

With `augment_on='device'` the workers do only the decoding and resizing; the crop and
augmentations run batched inside the jitted step (`augment_device.augment_batch`, which the
training loop's preprocess hook calls), from the same sampled parameters, so the two modes
give the same pixels (to one gray level, tested). This module imports nothing of ours that
uses JAX, so the Grain workers that unpickle its callables need none (tests/test_pipeline.py
runs it with `import jax` failing; Grain itself imports jax where it is installed, and runs
without it).

Eval (`make_eval_iterator`): one pass over the split, padded with repeats of real records
to whole global batches and a 'mask' marking the real ones; in source order, or ('whole',
dense evaluation of the whole image) grouped by the images' resized shapes
(`whole_image_plan`, from `record_shapes`: a header read of every record), one shape per
batch.

Config fields (`config.data`): `data_config.default_config()` declares them with their
defaults; code reads the fields directly, so a config without one fails loudly instead of
running on a hidden default.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np
import simplejpeg
from PIL import Image

from deep_image.config_error import ConfigError
from deep_image.data import augment, augment_host, grain_workers
from deep_image.data.sources import decode_image, make_source

AUGMENT_ON = ("host", "device")
EVAL_MODES = ("center", "square", "whole", "full")


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so the shorter side is exactly `size`, keeping the aspect ratio.

  Args:
    image: uint8 [H, W, 3].
    size: target shorter side.

  Returns:
    uint8 [h, w, 3] with min(h, w) == size; `image` itself when it already is.
  """
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  if h <= w:
    new_h, new_w = size, max(size, round(w * size / h))
  else:
    new_h, new_w = max(size, round(h * size / w)), size
  # Area averaging when shrinking (no aliasing of fine texture), bilinear when enlarging.
  shrink = new_h < h
  interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def _decode_resized(record: dict, scale: int) -> np.ndarray:
  """uint8 [h, w, 3] with shorter side `scale`, from a source record."""
  return resize_shorter_side(decode_image(record["image"], min_side=scale), scale)


def square_window(
  image: np.ndarray, params: augment.AugmentParams
) -> tuple[np.ndarray, augment.AugmentParams]:
  """An S x S window of a shorter-side-S image holding the crop, and params relative to it.

  The window is centred on the crop where the image allows, so the margin that rotation and
  lens distortion pull pixels from is real image, as on the host path; only beyond the
  window does BORDER_REFLECT_101 differ from the host's reflection about the whole image.
  For square images the window is the image and both paths see identical inputs.

  Args:
    image: uint8 [H, W, 3] with min(H, W) == S.
    params: one image's params sampled for `image`'s (H, W).

  Returns:
    (uint8 [S, S, 3] contiguous window, params with crop_y / crop_x inside the window).
  """
  h, w = image.shape[:2]
  s, c = min(h, w), params.crop_size
  y0 = int(np.clip(int(params.crop_y) - (s - c) // 2, 0, h - s))
  x0 = int(np.clip(int(params.crop_x) - (s - c) // 2, 0, w - s))
  window = np.ascontiguousarray(image[y0 : y0 + s, x0 : x0 + s])
  return window, params.replace(crop_y=int(params.crop_y) - y0, crop_x=int(params.crop_x) - x0)


class _TrainExample:
  """record, rng -> training example; a picklable callable for Grain workers.

  Output: {'image': uint8 [c, c, 3], 'label': int32} ('host'), or {'image': uint8 [S, S, 3],
  'label': int32, 'augment': AugmentParams.as_dict()} ('device').
  """

  def __init__(self, scale: int, space: augment.SamplingSpace, augment_on: str):
    self.scale, self.space, self.augment_on = scale, space, augment_on

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = _decode_resized(record, self.scale)
    params = augment.sample_params(rng, self.space, image.shape[:2])
    label = np.int32(record["label"])
    if self.augment_on == "host":
      return {"image": augment_host.apply(image, params), "label": label}
    window, params = square_window(image, params)
    return {"image": window, "label": label, "augment": params.as_dict()}


def check_augment_on(data_cfg: ml_collections.ConfigDict) -> None:
  """ConfigError unless data.augment_on is one of AUGMENT_ON."""
  if data_cfg.augment_on not in AUGMENT_ON:
    raise ConfigError(f"data.augment_on={data_cfg.augment_on!r}: expected one of {AUGMENT_ON}")


def eval_scale(data_cfg: ml_collections.ConfigDict) -> int:
  """The evaluation images' shorter side: data.eval_scale, or data.train_scale when it is 0."""
  if data_cfg.eval_scale < 0:
    raise ConfigError(f"data.eval_scale={data_cfg.eval_scale} must be >= 0 (0: train_scale)")
  return int(data_cfg.eval_scale or data_cfg.train_scale)


def check_crop_fits(data_cfg: ml_collections.ConfigDict, scale_field: str) -> None:
  """ConfigError unless data.augment.crop_size <= data.<scale_field> ('train_scale' /
  'eval_scale', the latter resolved by `eval_scale`)."""
  crop = int(data_cfg.augment.crop_size)
  scale = eval_scale(data_cfg) if scale_field == "eval_scale" else int(data_cfg[scale_field])
  if crop > scale:
    raise ConfigError(f"data.augment.crop_size={crop} exceeds data.{scale_field}={scale}")


def _host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"train.batch_size={global_batch_size} must be a positive multiple of the "
      f"{process_count} processes (each process loads train.batch_size / processes examples)"
    )
  return global_batch_size // process_count


class _EpochShuffle(grain.MapDataset):
  """`MapDataset.shuffle` with a numpy permutation per epoch instead of Grain's index_shuffle.

  Grain's shuffle computes each index with `index_shuffle`, which cost ~400 us per record
  here, half the decode (BENCHMARKS.md, input profile). One `permutation(n)` per epoch costs
  ~20 ms per million records. Index i of epoch e (i + e n from `repeat`) reads record
  perm_e[i] of the parent, perm_e from np.random.default_rng([seed, e]); a pure function of
  (seed, index), so workers, threads and resumed iterators agree.
  """

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._seed = int(seed)
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
      # Threads near an epoch boundary ask for two epochs: keep the latest two.
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1} | {epoch: perm}
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    epoch, position = divmod(int(index), n)
    return self._parent[int(self._permutation(epoch)[position]) + epoch * n]


class _ProcessRows(grain.MapDataset):
  """Index j of process p -> position g B + p b + o of the global stream (g, o = divmod(j, b)).

  The rows of every global batch that this process's devices hold, in order; with one
  process the identity.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._global, self._index, self._count = global_batch, index, count
    self._local = global_batch // count

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __str__(self) -> str:
    return f"ProcessRows(batch={self._global}, process={self._index} of {self._count})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g, o = divmod(int(index), self._local)
    return self._parent[g * self._global + self._index * self._local + o]


def _op_seed(seed: int, op: int) -> int:
  # Independent, explicit per-op seeds: Grain's derived seeds depend on the pipeline's shape.
  return int(np.random.SeedSequence([int(seed), op]).generate_state(1)[0])


def make_train_iterator(
  data_cfg: Any,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int | None = None,
  source: Any = None,
  start_batch: int = 0,
  sampling_space: Any = None,  # data_cfg.augment's SamplingSpace, if built already
) -> grain.DatasetIterator:
  """Endless, shuffled, augmented host-local training batches of this process.

  Args:
    data_cfg: `config.data` (`data_config.default_config()`).
    global_batch_size: examples per step over all processes (`train.batch_size`).
    seed: shuffling and augmentation seed.
    process_index, process_count: this process reads rows [p b, (p+1) b) of every global
      batch.
    num_workers: overrides `data_cfg.num_workers` (0 = in-process).
    source: a random-access source; `make_source(data_cfg, 'train')` when None.
    start_batch: the first global batch to yield: the stream resumed at a step on any
      number of processes or workers (a checkpoint from another topology).

  Every process reads its rows of the same global stream (module docstring), so P
  processes together yield exactly the batches of one process with the same global batch.

  Returns:
    a Grain DatasetIterator, or with workers a `grain_workers.WorkerIterator` owning one
    (both with `get_state()` / `set_state()` / `close()`; usable from any Python program),
    of dicts
      'image': uint8 [b, c, c, 3] ('host') or uint8 [b, S, S, 3] ('device'),
      'label': int32 [b],
      'augment' ('device' only): {AugmentParams field: [b] or color_shift [b, 3]},
    with b = global_batch_size / process_count, c = augment.crop_size, S = train_scale.

  Raises:
    ValueError: the batch does not divide over the processes, an unknown `augment_on`, a
      crop larger than the train scale, or fewer examples than one global batch.
  """
  b = _host_batch_size(global_batch_size, process_count)
  check_augment_on(data_cfg)
  augment_on = data_cfg.augment_on
  check_crop_fits(data_cfg, "train_scale")
  scale, aug_cfg = int(data_cfg.train_scale), data_cfg.augment
  src = make_source(data_cfg, "train") if source is None else source
  if len(src) < global_batch_size:
    raise ValueError(
      f"{len(src)} training examples are fewer than one global batch "
      f"(train.batch_size={global_batch_size})"
    )
  ds = _EpochShuffle(grain.MapDataset.source(src), seed=_op_seed(seed, 0)).repeat()
  space = sampling_space or augment.SamplingSpace.from_config(aug_cfg)
  example = _TrainExample(scale, space, augment_on)
  ds = ds.random_map(example, seed=_op_seed(seed, 1))
  ds = _ProcessRows(ds, global_batch_size, process_index, process_count)
  options = grain_workers.read_options(data_cfg, num_workers)
  if grain_workers.worker_count(data_cfg, num_workers):
    # Workers take every W-th element of what they are given: whole batches, so batch k
    # holds the same rows as without workers (batching inside each worker would fill batch
    # k with every W-th row instead).
    ds = ds.batch(b, drop_remainder=True)[start_batch:].to_iter_dataset(options)
  else:
    ds = ds[start_batch * b :].to_iter_dataset(options).batch(b, drop_remainder=True)
  return grain_workers.iterate(ds, data_cfg, num_workers)


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """The (h, w) that `resize_shorter_side` gives an [height, width] image (tested to agree)."""
  if min(height, width) == size:
    return height, width
  if height <= width:
    return size, max(size, round(width * size / height))
  return max(size, round(height * size / width)), size


def whole_image_shape(height: int, width: int, scale: int, grid: int) -> tuple[int, int]:
  """The shape a whole-image dense view scores: resized, then snapped to the model's grid.

  The image is resized to shorter side `scale` (`resize_shorter_side`); a side longer than
  `scale` is then cut, centred, to `scale` plus a multiple of `grid` (the model's stride,
  2^pools), i.e. by fewer than `grid` pixels. With `scale` a multiple of `grid` the cut
  loses no score-map position: a map has floor(side / grid) - k + 1 positions along a side
  either way, and the cut pixels were only ever seen through the border convolutions.
  Shapes are bounded: images of aspect ratio up to A give at most 1 + 2 (A - 1) scale / grid
  distinct shapes (`accuracy` module docstring).

  Args:
    height, width: the record's image, before resizing.
    scale: the shorter side S.
    grid: the model's stride in pixels (1: no snapping).

  Returns:
    (h, w), min(h, w) == scale.
  """
  if grid < 1:
    raise ValueError(f"grid={grid}: expected the model's stride in pixels, >= 1")
  h, w = _resized_shape(int(height), int(width), int(scale))
  return tuple(scale + (side - scale) // grid * grid for side in (h, w))


def image_shape(image: bytes | np.ndarray) -> tuple[int, int]:
  """(H, W) of a record's image without decoding its pixels (a header read for bytes).

  Agrees with `decode_image(image).shape[:2]` (tested): JPEGs by simplejpeg's header
  reader, other formats (and JPEGs it rejects) by Pillow, which reads only the header.
  """
  if isinstance(image, np.ndarray):
    return int(image.shape[0]), int(image.shape[1])
  data = bytes(image)
  if data[:2] == b"\xff\xd8":
    try:
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      return int(height), int(width)
    except ValueError:
      pass  # Pillow reports a broken file the way decode_image does
  with Image.open(io.BytesIO(data)) as img:
    width, height = img.size
  return int(height), int(width)


class _RecordShape:
  """index -> int32 [2], the (H, W) of source record `index`; picklable for Grain workers."""

  def __init__(self, src: Any):
    self.src = src

  def __call__(self, index: int) -> np.ndarray:
    return np.asarray(image_shape(self.src[int(index)]["image"]), np.int32)


def record_shapes(
  data_cfg: Any,
  *,
  source: Any,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int | None = None,
) -> np.ndarray:
  """int32 [n_p, 2]: (H, W) of records [process_index::process_count] of `source`.

  The pre-pass of whole-image dense evaluation: one record read and header parse each, no
  decode (the generated sources render theirs: 2 ms at 96 px). Each process reads its
  share; the caller gathers them (`accuracy.Evaluator`).
  """
  n = len(source)
  ds = grain.MapDataset.range(n)[process_index::process_count].map(_RecordShape(source))
  # Batched before the workers, which take every W-th element: whole batches, in order.
  ds = ds.batch(256).to_iter_dataset(grain_workers.read_options(data_cfg, num_workers))
  parts = list(grain_workers.iterate(ds, data_cfg, num_workers))
  return np.concatenate(parts) if parts else np.zeros((0, 2), np.int32)


@dataclasses.dataclass(frozen=True)
class WholeImagePlan:
  """The positions of a whole-image pass: groups of one shape, each whole global batches.

  Position t of the padded index space reads source record `index[t]`, resized and cut to
  `shape[t]`; `real[t]` is False for the repeats that fill a group's last global batch.
  Every real record appears exactly once; groups are in sorted shape order.

  Attributes:
    index: int32 [T] source record of each position.
    real: bool [T].
    shape: int32 [T, 2] (h, w) of each position's view (`whole_image_shape`).
    source_shape: int32 [N, 2] (H, W) of every source record before resizing.
  """

  index: np.ndarray
  real: np.ndarray
  shape: np.ndarray
  source_shape: np.ndarray

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """The distinct view shapes: one compiled program each."""
    return sorted({(int(h), int(w)) for h, w in self.shape})


def whole_image_plan(
  source_shape: np.ndarray, *, scale: int, grid: int, global_batch_size: int
) -> WholeImagePlan:
  """Groups records by `whole_image_shape`, each group padded to whole global batches.

  A group of n records fills ceil(n / B) global batches; its last is completed with
  repeats of the group's own records (mask False), so a batch never mixes shapes and at
  most B - 1 padding rows per shape are computed.

  Args:
    source_shape: int [N, 2] (H, W) of every record (`record_shapes`, all processes).
    scale, grid: as `whole_image_shape`.
    global_batch_size: B.
  """
  source_shape = np.asarray(source_shape, np.int32).reshape(-1, 2)
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (h, w) in enumerate(source_shape):
    groups.setdefault(whole_image_shape(h, w, scale, grid), []).append(i)
  index, real, shape = [], [], []
  for view_shape in sorted(groups):
    members = groups[view_shape]
    padded = -(-len(members) // global_batch_size) * global_batch_size
    index += [members[t % len(members)] for t in range(padded)]
    real += [t < len(members) for t in range(padded)]
    shape += [view_shape] * padded
  return WholeImagePlan(
    index=np.asarray(index, np.int32),
    real=np.asarray(real, bool),
    shape=np.asarray(shape, np.int32).reshape(-1, 2),
    source_shape=source_shape,
  )


class _EvalExample:
  """(index, padded?) -> eval example; picklable for Grain workers.

  `plan` (mode 'whole'): a `WholeImagePlan` whose positions `index` counts; otherwise
  position i reads record i mod N and is real for i < N.
  """

  def __init__(self, src: Any, scale: int, crop_size: int, mode: str, plan=None):
    self.src, self.scale, self.crop_size, self.mode = src, scale, crop_size, mode
    self.plan = plan

  def _whole(self, index: int) -> dict:
    plan = self.plan
    source_index = int(plan.index[index])
    record = self.src[source_index]
    image = decode_image(record["image"], min_side=self.scale)
    # Resize to the shape the plan computed from the header, not from the decoded pixels
    # (a reduced-scale JPEG decode rounds its sides): every process agrees on the batch.
    height, width = (int(v) for v in plan.source_shape[source_index])
    got_h, got_w = image.shape[:2]
    # A reduced-scale decode rounds each side up: its aspect is the header's to a pixel.
    if abs(got_h * width - got_w * height) > height + width:
      raise ValueError(
        f"record {source_index}: decoded {got_h}x{got_w}, but source_shape says "
        f"{height}x{width} (source_shape must list the records in source order)"
      )
    h, w = _resized_shape(height, width, self.scale)
    if image.shape[:2] != (h, w):
      shrink = h < image.shape[0]
      interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
      image = cv2.resize(image, (w, h), interpolation=interpolation)
    out_h, out_w = (int(s) for s in plan.shape[index])
    y0, x0 = (h - out_h) // 2, (w - out_w) // 2
    return {
      "image": np.ascontiguousarray(image[y0 : y0 + out_h, x0 : x0 + out_w]),
      "label": np.int32(record["label"]),
      "index": np.int32(source_index),
      "mask": np.bool_(plan.real[index]),
    }

  def __call__(self, index: int) -> dict:
    if self.mode == "whole":
      return self._whole(int(index))
    source_index = index % len(self.src)
    record = self.src[source_index]
    image = _decode_resized(record, self.scale)
    if self.mode != "full":
      side = self.crop_size if self.mode == "center" else self.scale
      h, w = image.shape[:2]
      y0, x0 = (h - side) // 2, (w - side) // 2
      image = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
    return {
      "image": image,
      "label": np.int32(record["label"]),
      "index": np.int32(source_index),
      "mask": np.bool_(index < len(self.src)),
    }


def _stack_eval(examples: list[dict]) -> dict:
  shapes = {e["image"].shape for e in examples}
  if len(shapes) > 1:
    raise ValueError(
      f"an eval batch holds images of one size only, got {sorted(shapes)}: in mode='full' "
      "use mode='whole' (grouped by shape), global_batch_size=1 per process or a source of "
      "same-size images"
    )
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_eval_iterator(
  data_cfg: Any,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  mode: str = "center",
  scale: int | None = None,
  split: str = "validation",
  num_workers: int | None = None,
  source: Any = None,
  grid: int = 1,
  source_shape: np.ndarray | None = None,
) -> grain.DatasetIterator:
  """One pass over an evaluation split, padded to whole global batches.

  The index space is padded up to a multiple of `global_batch_size`; process p reads
  positions [p::process_count] of it, so every process yields the same number of batches,
  local batch j of every process holds rows of global batch j, and together they see each
  real example once. Modes 'center', 'square' and 'full' read the source in order, the
  last batch padded with repeats; 'whole' reads `whole_image_plan`'s positions: one view
  shape per global batch, each shape's last batch padded with repeats of its own records.

  Args:
    data_cfg: `config.data`.
    global_batch_size: examples per step over all processes.
    process_index, process_count: this process's share.
    mode: after resizing the shorter side to the scale: 'center' (the centre
      augment.crop_size crop), 'square' (the centre scale x scale square: the whole image
      of a square source; `dense_square` views), 'whole' (the whole resized image snapped
      to `grid`, `whole_image_shape`; batches grouped by shape; `dense` views) or 'full'
      (the whole resized image; same-size images per batch).
    scale: the shorter side; None: `eval_scale(data_cfg)`.
    split: generic split name for `make_source`.
    num_workers: overrides `data_cfg.num_workers`.
    source: a random-access source; `make_source(data_cfg, split)` when None.
    grid: 'whole': the model's stride in pixels.
    source_shape: 'whole': int [N, 2] (H, W) of every record, identical on every process
      (`record_shapes`, gathered); None: this process reads every record's header.

  Returns:
    a Grain DatasetIterator of {'image': uint8 [b, c, c, 3] ('center'), [b, s, s, 3]
    ('square') or [b, h, w, 3] ('full', 'whole': h, w may change from batch to batch),
    'label': int32 [b], 'index': int32 [b] (the record's position in the source; padding
    repeats real records), 'mask': bool [b] (True = real example)},
    b = global_batch_size / process_count.
  """
  b = _host_batch_size(global_batch_size, process_count)
  if mode not in EVAL_MODES:
    raise ValueError(f"eval mode={mode!r}: expected one of {EVAL_MODES}")
  src = make_source(data_cfg, split) if source is None else source
  scale = eval_scale(data_cfg) if scale is None else int(scale)
  crop = int(data_cfg.augment.crop_size)
  if crop > scale:
    raise ConfigError(f"data.augment.crop_size={crop} exceeds the evaluation scale {scale}")
  plan = None
  if mode == "whole":
    if source_shape is None:
      source_shape = record_shapes(data_cfg, source=src, num_workers=num_workers)
    if len(source_shape) != len(src):
      raise ValueError(f"source_shape has {len(source_shape)} rows for {len(src)} records")
    plan = whole_image_plan(
      source_shape, scale=scale, grid=grid, global_batch_size=global_batch_size
    )
    total = len(plan.index)
  else:
    total = -(-len(src) // global_batch_size) * global_batch_size
  ds = grain.MapDataset.range(total)[process_index::process_count]
  ds = ds.map(_EvalExample(src, scale, crop, mode, plan))
  options = grain_workers.read_options(data_cfg, num_workers)
  if grain_workers.worker_count(data_cfg, num_workers):
    # Workers take every W-th element of what they are given: whole batches, so batch j
    # holds the rows it holds without workers ('whole': one shape, not every W-th row).
    ds = ds.batch(b, drop_remainder=False, batch_fn=_stack_eval).to_iter_dataset(options)
  else:
    ds = ds.to_iter_dataset(options).batch(b, drop_remainder=False, batch_fn=_stack_eval)
  return grain_workers.iterate(ds, data_cfg, num_workers)

"""Test protocols (paper section 5): which views of each image are scored and fused.

A protocol is a name a user types and a table row shows:

=========================  =============================================================
name                       views of each image, fused by averaging softmax posteriors
=========================  =============================================================
center@256                 the centre crop (crop_size) of the image resized to 256
center+flip@256            that crop and its mirror image
dense@256                  the FC layers run as convolutions over the whole image resized
                           to 256 (any aspect ratio; the longer side cut by less than the
                           model's stride, `pipeline.whole_image_shape`); the class-score
                           map's posteriors are averaged over all its positions
                           (OverFeat / VGG)
dense+flip@256,384,512     dense views at three scales, each also mirrored: 6 views
dense_square@256           as dense, over the centre 256 x 256 square only (the strips of a
                           non-square image beyond it are not scored; on square images the
                           same as dense)
dense_square+flip@256,512  its flips and scales, as for dense
=========================  =============================================================

Without '@scales' (`parse_protocol(text, default_scale)`) a protocol is tested at the
model's own evaluation scale, so `--protocol=dense+flip` means the same thing for models
trained at different scales (the ensembles of section 4.2).

A `View` is one forward pass over the split: (kind, scale, flip). Protocols that share
views share their passes (`views_of`).
"""

from __future__ import annotations

import dataclasses
import re

from deep_image.config_error import ConfigError

# View kinds: what of the resized image is scored (`accuracy.Evaluator` maps each to an eval
# iterator mode: 'center', 'whole', 'square').
KINDS = ("center", "dense", "dense_square")
# The kinds of `protocol_grid` (`experiments.evaluate --dense`); dense_square only by name.
GRID_KINDS = ("center", "dense")
_NAME = re.compile(r"^(center|dense_square|dense)(\+flip)?(?:@(\d+(?:,\d+)*))?$")


@dataclasses.dataclass(frozen=True)
class View:
  """One pass over the split: the `kind` of view at one `scale`, mirrored or not."""

  kind: str
  scale: int
  flip: bool = False

  @property
  def name(self) -> str:
    return f"{self.kind}{'+flip' if self.flip else ''}@{self.scale}"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A fusion of views: every scale in `scales`, each plain and (with `flip`) mirrored."""

  kind: str
  scales: tuple[int, ...]
  flip: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"test protocol kind {self.kind!r}: expected one of {KINDS}")
    if not self.scales or any(s <= 0 for s in self.scales):
      raise ConfigError(f"test protocol scales {self.scales}: expected positive sizes")

  @property
  def name(self) -> str:
    return f"{self.kind}{'+flip' if self.flip else ''}@{','.join(map(str, self.scales))}"

  @property
  def views(self) -> tuple[View, ...]:
    flips = (False, True) if self.flip else (False,)
    return tuple(View(self.kind, s, f) for s in self.scales for f in flips)


def parse_protocol(text: str, default_scale: int) -> Protocol:
  """'dense+flip@256,512' -> Protocol; without '@...' the scale is `default_scale`.

  Raises:
    ConfigError: a name that does not follow the grammar (quoting it and an example).
  """
  match = _NAME.match(text.strip())
  if not match:
    raise ConfigError(
      f"test protocol {text!r}: expected center|dense|dense_square, then optionally +flip "
      "and @SCALE[,SCALE...], e.g. 'dense+flip@256,512'"
    )
  kind, flip, scales = match.groups()
  parsed = tuple(int(s) for s in scales.split(",")) if scales else (int(default_scale),)
  return Protocol(kind, parsed, flip=bool(flip))


def protocol_grid(scales: tuple[int, ...], *, flip: bool, dense: bool) -> list[Protocol]:
  """Every combination `experiments.evaluate` reports, centre crop at the first scale first.

  Kinds: center (and dense, the whole image; dense_square only by name); flips: no (and
  yes); scales: each alone (and, for several, all fused). With scales (256, 512), flip and
  dense that is 2 x 2 x 3 = 12 protocols.
  """
  if not scales:
    raise ConfigError("no test scales given")
  scale_sets = [(s,) for s in scales] + ([tuple(scales)] if len(scales) > 1 else [])
  kinds = GRID_KINDS if dense else ("center",)
  flips = (False, True) if flip else (False,)
  return [Protocol(k, s, f) for k in kinds for f in flips for s in scale_sets]


def views_of(protocols: list[Protocol]) -> list[View]:
  """The distinct views the protocols need, in first-use order."""
  return list(dict.fromkeys(v for p in protocols for v in p.views))

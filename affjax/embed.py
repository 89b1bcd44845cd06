r"""Cached-embedding mode: embed every cached face frame once, frozen backbone.

With the backbone frozen, its 512-d output for a frame never changes, yet
end-to-end training recomputes it for every window that contains the frame
(1.5 times per epoch with the reference's 300/200 windows) in every epoch.
This module computes it once per frame and stores it beside the trial's other
features:

```
<cache_dir>/trials/<trial>/embeddings.npy    float32 [T, 512]
<cache_dir>/trials/<trial>/embeddings.json   how they were made (see below)
```

Frames are prepared as the evaluation pipeline prepares them (centre
`crop_size` crop of the cached frame, `(x / 255 - 0.5) / 0.5`) and the
backbone runs in eval mode (BatchNorm running statistics, no dropout), so
`embeddings[t]` equals the backbone applied to frame t alone.

The cache format is unchanged: both files are additions that readers may
ignore. `embeddings.json` records the backbone name, the checkpoint file and
its SHA-256 (or the init seed), the crop and this module's format version;
a rerun with the same settings skips finished trials (resume), a rerun with
other settings refuses unless told to overwrite. Each file is written to a
temporary name in the trial directory and renamed; the JSON goes last, so a
trial counts as embedded only once both files are complete.

Frames of consecutive trials are packed into fixed-size batches (one compiled
shape, no per-trial padding) and one batch is kept in flight while the host
fills the next.

  python -m affjax.embed --cache=/data/cache --checkpoint=res50_ir_0.887.pth
  python -m affjax.embed --cache=/tmp/demo/data/cache --backbone=tiny
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from affjax import io

Array = jax.Array
Variables = Mapping[str, Any]
EmbedFn = Callable[[np.ndarray], Array]

EMBEDDINGS_FILE = "embeddings.npy"
INFO_FILE = "embeddings.json"
FRAMES_FILE = "frames.npy"
TRIALS_DIR = "trials"
EMBEDDING_DIM = 512
# Bumped whenever the same settings would give different numbers.
FORMAT_VERSION = 1
# Settings that must match for finished embeddings to be reused. The
# checkpoint's path is informative only: the file is identified by its hash.
IDENTITY_KEYS = (
  "version",
  "backbone",
  "checkpoint_sha256",
  "seed",
  "crop_size",
)


def embedding_settings(
  backbone: str, *, checkpoint: str = "", seed: int = 0, crop_size: int = 40
) -> dict[str, Any]:
  """The record stored in every trial's `embeddings.json`.

  Args:
    backbone: a name of `affjax.models.iresnet.BACKBONES` ('ir50', 'tiny', ..).
    checkpoint: the PyTorch file the weights came from; '' = random init.
    seed: init seed (only meaningful without a checkpoint).
    crop_size: side of the centre crop fed to the backbone, pixels.
  """
  return {
    "version": FORMAT_VERSION,
    "backbone": backbone,
    "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
    "checkpoint_sha256": _sha256(checkpoint) if checkpoint else "",
    "seed": 0 if checkpoint else int(seed),
    "crop_size": int(crop_size),
    "preprocessing": "centre crop, (x / 255 - 0.5) / 0.5",
    "backbone_mode": "eval (BatchNorm running statistics, no dropout)",
  }


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def prepare_frames(frames: Array, crop_size: int) -> Array:
  """Cached uint8 frames -> backbone input, as the evaluation pipeline does.

  Args:
    frames: `[N, H, W, 3]` uint8 (H, W >= crop_size).
    crop_size: side of the centre crop, pixels.

  Returns:
    `[N, crop_size, crop_size, 3]` float32 in [-1, 1].
  """
  h, w = frames.shape[1:3]
  if h < crop_size or w < crop_size:
    raise ValueError(
      f"frames of {h}x{w} pixels are smaller than the "
      f"{crop_size}x{crop_size} crop."
    )
  top, left = (h - crop_size) // 2, (w - crop_size) // 2
  x = frames[:, top : top + crop_size, left : left + crop_size, :]
  return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def make_embed_fn(
  backbone: Any, variables: Variables, crop_size: int = 40
) -> EmbedFn:
  """A jitted `uint8 [N, H, W, 3] -> float32 [N, 512]` frame embedder.

  The variables are an argument of the jitted function rather than constants
  baked into it (large constants slow XLA's compilation); the function
  compiles once per batch shape.

  Args:
    backbone: a Flax `IResNet` (called with `train=False`).
    variables: its `{'params', 'batch_stats'}`.
    crop_size: centre crop side, pixels.
  """

  @jax.jit
  def embed(variables, frames):
    x = prepare_frames(frames, crop_size)
    return backbone.apply(variables, x, train=False)

  variables = jax.device_put(dict(variables))
  return lambda frames: embed(variables, frames)


def embed_frames(
  embed_fn: EmbedFn, trials: Iterable[tuple[str, np.ndarray]], batch_size: int
) -> Iterator[tuple[str, np.ndarray]]:
  """Embeds the frames of consecutive trials in fixed-size batches.

  Frames of neighbouring trials share batches, so every call has the shape
  `[batch_size, H, W, 3]` and only the very last batch is zero-padded. One
  batch is in flight while the next is filled.

  Args:
    embed_fn: `[batch_size, ...] -> [batch_size, 512]`.
    trials: `(name, frames [T, ...])` in order (uint8 cache frames or any
      array `embed_fn` takes; frames may be a memory map; T may be 0).
    batch_size: frames per call.

  Yields:
    `(name, embeddings [T, 512] float32)` in input order, each as soon as
    its last frame is embedded.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  parts: dict[str, list[np.ndarray]] = {}
  remaining: dict[str, int] = {}
  order: collections.deque[str] = collections.deque()
  in_flight: collections.deque = collections.deque()
  buf, fill, segments = None, 0, []

  def finished() -> Iterator[tuple[str, np.ndarray]]:
    while order and remaining[order[0]] == 0:
      name = order.popleft()
      del remaining[name]
      chunks = parts.pop(name)
      yield (
        name,
        (
          np.concatenate(chunks)
          if chunks
          else np.zeros((0, EMBEDDING_DIM), np.float32)
        ),
      )

  def collect(out, segs) -> None:
    out = np.asarray(out, np.float32)
    offset = 0
    for name, n in segs:
      parts[name].append(out[offset : offset + n])
      remaining[name] -= n
      offset += n

  for name, frames in trials:
    if name in remaining:
      raise ValueError(f"trial {name!r} given twice.")
    order.append(name)
    parts[name], remaining[name] = [], len(frames)
    pos = 0
    while pos < len(frames):
      if buf is None:
        # A fresh buffer per batch: a dispatched call may still read the
        # previous one (CPU transfers can alias host memory).
        buf = np.zeros((batch_size, *frames.shape[1:]), frames.dtype)
      n = min(batch_size - fill, len(frames) - pos)
      buf[fill : fill + n] = frames[pos : pos + n]
      segments.append((name, n))
      fill, pos = fill + n, pos + n
      if fill == batch_size:
        in_flight.append((embed_fn(buf), segments))
        buf, fill, segments = None, 0, []
        if len(in_flight) > 1:
          collect(*in_flight.popleft())
          yield from finished()
    yield from finished()
  if fill:
    in_flight.append((embed_fn(buf), segments))
  while in_flight:
    collect(*in_flight.popleft())
  yield from finished()


def write_embeddings(
  trial_dir: str, embeddings: np.ndarray, settings: Mapping[str, Any]
) -> None:
  """Writes `embeddings.npy` then `embeddings.json`, each atomically."""
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[1] != EMBEDDING_DIM:
    raise ValueError(
      f"{trial_dir}: embeddings must be [T, {EMBEDDING_DIM}], "
      f"got {embeddings.shape}."
    )
  io.atomic_write(
    os.path.join(trial_dir, EMBEDDINGS_FILE),
    lambda f: np.save(f, embeddings),
    "wb",
  )
  info = dict(settings, n_frames=int(embeddings.shape[0]))
  io.atomic_write(
    os.path.join(trial_dir, INFO_FILE),
    lambda f: json.dump(info, f, indent=1, sort_keys=True),
  )


def read_info(trial_dir: str) -> dict[str, Any] | None:
  """The trial's `embeddings.json`, or None if embeddings are incomplete."""
  info_path = os.path.join(trial_dir, INFO_FILE)
  if not (
    os.path.isfile(info_path)
    and os.path.isfile(os.path.join(trial_dir, EMBEDDINGS_FILE))
  ):
    return None
  with open(info_path) as f:
    return json.load(f)


def settings_diff(
  found: Mapping[str, Any], wanted: Mapping[str, Any]
) -> list[str]:
  """`IDENTITY_KEYS` whose values differ, formatted for error messages."""
  return [
    f"{k}: found {found.get(k, '<absent>')!r}, wanted "
    f"{wanted.get(k, '<absent>')!r}"
    for k in IDENTITY_KEYS
    if found.get(k, "<absent>") != wanted.get(k, "<absent>")
  ]


def list_trials(cache_dir: str) -> list[str]:
  """Finished trial directories of a feature cache (temporaries skipped)."""
  root = os.path.join(cache_dir, TRIALS_DIR)
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"{root} does not exist: {cache_dir} is not a "
      "feature cache (run preprocessing first)."
    )
  return sorted(
    n
    for n in os.listdir(root)
    if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
  )


def _pending(
  cache_dir: str,
  trials: Sequence[str],
  settings: Mapping[str, Any],
  overwrite: bool,
) -> list[str]:
  """Trials still to embed; raises on embeddings made with other settings."""
  todo = []
  for name in trials:
    trial_dir = os.path.join(cache_dir, TRIALS_DIR, name)
    if not os.path.isfile(os.path.join(trial_dir, FRAMES_FILE)):
      raise FileNotFoundError(
        f"{os.path.join(trial_dir, FRAMES_FILE)} is missing."
      )
    # Leftovers of a killed run; one embedding run per cache at a time.
    io.remove_temporaries(trial_dir)
    info = read_info(trial_dir)
    if info is None:
      todo.append(name)
      continue
    diff = settings_diff(info, settings)
    if diff and not overwrite:
      raise ValueError(
        f"{os.path.join(trial_dir, INFO_FILE)} was made with other "
        f"settings ({'; '.join(diff)}). Pass overwrite=True (--overwrite) "
        "to replace the embeddings of the whole cache."
      )
    if diff:
      todo.append(name)
  return todo


def embed_cache(
  cache_dir: str,
  embed_fn: EmbedFn,
  settings: Mapping[str, Any],
  *,
  batch_size: int = 256,
  trials: Sequence[str] | None = None,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Writes `embeddings.npy` + `embeddings.json` into every trial directory.

  Args:
    cache_dir: the feature cache (`<cache_dir>/trials/<trial>/frames.npy`).
    embed_fn: from `make_embed_fn` (must match `settings`).
    settings: from `embedding_settings`; recorded per trial.
    batch_size: frames per backbone call.
    trials: restrict to these trials (default: every finished trial).
    overwrite: re-embed trials embedded with other settings instead of
      raising.
    log: called with a progress line per trial (e.g. `print`).

  Returns:
    `{'embedded': [names], 'skipped': [names], 'frames': n, 'seconds': s}`.

  Raises:
    FileNotFoundError: no cache, or a trial without `frames.npy`.
    ValueError: existing embeddings from other settings (unless overwrite),
      or a frames array that is not `[T, H, W, 3]` uint8.
  """
  names = list_trials(cache_dir) if trials is None else list(trials)
  todo = _pending(cache_dir, names, settings, overwrite)
  start, count = time.perf_counter(), 0

  def sources():
    for name in todo:
      path = os.path.join(cache_dir, TRIALS_DIR, name, FRAMES_FILE)
      frames = np.load(path, mmap_mode="r")
      if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
          f"{path}: expected uint8 [T, H, W, 3], found "
          f"{frames.dtype} {frames.shape}."
        )
      yield name, frames

  for name, emb in embed_frames(embed_fn, sources(), batch_size):
    write_embeddings(os.path.join(cache_dir, TRIALS_DIR, name), emb, settings)
    count += len(emb)
    if log is not None:
      rate = count / max(time.perf_counter() - start, 1e-9)
      log(f"{name}: {len(emb)} frames embedded ({rate:.1f} frames/s so far)")
  return {
    "embedded": todo,
    "skipped": [n for n in names if n not in todo],
    "frames": count,
    "seconds": time.perf_counter() - start,
  }


def check_embeddings(cache_dir: str, trials: Sequence[str]) -> dict[str, Any]:
  """Checks that `trials` all have embeddings from the same settings.

  For readers (the dataset builder) before they use `embeddings.npy`.

  Returns:
    The common settings (without the per-trial `n_frames`).

  Raises:
    FileNotFoundError: a trial has no complete embeddings (named).
    ValueError: trials were embedded with different settings.
  """
  common, first = None, None
  for name in trials:
    trial_dir = os.path.join(cache_dir, TRIALS_DIR, name)
    info = read_info(trial_dir)
    if info is None:
      raise FileNotFoundError(
        f"{trial_dir} has no complete {EMBEDDINGS_FILE} + {INFO_FILE}; run "
        f"`python -m affjax.embed --cache={cache_dir}` first."
      )
    info = {k: v for k, v in info.items() if k != "n_frames"}
    if common is None:
      common, first = info, name
    elif diff := settings_diff(info, common):
      raise ValueError(
        f"trials {first!r} and {name!r} of {cache_dir} were "
        f"embedded with different settings: {'; '.join(diff)}"
      )
  return common or {}


def load_backbone(
  name: str,
  checkpoint: str = "",
  seed: int = 0,
  frame_shape: tuple[int, int, int] = (40, 40, 3),
) -> tuple[Any, dict[str, Any]]:
  """The backbone module and its variables (converted or freshly initialised).

  Args:
    name: `affjax.models.iresnet.BACKBONES` key.
    checkpoint: a reference PyTorch file: the full model (`spatial.*`), the
      pretrained `res50_ir_0.887.pth` (`backbone.*`), or a bare backbone state
      dict; '' = random init from `seed` (e.g. for the synthetic demo).
    seed: init seed when there is no checkpoint.
    frame_shape: backbone input `(H, W, C)`.

  Raises:
    ValueError: unknown name, or a checkpoint of another architecture.
  """
  from affjax.models import iresnet  # pylint: disable=g-import-not-at-top

  if name not in iresnet.BACKBONES:
    raise ValueError(
      f"backbone must be one of {sorted(iresnet.BACKBONES)}, got {name!r}."
    )
  backbone = iresnet.BACKBONES[name]()
  dummy = jnp.zeros((1, *frame_shape), jnp.float32)
  init = jax.jit(lambda key: backbone.init(key, dummy, train=False))
  if not checkpoint:
    # The 'rbg' generator: XLA compiles the init of IR-50's ~150 random
    # tensors about 5x faster than with the default threefry.
    return backbone, dict(init(jax.random.key(seed, impl="rbg")))
  from affjax import convert  # pylint: disable=g-import-not-at-top

  loaded = convert.load_backbone_variables(checkpoint)
  want = jax.eval_shape(init, jax.random.key(0))
  shapes = lambda t: jax.tree.map(lambda a: tuple(np.shape(a)), t)
  if shapes(dict(want)) != shapes(dict(loaded)):
    raise ValueError(
      f"{checkpoint} does not hold a {name!r} backbone "
      f"(parameter tree or shapes differ)."
    )
  return backbone, loaded


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if f.checkpoint and not os.path.isfile(f.checkpoint):
    raise FileNotFoundError(f"--checkpoint={f.checkpoint} does not exist.")
  settings = embedding_settings(
    f.backbone, checkpoint=f.checkpoint, seed=f.seed, crop_size=f.crop_size
  )
  backbone, variables = load_backbone(
    f.backbone, f.checkpoint, f.seed, (f.crop_size, f.crop_size, 3)
  )
  summary = embed_cache(
    f.cache,
    make_embed_fn(backbone, variables, f.crop_size),
    settings,
    batch_size=f.batch_size,
    overwrite=f.overwrite,
    log=print,
  )
  print(
    f"{len(summary['embedded'])} trials embedded "
    f"({summary['frames']} frames in {summary['seconds']:.1f} s), "
    f"{len(summary['skipped'])} already done."
  )


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("cache", None, "Feature cache directory.", required=True)
  flags.DEFINE_string("backbone", "ir50", "iresnet.BACKBONES name.")
  flags.DEFINE_string(
    "checkpoint",
    "",
    "Reference PyTorch backbone weights ('' = random init from --seed).",
  )
  flags.DEFINE_integer("seed", 0, "Init seed without --checkpoint.")
  flags.DEFINE_integer("crop_size", 40, "Centre crop side, pixels.")
  flags.DEFINE_integer("batch_size", 256, "Frames per backbone call.")
  flags.DEFINE_bool(
    "overwrite", False, "Replace embeddings made with other settings."
  )


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)

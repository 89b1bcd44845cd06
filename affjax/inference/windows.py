"""Windowed predict-and-stitch: model inputs -> per-frame predictions.

The one path from a model to per-frame outputs, used by validation in the
training loop, `--mode=evaluate`, `--mode=predict` and whole-trial inference
(`affjax.inference.trial`):

1. Windows. Every row of a batch is a window of T frames of one trial and
   carries its identity: `trial` int `[B]` (index of the trial, -1 on rows
   that only pad a batch) and `frame_index` int `[B, T]` (frame of the trial
   at each position, -1 where nothing is kept: padding, or the left context
   of a whole-trial chunk). `gather_windows` cuts trials into such windows,
   `fixed_batches` groups them into batches of one compiled shape.
2. The window step (`jit_window_step`, `make_window_fn`) runs the model on a
   global batch and returns the predictions *with* the identity arrays, all
   computed on the devices from the same global rows, so a prediction can
   never be paired with another window's identity, whatever the device order
   of the mesh.
3. Stitching (`stitch`) averages, per frame, every window covering it, after
   putting the windows in a canonical order (by trial, then first frame), so
   the float sums do not depend on batch order, process count or device
   order.

Multi-process runs: every process passes the same whole batch and
`global_batch` builds each global array with `jax.make_array_from_callback`:
each process fills exactly the rows its devices hold under the data sharding,
wherever those rows are. On TPU pod slices `jax.make_mesh` interleaves the
processes' devices (v4-32: processes [0, 1, 2, 3, 0, 1, 2, 3, ...] along the
mesh), so "process p feeds rows [p n, (p + 1) n)" would scramble the batch;
asking the sharding which rows each device holds cannot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from affjax import sharding
from affjax.data import stitch as stitch_lib

Batch = Mapping[str, np.ndarray]
IDENTITY = ("trial", "frame_index")
# Value of padding positions per input, as the eval pipeline pads: frames are
# zero pixels, i.e. -1 after the (x / 255 - 0.5) / 0.5 normalisation; the
# normalised audio features are 0 (the training mean).
PAD_VALUES = {"frames": -1.0}


@dataclasses.dataclass
class WindowPredictions:
  """Model outputs of windows, each row with its own identity.

  Attributes:
    preds: float32 `[N, T, C]` window outputs.
    trial: int `[N]` index of the window's trial, -1 on padding rows.
    frame_index: int `[N, T]` frame inside the trial, -1 where not kept.
  """

  preds: np.ndarray
  trial: np.ndarray
  frame_index: np.ndarray

  @classmethod
  def concat(cls, parts: Sequence[WindowPredictions]) -> WindowPredictions:
    if not parts:
      raise ValueError("no window predictions (no batch was evaluated)")
    return cls(
      np.concatenate([p.preds for p in parts]),
      np.concatenate([p.trial for p in parts]),
      np.concatenate([p.frame_index for p in parts]),
    )

  def canonical(self) -> WindowPredictions:
    """Real windows only, sorted by (trial, first kept frame).

    The order of windows with the same key is kept; two windows of one trial
    starting at the same frame only occur if a caller evaluates a window
    twice, and then the same inputs give the same outputs.
    """
    frame_index = np.asarray(self.frame_index)
    trial = np.asarray(self.trial)
    kept = frame_index >= 0
    real = (trial >= 0) & kept.any(axis=1)
    first = np.where(kept, frame_index, np.iinfo(np.int64).max).min(axis=1)
    order = np.flatnonzero(real)
    order = order[np.lexsort((first[order], trial[order]))]
    return WindowPredictions(
      np.asarray(self.preds)[order], trial[order], frame_index[order]
    )


# ----------------------------------------------------------------------------
# Windows and batches.


def gather_windows(
  trials: Sequence[Mapping[str, np.ndarray]],
  spans: Sequence[tuple[int, int, int, int]],
  width: int,
  *,
  keys: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """Windows cut from `trials` at given spans, with their identity.

  Args:
    trials: per trial `{input: [L_i, ...]}`.
    spans: per window `(trial, keep_start, keep_end, input_start)`: the
      window reads frames `[input_start, input_start + width)` of its trial
      and its outputs for frames `[keep_start, keep_end)` are kept (the
      others get `frame_index` -1).
    width: frames per window.
    keys: the inputs to cut (default: all of the first trial's).

  Returns:
    `{input: [N, width, ...], "trial": int32 [N], "frame_index": int32
    [N, width]}`.
  """
  if not trials:
    raise ValueError("no trials to cut into windows")
  keys = tuple(trials[0] if keys is None else keys)
  out = {}
  for k in keys:
    x = np.asarray(trials[0][k])
    out[k] = np.full(
      (len(spans), width, *x.shape[1:]), PAD_VALUES.get(k, 0), x.dtype
    )
  frame_index = np.full((len(spans), width), -1, np.int32)
  for row, (i, keep_start, keep_end, start) in enumerate(spans):
    length = _trial_length(i, trials[i], keys)
    n = max(0, min(width, length - start))
    for k in keys:
      out[k][row, :n] = np.asarray(trials[i][k])[start : start + n]
    lo, hi = keep_start - start, min(keep_end, length) - start
    frame_index[row, lo:hi] = np.arange(keep_start, start + hi)
  out["trial"] = np.asarray([s[0] for s in spans], np.int32)
  out["frame_index"] = frame_index
  return out


def _trial_length(
  index: int, trial: Mapping[str, np.ndarray], keys: Sequence[str] | None
) -> int:
  keys = tuple(trial if keys is None else keys)
  missing = [k for k in keys if k not in trial]
  if missing:
    raise ValueError(
      f"trial {index} lacks model inputs {missing}; found {sorted(trial)}."
    )
  lengths = {k: len(trial[k]) for k in keys}
  if len(set(lengths.values())) != 1:
    raise ValueError(
      f"trial {index}: inputs differ in length (frames): {lengths}."
    )
  return next(iter(lengths.values()))


def fixed_batches(
  windows: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Batches of exactly `batch_size` windows (one compiled shape).

  The last batch is completed with padding rows: `trial` -1, `frame_index`
  -1, inputs at their `PAD_VALUES`.
  """
  batch_size = int(batch_size)
  total = len(windows["trial"])
  for lo in range(0, total, batch_size):
    batch = {}
    for k, v in windows.items():
      part = v[lo : lo + batch_size]
      if len(part) < batch_size:
        fill = -1 if k in IDENTITY else PAD_VALUES.get(k, 0)
        pad = np.full((batch_size - len(part), *part.shape[1:]), fill, v.dtype)
        part = np.concatenate([part, pad])
      batch[k] = part
    yield batch


# ----------------------------------------------------------------------------
# The window step.


def global_batch(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Global batch-sharded arrays from a batch every process holds whole.

  Each process fills the rows of its own devices, as the data sharding
  places them (`make_array_from_callback`), so the global array equals
  `batch` row for row whatever the mesh's device order.
  """
  data = sharding.data_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, data, lambda index: x[index])

  return {k: one(v) for k, v in batch.items()}


def jit_window_step(
  apply: Callable[[Any, dict[str, jax.Array]], jax.Array],
  mesh: jax.sharding.Mesh,
  params_sharding: Any,
) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Jits `apply(params, inputs) -> [B, T, C]` into a window step.

  The step takes a batch of model inputs plus the identity (`trial`,
  `frame_index`) and returns `{"preds", "trial", "frame_index"}`, all sharded
  like the batch: the identity goes through the devices with its rows.
  """

  def step(params, batch):
    inputs = {k: v for k, v in batch.items() if k not in IDENTITY}
    out = {"preds": apply(params, inputs)}
    out.update({k: batch[k] for k in IDENTITY})
    return out

  data = sharding.data_sharding(mesh)
  return jax.jit(step, in_shardings=(params_sharding, data), out_shardings=data)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_window_fn(
  step: Callable[[Any, dict[str, Any]], Mapping[str, jax.Array]],
  params: Any,
  mesh: jax.sharding.Mesh,
  input_keys: Iterable[str],
) -> Callable[[Batch], WindowPredictions]:
  """Host function: a whole numpy batch -> its `WindowPredictions`.

  Every process passes the same whole batch (inputs, `trial`,
  `frame_index`) and receives every row's predictions with the identity that
  travelled with them through the devices.
  """
  keys = tuple(input_keys) + IDENTITY

  def predict(batch: Batch) -> WindowPredictions:
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(
        f"eval batch lacks {missing} (has {sorted(batch)}); a window "
        "batch needs the model inputs and trial/frame_index"
      )
    inputs = {k: np.asarray(batch[k]) for k in keys}
    out = step(params, global_batch(inputs, mesh))
    return WindowPredictions(
      _to_host(out["preds"]).astype(np.float32, copy=False),
      _to_host(out["trial"]),
      _to_host(out["frame_index"]),
    )

  return predict


def collect(
  predict_fn: Callable[[Batch], Any], batches: Iterable[Batch]
) -> WindowPredictions:
  """Runs `predict_fn` over `batches` and concatenates their predictions.

  Args:
    predict_fn: batch -> `WindowPredictions` (a window step, whose identity
      travelled with the predictions through the devices), or batch -> a
      `[B, T, C]` array in the batch's row order (a host function of one
      process; the identity is then the batch's own).
    batches: batches with `trial` `[B]` and `frame_index` `[B, T]`.
  """
  parts = []
  for i, batch in enumerate(batches):
    part = predict_fn(batch)
    if not isinstance(part, WindowPredictions):
      part = WindowPredictions(
        np.asarray(part, np.float32),
        np.asarray(batch["trial"]),
        np.asarray(batch["frame_index"]),
      )
    if part.preds.ndim != 3 or part.preds.shape[:2] != np.shape(
      part.frame_index
    ):
      raise ValueError(
        f"predictions of batch {i} have shape {part.preds.shape}; expected "
        f"[batch, time, outputs] matching frame_index "
        f"{np.shape(part.frame_index)}"
      )
    parts.append(part)
  return WindowPredictions.concat(parts)


# ----------------------------------------------------------------------------
# Stitching.


def stitch(
  windows: WindowPredictions, trial_lengths: Sequence[int] | np.ndarray
) -> list[np.ndarray]:
  """Per-trial float64 `[L_i, C]`: the mean of the windows covering each frame.

  Windows are put in canonical order first, so the result is the same for
  any batch order, process count and device order.

  Raises:
    ValueError: a window points outside its trial, or a frame is covered by
      no window (see `affjax.data.stitch.stitch_windows`).
  """
  w = windows.canonical()
  return stitch_lib.stitch_windows(
    w.preds, w.trial, w.frame_index, trial_lengths
  )


def plan_chunks(
  length: int, chunk_length: int, context: int
) -> list[tuple[int, int, int]]:
  """Whole-trial chunks: `[0, length)` in windows of `chunk_length + context`.

  Chunk 0 reads frames `[0, width)` and keeps all of them; chunk j >= 1 reads
  `[j * chunk_length, j * chunk_length + width)` and keeps all but its first
  `context` frames (their causal history is cut). Kept ranges tile
  `[0, length)` exactly once.

  Args:
    length: trial length, frames.
    chunk_length: new frames per chunk (> 0).
    context: left context, the model's `receptive_field - 1` frames.

  Returns:
    `[(input_start, keep_start, keep_end), ...]`; empty for length 0.
  """
  if chunk_length < 1 or context < 0:
    raise ValueError(
      f"need chunk_length >= 1 and context >= 0, got "
      f"{chunk_length} and {context}."
    )
  if length <= 0:
    return []
  width = chunk_length + context
  count = max(1, -(-(length - context) // chunk_length))
  plan = [(0, 0, min(width, length))]
  for j in range(1, count):
    start = j * chunk_length
    plan.append((start, start + context, min(start + width, length)))
  return plan


def predict_trials(
  predict_fn: Callable[[Batch], Any],
  trials: Sequence[Mapping[str, np.ndarray]],
  *,
  window: int,
  hop: int | None = None,
  context: int | None = None,
  batch_size: int,
  keys: Sequence[str] | None = None,
) -> list[np.ndarray]:
  """Windowed inference over whole trials, stitched per frame.

  Two window layouts, one path:
  - `hop` given: the evaluation's windows (`window` frames every `hop`,
    `affjax.data.stitch.window_starts`), overlapping outputs averaged;
  - `context` given (whole-trial inference, `affjax.inference.trial`):
    chunks of `window + context` frames every `window` frames
    (`plan_chunks`), each frame's output kept from the one chunk where it has
    its full causal history, so every frame is predicted once.

  Args:
    predict_fn: e.g. `make_window_fn(...)` (see `collect`).
    trials: per trial `{input: [L_i, ...]}`, normalised as the pipeline does.
    window: frames per window (`data.window_length`), or new frames per
      chunk.
    hop: frames between window starts (`data.hop_length`).
    context: frames of left context per chunk (`receptive_field - 1`).
    batch_size: windows per call (a multiple of the devices).
    keys: the model inputs (default: all of the first trial's).

  Returns:
    Per trial float64 `[L_i, C]`.
  """
  if (hop is None) == (context is None):
    raise ValueError("give exactly one of hop (windows) or context (chunks)")
  lengths = [_trial_length(i, t, keys) for i, t in enumerate(trials)]
  if context is None:
    width = int(window)
    spans = [
      (i, int(s), int(s) + width, int(s))
      for i, n in enumerate(lengths)
      for s in stitch_lib.window_starts(n, width, hop)
    ]
  else:
    width = int(window) + int(context)
    spans = [
      (i, keep_start, keep_end, start)
      for i, n in enumerate(lengths)
      for start, keep_start, keep_end in plan_chunks(n, window, context)
    ]
  if not spans:
    raise ValueError("no frames to predict: every trial is empty")
  windows = gather_windows(trials, spans, width, keys=keys)
  return stitch(
    collect(predict_fn, fixed_batches(windows, batch_size)), lengths
  )

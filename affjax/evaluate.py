"""Host-side evaluation: window predictions -> trials -> metrics and files.

Independent of training. The caller supplies a `predict_fn` mapping one eval
batch (numpy dict, the layout of `affjax.data.pipeline`) to `[batch, time, outputs]`
predictions, e.g. its jitted eval step; this module collects the window
outputs, stitches them into per-trial series (overlapping windows averaged per
frame, `affjax.data.stitch.stitch_windows`), and scores them like the
reference: CCC, PCC and RMSE per emotion on the concatenation of every
trial's valid frames (`overall`, what model selection uses), plus the same
metrics per trial. CCC here is Lin's CCC with population moments
(`affjax.metrics`); `variance_ddof=1` reproduces the reference logger's
variances instead (the two differ by O(1/n_frames)).

Files written under `out_dir` (all atomically):
  results.json             metrics (NaN written as null)
  predictions/<trial>.txt  header = emotions, one row per frame: the input
                           of `affjax.merge.merge_folds`
  plots/<trial>.png        prediction vs label per emotion (optional)

Multi-process evaluation: pass a window step of `affjax.inference.windows`
(`make_window_fn`) as `predict_fn`; every process feeds the same whole batch,
gets every row's prediction back with the identity (trial, frames) that went
through the devices with it, and stitching sorts the windows first, so every
process computes the same results as one process would. Every frame of every
trial must be covered by some window, or a ValueError names the trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from affjax import io, metrics
from affjax.inference import windows as windows_lib

Batch = Mapping[str, np.ndarray]
PredictFn = Callable[[Batch], Any]
Results = dict[str, Any]

METRIC_NAMES = ("ccc", "pcc", "rmse")


class SplitLike(Protocol):
  """The fields of `affjax.data.pipeline.Split` this module reads."""

  name: str
  trial_names: list[str]
  trial_lengths: np.ndarray  # [n_trials] frames
  labels: list[np.ndarray]  # per trial [L, n_emotions], -5 invalid
  label_masks: list[np.ndarray]  # per trial [L] (or [L, n_emotions]) bool


WindowPredictions = windows_lib.WindowPredictions


def collect_windows(
  predict_fn: PredictFn, batches: Iterable[Batch]
) -> WindowPredictions:
  """Runs `predict_fn` over `batches` and stacks the window outputs.

  Args:
    predict_fn: batch dict -> either `WindowPredictions` (a window step of
      `affjax.inference.windows`, whose identity travelled with the
      predictions) or a `[B, T, C]` array in the batch's row order (a
      single-process host function; the identity is then the batch's).
    batches: eval batches with at least `trial` `[B]` and `frame_index`
      `[B, T]`.

  Returns:
    `WindowPredictions` with every row of every batch (padding included).

  Raises:
    ValueError: if there are no batches or an output has the wrong shape.
  """

  return windows_lib.collect(predict_fn, batches)


def stitch_trials(
  windows: WindowPredictions, split: SplitLike
) -> list[np.ndarray]:
  """Per-trial series `[L_i, C]` (float64), averaging overlapping windows.

  Raises:
    ValueError: if a frame of a trial is covered by no window, or a window
      points outside its trial.
  """
  lengths = np.asarray(split.trial_lengths, np.int64)
  trial = np.asarray(windows.trial)
  frame_index = np.asarray(windows.frame_index)
  rows = np.broadcast_to(trial[:, None], frame_index.shape)
  real = (rows >= 0) & (frame_index >= 0)
  if np.any(rows[real] >= len(lengths)):
    raise ValueError(
      f"split {split.name!r}: a window refers to trial index "
      f"{int(rows[real].max())}, but the split has {len(lengths)} trials"
    )
  beyond = frame_index[real] >= lengths[rows[real]]
  if np.any(beyond):
    bad = int(rows[real][beyond][0])
    raise ValueError(
      f"split {split.name!r}, trial {split.trial_names[bad]!r}: a window "
      f"refers to frame {int(frame_index[real][beyond][0])} but the trial "
      f"has {lengths[bad]} frames"
    )
  for i, name in enumerate(split.trial_names):
    covered = np.zeros(lengths[i], bool)
    covered[frame_index[real & (rows == i)]] = True
    if not covered.all():
      raise ValueError(
        f"split {split.name!r}, trial {name!r}: {int((~covered).sum())} of "
        f"{lengths[i]} frames have no window prediction (incomplete "
        f"eval batches)"
      )
  return windows_lib.stitch(windows, lengths)


def _valid_mask(split: SplitLike, i: int, n_emotions: int) -> np.ndarray:
  """Bool `[L, n_emotions]` of frames with a valid label."""
  mask = np.asarray(split.label_masks[i], bool)
  if mask.ndim == 1:
    mask = np.repeat(mask[:, None], n_emotions, axis=1)
  return mask


def _scores(pred, label, mask, emotions, ddof) -> dict[str, dict[str, float]]:
  m = metrics.moments_np(pred, label, mask)
  values = {
    "ccc": metrics.ccc_from_moments(m, ddof),
    "pcc": metrics.pcc_from_moments(m),
    "rmse": metrics.rmse_from_moments(m),
  }
  return {
    e: {
      **{k: float(values[k][j]) for k in METRIC_NAMES},
      "num_frames": int(m.count[j]),
    }
    for j, e in enumerate(emotions)
  }


def compute_results(
  stitched: Sequence[np.ndarray],
  split: SplitLike,
  emotions: Sequence[str],
  variance_ddof: int = 0,
) -> Results:
  """Partition-level and per-trial metrics of stitched predictions.

  Args:
    stitched: per trial `[L_i, C]` predictions, C = len(emotions).
    split: labels, masks and names of the trials.
    emotions: names of the C channels, in order.
    variance_ddof: see `affjax.metrics.ccc`.

  Returns:
    `{"split", "emotions", "num_trials", "ccc_mean", "overall": {emotion:
    {"ccc", "pcc", "rmse", "num_frames"}}, "trials": {name: {emotion:
    {...}}}}`. `overall` scores the concatenation of all trials' valid
    frames; `ccc_mean` is the mean of the overall CCCs over emotions.

  Raises:
    ValueError: on a length or channel mismatch, naming the trial.
  """
  emotions = list(emotions)
  c = len(emotions)
  preds, labels, masks, trials = [], [], [], {}
  for i, name in enumerate(split.trial_names):
    pred = np.asarray(stitched[i], np.float64)
    label = np.asarray(split.labels[i], np.float64)
    mask = _valid_mask(split, i, c)
    if pred.shape != (label.shape[0], c) or label.shape != mask.shape:
      raise ValueError(
        f"trial {name!r}: prediction {pred.shape}, label {label.shape}, "
        f"mask {mask.shape}; expected [{label.shape[0]}, {c}] for "
        f"emotions {emotions}"
      )
    trials[name] = _scores(pred, label, mask, emotions, variance_ddof)
    preds.append(pred)
    labels.append(label)
    masks.append(mask)
  overall = _scores(
    np.concatenate(preds),
    np.concatenate(labels),
    np.concatenate(masks),
    emotions,
    variance_ddof,
  )
  return {
    "split": split.name,
    "emotions": emotions,
    "num_trials": len(trials),
    "ccc_mean": float(np.mean([overall[e]["ccc"] for e in emotions])),
    "overall": overall,
    "trials": trials,
  }


def scalars(results: Results, prefix: str = "") -> dict[str, float]:
  """Flat `{prefix + "<emotion>/<metric>": value}` for metric writers."""
  out = {
    f"{prefix}{e}/{k}": results["overall"][e][k]
    for e in results["emotions"]
    for k in METRIC_NAMES
  }
  out[f"{prefix}ccc_mean"] = results["ccc_mean"]
  return out


def write_results(path: str, results: Results) -> None:
  """Writes `results` as JSON (NaN/inf as null), atomically."""
  io.write_json(path, results)


def write_prediction_file(
  path: str, pred: np.ndarray, emotions: Sequence[str]
) -> None:
  """One trial's predictions: header `emotion,...`, one row per frame.

  Values use 9 significant digits, enough to round-trip float32.
  """
  pred = np.asarray(pred, np.float64)
  if pred.ndim != 2 or pred.shape[1] != len(emotions):
    raise ValueError(
      f"{path}: predictions of shape {pred.shape} do not "
      f"match emotions {list(emotions)}"
    )
  io.atomic_write(
    path,
    lambda f: np.savetxt(
      f, pred, fmt="%.9g", delimiter=",", header=",".join(emotions), comments=""
    ),
  )


def read_prediction_file(path: str) -> tuple[list[str], np.ndarray]:
  """Reads a prediction/submission file.

  Returns:
    (lower-cased header names, float64 `[L, len(names)]`).

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: on an empty/bad header, unparsable rows, a wrong number of
      columns or NaN/inf values, naming the file (and row).
  """
  lines = io.read_text(path).splitlines()
  header = (lines[0] if lines else "").strip()
  names = [h.strip().lower() for h in header.split(",")]
  if not header or any(not n for n in names) or len(set(names)) != len(names):
    raise ValueError(
      f"{path}: bad header line {header!r}; expected "
      f"comma-separated emotion names, e.g. valence,arousal"
    )
  rows = []
  for line_no, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    try:
      row = [float(v) for v in line.split(",")]
    except ValueError:
      raise ValueError(
        f"{path}, line {line_no}: cannot parse {line!r}"
      ) from None
    if len(row) != len(names):
      raise ValueError(
        f"{path}, line {line_no}: {len(row)} values, "
        f"expected {len(names)} ({','.join(names)})"
      )
    if not all(math.isfinite(v) for v in row):
      raise ValueError(
        f"{path}, line {line_no}: non-finite value in {line.strip()!r}"
      )
    rows.append(row)
  data = np.asarray(rows, np.float64).reshape(len(rows), len(names))
  return names, data


def plot_trial(
  path: str,
  name: str,
  pred: np.ndarray,
  label: np.ndarray,
  mask: np.ndarray,
  emotions: Sequence[str],
  scores: Mapping[str, Mapping[str, float]],
) -> None:
  """PNG of prediction (red) vs label (green) per emotion, atomically."""
  # The object-oriented API with an Agg canvas keeps no pyplot global state,
  # so this is safe in background threads and needs no display.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 2.6 * len(emotions)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(emotions), 1, squeeze=False)[:, 0]
  for j, (ax, emotion) in enumerate(zip(axes, emotions)):
    ax.plot(pred[:, j], "r-", lw=0.8, label="prediction")
    ax.plot(
      np.where(mask[:, j], label[:, j], np.nan), "g-", lw=0.8, label="label"
    )
    s = scores[emotion]
    ax.set_title(
      f"{name} {emotion}: ccc={s['ccc']:.3f} pcc={s['pcc']:.3f} "
      f"rmse={s['rmse']:.3f}",
      fontsize=9,
    )
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlabel("frame")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.3)
  fig.tight_layout()
  io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), "wb")


def write_split_outputs(
  out_dir: str,
  results: Results,
  stitched: Sequence[np.ndarray],
  split: SplitLike,
  emotions: Sequence[str],
  *,
  plots: bool = True,
) -> None:
  """Writes results.json, predictions/<trial>.txt and plots/<trial>.png."""
  for i, name in enumerate(split.trial_names):
    write_prediction_file(
      io.join(out_dir, "predictions", f"{name}.txt"), stitched[i], emotions
    )
    if plots:
      plot_trial(
        io.join(out_dir, "plots", f"{name}.png"),
        name,
        stitched[i],
        np.asarray(split.labels[i]),
        _valid_mask(split, i, len(emotions)),
        emotions,
        results["trials"][name],
      )
  # Last, so that its presence means the directory is complete.
  write_results(io.join(out_dir, "results.json"), results)


def evaluate_predictions(
  windows: WindowPredictions,
  split: SplitLike,
  emotions: Sequence[str],
  *,
  out_dir: str | None = None,
  plots: bool = True,
  variance_ddof: int = 0,
) -> Results:
  """Stitches gathered window predictions, scores them, optionally writes."""
  if windows.preds.shape[-1] != len(emotions):
    raise ValueError(
      f"predictions have {windows.preds.shape[-1]} outputs but emotions "
      f"are {list(emotions)}"
    )
  stitched = stitch_trials(windows, split)
  results = compute_results(stitched, split, emotions, variance_ddof)
  if out_dir is not None:
    write_split_outputs(
      out_dir, results, stitched, split, emotions, plots=plots
    )
  return results


def evaluate_windows(
  predict_fn: PredictFn,
  batches: Iterable[Batch],
  split: SplitLike,
  emotions: Sequence[str],
  *,
  out_dir: str | None = None,
  plots: bool = True,
  variance_ddof: int = 0,
) -> Results:
  """Evaluates a model over every window of a split (single process).

  Args:
    predict_fn: batch dict -> `[B, T, C]` predictions, C = len(emotions).
    batches: the split's eval batches (every window once; padding rows have
      `trial` -1).
    split: the split's metadata (`affjax.data.pipeline.Split`).
    emotions: channel names, e.g. `("valence", "arousal")`.
    out_dir: if given, write results.json, predictions/ and plots/ there.
    plots: whether to draw the per-trial PNGs (only with out_dir).
    variance_ddof: 0 = Lin's CCC; 1 = the reference logger's variances.

  Returns:
    The results dict of `compute_results`.
  """
  return evaluate_predictions(
    collect_windows(predict_fn, batches),
    split,
    emotions,
    out_dir=out_dir,
    plots=plots,
    variance_ddof=variance_ddof,
  )

"""Raw Aff-Wild2 layout → per-trial feature cache (multiprocess, resumable).

`preprocess` runs in two phases:

1. Check (main process, cheap, before any feature is computed): find every
   trial; for each trial still to do, probe the video (exists, readable, has
   an audio track, frame count and rate), read and check the annotation, align
   its rows to the frames, and check the crop folder exists. All problems are
   reported together, each naming its file, so a bad dataset fails in
   seconds, not hours in. Trials with no valid label are skipped with a
   warning and recorded under `manifest["skipped"]`.
2. Build (a `ProcessPoolExecutor` with the spawn start method, or in-process
   when `num_workers == 1`): per trial, the face frames, labels, and the
   MFCC/eGeMAPS/VGGish features aligned to the video frames; written to a
   temporary directory and renamed when complete. The manifest is rewritten
   atomically after each trial, so an interrupted run resumes where it
   stopped: finished trial directories are skipped.

Both phases run holding the cache's lock (`affjax.data.dirlock`): a second
run on the same cache waits, then finds the trials the first one built.
Workers die with the process that started them (`kill -9` of it alone
included), so no orphan keeps writing into the cache; a worker that dies
fails the run with `BrokenProcessPool`, naming the unfinished trials.
"""

import concurrent.futures
import ctypes
import dataclasses
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from absl import logging

from affjax import logs
from affjax.data import dirlock
from affjax.data.preprocess import (
  audio,
  cache,
  labels,
  layout,
  opensmile_preload,
  video,
)
from affjax.data.preprocess.cache import PreprocessSettings

__all__ = ["BrokenProcessPool", "PreprocessSettings", "preprocess"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class _Job:
  source: layout.TrialSource
  n_frames: int
  fps: float
  labels: np.ndarray  # [n_frames, 2], -5 where invalid


def _check_trial(
  source: layout.TrialSource, settings: PreprocessSettings
) -> _Job:
  """Validates one trial's inputs (see module docstring); cheap."""
  info = video.probe_video(source.video_path)
  if not info.has_audio:
    raise ValueError(
      f"{source.video_path}: the video has no audio track (trial "
      f"{source.name}); audio features cannot be computed"
    )
  if source.annotation_path is None:  # test trial
    y = np.full((info.n_frames, 2), labels.INVALID, np.float32)
  else:
    rows = labels.read_annotation(source.annotation_path)
    y = labels.align_labels(
      rows, info.n_frames, settings.label_tolerance, source.annotation_path
    )
  if not os.path.isdir(source.crop_dir):
    raise FileNotFoundError(
      f"face-crop directory {source.crop_dir} of trial {source.name} does "
      "not exist"
    )
  return _Job(source=source, n_frames=info.n_frames, fps=info.fps, labels=y)


def _check_vggish_checkpoint(path: str) -> None:
  if path and not (os.path.exists(path) or os.path.exists(path + ".index")):
    raise FileNotFoundError(f"VGGish checkpoint {path} does not exist")


def _check_all(sources, settings):
  """Phase 1: returns (jobs, skipped); raises listing every problem."""
  jobs, skipped, problems = [], {}, []
  for source in sources:
    try:
      job = _check_trial(source, settings)
    except (OSError, ValueError) as e:
      problems.append(e)
      continue
    if source.partition != "test" and not labels.valid_mask(job.labels).any():
      reason = f"no valid label in {source.annotation_path} (all rows -5)"
      warnings.warn(f"skipping trial {source.name}: {reason}", stacklevel=3)
      skipped[source.name] = {"partition": source.partition, "reason": reason}
      continue
    jobs.append(job)
  if problems:
    first = problems[0]
    if len(problems) > 1:
      lines = "\n".join(f"  - {p}" for p in problems)
      message = f"{len(problems)} trials have bad inputs:\n{lines}"
      error_type = type(first) if isinstance(first, ValueError) else OSError
      if all(isinstance(p, FileNotFoundError) for p in problems):
        error_type = FileNotFoundError
      raise error_type(message) from first
    raise first
  return jobs, skipped


@functools.lru_cache(maxsize=4)
def _vggish_params(model: str, checkpoint: str) -> Any:
  from affjax.models import vggish  # pylint: disable=g-import-not-at-top

  if checkpoint:
    if checkpoint.endswith((".pth", ".pt")):
      import torch  # pylint: disable=g-import-not-at-top

      state = torch.load(checkpoint, map_location="cpu")
      return vggish.params_from_torch_state_dict(state)
    return vggish.load_tf_checkpoint(checkpoint)
  return vggish.init_params(0, tiny=True) if model == "tiny" else None


def _build_trial(job: _Job, settings: PreprocessSettings, cache_dir: str):
  """Phase 2 for one trial; returns its meta dict. Runs in a worker."""
  src, n, fps, sr = job.source, job.n_frames, job.fps, settings.sample_rate
  start = time.time()
  try:
    frames, face_mask = video.load_frames(
      video.list_crops(src.crop_dir), n, settings.frame_size
    )
    wave = audio.load_audio(src.video_path, sr)
    shortfall = {"max_shortfall_seconds": settings.max_audio_shortfall_seconds}
    features = {
      "mfcc": audio.mfcc_features(wave, sr, n, fps, **shortfall),
      "egemaps": audio.egemaps_features(
        wave, sr, n, fps, feature_set=settings.egemaps_feature_set, **shortfall
      ),
      "vggish": audio.vggish_features(
        wave,
        sr,
        n,
        fps,
        params=_vggish_params(
          settings.vggish_model, settings.vggish_checkpoint
        ),
        hop_seconds=settings.vggish_hop_seconds,
        **shortfall,
      ),
    }
  except (OSError, ValueError) as e:
    # Name the trial and its video: feature errors only describe the audio.
    raise type(e)(f"trial {src.name} ({src.video_path}): {e}") from e
  except Exception as e:  # e.g. openSMILE errors; keep the trial in the text
    raise RuntimeError(
      f"trial {src.name} ({src.video_path}): {type(e).__name__}: {e}"
    ) from e
  valid = labels.valid_mask(job.labels)
  stats_frames = valid if src.partition != "test" else np.ones(n, bool)
  meta = {
    "trial": src.name,
    "video": src.video,
    "partition": src.partition,
    "fps": fps,
    "n_frames": n,
    "n_valid_labels": int(valid.sum()),
    "n_faces": int(face_mask.sum()),
    "feature_sums": cache.feature_sums(features, stats_frames),
    "stats_frames": "labelled" if src.partition != "test" else "all",
    "sources": {
      "video": src.video_path,
      "annotation": src.annotation_path,
      "crops": src.crop_dir,
    },
  }
  arrays = {"frames": frames, "face_mask": face_mask, "labels": job.labels}
  arrays.update(features)
  cache.write_trial(cache_dir, src.name, arrays, meta)
  logging.debug(
    "preprocessed %s: %d frames in %.1fs", src.name, n, time.time() - start
  )
  return meta


def _init_worker(parent_pid: int, log_settings: dict[str, Any]) -> None:
  """Start of each spawn worker: dies with the parent, loads openSMILE first.

  A worker is a fresh interpreter that computes the audio features, so it
  loads openSMILE's native library before anything could import TensorFlow
  (see `opensmile_preload`), and logs like the parent (`affjax.logs`).
  """
  opensmile_preload.preload()
  logs.configure(**log_settings)
  _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
  """Ends this worker process when its parent `parent_pid` dies.

  Spawn workers otherwise outlive a `kill -9` of the preprocessing process:
  they go on building the trials queued to them, writing into the cache
  while the user reruns.
  """
  if sys.platform.startswith("linux"):
    # The kernel sends SIGKILL when the thread that spawned this process
    # exits. The pool spawns its workers from the thread calling `submit`,
    # which stays in `_build_in_pool` until the pool is shut down.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
      code = ctypes.get_errno()
      raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
  else:

    def watch():
      while os.getppid() == parent_pid:
        time.sleep(1.0)
      os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
  # The parent may have died before prctl took effect: no signal would come.
  if os.getppid() != parent_pid:
    os._exit(1)


def _worker_died(unfinished: list[str]):
  """The error of a run whose worker died (the pool is broken)."""
  shown = ", ".join(unfinished[:10]) + (", ..." if len(unfinished) > 10 else "")
  return BrokenProcessPool(
    f"a preprocessing worker died (killed by a signal, e.g. by the "
    f"out-of-memory killer) while building one of the {len(unfinished)} "
    f"unfinished trials ({shown}). Rerun the same command to build them "
    "(finished trials are kept); if it happens again, use fewer workers"
  )


def _build_in_pool(jobs, settings, cache_dir, num_workers, record):
  """Phase 2 in spawn worker processes; `record(meta)` after each trial."""
  context = multiprocessing.get_context("spawn")
  finished = set()
  # Longest trials first keeps the workers busy until the end.
  ordered = sorted(jobs, key=lambda j: -j.n_frames)
  # No queue or lock is shared with the workers (a worker killed while
  # holding one would block the others): the pool's own bookkeeping tells
  # that a worker died, the finished set what is left.
  with concurrent.futures.ProcessPoolExecutor(
    max_workers=min(num_workers, len(jobs)),
    mp_context=context,
    initializer=_init_worker,
    initargs=(os.getpid(), logs.settings()),
  ) as pool:
    try:
      # Inside the try: a worker killed while jobs are still being submitted
      # breaks the pool in `submit` already.
      futures = [
        pool.submit(_build_trial, j, settings, cache_dir) for j in ordered
      ]
      for future in concurrent.futures.as_completed(futures):
        meta = future.result()
        finished.add(meta["trial"])
        record(meta)
    except BrokenProcessPool:
      # The executor stops the other workers with SIGTERM and joins them
      # without a timeout; a worker busy in native code that catches SIGTERM
      # (seen here: the survivor of a killed worker kept running, and the run
      # hung in that join) never exits. SIGKILL cannot be caught.
      for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
          process.kill()
      pool.shutdown(wait=True, cancel_futures=True)
      unfinished = [j.source.name for j in ordered]
      unfinished = [n for n in unfinished if n not in finished]
      raise _worker_died(sorted(unfinished)) from None
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


class _Progress:
  """Logs 'built k/n trials' at most once a minute (each trial: DEBUG).

  On Aff-Wild2 the build takes hours: a line a minute shows it is moving
  without one line per trial.
  """

  EVERY_SECONDS = 60.0

  def __init__(self, total: int):
    self.total, self.done = total, 0
    self.start = self.last = time.monotonic()

  def one_done(self) -> None:
    self.done += 1
    now = time.monotonic()
    if now - self.last >= self.EVERY_SECONDS and self.done < self.total:
      self.last = now
      logging.info(
        "built %d/%d trials in %.0fs", self.done, self.total, now - self.start
      )


def _reconcile(manifest, cache_dir, wanted):
  """Makes manifest["trials"] list exactly the finished trial directories."""
  done = set(cache.finished_trials(cache_dir))
  trials = {n: e for n, e in manifest["trials"].items() if n in done}
  for name in sorted(done - set(trials)):
    # Finished, but the run died before the manifest was rewritten.
    meta = cache.read_json(
      os.path.join(cache.trial_dir(cache_dir, name), cache.META)
    )
    trials[name] = cache.manifest_entry(meta)
  stale = sorted(done - wanted)
  if stale:
    logging.warning("cache trials not in the raw dataset: %s", stale)
  manifest["trials"] = dict(sorted(trials.items()))
  return done


def preprocess(
  raw_dir: str,
  cache_dir: str,
  settings: PreprocessSettings | None = None,
  num_workers: int = 1,
  *,
  test_list: str | None = None,
  trials: list[str] | None = None,
) -> dict[str, Any]:
  """Builds (or completes) the feature cache of a raw Aff-Wild2 dataset.

  Waits while another process builds the same cache (its lock), then
  resumes from what that run left.

  Args:
    raw_dir: raw layout (see `layout`).
    cache_dir: output; created if needed. See `cache` for the format.
    settings: preprocessing settings; None → defaults. Must equal those of an
      existing cache.
    num_workers: processes building trials (1 → in this process).
    test_list: test trial list; None → `<raw_dir>/va_test_set.txt` if present.
    trials: only these trials (default: all).

  Returns:
    The manifest: {"version", "settings", "raw_dir", "trials": {name: entry},
    "skipped": {name: {"partition", "reason"}}}.

  Raises:
    FileNotFoundError, ValueError: bad inputs (every file named), a settings
      mismatch with the existing cache, or an unreadable manifest.
    OSError: a write failed (a full disk names the trial).
    BrokenProcessPool: a worker died (e.g. out of memory); the message names
      the unfinished trials. Rerunning resumes.
  """
  settings = settings or PreprocessSettings()
  raw_dir = os.path.abspath(raw_dir)
  sources = layout.find_trials(raw_dir, test_list, trials)
  _check_vggish_checkpoint(settings.vggish_checkpoint)
  os.makedirs(cache_dir, exist_ok=True)
  with dirlock.hold(dirlock.inside(cache_dir), f"feature cache {cache_dir}"):
    # Read under the lock: a run that held it may have built trials.
    manifest = cache.open_manifest(cache_dir, settings)
    manifest["raw_dir"] = raw_dir
    cache.remove_stale_temporaries(cache_dir)
    done = _reconcile(manifest, cache_dir, {s.name for s in sources})
    todo = [s for s in sources if s.name not in done]
    jobs, skipped = _check_all(todo, settings)
    for name in manifest["skipped"].copy():
      if name in done or name in {j.source.name for j in jobs}:
        del manifest["skipped"][name]
    manifest["skipped"].update(skipped)
    manifest_path = os.path.join(cache_dir, cache.MANIFEST)
    cache.atomic_write_json(manifest_path, manifest)
    logging.info(
      "%d trials cached, %d to build, %d skipped",
      len(done),
      len(jobs),
      len(manifest["skipped"]),
    )

    progress = _Progress(len(jobs))

    def record(meta):
      manifest["trials"][meta["trial"]] = cache.manifest_entry(meta)
      manifest["trials"] = dict(sorted(manifest["trials"].items()))
      cache.atomic_write_json(manifest_path, manifest)
      progress.one_done()

    if num_workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        record(_build_trial(job, settings, cache_dir))
    else:
      _build_in_pool(jobs, settings, cache_dir, num_workers, record)
  return manifest

"""Makes a config's data ready: raw dataset -> feature cache -> TFDS dataset.

Every stage is idempotent, so `prepare` is cheap once done and resumes an
interrupted run:

1. raw data: for `data.name == 'synthetic'` the embedded generator writes
   it (`affjax.data.synthetic.generate`; a no-op when it already exists with
   the same settings). For 'affwild2' it must exist.
2. cache: `affjax.data.preprocess.run.preprocess` (finished trials skipped).
   Stages 1-2 run in a child Python (openSMILE crashes in a process that
   imported TensorFlow first).
3. TFDS: `affjax.data.affwild2.build` (skipped when the cache is unchanged).

Options (all optional):
  config.data.synthetic: generator arguments (`synthetic.generate`); keys
    naming `PreprocessSettings` fields, `num_workers` or `test_list` are
    passed to preprocessing instead.
  config.data.preprocess: `PreprocessSettings` fields, `num_workers`,
    `test_list` (every one in the config schema, `configs/common.py`); for
    the synthetic dataset, settings in `config.data.synthetic` win.
Empty `raw_dir`/`cache_dir`/`tfds_dir` mean `<workdir>/data/{raw,cache,tfds}`;
for a URL workdir (`gs://...`) they mean a local directory instead (see
`local_data_base`): all three must be local paths.

The stages' modules are imported inside the functions: importing this module
stays cheap, and TensorFlow is only loaded when the TFDS stage runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import logging

from affjax import io

_RUN_OPTIONS = ("num_workers", "test_list")


@dataclasses.dataclass(frozen=True)
class DataPaths:
  """Where a config's data lives (absolute local paths)."""

  raw_dir: str
  cache_dir: str
  tfds_dir: str


# Where the data of a run whose workdir is a URL goes by default.
LOCAL_DATA_ROOT = "~/.cache/affjax/workdirs"


def local_data_base(workdir: str) -> str:
  """The local directory whose `data/` holds a run's data by default.

  A local workdir is its own base. For a URL workdir (`gs://bucket/run`) it
  is `~/.cache/affjax/workdirs/gs/bucket/run`: the feature cache is read by
  memory-mapping numpy files and written by worker processes, which needs a
  local file system, so data never defaults to a bucket.
  """
  if not io.is_url(workdir):
    return io.absolute(workdir)
  scheme, rest = io.absolute(workdir).split("://", 1)
  return os.path.join(os.path.expanduser(LOCAL_DATA_ROOT), scheme, rest)


def resolve_paths(data_config: Any, workdir: str) -> DataPaths:
  """Config paths, '' replaced by `<local base>/data/{raw,cache,tfds}`.

  Raises:
    ValueError: a data directory is a URL. Preprocessing and the input
      pipeline read and write local files (memory-mapped numpy arrays, worker
      processes, TFDS shards): copy a dataset kept in a bucket to local disk
      first (`gcloud storage rsync -r gs://... DIR`) and point the key there.
  """

  def pick(key, default):
    value = data_config.get(key, "")
    if value and io.is_url(value):
      raise ValueError(
        f"config.data.{key}={value!r}: data directories must be local paths "
        "(the feature cache is memory-mapped and written by worker "
        "processes); copy it to local disk first, e.g. `gcloud storage rsync "
        f"-r {value} /data/{default}`, and set config.data.{key} to that "
        "directory"
      )
    if not value:
      value = os.path.join(local_data_base(workdir), "data", default)
    return io.absolute(value)

  return DataPaths(
    pick("raw_dir", "raw"), pick("cache_dir", "cache"), pick("tfds_dir", "tfds")
  )


def _as_dict(value: Any) -> dict[str, Any]:
  if value is None:
    return {}
  return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def _split_options(data_config: Any) -> tuple[dict, dict, dict]:
  """(generator kwargs, PreprocessSettings kwargs, preprocess() kwargs)."""
  from affjax.data import synthetic  # pylint: disable=g-import-not-at-top
  from affjax.data.preprocess import cache

  settings_keys = {f.name for f in dataclasses.fields(cache.PreprocessSettings)}
  gen_keys = set(inspect.signature(synthetic.generate).parameters) - {"out_dir"}
  gen, settings, run = {}, {}, {}
  sources = [
    ("config.data.preprocess", _as_dict(data_config.get("preprocess", None)))
  ]
  if data_config.name == "synthetic":
    # After `data.preprocess`, whose every key the schema sets: a setting
    # the synthetic dataset names (e.g. the tests' narrow VGGish) wins.
    sources.append(
      ("config.data.synthetic", _as_dict(data_config.get("synthetic", None)))
    )
  for where, options in sources:
    for key, value in options.items():
      if isinstance(value, list):
        value = tuple(value)
      if key in settings_keys:
        settings[key] = value
      elif key in _RUN_OPTIONS:
        run[key] = value or None
      elif key in gen_keys and where == "config.data.synthetic":
        gen[key] = value
      else:
        allowed = sorted(
          settings_keys
          | set(_RUN_OPTIONS)
          | (gen_keys if "synthetic" in where else set())
        )
        raise ValueError(f"{where}.{key}: unknown option; allowed: {allowed}")
  return gen, settings, run


def _run_stages(job: dict[str, Any]) -> None:
  """Generation (optional) and preprocessing; runs in a fresh interpreter."""
  from affjax.data.preprocess import cache
  from affjax.data.preprocess import run as run_lib

  if job["generate"] is not None:
    from affjax.data import synthetic  # pylint: disable=g-import-not-at-top

    start = time.monotonic()
    synthetic.generate(job["raw_dir"], **job["generate"])
    logging.info(
      "Data: synthetic raw dataset in %s (%.0fs).",
      job["raw_dir"],
      time.monotonic() - start,
    )
  start = time.monotonic()
  manifest = run_lib.preprocess(
    job["raw_dir"],
    job["cache_dir"],
    cache.PreprocessSettings(**job["settings"]),
    num_workers=int(job["num_workers"] or 1),
    test_list=job["test_list"],
  )
  logging.info(
    "Data: feature cache %s: %d trials, %d skipped (%.0fs).",
    job["cache_dir"],
    len(manifest["trials"]),
    len(manifest.get("skipped", {})),
    time.monotonic() - start,
  )


_ERRORS = {
  e.__name__: e for e in (FileNotFoundError, ValueError, OSError, RuntimeError)
}


def _run_stages_in_subprocess(job: dict[str, Any]) -> None:
  """Runs `_run_stages` in a child Python and re-raises its error here.

  openSMILE aborts the process (`malloc(): invalid size`) when TensorFlow
  was imported before it, and the training process has TensorFlow loaded,
  so the audio features are always computed in a fresh interpreter.
  """
  with tempfile.TemporaryDirectory(prefix="affjax-prepare-") as tmp:
    job_path = os.path.join(tmp, "job.json")
    error_path = os.path.join(tmp, "error.json")
    with open(job_path, "w") as f:
      json.dump(job, f)
    # The child must import this same affjax, installed or not.
    root = os.path.dirname(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
      p for p in (root, env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
      [sys.executable, "-m", "affjax.data.prepare", job_path, error_path],
      check=False,
      env=env,
    )
    if os.path.isfile(error_path):
      with open(error_path) as f:
        err = json.load(f)
      raise _ERRORS.get(err["type"], RuntimeError)(err["message"])
    if proc.returncode:
      raise RuntimeError(
        f"data preparation of {job['cache_dir']} failed "
        f"(exit code {proc.returncode}); see its log above"
      )


def _child_main(job_path: str, error_path: str) -> int:
  from affjax import logs
  from affjax.data.preprocess import opensmile_preload

  # This fresh interpreter computes the audio features: openSMILE first.
  opensmile_preload.preload()
  with open(job_path) as f:
    job = json.load(f)
  logs.configure(**job.get("logging", {"verbosity": 0, "quiet": True}))
  try:
    _run_stages(job)
  except Exception as e:  # noqa: BLE001  (re-raised in the parent)
    with open(error_path, "w") as f:
      json.dump({"type": type(e).__name__, "message": str(e)}, f)
    return 1
  return 0


def _has_cache(cache_dir: str) -> bool:
  return os.path.isfile(os.path.join(cache_dir, "manifest.json"))


def prepare(data_config: Any, workdir: str) -> DataPaths:
  """Generates/preprocesses/builds what `data_config` needs; returns paths.

  Args:
    data_config: `config.data`.
    workdir: the run's directory (default location of the data).

  Raises:
    FileNotFoundError: affwild2 raw data missing (naming the config key and
      path) and no cache to fall back on.
    ValueError: unknown data name or option; errors of the stages.
  """
  from affjax import logs  # pylint: disable=g-import-not-at-top
  from affjax.data import affwild2  # pylint: disable=g-import-not-at-top

  paths = resolve_paths(data_config, workdir)
  if data_config.name not in ("synthetic", "affwild2"):
    raise ValueError(
      f"config.data.name must be 'synthetic' or 'affwild2', "
      f"got {data_config.name!r}"
    )
  gen, settings, run = _split_options(data_config)
  job = {
    "generate": None,
    "raw_dir": paths.raw_dir,
    "cache_dir": paths.cache_dir,
    "settings": settings,
    "num_workers": run.get("num_workers"),
    "test_list": run.get("test_list"),
    # The child logs like this process (e.g. with --verbosity=1 each trial).
    "logging": logs.settings(),
  }
  if data_config.name == "synthetic":
    _run_stages_in_subprocess(dict(job, generate=gen))
  else:
    raw_given = bool(data_config.get("raw_dir", ""))
    if os.path.isdir(paths.raw_dir):
      _run_stages_in_subprocess(job)
    elif raw_given or not _has_cache(paths.cache_dir):
      raise FileNotFoundError(
        f"config.data.raw_dir={paths.raw_dir!r} does not exist"
        + (
          ""
          if raw_given
          else f" and config.data.cache_dir={paths.cache_dir!r} holds no "
          "manifest.json"
        )
        + ": point config.data.raw_dir at the Aff-Wild2 layout "
        "(annotations/VA_Set, cropped_aligned, videos)"
      )
    else:
      logging.info(
        "No raw data at %s; using the cache %s as is.",
        paths.raw_dir,
        paths.cache_dir,
      )
  start = time.monotonic()
  affwild2.build(paths.cache_dir, paths.tfds_dir)
  logging.info(
    "Data: TFDS dataset %s (%.0fs).", paths.tfds_dir, time.monotonic() - start
  )
  return paths


if __name__ == "__main__":
  sys.exit(_child_main(*sys.argv[1:3]))

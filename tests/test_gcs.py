"""A `gs://` workdir end to end, against a local GCS API (tests/gcs_emulator.py).

`configs/test.py` runs in child processes with `--workdir=gs://<bucket>/run`
and the ordinary clients (orbax/TensorStore, TensorFlow's GCS file system for
TensorBoard summaries and `etils.epath`) pointed at the emulator: trained and
`kill -9`ed once the second checkpoint's first object is in the bucket,
rerun (resumes from the bucket), evaluated, two fold directories in the
bucket merged into the bucket, and a video predicted from the bucket
checkpoint into the bucket. The data directories stay local (they must).
"""

import ast
import glob
import json
import os
import re
import urllib.parse
import urllib.request

import ml_collections
import numpy as np
import pytest

from affjax import merge
from affjax.data import prepare
from tests import gcs_emulator
from tests import reliability_helpers as rh


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator child on 127.0.0.1 for the whole session."""
  emulator = gcs_emulator.start(str(tmp_path_factory.mktemp("gcs")))
  yield emulator
  emulator.stop()


def _objects(gcs, prefix: str) -> list[str]:
  """Object names under `prefix`, without "dir/" markers (as mkdir makes)."""
  query = urllib.parse.urlencode({"prefix": prefix})
  url = f"{gcs.api_url}/storage/v1/b/{gcs.bucket}/o?{query}"
  with urllib.request.urlopen(url, timeout=30) as r:
    names = [o["name"] for o in json.load(r).get("items", [])]
  return sorted(n for n in names if not n.endswith("/"))


def _download(gcs, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  url = f"{gcs.api_url}/download/storage/v1/b/{gcs.bucket}/o/{quoted}?alt=media"
  with urllib.request.urlopen(url, timeout=30) as r:
    return r.read()


def _argv(workdir, data_root, *extra):
  return [
    rh.PYTHON,
    "-m",
    "affjax.main",
    "--config=configs/test.py",
    f"--workdir={workdir}",
    *(
      f"--config.data.{k}_dir={os.path.join(data_root, k)}"
      for k in ("raw", "cache", "tfds")
    ),
    # Two epochs: the kill lands in the second checkpoint's save, the rerun
    # finishes it.
    "--config.train.max_epochs=2",
    *extra,
  ]


def _checkpoint_steps(gcs, prefix: str) -> set[int]:
  """Steps whose checkpoint orbax finished (its commit marker exists)."""
  steps = set()
  for name in _objects(gcs, prefix):
    found = re.fullmatch(re.escape(prefix) + r"(\d+)/commit_success\.txt", name)
    if found:
      steps.add(int(found.group(1)))
  return steps


def test_url_workdir_defaults_data_to_local_disk(monkeypatch, tmp_path):
  monkeypatch.setattr(prepare, "LOCAL_DATA_ROOT", str(tmp_path))
  data = ml_collections.ConfigDict(
    {"raw_dir": "", "cache_dir": "", "tfds_dir": ""}
  )
  paths = prepare.resolve_paths(data, "gs://bucket/team/run/")
  assert paths == prepare.DataPaths(
    raw_dir=str(tmp_path / "gs/bucket/team/run/data/raw"),
    cache_dir=str(tmp_path / "gs/bucket/team/run/data/cache"),
    tfds_dir=str(tmp_path / "gs/bucket/team/run/data/tfds"),
  )


def test_url_data_dir_is_refused_naming_the_key():
  data = ml_collections.ConfigDict(
    {"raw_dir": "", "cache_dir": "gs://b/cache", "tfds_dir": ""}
  )
  with pytest.raises(
    ValueError, match=r"config\.data\.cache_dir='gs://b/cache'"
  ):
    prepare.resolve_paths(data, "/tmp/run")


def test_train_kill_resume_evaluate_merge_in_bucket(gcs, tmp_path):
  workdir = f"gs://{gcs.bucket}/run"
  data_root = str(tmp_path / "data")
  # A compilation cache shared by the four children keeps the reruns short.
  env = dict(
    gcs.env,
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  log_path = str(tmp_path / "train.txt")
  ckpt_prefix = "run/checkpoints/"

  # 1. Killed (-9) as soon as checkpoint 2's first object is in the bucket:
  #    checkpoint 1 is then complete (orbax finishes a save before the next).
  proc = rh.start(_argv(workdir, data_root), log_path, **env)
  try:
    second = lambda: any(
      n.startswith(ckpt_prefix + "2") for n in _objects(gcs, ckpt_prefix)
    )
    assert rh.wait_until(second, proc, timeout=600, interval=0.05)
  finally:
    rh.kill_group(proc)
  with open(log_path) as f:
    first_log = f.read()
  assert 1 in _checkpoint_steps(gcs, ckpt_prefix), first_log[-3000:]
  done_before = _checkpoint_steps(gcs, ckpt_prefix)
  # TensorBoard summaries went to the bucket, not to a local "gs:" folder.
  assert any("events.out.tfevents" in n for n in _objects(gcs, "run/"))
  assert not os.path.exists(os.path.join(rh.ROOT, "gs:"))

  # 2. The same command resumes from the bucket and finishes.
  final = rh.run(_argv(workdir, data_root), timeout=600, **env)
  assert final.returncode == 0, final.stderr[-5000:]
  resumed = re.findall(r"Resumed (\S+) at epoch (\d+)", final.stderr)
  assert resumed == [(workdir, str(max(done_before)))], final.stderr[-3000:]
  summary = ast.literal_eval(
    re.findall(r"Training done: (\{.*\})", final.stderr)[-1]
  )
  assert summary["epochs"] == 2
  assert max(_checkpoint_steps(gcs, ckpt_prefix)) == 2
  assert not any("tmp" in n for n in _objects(gcs, ckpt_prefix))

  # 3. --mode=evaluate reads the bucket checkpoint, writes to the bucket.
  out = f"{workdir}/eval/validation"
  evaluated = rh.run(
    _argv(workdir, data_root, "--mode=evaluate", f"--out={out}"),
    timeout=600,
    **env,
  )
  assert evaluated.returncode == 0, evaluated.stderr[-5000:]
  results = json.loads(_download(gcs, "run/eval/validation/results.json"))
  logged = float(
    re.findall(r"Evaluation: ccc_mean (\S+),", evaluated.stderr)[-1]
  )
  assert round(results["ccc_mean"], 4) == logged
  trials = [
    n.rsplit("/", 1)[1][:-4]
    for n in _objects(gcs, "run/eval/validation/predictions/")
  ]
  assert trials and all(t in results["trials"] for t in trials)

  # 4. --mode=merge of two fold directories in the bucket into the bucket
  #    (a fold dir's predictions/ is found), checked against merging local
  #    copies of the same files in this process.
  merged = rh.run(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--mode=merge",
      f"--fold_dirs={out},{out}/predictions",
      f"--out={workdir}/submission",
    ],
    timeout=300,
    **env,
  )
  assert merged.returncode == 0, merged.stderr[-5000:]
  local = tmp_path / "predictions"
  local.mkdir()
  for t in trials:
    (local / f"{t}.txt").write_bytes(
      _download(gcs, f"run/eval/validation/predictions/{t}.txt")
    )
  want = merge.merge_folds([local, local], tmp_path / "submission")
  for t in trials:
    got = _download(gcs, f"run/submission/{t}.txt")
    assert got == (tmp_path / "submission" / f"{t}.txt").read_bytes()
    lines = got.decode().splitlines()
    assert lines[0] == "valence,arousal"
    np.testing.assert_allclose(
      np.loadtxt(lines[1:], delimiter=","), want[t], rtol=1e-8
    )

  # 5. --mode=predict restores the bucket checkpoint and writes its CSV, PNG
  #    and JSON to the bucket (the video itself is a local file).
  video = min(glob.glob(os.path.join(data_root, "raw", "videos", "*.mp4")))
  stem = os.path.splitext(os.path.basename(video))[0]
  predicted = rh.run(
    _argv(
      workdir,
      data_root,
      "--mode=predict",
      f"--video={video}",
      f"--out={workdir}/predict",
    ),
    timeout=600,
    **env,
  )
  assert predicted.returncode == 0, predicted.stderr[-5000:]
  assert _objects(gcs, "run/predict/") == [
    f"run/predict/{stem}.{k}" for k in ("csv", "json", "png")
  ]
  info = json.loads(_download(gcs, f"run/predict/{stem}.json"))
  rows = _download(gcs, f"run/predict/{stem}.csv").decode().splitlines()
  assert rows[0] == "frame,time_s,valence,arousal,face_found"
  assert len(rows) == info["n_frames"] + 1

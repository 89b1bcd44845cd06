"""Preprocessing leaves no orphans or leftovers and says what went wrong.

* `kill -9 <pid>` of the preprocessing parent alone (not its process group)
  leaves no spawn worker running: orphans would keep writing trials into the
  cache and race the rerun (its stale-temporary sweep and its own renames).
* A manifest temporary left by a kill is removed by the next run.
* A worker killed by the OS (out of memory) fails the run with a message that
  names the trials being built and says that rerunning resumes.
* A corrupt manifest.json is named in the error.
* A full disk: the error names the trial and says the disk is full, and the
  half-written trial is removed.

See docs/failure_modes.md; `tests/test_reliability_preprocess_kill.py` covers
kills of the whole process group.
"""

import os
import re
import signal
import subprocess

import pytest

from affjax.data.preprocess import cache
from tests import reliability_helpers as rh


@pytest.fixture(scope="module")
def raw(test_data_root):
  """`configs/test.py`'s raw data, 6 trials (the session's, read only)."""
  return os.path.join(test_data_root, "raw")


def _call(raw, out, workers):
  return rh.preprocess_call(raw, out, workers)


def test_parent_killed_alone_stops_its_workers(raw, tmp_path):
  out = str(tmp_path / "cache")
  proc = rh.start(
    [rh.PYTHON, "-c", _call(raw, out, 2)], str(tmp_path / "log.txt")
  )
  try:
    assert rh.wait_until(
      lambda: len(cache.finished_trials(out)) >= 1, proc, timeout=300
    )
    # Killed while it still has work and workers (else nothing is tested).
    assert proc.poll() is None and rh.pool_workers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    gone = rh.group_gone(proc.pid, timeout=15)
    assert gone, (
      f"workers {rh.group_members(proc.pid)} still run 15 s "
      "after their parent was killed"
    )
  finally:
    rh.kill_group(proc)


def test_manifest_temporary_left_by_a_kill_is_removed(raw, tmp_path):
  out = str(tmp_path / "cache")
  killed = rh.run(
    rh.kill_on_call_driver([("os", "replace", 2, "before")], _call(raw, out, 1))
  )
  assert killed.returncode == -9
  assert rh.temporaries(out), "the kill should leave a manifest temporary"
  done = rh.run([rh.PYTHON, "-c", _call(raw, out, 1)])
  assert done.returncode == 0, done.stderr[-3000:]
  assert rh.temporaries(out) == []


def test_killed_worker_error_names_the_trials_and_says_rerun(raw, tmp_path):
  out = str(tmp_path / "cache")
  log = str(tmp_path / "log.txt")
  proc = rh.start(
    [
      rh.PYTHON,
      "-m",
      "affjax.data.preprocess",
      f"--raw={raw}",
      f"--out={out}",
      "--vggish_model=tiny",
      "--workers=2",
    ],
    log,
  )
  try:
    assert rh.wait_until(lambda: rh.pool_workers(proc.pid), proc, timeout=300)
    os.kill(rh.pool_workers(proc.pid)[0], signal.SIGKILL)
    code = proc.wait(timeout=300)
  except subprocess.TimeoutExpired:
    code = None
  finally:
    rh.kill_group(proc)
  assert code == 2  # the command line's "bad input / failed" status
  with open(log) as f:
    text = f.read()
  assert "Traceback" not in text, text[-2000:]
  unfinished = sorted(
    set(os.listdir(os.path.join(raw, "cropped_aligned")))
    - set(cache.finished_trials(out))
  )
  assert re.search(r"worker .*(died|killed|terminated)", text), text[-2000:]
  assert any(t in text for t in unfinished), text[-2000:]
  assert "rerun" in text.lower(), text[-2000:]


def test_corrupt_manifest_is_named(raw, tmp_path):
  out = str(tmp_path / "cache")
  assert rh.run([rh.PYTHON, "-c", _call(raw, out, 1)]).returncode == 0
  path = os.path.join(out, cache.MANIFEST)
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[: len(text) // 2])
  result = rh.run(
    [
      rh.PYTHON,
      "-m",
      "affjax.data.preprocess",
      f"--raw={raw}",
      f"--out={out}",
      "--vggish_model=tiny",
    ]
  )
  assert result.returncode == 2
  assert path in result.stderr, result.stderr[-2000:]


def test_full_disk_names_the_trial(raw, tmp_path):
  mount = tmp_path / "small"
  mount.mkdir()
  out = mount / "cache"
  cmd = subprocess.list2cmdline(
    [
      rh.PYTHON,
      "-m",
      "affjax.data.preprocess",
      f"--raw={raw}",
      f"--out={out}",
      "--vggish_model=tiny",
    ]
  )
  script = (
    f"mount -t tmpfs -o size=2m tmpfs {mount} && {cmd}; code=$?; "
    f"ls -a {out}/trials; exit $code"
  )
  result = subprocess.run(
    [
      "unshare",
      "-m",
      "sh",
      "-c",
      script,
    ],
    cwd=rh.ROOT,
    env=rh.child_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  err = result.stderr
  assert "disk full" in err or "No space left" in err, err[-2000:]
  assert re.search(r"trial \S+", err), err[-2000:]
  assert ".tmp" not in result.stdout  # the half trial was removed

"""kill -9 during preprocessing: a rerun finishes, redoing only what was left.

Each case runs the preprocessing command line in a child, kills it with
SIGKILL at a chosen point (inside a trial's array writes, between a trial's
rename and the manifest update, just before the manifest replace) or at
random moments, and checks:

* right after the kill: every visible trial directory is complete and every
  trial the manifest lists is complete (nothing half-written or marked done);
* after rerunning the same command: every trial is cached, the trials that
  were finished before the kill were not rewritten (same inode and mtime),
  no temporary is left, and the cache is bit-identical to an uninterrupted
  build.
"""

import os
import random
import re
import signal
import subprocess

import pytest

from affjax.data.preprocess import cache
from affjax.data.preprocess.cache import PreprocessSettings
from tests import reliability_helpers as rh

SETTINGS = PreprocessSettings(vggish_model="tiny")
NUM_TRIALS = 6  # configs/test.py's: 5 videos (one with _left/_right)
ARRAY_FILES = len(cache.ARRAYS)  # np.save calls per trial


@pytest.fixture(scope="module")
def raw(test_data_root):
  """`configs/test.py`'s raw data (the session's, tests/conftest.py)."""
  return os.path.join(test_data_root, "raw")


@pytest.fixture(scope="module")
def reference(test_data_root):
  """An uninterrupted build of the same raw data with the same settings:
  the session's cache, built by `affjax.data.prepare` (vggish_model tiny)."""
  out = os.path.join(test_data_root, "cache")
  manifest = cache.read_json(os.path.join(out, cache.MANIFEST))
  assert len(manifest["trials"]) == NUM_TRIALS
  return out


def _cli_call(raw, out, workers=1):
  return rh.preprocess_call(raw, out, workers)


def _cli(raw, out, workers=1):
  return [rh.PYTHON, "-c", _cli_call(raw, out, workers)]


def _rerun_and_check(raw, out, reference, before):
  """Reruns to completion; checks only unfinished trials were built."""
  stamps = rh.tree_stamps(out)
  result = rh.run(_cli(raw, out))
  assert result.returncode == 0, result.stderr[-3000:]
  built = re.search(r"(\d+) trials cached, (\d+) to build", result.stderr)
  assert built, result.stderr[-3000:]
  assert int(built.group(1)) == len(before)
  assert int(built.group(2)) == NUM_TRIALS - len(before)
  after = rh.tree_stamps(out)
  for path, stamp in stamps.items():
    if path.split(os.sep)[0] in before:
      assert after[path] == stamp, f"{path} was rewritten"
  assert rh.temporaries(os.path.join(out, cache.TRIALS_DIR)) == []
  rh.assert_same_cache(out, reference)


@pytest.mark.parametrize(
  "where, patch, finished",
  [
    # The 3rd array file of the 2nd trial: a half-written temporary.
    (
      "inside a trial's writes",
      ("numpy", "save", ARRAY_FILES + 3, "before"),
      1,
    ),
    # The 3rd trial directory is in place; the manifest does not list it.
    ("after a trial's rename", ("os", "rename", 3, "after"), 3),
    # The manifest's temporary is written but not yet renamed over it.
    # Replaces: 1 = the initial manifest, then one per trial.
    ("before the manifest replace", ("os", "replace", 3, "before"), 2),
  ],
)
def test_kill_at_a_chosen_point_then_rerun(
  raw, reference, tmp_path, where, patch, finished
):
  out = str(tmp_path / "cache")
  proc = rh.run(rh.kill_on_call_driver([patch], _cli_call(raw, out)))
  assert proc.returncode == -9, (where, proc.stderr[-3000:])
  before = rh.assert_cache_consistent(out)
  assert len(before) == finished, (where, sorted(before))
  _rerun_and_check(raw, out, reference, before)


def test_kill_at_random_moments_then_rerun(raw, reference, tmp_path):
  """Process-group kills (2 workers) at random points, until a run finishes.

  Each kill comes a random 0-0.3 s after a random number of trials became
  visible, so the kills land in start-up, in trial builds and in writes.
  """
  out = str(tmp_path / "cache")
  rng = random.Random(7)
  log = str(tmp_path / "log.txt")
  kills, done_before = 0, {}
  for _ in range(5):
    target = rng.randint(min(len(done_before), NUM_TRIALS - 1), NUM_TRIALS - 1)
    proc = rh.start(_cli(raw, out, workers=2), log)
    rh.wait_until(
      lambda t=target: len(cache.finished_trials(out)) >= t, proc, timeout=300
    )
    try:
      proc.wait(timeout=rng.uniform(0.0, 0.3))
      break  # finished before the kill
    except subprocess.TimeoutExpired:
      rh.kill_group(proc)
    kills += 1
    print(f"kill {kills} after {target}: {sorted(rh.complete_trials(out))}")
    assert rh.group_gone(proc.pid, timeout=60)
    done = rh.assert_cache_consistent(out)
    assert set(done_before) <= set(done)  # finished trials stay finished
    done_before = done
  assert kills >= 1
  with open(log) as f:
    text = f.read()
  assert "Traceback" not in text, text[-3000:]
  if proc.returncode != 0:
    _rerun_and_check(raw, out, reference, rh.assert_cache_consistent(out))
  else:
    assert rh.temporaries(os.path.join(out, cache.TRIALS_DIR)) == []
    rh.assert_same_cache(out, reference)


def test_killed_worker_fails_the_run_then_rerun_completes(
  raw, reference, tmp_path
):
  """A worker killed by the OS: the run exits non-zero (no hang), resumable.

  The worker is killed as soon as it exists, while every trial is pending
  (a worker killed after the last job finished would go unnoticed).
  """
  out = str(tmp_path / "cache")
  proc = rh.start(_cli(raw, out, workers=2), str(tmp_path / "log.txt"))
  try:
    assert rh.wait_until(lambda: rh.pool_workers(proc.pid), proc, timeout=300)
    os.kill(rh.pool_workers(proc.pid)[0], signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
  finally:
    rh.kill_group(proc)
  _rerun_and_check(raw, out, reference, rh.assert_cache_consistent(out))

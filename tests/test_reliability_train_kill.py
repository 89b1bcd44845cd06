"""kill -9 during training: the same command resumes and ends bit-identical.

`python -m affjax.main --config=configs/test.py` (3 epochs, one checkpoint per
epoch) runs in a child process. The chain under test, in one workdir:

1. killed (SIGKILL to its process group) while checkpoint 2 is being written,
   a random 0-0.6 s after its temporary directory appears;
2. the same command, killed at a random moment;
3. the same command, run to the end.

Every restart must resume from the newest complete checkpoint (losing at most
the epoch in progress plus the one whose checkpoint was being written), and
the last run must end with exactly the summary and final parameters of an
uninterrupted run of the same config (CPU, one device: bit-identical).

The uninterrupted run builds the shared data (generation, preprocessing,
TFDS) and runs alongside the chain; a persistent compilation cache keeps the
restarts short.
"""

import ast
import glob
import os
import random
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import reliability_helpers as rh


def _env(tmp):
  return {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("shared"))
  return root, [
    f"--config.data.{k}_dir={os.path.join(root, k)}"
    for k in ("raw", "cache", "tfds")
  ]


def _argv(workdir, data_flags, *extra):
  return [
    rh.PYTHON,
    "-m",
    "affjax.main",
    "--config=configs/test.py",
    f"--workdir={workdir}",
    *data_flags,
    *extra,
  ]


def summary_of(log: str) -> dict:
  """The `Training done: {...}` summary logged by main."""
  found = re.findall(r"Training done: (\{.*\})", log)
  assert found, log[-3000:]
  return ast.literal_eval(found[-1])


def resumed_epoch(log: str) -> int | None:
  found = re.findall(r"Resumed \S+ at epoch (\d+)", log)
  return int(found[-1]) if found else None


def finished_epochs(log: str) -> int:
  """Epochs whose validation was logged (each is then checkpointed)."""
  done = [int(e) for e in re.findall(r"\] epoch (\d+) step \d+: train", log)]
  return max(done) + 1 if done else 0


def complete_checkpoints(workdir: str) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(n) for n in names if n.isdigit())


def final_state(workdir: str, step: int) -> dict:
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def test_kill_during_checkpoint_save_and_at_random_then_resume(
  shared, tmp_path
):
  root, data_flags = shared
  rng = random.Random(11)
  # The uninterrupted reference runs alongside the chain. The chain starts
  # once the reference has built the shared data: two data preparations at
  # once on one cache are not supported.
  full_dir = str(tmp_path / "uninterrupted")
  full_log = str(tmp_path / "uninterrupted.txt")
  reference = rh.start(_argv(full_dir, data_flags), full_log, **_env(root))

  def data_ready():  # tfds renames the finished dataset into place
    info = os.path.join(root, "tfds", "aff_wild2", "1.0.0", "dataset_info.json")
    return os.path.isfile(info)

  try:
    assert rh.wait_until(data_ready, reference, timeout=300, interval=0.5)
    kept, workdir = _kill_twice(root, data_flags, tmp_path, rng)
    final = rh.run(_argv(workdir, data_flags), timeout=600, **_env(root))
    assert reference.wait(timeout=600) == 0
  finally:
    rh.kill_group(reference)
  with open(full_log) as f:
    full = summary_of(f.read())

  # 3. Restarted, runs to the end.
  assert final.returncode == 0, final.stderr[-5000:]
  if kept:
    assert resumed_epoch(final.stderr) == kept[-1]
  assert summary_of(final.stderr) == full
  assert complete_checkpoints(workdir) == complete_checkpoints(full_dir)
  last = complete_checkpoints(full_dir)[-1]
  got, want = final_state(workdir, last), final_state(full_dir, last)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


def _kill_twice(root, data_flags, tmp_path, rng):
  """Steps 1 and 2; returns (complete checkpoints left, workdir)."""
  workdir = str(tmp_path / "run")
  argv = _argv(workdir, data_flags)
  log_path = str(tmp_path / "log.txt")
  ckpt_tmp = os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp*")

  def kill(proc, chosen):
    """Kills at `chosen` (a predicate or seconds); returns the run's log."""
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    if callable(chosen):
      assert rh.wait_until(chosen, proc, timeout=300, interval=0.002)
      rh.wait_until(lambda: False, proc, timeout=rng.uniform(0.0, 0.6))
    else:
      rh.wait_until(lambda: False, proc, timeout=chosen)
    finished = proc.poll() is not None
    rh.kill_group(proc)
    with open(log_path) as f:
      f.seek(start)
      return f.read(), finished

  # 1. Killed while writing checkpoint 2.
  proc = rh.start(argv, log_path, **_env(root))
  log, finished = kill(proc, lambda: glob.glob(ckpt_tmp))
  assert not finished, log[-3000:]
  kept = complete_checkpoints(workdir)
  assert kept and finished_epochs(log) - kept[-1] <= 1, (kept, log[-3000:])

  # 2. Restarted, killed at a random moment (start-up, an epoch, a save...).
  proc = rh.start(argv, log_path, **_env(root))
  delay = rng.uniform(1.0, 14.0)
  log, finished = kill(proc, delay)
  if finished:
    return [], workdir
  resumed = resumed_epoch(log)
  assert resumed is None or resumed == kept[-1], (resumed, kept)
  assert "Traceback" not in log, log[-3000:]
  done = max(finished_epochs(log), kept[-1])
  kept = complete_checkpoints(workdir)
  assert done - kept[-1] <= 1, (done, kept, delay)
  return kept, workdir

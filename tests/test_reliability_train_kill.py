"""kill -9 during training: the same command resumes and ends bit-identical.

`python -m affjax.main --config=configs/test.py` (3 epochs, one checkpoint per
epoch, 8 CPU devices) runs in a child process. The chain under test, in one
workdir, each kill triggered by an event of the run (never by how far it got
in some number of seconds):

1. killed (SIGKILL to its process group) while checkpoint 2 is being written:
   a random 0-0.6 s after its temporary directory appears, or at once when
   checkpoint 3 shows up first (so the run can never finish first);
2. the same command, SIGKILLed inside its first resumed epoch (by itself,
   right after its first logged training step);
3. the same command, run to the end.

Every restart must resume from the newest complete checkpoint (losing at most
the epoch in progress plus the one whose checkpoint was being written), and
the last run must end with exactly the summary and final parameters of the
session's uninterrupted in-process run of the same config on the same data
(tests/conftest.py; CPU, 8 devices: bit-identical, as
test_reliability_determinism.py checks for a child against this process).
A persistent compilation cache keeps the restarts short.
"""

import ast
import glob
import os
import random
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests import reliability_helpers as rh
from tests import shared_data


def _env(tmp):
  return {
    "JAX_NUM_CPU_DEVICES": "8",  # as the in-process reference run
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


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


def test_kill_during_checkpoint_save_and_in_an_epoch_then_resume(
  test_data_root, trained_run, tmp_path
):
  data_flags = shared_data.data_flags(test_data_root)
  full_dir, full = trained_run
  kept, workdir = _kill_twice(data_flags, tmp_path, random.Random(11))
  final = rh.run(_argv(workdir, data_flags), timeout=600, **_env(tmp_path))

  # 3. Restarted, runs to the end.
  assert final.returncode == 0, final.stderr[-5000:]
  assert resumed_epoch(final.stderr) == kept[-1], final.stderr[-3000:]
  assert summary_of(final.stderr) == full
  assert complete_checkpoints(workdir) == complete_checkpoints(full_dir)
  last = complete_checkpoints(full_dir)[-1]
  got, want = final_state(workdir, last), final_state(full_dir, last)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))


def _output_from(log_path: str, start: int) -> str:
  with open(log_path) as f:
    f.seek(start)
    return f.read()


def _kill_twice(data_flags, tmp_path, rng):
  """Steps 1 and 2; returns (complete checkpoints left, workdir)."""
  workdir = str(tmp_path / "run")
  argv = _argv(workdir, data_flags)
  log_path = str(tmp_path / "log.txt")
  ckpt = os.path.join(workdir, "checkpoints")

  # 1. Killed while writing checkpoint 2. Epoch 3 and checkpoint 3 come
  # after it, so a wait cut short when checkpoint 3 appears kills before the
  # end of the run on any machine.
  proc = rh.start(argv, log_path, **_env(tmp_path))
  try:
    saving = rh.wait_until(
      lambda: glob.glob(os.path.join(ckpt, "2.orbax-checkpoint-tmp*")),
      proc,
      timeout=600,
      interval=0.002,
    )
    rh.wait_until(
      lambda: glob.glob(os.path.join(ckpt, "3*")),
      proc,
      timeout=rng.uniform(0.0, 0.6),
      interval=0.002,
    )
    finished = proc.poll() is not None
  finally:
    rh.kill_group(proc)
  log = _output_from(log_path, 0)
  assert saving and not finished, log[-3000:]
  kept = complete_checkpoints(workdir)
  assert kept and kept[-1] <= 2, (kept, log[-3000:])
  assert finished_epochs(log) - kept[-1] <= 1, (kept, log[-3000:])

  # 2. Restarted, killed in the middle of the resumed epoch, before its
  # checkpoint: the run SIGKILLs itself right after its first logged step
  # (train.check_finite checks every log_every_steps-th step's metrics). A
  # run that ends instead fails the test.
  start = os.path.getsize(log_path)
  call = (
    "import sys; from absl import app; from affjax import main; "
    f"sys.argv = {argv[2:]!r}; "
    "app.run(main.main, flags_parser=main.parse_flags)"
  )
  driver = rh.kill_on_call_driver(
    [("affjax.train", "check_finite", 1, "after")], call
  )
  proc = rh.start(driver, log_path, **_env(tmp_path))
  try:
    code = proc.wait(timeout=600)
  finally:
    rh.kill_group(proc)
  log = _output_from(log_path, start)
  assert code == -9, (code, log[-3000:])
  assert resumed_epoch(log) == kept[-1], (kept, log[-3000:])
  assert "Traceback" not in log, log[-3000:]
  assert finished_epochs(log) == 0, log[-3000:]  # killed inside the epoch
  assert complete_checkpoints(workdir) == kept
  return kept, workdir

"""A full disk during training: clear error, earlier checkpoints intact,
resumable once space is freed.

The workdir is a tmpfs (in a private mount namespace: `unshare -m`, the tests
run as root) sized for one checkpoint and a half, so checkpoint 1 is written
and checkpoint 2 runs out of space. The training command must then fail,
naming the file system error and the checkpoint; after the file system grows
(`mount -o remount,size=...`), the same command resumes from checkpoint 1 and
finishes.
"""

import math
import os
import re
import subprocess

import jax
import numpy as np

from affjax import sharding, train
from configs import test as test_config
from tests import reliability_helpers as rh
from tests import shared_data


def _checkpoint_bytes(config) -> int:
  """Bytes of the train state (params, batch stats, Adam moments)."""
  mesh = sharding.make_mesh(config.mesh)
  state = train.build_program(config, mesh).setup.abstract_state
  return sum(
    int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state)
  )


def test_full_disk_then_resume(test_data_root, tmp_path):
  config = test_config.get_config()
  size_mib = math.ceil(1.5 * _checkpoint_bytes(config) / 2**20) + 2
  mount = tmp_path / "disk"
  mount.mkdir()
  workdir = mount / "work"
  data = shared_data.data_flags(test_data_root)  # the session's data
  cmd = subprocess.list2cmdline(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      f"--workdir={workdir}",
      *data,
    ]
  )
  out = tmp_path / "out"
  out.mkdir()
  script = f"""
    mount -t tmpfs -o size={size_mib}m tmpfs {mount} || exit 99
    {cmd} > {out}/log1.txt 2>&1; echo $? > {out}/rc1
    ls {workdir}/checkpoints > {out}/ls1
    mount -o remount,size={8 * size_mib}m {mount}
    {cmd} > {out}/log2.txt 2>&1; echo $? > {out}/rc2
    ls {workdir}/checkpoints > {out}/ls2
  """
  env = rh.child_env(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  done = subprocess.run(
    ["unshare", "-m", "sh", "-c", script],
    cwd=rh.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert done.returncode == 0, done.stderr

  def read(name):
    return (out / name).read_text()

  # The first run fails, naming the error and the checkpoint being written.
  assert read("rc1").strip() != "0"
  log1 = read("log1.txt")
  assert "No space left on device" in log1, log1[-5000:]
  assert os.path.join(str(workdir), "checkpoints", "2") in log1
  assert read("ls1").split()[0] == "1", read("ls1")  # 1 complete; 2 is not
  assert "2" not in read("ls1").split()

  # With space again, the same command resumes from checkpoint 1.
  log2 = read("log2.txt")
  assert read("rc2").strip() == "0", log2[-5000:]
  assert re.search(r"Resumed \S+ at epoch 1 ", log2), log2[-5000:]
  assert "'epochs': 3" in log2
  assert read("ls2").split() == ["3"]

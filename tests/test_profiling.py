"""Profiler trace of chosen steps and the persistent compilation cache."""

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from affjax import profiling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_profile_steps():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("10,12") == (10, 12)
  for bad in ("5", "3,3", "4,2", "a,b", "-1,2"):
    with pytest.raises(ValueError, match="profile_steps"):
      profiling.parse_profile_steps(bad)


def test_profile_hook_traces_only_between_its_steps(tmp_path):
  hook = profiling.ProfileSteps(2, 4, str(tmp_path))
  step = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  for done in range(1, 7):
    hook(done)
    if done == 1:
      assert not hook.active
    if done == 2:
      assert hook.active
    x = step(x)
  assert not hook.active
  traces = glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


_CACHE = """
import sys, jax, jax.numpy as jnp
from affjax import profiling
profiling.enable_compilation_cache(sys.argv[1])
print(float(jax.jit(lambda x: jnp.sin(x).sum())(jnp.arange(7.0))))
"""


def test_compilation_cache_dir_is_filled_and_reused(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  outputs = []
  for _ in range(2):
    proc = subprocess.run(
      [sys.executable, "-c", _CACHE, str(cache)],
      check=False,
      env=env,
      capture_output=True,
      text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs.append(proc.stdout.strip())
    entries = sorted(os.listdir(cache))
    assert entries, "no compiled program was cached"
    if len(outputs) == 1:
      first = entries
  # The second run found its program in the cache: no new entry.
  assert entries == first
  assert outputs[0] == outputs[1]

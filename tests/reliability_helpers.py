"""Shared pieces of the reliability tests (`tests/test_reliability_*.py`).

Subprocess runs of the command line tools (each in its own session so a
SIGKILL can take the whole process group, as a preempted machine or a killed
job does), fault injection into a child ("SIGKILL yourself on the n-th call of
a function"), and invariants of the feature cache that must hold after any
crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence

import numpy as np

from affjax.data.preprocess import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def child_env(**extra: str) -> dict[str, str]:
  """Environment of a child: CPU JAX, this checkout importable, quiet TF."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
  )
  # The test session's 8 fake devices are set in-process (conftest); a child
  # gets the default single CPU device unless a test asks otherwise.
  env.update(extra)
  return env


def start(argv: Sequence[str], log_path: str, **env: str) -> subprocess.Popen:
  """Starts `argv` in a new session (own process group), output to a file."""
  log = open(log_path, "ab")  # noqa: SIM115  (closed by the child's exit)
  try:
    return subprocess.Popen(
      list(argv),
      cwd=ROOT,
      env=child_env(**env),
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
  finally:
    log.close()


def run(
  argv: Sequence[str], timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
  """Runs `argv` to completion; returns it with text stdout/stderr."""
  return subprocess.run(
    list(argv),
    cwd=ROOT,
    env=child_env(**env),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def kill_group(proc: subprocess.Popen) -> None:
  """SIGKILLs the process group of `proc` (the child and its children)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait(timeout=30)


def group_members(pgid: int) -> list[int]:
  """Live (non-zombie) processes of process group `pgid`."""
  out = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    # After ")": state, ppid, pgrp, ...
    if int(fields[2]) == pgid and fields[0] != "Z":
      out.append(int(pid))
  return out


def pool_workers(pgid: int) -> list[int]:
  """multiprocessing spawn workers in process group `pgid`."""
  out = []
  for pid in group_members(pgid):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"spawn_main" in f.read():
          out.append(pid)
    except OSError:
      continue
  return out


def group_gone(pgid: int, timeout: float) -> bool:
  """Waits until process group `pgid` has no live member; False on timeout."""
  return wait_until(lambda: not group_members(pgid), timeout=timeout)


def wait_until(
  predicate: Callable[[], bool],
  proc: subprocess.Popen | None = None,
  timeout: float = 120,
  interval: float = 0.005,
) -> bool:
  """Polls `predicate` until true; False if `proc` exits or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return predicate()
    time.sleep(interval)
  return False


def kill_on_call_driver(
  patches: Sequence[tuple[str, str, int, str]], call: str
) -> list[str]:
  """argv of a child that SIGKILLs itself inside a chosen function call.

  Args:
    patches: `(module, attribute, n, when)` entries: the n-th call (1-based)
      of `module.attribute` kills the process, `when` = 'before' the real
      call or 'after' it returned.
    call: Python statement the child runs after patching, e.g.
      "from affjax.data.preprocess import __main__ as m; m.main([...])".
  """
  code = textwrap.dedent(
    f"""
    import importlib, os, signal
    def _patch(module, attribute, n, when):
      mod = importlib.import_module(module)
      real = getattr(mod, attribute)
      calls = [0]
      def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == n
        if hit and when == "before":
          os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if hit and when == "after":
          os.kill(os.getpid(), signal.SIGKILL)
        return out
      setattr(mod, attribute, wrapper)
    for p in {list(patches)!r}:
      _patch(*p)
    {call}
    """
  )
  return [PYTHON, "-c", code]


# ----------------------------------------------------------------------------
# Feature cache invariants.


def complete_trials(cache_dir: str) -> dict[str, dict]:
  """Checks every visible trial directory is complete; returns their metas.

  A visible (non-temporary) trial directory must hold every array and a
  meta.json, all loadable, with `n_frames` rows each.
  """
  metas = {}
  for name in cache.finished_trials(cache_dir):
    d = cache.trial_dir(cache_dir, name)
    files = sorted(os.listdir(d))
    expected = sorted([f"{a}.npy" for a in cache.ARRAYS] + [cache.META])
    assert files == expected, f"{d} is incomplete: {files}"
    meta = cache.read_json(os.path.join(d, cache.META))
    for a in cache.ARRAYS:
      arr = np.load(os.path.join(d, a + ".npy"))
      assert arr.shape[0] == meta["n_frames"], (d, a, arr.shape)
    metas[name] = meta
  return metas


def assert_cache_consistent(cache_dir: str) -> dict[str, dict]:
  """Invariants after any crash: no half trial visible or marked done.

  Returns:
    name -> meta of the complete trials.
  """
  metas = complete_trials(cache_dir)
  path = os.path.join(cache_dir, cache.MANIFEST)
  if os.path.exists(path):
    manifest = cache.read_json(path)  # parses: never half-written
    listed = set(manifest["trials"])
    assert listed <= set(metas), (
      f"manifest lists unfinished trials {sorted(listed - set(metas))}"
    )
  return metas


def tree_stamps(cache_dir: str) -> dict[str, tuple[int, int]]:
  """(inode, mtime_ns) of every file under trials/: proves no rewrite."""
  out = {}
  root = os.path.join(cache_dir, cache.TRIALS_DIR)
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_ino, st.st_mtime_ns)
  return out


def temporaries(cache_dir: str) -> list[str]:
  """Leftover temporary files or directories anywhere in the cache."""
  out = []
  for dirpath, dirs, files in os.walk(cache_dir):
    out += [
      os.path.join(dirpath, n) for n in dirs + files if n.startswith(".tmp")
    ]
  return sorted(out)


def assert_same_cache(got: str, want: str) -> None:
  """Same trials, bit-identical arrays and equal manifest entries."""
  g, w = (cache.read_json(os.path.join(d, cache.MANIFEST)) for d in (got, want))
  assert g["trials"] == w["trials"]
  assert g["settings"] == w["settings"]
  assert cache.finished_trials(got) == cache.finished_trials(want)
  for name in cache.finished_trials(want):
    a, b = cache.read_trial(got, name), cache.read_trial(want, name)
    for key in cache.ARRAYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}/{key}")
    assert json.dumps(a["meta"], sort_keys=True) == json.dumps(
      b["meta"], sort_keys=True
    )


def preprocess_call(raw: str, out: str, workers: int = 1) -> str:
  """`python -c` code running the preprocessing command line on `raw`.

  The child exits with the command line's status (`main()` returns it).
  """
  args = [
    f"--raw={raw}",
    f"--out={out}",
    "--vggish_model=tiny",
    f"--workers={workers}",
  ]
  return (
    "import sys; from affjax.data.preprocess import __main__ as m; "
    f"sys.exit(m.main({args!r}))"
  )

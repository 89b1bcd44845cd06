"""Determinism: same config and seed, same numbers; another seed, another
data order.

* Two independent training runs of `configs/test.py` on CPU with 8 devices,
  one in this process and one a separate `python -m affjax.main` process
  (each compiles on its own), end with identical summaries and bit-identical
  final parameters.
* The training batches of an epoch are a function of (seed, epoch): equal
  for equal arguments (order, crops and flips), different for another seed
  or another epoch.
"""

import ast
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from affjax.data import pipeline
from affjax.data import prepare as prepare_lib
from tests import reliability_helpers as rh
from tests import shared_data


@pytest.fixture(scope="module")
def prepared(test_data_root):
  """(data config, data paths) of `configs/test.py`: the session's data."""
  config = shared_data.test_config(test_data_root)
  paths = prepare_lib.DataPaths(
    *(os.path.join(test_data_root, k) for k in shared_data.KINDS)
  )
  return config, paths


def _final_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  state = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, state["params"])


def test_two_runs_same_seed_identical(prepared, tmp_path, request):
  config, _ = prepared
  child_dir = str(tmp_path / "child")
  child = rh.start(
    [
      rh.PYTHON,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      f"--workdir={child_dir}",
      *(
        f"--config.data.{k}_dir={config.data[k + '_dir']}"
        for k in ("raw", "cache", "tfds")
      ),
    ],
    str(tmp_path / "child.txt"),
    JAX_NUM_CPU_DEVICES="8",
  )
  try:
    # The session's in-process run of the same config (tests/conftest.py),
    # trained now, while the child runs, unless an earlier test needed it.
    here_dir, here = request.getfixturevalue("trained_run")
    assert child.wait(timeout=600) == 0
  finally:
    rh.kill_group(child)
  with open(tmp_path / "child.txt") as f:
    log = f.read()
  assert "8 global devices" in log, log[-3000:]
  found = re.findall(r"Training done: (\{.*\})", log)
  assert found, log[-3000:]
  assert ast.literal_eval(found[-1]) == here
  last = here["epochs"]
  a, b = _final_params(here_dir, last), _final_params(child_dir, last)
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
  ):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _epoch(prepared, seed, epoch):
  config, paths = prepared
  return list(
    pipeline.train_batches(
      config.data, paths, "train", batch_size=4, epoch=epoch, seed=seed
    )
  )


def _order(batches):
  return [
    (int(t), int(f))
    for b in batches
    for t, f in zip(b["trial"], b["frame_index"][:, 0], strict=True)
  ]


def test_batches_depend_only_on_seed_and_epoch(prepared):
  first, again = _epoch(prepared, 0, 0), _epoch(prepared, 0, 0)
  assert len(first) == len(again) > 1
  for a, b in zip(first, again, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  other_seed, other_epoch = _epoch(prepared, 1, 0), _epoch(prepared, 0, 1)
  for other in (other_seed, other_epoch):
    assert len(other) == len(first)
    assert _order(other) != _order(first)

"""Tests for affjax.checkpoints: latest + best retention, restore, config check."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from affjax import checkpoints, sharding


def _config(**overrides):
  c = ml_collections.ConfigDict(
    {
      "seed": 0,
      "data": {"fold": 0, "emotions": ("valence", "arousal"), "cache_dir": ""},
      "train": {"max_epochs": 3},
    }
  )
  c.update_from_flattened_dict(overrides)
  return c


def _state(value, mesh):
  repl = sharding.replicated(mesh)
  return {
    "params": {"w": jax.device_put(jnp.full((4, 2), value), repl)},
    "step": jax.device_put(jnp.asarray(int(value), jnp.int32), repl),
  }


def test_keeps_latest_and_best_and_restores_onto_shardings(tmp_path):
  mesh = sharding.make_mesh([("data", -1)])
  workdir = str(tmp_path)
  manager = checkpoints.create_manager(workdir)
  cccs = {1: 0.2, 2: 0.6, 3: 0.4, 4: 0.5, 5: 0.1}
  for step, ccc in cccs.items():
    checkpoints.save(
      manager,
      step,
      _state(step, mesh),
      _config(),
      {"epoch": step, "stats": {"mfcc": np.arange(3.0)}},
      ccc,
    )
  manager.wait_until_finished()
  # Latest (5) and best (2, ccc 0.6) survive; the rest are deleted.
  assert sorted(manager.all_steps()) == [2, 5]
  assert manager.latest_step() == 5 and manager.best_step() == 2
  manager.close()

  reader = checkpoints.create_manager(workdir, read_only=True)
  assert reader.best_step() == 2
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    _state(0, mesh),
  )
  out = checkpoints.restore(reader, reader.best_step(), abstract)
  np.testing.assert_array_equal(out.state["params"]["w"], np.full((4, 2), 2.0))
  assert out.state["params"]["w"].sharding == sharding.replicated(mesh)
  assert int(out.state["step"]) == 2
  assert out.metadata == {"epoch": 2, "stats": {"mfcc": [0.0, 1.0, 2.0]}}
  assert out.config["data"]["emotions"] == ["valence", "arousal"]
  meta_only = checkpoints.restore(reader, 5)
  assert meta_only.state is None and meta_only.metadata["epoch"] == 5
  with pytest.raises(FileNotFoundError, match="step 3 not in"):
    checkpoints.restore(reader, 3)


def test_read_only_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    checkpoints.create_manager(str(tmp_path / "nothing"), read_only=True)


def test_config_mismatch_names_keys(tmp_path):
  saved = checkpoints.config_to_json(_config())
  checkpoints.check_config(saved, _config(), "dir")
  checkpoints.check_config(
    saved,
    _config(**{"data.cache_dir": "/x"}),
    "dir",
    ignore=("data.cache_dir",),
  )
  current = _config(**{"data.fold": 3, "train.max_epochs": 9})
  assert checkpoints.config_differences(saved, current) == [
    "data.fold",
    "train.max_epochs",
  ]
  with pytest.raises(
    ValueError,
    match=r"2 keys differ\): data.fold: checkpoint 0,"
    r" given 3; train.max_epochs: checkpoint 3, given 9",
  ):
    checkpoints.check_config(saved, current, str(tmp_path))
  current = _config()
  current.data.emotions = ("valence",)
  with pytest.raises(ValueError, match="data.emotions: checkpoint"):
    checkpoints.check_config(saved, current, "dir")


def test_metadata_must_be_json(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path))
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  with pytest.raises(TypeError, match="not JSON-serialisable"):
    checkpoints.save(
      manager, 1, _state(1, mesh), _config(), {"bad": object()}, 0.1
    )
  manager.close()


_SAVE_ON_4_DEVICES = """
import sys, jax, numpy as np, ml_collections
jax.config.update("jax_num_cpu_devices", 4)
from affjax import checkpoints, sharding
repl = sharding.replicated(sharding.make_mesh([("data", -1)]))
put = lambda x: jax.device_put(x, repl)
state = {"params": {"w": put(np.arange(6, dtype=np.float32).reshape(2, 3))},
         "step": put(np.int32(3))}
manager = checkpoints.create_manager(sys.argv[1])
checkpoints.save(manager, 1, state, ml_collections.ConfigDict({"a": 1}), {}, 0.5)
manager.wait_until_finished()
"""


def test_restore_params_of_a_checkpoint_saved_on_other_devices(tmp_path):
  """Saved by a process with 4 devices, read here (8): no topology error."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
  env.pop("XLA_FLAGS", None)
  subprocess.run(
    [sys.executable, "-c", _SAVE_ON_4_DEVICES, str(tmp_path)],
    env=env,
    check=True,
    timeout=120,
  )
  manager = checkpoints.create_manager(str(tmp_path), read_only=True)
  params = checkpoints.restore_params(manager, 1)
  np.testing.assert_array_equal(
    params["w"], np.arange(6, dtype=np.float32).reshape(2, 3)
  )

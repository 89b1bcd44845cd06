"""Cached-embedding head -> end-to-end run (`config.model.head_checkpoint`)."""

import jax
import numpy as np
import pytest

from affjax import checkpoints, sharding
from affjax import train_state as ts
from configs import common, test


def _config(visual_input: str, name: str = "av_leader_follower"):
  config = test.get_config("visual_only" if name == "visual_only" else None)
  config.unlock()
  config.model.input = visual_input
  if name != "visual_only":
    common.set_audio(config, ("vggish", "mfcc"))
  if visual_input == "embeddings":  # no backbone to freeze or release
    config.optim.frozen = ""
    config.optim.release_groups = ""
  return config.lock()


def _saved_run(tmp_path, config, seed: int) -> tuple[str, ts.TrainState]:
  """A workdir whose one checkpoint holds a fresh state of `config`."""
  mesh = sharding.make_mesh(config.mesh)
  state = ts.init_state(ts.build_setup(config, mesh), jax.random.key(seed))
  workdir = str(tmp_path / f"run_{seed}")
  manager = checkpoints.create_manager(workdir)
  checkpoints.save(manager, 1, state, config, {}, 0.5)
  manager.wait_until_finished()
  manager.close()
  return workdir, state


def _batch(config, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  t, c = config.data.window_length, config.data.crop_size
  return {
    "frames": rng.uniform(-1, 1, (2, t, c, c, 3)).astype(np.float32),
    "vggish": rng.normal(size=(2, t, 128)).astype(np.float32),
    "mfcc": rng.normal(size=(2, t, 39)).astype(np.float32),
  }


def test_end_to_end_run_starts_from_the_cached_embedding_head(tmp_path):
  head_config = _config("embeddings")
  head_dir, head_state = _saved_run(tmp_path, head_config, seed=1)
  e2e_config = _config("frames")
  mesh = sharding.make_mesh(e2e_config.mesh)
  setup = ts.build_setup(e2e_config, mesh)
  fresh = ts.init_state(setup, jax.random.key(2))
  state = ts.load_head_checkpoint(fresh, head_dir)

  assert set(state.params) == set(head_state.params) | {"backbone"}
  for key, value in head_state.params.items():
    jax.tree.map(np.testing.assert_array_equal, state.params[key], value)
    # A different seed really gave different weights before loading.
    assert not all(
      np.array_equal(a, b)
      for a, b in zip(
        jax.tree.leaves(fresh.params[key]), jax.tree.leaves(value)
      )
    )
  jax.tree.map(
    np.testing.assert_array_equal,
    state.params["backbone"],
    fresh.params["backbone"],
  )

  # The end-to-end model now equals the head run applied to the backbone's
  # embeddings of the same frames (eval mode).
  batch = _batch(e2e_config, 3)
  e2e = setup.model.apply(state.variables(), batch, train=False)
  b, t = batch["frames"].shape[:2]
  backbone_vars = {
    "params": state.params["backbone"],
    "batch_stats": state.batch_stats["backbone"],
  }
  embeddings = setup.model.backbone.apply(
    backbone_vars,
    batch["frames"].reshape(b * t, *batch["frames"].shape[2:]),
    train=False,
  ).reshape(b, t, -1)
  head_model = ts.build_setup(head_config, mesh).model
  head = head_model.apply(
    head_state.variables(),
    {
      "embeddings": embeddings,
      "vggish": batch["vggish"],
      "mfcc": batch["mfcc"],
    },
    train=False,
  )
  np.testing.assert_allclose(np.asarray(e2e), np.asarray(head), atol=1e-5)


def test_a_different_head_is_rejected_naming_the_parameters(tmp_path):
  head_dir, _ = _saved_run(
    tmp_path, _config("embeddings", "visual_only"), seed=1
  )
  config = _config("frames")
  setup = ts.build_setup(config, sharding.make_mesh(config.mesh))
  state = ts.init_state(setup, jax.random.key(2))
  with pytest.raises(ValueError, match="head_checkpoint") as info:
    ts.load_head_checkpoint(state, head_dir)
  message = str(info.value)
  assert "regressor" in message and "fusion" in message, message
  assert "missing" in message, message


def test_a_workdir_without_checkpoints_is_named(tmp_path):
  config = _config("frames")
  setup = ts.build_setup(config, sharding.make_mesh(config.mesh))
  state = ts.init_state(setup, jax.random.key(0))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ts.load_head_checkpoint(state, str(tmp_path / "nothing"))

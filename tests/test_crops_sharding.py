"""A `crops` mesh axis: the backbone's crops split over all devices.

With `[("data", 4), ("crops", 2)]` on 8 devices a batch of 4 windows is fed
to 4 shards while the 4 x 16 crops of a step are split 8 ways inside the
backbone: the same layout that lets the paper's batch of 8 use 16 chips.
"""

import jax
import numpy as np

from affjax import optim, sharding, train
from affjax import train_state as ts
from configs import test as test_config

BATCH = 4


def _config():
  config = test_config.get_config()
  with config.unlocked():
    config.optim.frozen = ""
    config.optim.release_groups = ""
    config.model.backbone.dropout = 0.0
  return config


def _batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    specs = ts.batch_specs(config, BATCH, train=True)
    batch = {
      k: rng.uniform(-1, 1, s.shape).astype(np.float32)
      for k, s in specs.items()
      if k != "mask"
    }
    batch["mask"] = rng.random(specs["mask"].shape) > 0.1
    out.append(batch)
  return out


def _train(mesh, config, batches):
  setup = ts.build_setup(config, mesh)
  init_key, loop_key = train.root_keys(config.seed)
  state = ts.init_state(setup, init_key)
  state = ts.set_learning_rates(state, setup, optim.init_plateau(setup.plateau))
  step = train.jit_train_step(setup, mesh, loop_key, released=0)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics.compute()["loss"]))
  text = step.lower(setup.abstract_state, sharding.global_batch(batch, mesh))
  return state, losses, text.compile().as_text()


def test_crops_axis_matches_one_device():
  config = _config()
  batches = _batches(config, 3)
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  split = sharding.make_mesh([("data", 4), ("crops", 2)])
  assert sharding.num_batch_shards(split) == 4
  s1, l1, _ = _train(one, config, batches)
  s8, l8, hlo = _train(split, config, batches)
  # Each device convolves 64 / 8 = 8 crops of 40x40 (the batch alone
  # would give it 16).
  assert "f32[8,40,40,3]" in hlo
  assert "f32[16,40,40,3]" not in hlo
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  # Only reduction order differs. Adam divides by sqrt(v): a weight whose
  # true gradient is zero (a bias just before BatchNorm) moves by about +-lr
  # per step with the sign of float32 round-off, so a few weights differ by
  # up to 2 lr-steps. A wrong split of the crops (other BatchNorm statistics,
  # lost gradients) changes most weights, so the check is on how many differ.
  init = ts.init_state(ts.build_setup(config, one), train.root_keys(0)[0])
  flat = {
    name: np.concatenate(
      [
        np.ravel(np.asarray(x, np.float64))
        for x in jax.tree.leaves(ts.weights(s))
      ]
    )
    for name, s in (("init", init), ("one", s1), ("split", s8))
  }
  differ = np.abs(flat["one"] - flat["split"]) > 1e-5
  assert differ.mean() < 0.01, differ.mean()
  # Training moved most weights: the comparison is not vacuous.
  assert (np.abs(flat["one"] - flat["init"]) > 1e-4).mean() > 0.5


def test_batch_is_split_over_all_axes_but_crops():
  mesh = sharding.make_mesh([("data", 4), ("crops", 2)])
  assert sharding.batch_axes(mesh) == ("data",)
  assert sharding.data_sharding(mesh).spec == jax.sharding.PartitionSpec(
    ("data",)
  )
  sharding.check_batch_size(4, mesh, "batch")
  np.testing.assert_array_equal(sharding.process_rows(4, mesh), np.arange(4))

"""Tests for affjax.optim: groups, Adam + L2, frozen params, plateau schedule."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from affjax import optim


def _params():
  rng = np.random.default_rng(0)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "backbone": {
      "stem": {"kernel": arr(3, 4)},
      "output": {"kernel": arr(4, 2), "bias": arr(2)},
      "body_3": {"kernel": arr(2, 2)},
    },
    "head": {"kernel": arr(2, 1)},
  }


def _optim_config(**overrides):
  c = ml_collections.ConfigDict(
    {"weight_decay": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
  )
  c.update(overrides)
  return c


GROUPS = [["^backbone/output/"], ["^backbone/body_3/"]]


def test_param_labels():
  labels = optim.param_labels(_params(), "^backbone/", GROUPS)
  assert labels == {
    "backbone": {
      "stem": {"kernel": "frozen"},
      "output": {"kernel": "release_0", "bias": "release_0"},
      "body_3": {"kernel": "release_1"},
    },
    "head": {"kernel": "head"},
  }
  # Nothing frozen: everything is head, release groups are then unmatched.
  assert set(jax.tree.leaves(optim.param_labels(_params(), "", []))) == {"head"}


def test_param_labels_unmatched_group_names_it():
  with pytest.raises(ValueError, match=r"release group 1 .*backbone/nope"):
    optim.param_labels(
      _params(), "^backbone/", [["^backbone/output/"], ["^backbone/nope"]]
    )


def _loss(params, x):
  h = jnp.tanh(x @ params["backbone"]["stem"]["kernel"])
  h = (
    h @ params["backbone"]["output"]["kernel"]
    + params["backbone"]["output"]["bias"]
  )
  h = jnp.tanh(h @ params["backbone"]["body_3"]["kernel"])
  return jnp.mean((h @ params["head"]["kernel"] - 1.0) ** 2)


def test_frozen_bit_identical_release_without_retrace():
  params = _params()
  labels = optim.param_labels(params, "^backbone/", GROUPS)
  tx = optim.make_optimizer(_optim_config(), labels, num_groups=2)
  opt_state = tx.init(params)
  cfg = optim.PlateauConfig(learning_rate=1e-2, num_groups=2)
  plateau = optim.init_plateau(cfg)
  opt_state = optim.set_learning_rates(
    opt_state, optim.learning_rates(cfg, plateau)
  )
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, opt_state):
    grads = jax.grad(_loss)(params, x)
    updates, opt_state = tx.update(grads, opt_state, params)
    import optax  # pylint: disable=g-import-not-at-top

    return optax.apply_updates(params, updates), opt_state

  p = params
  for _ in range(3):
    p, opt_state = step(p, opt_state)
  # Head trained, every backbone parameter bit-identical.
  assert not np.allclose(p["head"]["kernel"], params["head"]["kernel"])
  chex.assert_trees_all_equal(p["backbone"], params["backbone"])
  # Release group 0 by writing its lr: same trace, group 0 moves, others not.
  plateau, start = optim.begin_epoch(cfg, plateau)
  assert start.release and plateau.released == 1
  opt_state = optim.set_learning_rates(
    opt_state, optim.learning_rates(cfg, plateau)
  )
  assert optim.learning_rates_of(opt_state) == pytest.approx(
    {"head": 1e-2, "release_0": 1e-2, "release_1": 0.0, "frozen": 0.0}
  )
  p2, opt_state = step(p, opt_state)
  assert not np.allclose(
    p2["backbone"]["output"]["kernel"], p["backbone"]["output"]["kernel"]
  )
  chex.assert_trees_all_equal(p2["backbone"]["body_3"], p["backbone"]["body_3"])
  chex.assert_trees_all_equal(p2["backbone"]["stem"], p["backbone"]["stem"])


def test_adam_l2_matches_torch_adam_weight_decay():
  w0 = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
  x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
  wt = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  topt = torch.optim.Adam([wt], lr=1e-2, weight_decay=1e-1)
  for _ in range(4):
    topt.zero_grad()
    loss = ((torch.from_numpy(x) @ wt).tanh() ** 2).mean()
    loss.backward()
    topt.step()

  params = {"w": jnp.asarray(w0)}
  labels = optim.param_labels(params, "", [])
  tx = optim.make_optimizer(_optim_config(weight_decay=1e-1), labels, 0)
  state = optim.set_learning_rates(tx.init(params), {"head": 1e-2})
  for _ in range(4):
    grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_allclose(
    params["w"], wt.detach().numpy(), rtol=1e-5, atol=1e-6
  )


def test_scheduler_matches_torch_reduce_on_plateau():
  # No release groups: the lr trajectory is torch's ReduceLROnPlateau.
  cccs = [
    0.1,
    0.2,
    0.2,
    0.19,
    0.2,
    0.2,
    0.2,
    0.2,
    0.3,
    0.3,
    0.3,
    0.3,
    0.3,
    0.3,
    0.3,
    0.3,
    0.30001,
    0.3,
    0.1,
    0.1,
  ]
  cfg = optim.PlateauConfig(
    learning_rate=1e-3,
    patience=2,
    factor=0.5,
    min_learning_rate=0.0,
    early_stopping=0,
    num_groups=0,
    milestones=(),
  )
  w = torch.nn.Parameter(torch.zeros(1))
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
    torch.optim.Adam([w], lr=1e-3), mode="max", patience=2, factor=0.5
  )
  state = optim.init_plateau(cfg)
  for ccc in cccs:
    state, start = optim.begin_epoch(cfg, state)
    assert not start.stop
    state, _ = optim.end_epoch(cfg, state, ccc)
    sched.step(ccc)
    assert state.learning_rate == pytest.approx(
      sched.optimizer.param_groups[0]["lr"], rel=1e-12
    )
  assert state.learning_rate < 1e-3


def test_release_and_stop_sequence():
  # Reference settings: lr 1e-5, factor 0.1, patience 5, min lr 1e-6,
  # milestone 0, 2 release groups. 1e-5 * 0.1 is 1.0000000000000002e-06 (not
  # below 1e-6), so each release needs two reductions: 2 x 6 flat epochs.
  cfg = optim.PlateauConfig(
    learning_rate=1e-5,
    factor=0.1,
    patience=5,
    min_learning_rate=1e-6,
    early_stopping=100,
    num_groups=2,
    release_count=3,
    max_epochs=100,
  )
  state = optim.init_plateau(cfg)
  events = []
  for epoch in range(100):
    state, start = optim.begin_epoch(cfg, state)
    if start.stop:
      events.append(("stop", epoch, state.stop_reason))
      break
    if start.release:
      events.append(("release", epoch, state.released))
    ccc = 0.5 if epoch == 0 else 0.4  # best at epoch 0, flat afterwards
    state, improved = optim.end_epoch(cfg, state, ccc)
    assert improved == (epoch == 0)
  # Epoch 0: milestone release. Epochs 1..12 bad: lr 1e-6 after epoch 6 (6th
  # bad epoch > patience 5), 1e-7 after epoch 12 -> release at epoch 13, and
  # the scheduler restarts (epoch 13 sets its best) -> bad epochs 14..25.
  assert events == [
    ("release", 0, 1),
    ("release", 13, 2),
    ("stop", 26, "nothing_left_to_release"),
  ]
  assert state.best_epoch == 0 and state.best_ccc == 0.5


def test_early_stopping_and_max_epochs():
  cfg = optim.PlateauConfig(
    learning_rate=1.0,
    patience=1000,
    early_stopping=3,
    min_num_epochs=0,
    num_groups=0,
    max_epochs=50,
  )
  state = optim.init_plateau(cfg)
  ran = []
  while True:
    state, start = optim.begin_epoch(cfg, state)
    if start.stop:
      break
    ran.append(state.epoch)
    ccc = 0.1 * (state.epoch + 1) if state.epoch <= 2 else 0.0
    state, _ = optim.end_epoch(cfg, state, ccc)
  # Improvements at epochs 0, 1, 2 (epoch 0 is not counted: epoch > 0 rule);
  # then epochs 3, 4, 5 without improvement exhaust the counter of 3.
  assert ran == [0, 1, 2, 3, 4, 5]
  assert state.stop_reason == "early_stopping"
  cfg = dataclasses.replace(cfg, early_stopping=0, max_epochs=4)
  state = optim.init_plateau(cfg)
  for _ in range(4):
    state, start = optim.begin_epoch(cfg, state)
    assert not start.stop
    state, _ = optim.end_epoch(cfg, state, 0.0)
  state, start = optim.begin_epoch(cfg, state)
  assert start.stop and state.stop_reason == "max_epochs"


def test_plateau_state_json_round_trip():
  cfg = optim.PlateauConfig(num_groups=3)
  state, _ = optim.begin_epoch(cfg, optim.init_plateau(cfg))
  state, _ = optim.end_epoch(cfg, state, 0.25)
  again = optim.PlateauState.from_dict(json.loads(json.dumps(state.to_dict())))
  assert again == state
  assert optim.learning_rates(cfg, state) == {
    "head": 1e-5,
    "frozen": 0.0,
    "release_0": 1e-5,
    "release_1": 0.0,
    "release_2": 0.0,
  }


def test_frozen_group_keeps_no_adam_moments():
  # The stem is in no release group: `frozen` for the whole run, so
  # `optax.set_to_zero()` holds no state for it. Release groups (not yet
  # released) and the head hold Adam moments mu and nu shaped like their
  # parameters.
  params = _params()
  labels = optim.param_labels(params, "^backbone/", GROUPS)
  tx = optim.make_optimizer(_optim_config(), labels, num_groups=2)
  opt_state = tx.init(params)
  by_group = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    group = optim.state_group(path)
    by_group[group] = by_group.get(group, 0) + np.size(leaf)
  # Per group: mu and nu (2 x its parameter count), the injected
  # hyperparameters (lr, weight decay, b1, b2, eps) and two step counts.
  # No entry at all for `frozen` (its 3x4 stem kernel).
  sizes = {"head": 2 * 1, "release_0": 4 * 2 + 2, "release_1": 2 * 2}
  assert by_group == {name: 2 * n + 5 + 2 for name, n in sizes.items()}
  # Updates of the frozen group are exactly zero.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, opt_state, params)
  assert not np.any(updates["backbone"]["stem"]["kernel"])


def test_set_learning_rates_rejects_training_the_frozen_group():
  params = _params()
  labels = optim.param_labels(params, "^backbone/", GROUPS)
  tx = optim.make_optimizer(_optim_config(), labels, num_groups=2)
  state = optim.set_learning_rates(tx.init(params), {"frozen": 0.0})
  with pytest.raises(ValueError, match="never trained"):
    optim.set_learning_rates(state, {"frozen": 1e-3})
  with pytest.raises(ValueError, match="unknown parameter group 'nope'"):
    optim.set_learning_rates(state, {"nope": 1e-3})

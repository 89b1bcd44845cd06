"""Train/eval steps with a tiny fake model on the 8 fake CPU devices.

No data pipeline: synthetic numpy batches in the contract's layout. Covers the
sharded-vs-single-device equivalence, frozen parameters, learning-rate
changes and optimiser resets without recompilation, bounded dispatch and the
NaN check.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import optim, sharding, train, train_state
from configs import common

T = 12


class FakeModel(nn.Module):
  """embeddings [B,T,512] -> 'backbone' Dense+BN -> dropout -> 'head'."""

  num_outputs: int = 2

  @nn.compact
  def __call__(self, batch, *, train: bool):
    x = batch["embeddings"]
    # No bias before BatchNorm: its gradient is ~0 and Adam would amplify
    # the float noise into different updates on 1 and 8 devices.
    h = nn.Dense(8, use_bias=False, name="backbone")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
    h = nn.Dropout(0.3, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(self.num_outputs, name="head")(h)


def _config(frozen=""):
  c = common.base_config()
  c.model.input = "embeddings"
  common.set_audio(c, ())
  c.data.window_length = T
  c.optim.frozen = frozen
  c.optim.release_groups = ""
  c.optim.learning_rate = 1e-3
  return c


def _batches(n, batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = rng.normal(size=(batch_size, T, 512)).astype(np.float32)
    label = np.tanh(x[..., :2] + 0.1 * rng.normal(size=(batch_size, T, 2)))
    mask = rng.random((batch_size, T)) > 0.2
    out.append(
      {"embeddings": x, "label": label.astype(np.float32), "mask": mask}
    )
  return out


def _train(mesh, config, batches, state=None):
  setup = train_state.build_setup(config, mesh, model=FakeModel())
  init_key, loop_key = jax.random.split(jax.random.key(0))
  if state is None:
    state = train_state.init_state(setup, init_key)
  plateau = optim.init_plateau(setup.plateau)
  state = train_state.set_learning_rates(state, setup, plateau)
  step = train.jit_train_step(setup, mesh, loop_key)
  state, metrics = train.train_epoch(
    state,
    step,
    sharding.prefetch_to_device(batches, mesh),
    max_in_flight=4,
    log_every_steps=3,
  )
  return setup, state, metrics


def test_eight_devices_match_one_device():
  config = _config()
  batches = _batches(6)
  one = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  eight = sharding.make_mesh([("data", -1)])
  assert eight.size == 8
  _, s1, m1 = _train(one, config, batches)
  _, s8, m8 = _train(eight, config, batches)
  assert int(s1.step) == int(s8.step) == 6
  # Dropout masks come from the same fold_in(loop_key, step) keys and
  # BatchNorm statistics are global: only reduction order differs. Adam
  # divides by sqrt(v), so a weight with a near-zero gradient turns float32
  # round-off into up to ~1% of one lr-sized step: atol 1e-5 at lr 1e-3
  # (the updates themselves are up to 6e-3 over 6 steps).
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(train_state.weights(s1)),
    jax.tree.leaves(train_state.weights(s8)),
  ):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5
    )
  # Parameters moved (lr 1e-2 for 6 steps), so the comparison is not vacuous.
  init = train_state.init_state(
    train_state.build_setup(config, one, FakeModel()),
    jax.random.split(jax.random.key(0))[0],
  )
  assert not np.allclose(
    init.params["head"]["kernel"], s1.params["head"]["kernel"]
  )


def test_frozen_group_bit_identical_and_release_without_retrace():
  config = _config(frozen="^backbone/")
  mesh = sharding.make_mesh([("data", -1)])
  setup = train_state.build_setup(config, mesh, model=FakeModel())
  assert set(jax.tree.leaves(setup.labels)) == {"head", "frozen"}
  state = train_state.init_state(setup, jax.random.key(1))
  before = jax.tree.map(np.asarray, state.params)
  step = train.jit_train_step(setup, mesh, jax.random.key(2))
  plateau = optim.init_plateau(setup.plateau)
  state = train_state.set_learning_rates(state, setup, plateau)
  batches = list(sharding.prefetch_to_device(_batches(4), mesh))
  for b in batches[:2]:
    state, _ = step(state, b)
  np.testing.assert_array_equal(
    state.params["backbone"]["kernel"], before["backbone"]["kernel"]
  )
  assert not np.allclose(
    state.params["head"]["kernel"], before["head"]["kernel"]
  )
  # New lr values and a fresh optimiser state: still one trace (the step is
  # wrapped in train.trace_once, which would raise).
  state = train_state.reset_optimizer(state, setup)
  state = state.replace(
    opt_state=optim.set_learning_rates(
      state.opt_state, {"head": 1e-3, "frozen": 0.0}
    )
  )
  for b in batches[2:]:
    state, _ = step(state, b)
  np.testing.assert_array_equal(
    state.params["backbone"]["kernel"], before["backbone"]["kernel"]
  )
  assert optim.learning_rates_of(state.opt_state)["head"] == pytest.approx(1e-3)


def test_reset_optimizer_zeroes_moments():
  config = _config()
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  setup, state, _ = _train(mesh, config, _batches(2))
  head = state.opt_state.inner_states["head"].inner_state
  assert int(head.count) == 2
  state = train_state.reset_optimizer(state, setup)
  head = state.opt_state.inner_states["head"].inner_state
  assert int(head.count) == 0
  for leaf in jax.tree.leaves(head.inner_state):
    np.testing.assert_array_equal(np.asarray(leaf), 0)


def test_predict_fn_and_eval_step_on_eight_devices():
  config = _config()
  mesh = sharding.make_mesh([("data", -1)])
  setup = train_state.build_setup(config, mesh, model=FakeModel())
  state = train_state.init_state(setup, jax.random.key(0))
  predict = train.make_predict_fn(
    train.jit_eval_step(setup, mesh), state, mesh, ["embeddings"]
  )
  batch = _batches(1, batch_size=16)[0]
  out = predict(batch)
  want = FakeModel().apply(train_state.weights(state), batch, train=False)
  assert out.shape == (16, T, 2) and isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_nan_is_reported_with_step_range():
  config = _config()
  mesh = sharding.make_mesh([("data", -1)])
  batches = _batches(5)
  batches[3]["label"][:] = np.nan
  # Logged every 3 steps: 1..3 are finite; step 4 (batch 3) is NaN and is
  # reported with the unlogged window 4..5 at the end of the epoch.
  with pytest.raises(FloatingPointError, match=r"steps 4\.\.5"):
    _train(mesh, config, batches)

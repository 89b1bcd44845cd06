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
import optax
import pytest
from flax import traverse_util

from affjax import losses, optim, sharding, train, train_state
from configs import common
from configs import test as test_config

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
  step = train.jit_train_step(setup, mesh, loop_key, released=0)
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
  # BatchNorm statistics are global: only reduction order differs, so the
  # loss and BatchNorm statistics agree to float32 round-off.
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  # Adam divides by sqrt(v): a weight whose gradient is small turns that
  # round-off into a visibly different update, and the differences add up
  # over the steps (up to 1.1e-5 here after 6 steps, machine-dependent).
  # Each Adam step moves a weight by about lr at most, so the weights are
  # compared to 1% of the furthest they can have moved; a real mismatch
  # (other dropout masks, per-device BatchNorm statistics, a lost update)
  # differs by a good fraction of lr per step, 100x more.
  lr, steps = config.optim.learning_rate, int(s1.step)
  atol = 0.01 * lr * steps
  for a, b in zip(
    jax.tree.leaves(train_state.weights(s1)),
    jax.tree.leaves(train_state.weights(s8)),
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)
  # The weights moved by far more than the tolerance (Adam at lr 1e-3 for 6
  # steps), so the comparison is not vacuous.
  init = train_state.init_state(
    train_state.build_setup(config, one, FakeModel()),
    jax.random.split(jax.random.key(0))[0],
  )
  moved = np.abs(init.params["head"]["kernel"] - s1.params["head"]["kernel"])
  assert moved.max() > 20 * atol, moved.max()


def test_frozen_group_bit_identical_and_release_without_retrace():
  config = _config(frozen="^backbone/")
  mesh = sharding.make_mesh([("data", -1)])
  setup = train_state.build_setup(config, mesh, model=FakeModel())
  assert set(jax.tree.leaves(setup.labels)) == {"head", "frozen"}
  state = train_state.init_state(setup, jax.random.key(1))
  before = jax.tree.map(np.asarray, state.params)
  step = train.jit_train_step(setup, mesh, jax.random.key(2), released=0)
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
  # The identity of each window travels with its prediction.
  batch["trial"] = np.arange(16, dtype=np.int32)[::-1].copy()
  batch["frame_index"] = np.arange(16 * T, dtype=np.int32).reshape(16, T)
  out = predict(batch)
  want = FakeModel().apply(train_state.weights(state), batch, train=False)
  assert out.preds.shape == (16, T, 2) and isinstance(out.preds, np.ndarray)
  np.testing.assert_allclose(out.preds, np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.trial, batch["trial"])
  np.testing.assert_array_equal(out.frame_index, batch["frame_index"])


def test_nan_is_reported_with_step_range():
  config = _config()
  mesh = sharding.make_mesh([("data", -1)])
  batches = _batches(5)
  batches[3]["label"][:] = np.nan
  # Logged every 3 steps: 1..3 are finite; step 4 (batch 3) is NaN and is
  # reported with the unlogged window 4..5 at the end of the epoch.
  with pytest.raises(FloatingPointError, match=r"steps 4\.\.5"):
    _train(mesh, config, batches)


# ----------------------------------------------------------------------------
# Release stages: no gradient through frozen groups.


def _full_gradient_step(setup, loop_key):
  """The step before release stages: gradients w.r.t. every parameter.

  Frozen groups were held in place only by their learning rate of 0; the
  staged step must give the same weights and loss while skipping them.
  """
  model, tx = setup.model, setup.tx

  def step(state, batch):
    key = jax.random.fold_in(loop_key, state.step)

    def loss_fn(params):
      preds, updates = model.apply(
        dict(state.variables(), params=params),
        batch,
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
      )
      return losses.ccc_loss(preds, batch["label"], batch["mask"]), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
    )
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, deltas),
      batch_stats=updates["batch_stats"],
      opt_state=opt_state,
    ), loss

  return jax.jit(step)


def _frames_batch(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  t, e = config.data.window_length, len(config.data.emotions)
  batch = {
    k: rng.normal(size=v.shape).astype(np.float32)
    for k, v in train_state.dummy_batch(config, batch_size).items()
  }
  batch["label"] = np.tanh(rng.normal(size=(batch_size, t, e))).astype(
    np.float32
  )
  batch["mask"] = rng.random((batch_size, t)) > 0.2
  return batch


def _flops(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0]
  return cost["flops"]


@pytest.fixture(scope="module")
def real_setup():
  """configs/test.py's tiny IR backbone + TCNs, on one device."""
  config = test_config.get_config()
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  assert setup.plateau.num_groups == 3
  state = train_state.init_state(setup, jax.random.key(0))
  batch = sharding.global_batch(_frames_batch(config, 2), mesh)
  return config, mesh, setup, state, batch


@pytest.mark.parametrize("released", [0, 2])
def test_staged_step_matches_full_gradient_step(real_setup, released):
  _, mesh, setup, state, batch = real_setup
  loop_key = jax.random.key(3)
  plateau = optim.PlateauState(released=released, learning_rate=1e-3)
  state = train_state.set_learning_rates(state, setup, plateau)
  old_step = _full_gradient_step(setup, loop_key)
  new_step = train.jit_train_step(setup, mesh, loop_key, released=released)
  want, want_loss = old_step(state, batch)
  got, metrics = new_step(train_state.copy_tree(state), batch)
  np.testing.assert_array_equal(metrics.loss.total, want_loss)
  flat = lambda s: traverse_util.flatten_dict(train_state.weights(s), sep="/")
  before, want, got = flat(state), flat(want), flat(got)
  assert got.keys() == want.keys()
  labels = traverse_util.flatten_dict(setup.labels, sep="/")
  frozen = optim.frozen_labels(setup.plateau.num_groups, released)
  moved = set()
  for name in want:
    # Bit-identical on CPU: the forward and the trainable groups' backward
    # are the same computation, only the frozen groups' part is gone.
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if not np.array_equal(want[name], before[name]):
      moved.add(labels.get(name.removeprefix("params/"), "batch_stats"))
  # Not vacuous: the head, the released groups and the frozen backbone's
  # BatchNorm statistics (train-mode forward) all changed.
  trainable = {optim.HEAD} | {optim.release_label(i) for i in range(released)}
  assert moved == trainable | {"batch_stats"}
  assert not moved & frozen
  assert any(
    not np.array_equal(want[name], before[name])
    for name in want
    if name.startswith("batch_stats/backbone/")
  )


def test_frozen_backbone_step_skips_its_backward(real_setup):
  _, mesh, setup, state, batch = real_setup
  loop_key = jax.random.key(3)
  full = _flops(_full_gradient_step(setup, loop_key), state, batch)
  staged = [
    _flops(
      train.jit_train_step(setup, mesh, loop_key, released=r), state, batch
    )
    for r in (0, 3)
  ]
  # Backward ~2x the forward: without it the backbone-dominated step costs
  # about a third. With every group released the backbone's input layers
  # and first blocks (in no release group) still get no gradient; the full
  # step skips theirs too, since their `optax.set_to_zero()` update never
  # reads it (so equal, not less).
  assert staged[0] < 0.7 * full, (staged, full)
  assert staged[0] < staged[1] <= full, (staged, full)


def test_program_compiles_one_step_per_frozen_set(real_setup):
  _, mesh, setup, _, _ = real_setup
  program = train.Program(
    setup=setup, eval_step=None, mesh=mesh, loop_key=jax.random.key(0)
  )
  steps = [program.train_step(r) for r in range(4)]
  assert len({id(s) for s in steps}) == 4
  assert program.train_step(1) is steps[1]
  with pytest.raises(ValueError, match="released=4"):
    program.train_step(4)
  # Nothing frozen (demo / cached-embedding configs): one step for all.
  setup = train_state.build_setup(_config(), mesh, model=FakeModel())
  program = train.Program(
    setup=setup, eval_step=None, mesh=mesh, loop_key=jax.random.key(0)
  )
  assert program.train_step(0) is program.train_step(0)
  assert set(program.train_steps) == {frozenset()}

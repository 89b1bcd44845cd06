"""config.model.dtype: bfloat16 activations, float32 everything else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import train
from affjax import train_state as ts
from affjax.models import build_model
from configs import lfan
from configs import test as test_config

# Relative error of the bf16 predictions of the IR-50-sized audio-visual
# model (random weights, eval mode) against float32, measured as
# max |bf16 - f32| / max |f32|: 8 mantissa bits through 50 layers and the
# TCNs. Measured 0.0121 (this machine, seed 0); the bound leaves a 4x
# margin. XLA:CPU compiles the two IR-50 forwards slowly (minutes).
BF16_TOLERANCE = 0.05


def _config(dtype, base=lfan):
  config = base.get_config()
  with config.unlocked():
    config.model.dtype = dtype
  return config


def _batch(config, b, t, seed=0):
  rng = np.random.default_rng(seed)
  specs = ts.batch_specs(config, b, train=False)
  batch = {}
  for k, s in specs.items():
    shape = (b, t, *s.shape[2:])
    batch[k] = rng.uniform(-1, 1, shape).astype(np.float32)
  return batch


def test_bf16_forward_of_ir50_model_is_close_to_f32():
  f32, bf16 = (build_model(_config(d).model) for d in ("float32", "bfloat16"))
  batch = _batch(_config("float32"), 2, 8)
  variables = jax.jit(lambda k: f32.init(k, batch, train=False))(
    jax.random.key(0)
  )
  want = np.asarray(
    jax.jit(lambda v: f32.apply(v, batch, train=False))(variables)
  )
  got = jax.jit(lambda v: bf16.apply(v, batch, train=False))(variables)
  assert got.dtype == jnp.float32
  err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
  print(f"bf16 vs f32 relative error: {err:.4f}")
  assert 0 < err < BF16_TOLERANCE


def test_bf16_keeps_parameters_state_and_loss_in_float32():
  shapes = {}
  for dtype in ("float32", "bfloat16"):
    config = _config(dtype, test_config)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    setup = ts.build_setup(config, mesh)
    leaves = jax.tree.leaves(setup.abstract_state)
    assert {
      x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)
    } == {jnp.dtype(jnp.float32)}
    step = train.make_train_step(
      setup, train.root_keys(0)[1], released=setup.plateau.num_groups
    )
    batch = ts.batch_specs(config, 2, train=True)
    new_state, metrics = jax.eval_shape(step, setup.abstract_state, batch)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
      lambda x: x.dtype, setup.abstract_state
    )
    assert metrics.loss.total.dtype == jnp.float32
    shapes[dtype] = jax.tree.map(lambda x: (x.shape, x.dtype), new_state)
  # Same checkpoint layout whatever the activation dtype.
  assert shapes["float32"] == shapes["bfloat16"]


def test_unknown_dtype_is_an_error():
  with pytest.raises(ValueError, match="config.model.dtype"):
    build_model(_config("float16").model)


def test_uint8_frames_are_normalised_on_device():
  config = _config("float32", test_config)
  model = build_model(config.model)
  rng = np.random.default_rng(0)
  batch = _batch(config, 2, 4)
  pixels = rng.integers(0, 256, batch["frames"].shape, dtype=np.uint8)
  floats = dict(batch, frames=(pixels / 255.0 - 0.5) / 0.5)
  variables = model.init(jax.random.key(0), floats, train=False)
  want = model.apply(variables, floats, train=False)
  got = model.apply(variables, dict(batch, frames=pixels), train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

"""Chunked backbone convolutions (`config.model.backbone.conv_chunk`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax.models import iresnet


def _conv_inputs(n, hw=6, cin=3, cout=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, hw, hw, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
  return x, k


@pytest.mark.parametrize(
  "n, chunk, want",
  [(2400, 64, 60), (64, 64, 0), (10, 4, 2), (12, 4, 4), (7, 4, 0), (9, 0, 0)],
)
def test_chunk_size_is_the_largest_divisor_unless_too_small(n, chunk, want):
  assert iresnet._chunk_size(n, chunk) == want


@pytest.mark.parametrize(
  "strides, padding", [((1, 1), ((1, 1), (1, 1))), ((2, 2), "VALID")]
)
def test_chunked_conv_equals_one_call_value_and_gradients(strides, padding):
  x, k = _conv_inputs(12)

  def loss(x, k, chunk):
    y = iresnet.conv2d(x, k, strides, padding, chunk)
    return jnp.sum(y * jnp.cos(y))

  want = iresnet.conv2d(x, k, strides, padding)
  got = jax.jit(iresnet.conv2d, static_argnums=(2, 3, 4))(
    x, k, strides, padding, 4
  )
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  grads = jax.grad(loss, argnums=(0, 1))
  for g_want, g_got in zip(grads(x, k, 0), grads(x, k, 4)):
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_backbone_with_conv_chunk_matches_unchunked(train):
  x = jnp.asarray(
    np.random.default_rng(1).uniform(-1, 1, (12, 40, 40, 3)), jnp.float32
  )
  plain = iresnet.IRTiny(dropout_rate=0.0)
  chunked = iresnet.IRTiny(dropout_rate=0.0, conv_chunk=4)
  variables = plain.init(jax.random.key(0), x, train=False)
  # Same parameter tree: checkpoints and the converter are unaffected.
  chunked_vars = chunked.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(chunked_vars) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(chunked_vars), jax.tree.leaves(variables)):
    assert a.shape == b.shape
  kwargs = {"mutable": ["batch_stats"]} if train else {}
  want = plain.apply(variables, x, train=train, **kwargs)
  got = chunked.apply(variables, x, train=train, **kwargs)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_negative_conv_chunk_is_named():
  from affjax import train_state
  from configs import common

  config = common.base_config()
  config.model.backbone.conv_chunk = -1
  with pytest.raises(ValueError, match="config.model.backbone.conv_chunk"):
    train_state.check_model_config(config)


def test_conv_chunk_may_differ_from_the_checkpoint_on_resume_and_eval():
  from affjax import checkpoints
  from configs import common

  saved = common.base_config()
  del saved.model.backbone["conv_chunk"]  # a checkpoint from before the key
  current = common.base_config()
  current.model.backbone.conv_chunk = 64
  saved_json = checkpoints.config_to_json(saved)
  for keys in (checkpoints.RESUME_SAFE_KEYS, checkpoints.EVAL_SAFE_KEYS):
    assert not checkpoints.config_differences(saved_json, current, keys)
  assert checkpoints.config_differences(saved_json, current)


def test_chunked_conv_keeps_a_batch_sharding_without_gathering():
  # 8 devices, 32 images in chunks of 8: every chunk is spread over all the
  # devices, so the loop needs no communication.
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x, k = _conv_inputs(32, hw=8, cin=4, cout=4, seed=3)
  x = jax.device_put(x, batch)
  pad = ((1, 1), (1, 1))
  fn = jax.jit(
    lambda x, k: iresnet.conv2d(x, k, (1, 1), pad, 8),
    out_shardings=batch,
  )
  hlo = fn.lower(x, k).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  np.testing.assert_allclose(
    fn(x, k), iresnet.conv2d(x, k, (1, 1), pad), rtol=1e-6, atol=1e-6
  )

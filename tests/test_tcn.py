"""TemporalConvNet: parity with the reference TCN, causality, field, init."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from affjax import convert
from affjax.models import tcn
from tests.torch_reference import lfan


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _torch_tcn(in_features, channels, seed=0):
  torch.manual_seed(seed)
  return lfan.randomize_(
    lfan.TemporalConvNet(in_features, channels, kernel_size=5, dropout=0.1),
    seed,
  )


def _parity(in_features, channels, time=64):
  ref = _torch_tcn(in_features, channels)
  x = (
    np.random.default_rng(1)
    .normal(size=(2, time, in_features))
    .astype(np.float32)
  )
  with torch.no_grad():
    want = ref(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
  params = convert.tcn_params_from_reference(
    lfan.state_dict_numpy(ref), in_features, channels
  )
  got = tcn.TemporalConvNet(channels).apply({"params": params}, x, train=False)
  assert got.shape == (2, time, channels[-1])
  return _rel_err(got, want)


def test_parity_visual_widths():
  # 512 -> 128 x 4, as the visual TCN (downsample only in block 0).
  assert _parity(512, (128, 128, 128, 128)) < 1e-5


def test_parity_mixed_widths():
  # A downsample in every block but the third, and an audio-like input.
  assert _parity(39, (32, 16, 16, 24)) < 1e-5


def test_causality_and_receptive_field():
  channels = (8, 8, 8, 8)
  model = tcn.TemporalConvNet(channels)
  t_len, t_out = 160, 150
  x = jax.random.normal(jax.random.key(0), (1, t_len, 3))
  variables = model.init(jax.random.key(1), x, train=False)

  def out_at(inp):
    return model.apply(variables, inp, train=False)[0, t_out].sum()

  sens = np.abs(np.asarray(jax.grad(out_at)(x))[0]).sum(-1)
  assert np.all(sens[t_out + 1 :] == 0.0)  # nothing from the future
  assert tcn.receptive_field(5, 4) == 121
  first = t_out - 120
  assert np.all(sens[:first] == 0.0)  # nothing beyond the receptive field
  assert np.all(sens[first : t_out + 1] > 0.0)


def test_jacobian_is_block_lower_triangular():
  model = tcn.TemporalConvNet((4, 4), kernel_size=3)
  x = jax.random.normal(jax.random.key(2), (1, 12, 2))
  variables = model.init(jax.random.key(3), x, train=False)
  jac = jax.jacobian(lambda a: model.apply(variables, a, train=False))(x)
  dep = np.abs(np.asarray(jac)[0, :, :, 0, :, :]).sum(axis=(1, 3))  # [t, s]
  assert np.all(np.triu(dep, k=1) == 0.0)
  # Receptive field 1 + 2 * 2 * (1 + 2) = 13 > 12: every past frame counts.
  assert np.all(dep[np.tril_indices(12)] > 0.0)


def test_init_matches_reference_scheme():
  channels = (64, 64)
  x = jnp.zeros((1, 8, 96))
  params = tcn.TemporalConvNet(channels).init(
    jax.random.key(0), x, train=False
  )["params"]
  conv = params["block0"]["conv1"]
  v = np.asarray(conv["v"])
  # xavier-uniform, gain sqrt(2): bound sqrt(2) * sqrt(6 / (5*96 + 5*64)).
  bound = np.sqrt(2.0) * np.sqrt(6.0 / (5 * 96 + 5 * 64))
  assert v.shape == (5, 96, 64)
  assert np.abs(v).max() <= bound
  assert np.abs(v).max() > 0.95 * bound
  # weight norm starts at w == v: g = ||v|| over (kernel, in).
  np.testing.assert_allclose(
    conv["g"], np.sqrt((v.astype(np.float64) ** 2).sum((0, 1))), rtol=1e-5
  )
  bias_bound = 1.0 / np.sqrt(5 * 96)
  assert np.abs(np.asarray(conv["bias"])).max() <= bias_bound
  down = np.asarray(params["block0"]["downsample"]["kernel"])
  assert down.shape == (1, 96, 64)
  assert np.abs(down).max() <= np.sqrt(2.0) * np.sqrt(6.0 / (96 + 64))
  assert "downsample" not in params["block1"]


def test_dropout_drops_whole_channels_over_time():
  model = tcn.TemporalConvNet((16,), dropout=0.5)
  x = jnp.ones((4, 20, 16))
  variables = model.init(jax.random.key(0), x, train=False)
  # Capture the first dropout layer's input and output in train mode.
  mods = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "Dropout_0" and context.method_name == (
      "__call__"
    ):
      mods["in"], mods["out"] = args[0], out
    return out

  with nn.intercept_methods(capture):
    model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
  dropped = np.asarray(mods["out"]) == 0.0
  active = np.asarray(mods["in"]) != 0.0
  zero_where_active = dropped & active
  # Per (batch, channel): dropped at all frames or at none.
  per_bc = zero_where_active.sum(axis=1)
  assert set(np.unique(per_bc)) <= {0, 20}
  assert (per_bc == 20).any() and (per_bc == 0).any()
  kept = ~dropped & active
  np.testing.assert_allclose(
    np.asarray(mods["out"])[kept], 2.0 * np.asarray(mods["in"])[kept], rtol=1e-6
  )

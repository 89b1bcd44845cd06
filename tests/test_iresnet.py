"""Tests for the IResNet backbone: PyTorch parity, converter, release groups."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from affjax.models import iresnet
from tests.torch_reference import iresnet as torch_iresnet

_TINY = {"stage_channels": (16, 32, 64, 128), "stage_units": (1, 1, 1, 1)}
# Keyword arguments giving the PyTorch transcription of each named variant.
_TORCH_KWARGS = {
  "ir50": {},
  "ir_se50": {"se_reduction": 16},
  "tiny": _TINY,
  "tiny_se": dict(_TINY, se_reduction=4),
  "demo": {
    "stage_channels": (8, 16, 32, 64),
    "stage_units": (1, 1, 1, 1),
    "stage_strides": (2, 2, 2, 1),
  },
}


def _images(batch: int = 2, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (batch, 40, 40, 3)).astype(np.float32)


def _torch_forward(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.cache
def _torch_model(name: str) -> torch.nn.Module:
  torch.manual_seed(0)
  model = torch_iresnet.Backbone(**_TORCH_KWARGS[name])
  return torch_iresnet.randomize_(model, seed=1).eval()


@functools.cache
def _converted(name: str):
  return iresnet.iresnet_variables_from_torch(_torch_model(name).state_dict())


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name", sorted(iresnet.BACKBONES))
def test_parity_with_torch_reference(name):
  x = _images()
  expected = _torch_forward(_torch_model(name), x)
  model = iresnet.BACKBONES[name]()
  got = np.asarray(
    jax.jit(functools.partial(model.apply, train=False))(_converted(name), x)
  )
  assert got.shape == (2, 512)
  assert _rel_err(got, expected) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(iresnet.BACKBONES))
def test_converted_tree_matches_init(name):
  model = iresnet.BACKBONES[name]()
  init_shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jnp.zeros((1, 40, 40, 3)),
  )
  assert _shapes(_converted(name)) == _shapes(init_shapes)


def test_train_mode_matches_torch_and_momentum():
  torch.manual_seed(0)
  ref = torch_iresnet.randomize_(
    torch_iresnet.Backbone(**_TINY, drop_ratio=0.0), seed=2
  )
  variables = iresnet.iresnet_variables_from_torch(ref.state_dict())
  old = jax.tree.map(np.copy, variables["batch_stats"])
  # Batch 8, not 2: BatchNorm1d over two samples normalises by a variance of
  # nearly equal pairs, which magnifies float32 rounding past 1e-5.
  x = _images(batch=8, seed=3)
  expected = _torch_forward(ref.train(), x)
  got, updates = iresnet.IRTiny(dropout_rate=0.0).apply(
    variables, x, train=True, mutable=["batch_stats"]
  )
  assert _rel_err(np.asarray(got), expected) < 1e-5
  stats = updates["batch_stats"]
  state = ref.state_dict()
  np.testing.assert_allclose(
    stats["input_bn"]["mean"], state["input_layer.1.running_mean"], atol=1e-6
  )
  np.testing.assert_allclose(
    stats["output_bn1d"]["mean"],
    state["output_layer.4.running_mean"],
    atol=1e-6,
  )
  np.testing.assert_allclose(
    stats["body_2"]["res_bn2"]["mean"],
    state["body.2.res_layer.4.running_mean"],
    atol=1e-6,
  )
  # Both sides use momentum 0.1 on the new batch; PyTorch folds in the
  # unbiased variance (n / (n - 1) times the biased one), flax the biased.
  for flax_name, torch_key, n in (
    ("input_bn", "input_layer.1", 8 * 40 * 40),
    ("output_bn1d", "output_layer.4", 8),
  ):
    prev = old[flax_name]["var"]
    unbiased = (state[f"{torch_key}.running_var"].numpy() - 0.9 * prev) / 0.1
    np.testing.assert_allclose(
      stats[flax_name]["var"],
      0.9 * prev + 0.1 * unbiased * (n - 1) / n,
      rtol=1e-4,
      atol=1e-6,
    )


def test_dropout_only_in_train_mode():
  model = iresnet.IRTiny()
  x = jnp.asarray(_images())
  variables = _converted("tiny")

  @jax.jit
  def run(seed):
    train_out, _ = model.apply(
      variables,
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(seed)},
    )
    return train_out, model.apply(variables, x, train=False)

  (train1, eval1), (train2, eval2) = run(1), run(2)
  assert float(jnp.max(jnp.abs(train1 - train2))) > 1e-3
  np.testing.assert_allclose(jnp.linalg.norm(train1, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(eval1, eval2)


def test_converter_prefix_res50_layout_and_no_aliasing():
  backbone = _torch_model("tiny")
  expected = _converted("tiny")
  state = backbone.state_dict()
  fusion_like = {f"spatial.{k}": v for k, v in state.items()}
  fusion_like["temporal.network.0.conv1.weight_g"] = torch.ones(3)
  got = iresnet.iresnet_variables_from_torch(fusion_like, prefix="spatial.")
  jax.tree.map(np.testing.assert_array_equal, got, expected)

  res50 = {f"backbone.{k}": v for k, v in state.items()}
  res50["logits.weight"] = torch.zeros(8, 512)
  res50["logits.bias"] = torch.zeros(8)
  got = iresnet.iresnet_variables_from_res50(res50)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  with pytest.raises(ValueError, match="extra.head"):
    iresnet.iresnet_variables_from_res50({**res50, "extra.head": 1.0})

  # The conversion copies: later changes to the torch model do not leak in.
  with torch.no_grad():
    backbone.input_layer[2].weight.add_(1.0)
  try:
    np.testing.assert_array_equal(
      expected["params"]["input_prelu"]["negative_slope"],
      got["params"]["input_prelu"]["negative_slope"],
    )
    assert not np.allclose(
      backbone.input_layer[2].weight.detach().numpy(),
      got["params"]["input_prelu"]["negative_slope"],
    )
  finally:
    with torch.no_grad():
      backbone.input_layer[2].weight.sub_(1.0)


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda s: s.pop("body.2.res_layer.3.weight"),
      r"missing keys \['body.2.res_layer.3.weight'\]",
    ),
    (
      lambda s: s.pop("body.1.shortcut_layer.1.running_var"),
      r"missing keys \['body.1.shortcut_layer.1.running_var'\]",
    ),
    (
      lambda s: s.pop("body.1.res_layer.0.weight"),
      r"missing keys \['body.1.res_layer.0.weight'\]",
    ),
    (
      lambda s: s.update({"body.2.res_layer.9.weight": np.zeros(3)}),
      r"unexpected keys \['body.2.res_layer.9.weight'\]",
    ),
    (
      lambda s: s.update({"body.0.shortcut_layer.0.weight": np.zeros(3)}),
      r"unexpected keys \['body.0.shortcut_layer.0.weight'\]",
    ),
    (
      lambda s: s.update({"body.3.res_layer.5.fc1.weight": np.zeros(3)}),
      r"'body.0.res_layer.5.fc1.weight'",
    ),
    (
      lambda s: s.pop("output_layer.3.bias"),
      r"missing keys \['output_layer.3.bias'\]",
    ),
  ],
)
def test_converter_reports_missing_and_unexpected_keys(change, message):
  state = dict(_torch_model("tiny").state_dict())
  change(state)
  with pytest.raises(ValueError, match=message):
    iresnet.iresnet_variables_from_torch(state)


def test_converter_rejects_prefix_without_keys():
  with pytest.raises(ValueError, match="prefix 'spatial.'"):
    iresnet.iresnet_variables_from_torch(
      _torch_model("tiny").state_dict(), prefix="spatial."
    )


def _param_index_paths(name: str) -> dict[str, int]:
  """Flax param path -> index of the torch parameter it came from.

  Each reference parameter is filled with its index in `parameters()` order
  (the order the reference's release ranges count in), converted, and read
  back from the Flax tree.
  """
  with torch.device("meta"):
    model = torch_iresnet.Backbone(**_TORCH_KWARGS[name])
  index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
  state = {
    k: np.broadcast_to(np.float32(index.get(k, -1)), v.shape)
    for k, v in model.state_dict().items()
  }
  params = iresnet.iresnet_variables_from_torch(state)["params"]
  paths = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    paths["/".join(p.key for p in path)] = int(leaf.flat[0])
  assert sorted(paths.values()) == list(range(len(index)))
  return paths


def _selected(paths: dict[str, int], group: list[str]) -> set[int]:
  return {i for p, i in paths.items() if any(re.search(r, p) for r in group)}


@pytest.mark.parametrize(
  "name, ranges, total",
  [
    ("ir50", [(4, 10), (163, 187), (142, 163)], 187),
    ("ir_se50", [(4, 10), (205, 235), (187, 205)], 235),
  ],
)
def test_release_groups_match_reference_index_ranges(name, ranges, total):
  paths = _param_index_paths(name)
  assert len(paths) == total
  groups = iresnet.RELEASE_GROUPS[name]
  assert len(groups) == len(ranges)
  for group, (start, stop) in zip(groups, ranges):
    assert _selected(paths, group) == set(range(start, stop))
    # Unanchored, so a caller can prepend the backbone's path in the model.
    nested = {f"visual/backbone/{p}": i for p, i in paths.items()}
    assert _selected(nested, group) == set(range(start, stop))


@pytest.mark.parametrize("name", ["tiny", "tiny_se", "demo"])
def test_tiny_release_groups(name):
  paths = _param_index_paths(name)
  with torch.device("meta"):
    names = [
      n
      for n, _ in torch_iresnet.Backbone(
        **_TORCH_KWARGS[name]
      ).named_parameters()
    ]
  expected = [
    {i for i, n in enumerate(names) if n.startswith("output_layer.")},
    {i for i, n in enumerate(names) if n.startswith("body.3.")},
    {i for i, n in enumerate(names) if n.startswith("body.2.")},
  ]
  assert expected[0] == set(range(4, 10))
  groups = iresnet.RELEASE_GROUPS[name]
  assert [_selected(paths, g) for g in groups] == expected

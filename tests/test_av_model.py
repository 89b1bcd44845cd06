"""Full models: reference parity (tiny backbone), input modes, build_model."""

import functools

import flax
import jax
import ml_collections
import numpy as np
import pytest
import torch

from affjax import convert
from affjax.models import av_model, build_model
from tests.torch_reference import iresnet as iresnet_ref
from tests.torch_reference import lfan

AUDIO = (("vggish", 128), ("mfcc", 39))
TINY = {"stage_channels": (16, 32, 64, 128), "stage_units": (1, 1, 1, 1)}


def _config(
  name="av_leader_follower",
  visual_input="frames",
  backbone="tiny",
  num_outputs=2,
  audio_features=AUDIO,
):
  return ml_collections.ConfigDict(
    {
      "name": name,
      "input": visual_input,
      "backbone": {"name": backbone, "dropout": 0.4},
      "visual_channels": (128, 128, 128, 128),
      "audio_channels": (32, 32, 32, 32),
      "audio_features": audio_features,
      "kernel_size": 5,
      "dropout": 0.1,
      "fusion_dim": 32,
      "num_outputs": num_outputs,
    }
  )


def _batch(b, t, seed=0, audio_features=AUDIO):
  rng = np.random.default_rng(seed)
  batch = {"frames": rng.uniform(-1, 1, (b, t, 40, 40, 3)).astype(np.float32)}
  for name, dim in audio_features:
    batch[name] = rng.normal(size=(b, t, dim)).astype(np.float32)
  return batch


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _torch_frames(frames):
  return torch.from_numpy(frames).permute(0, 1, 4, 2, 3).contiguous()


def _tiny_torch_backbone(se_reduction=0, seed=0):
  torch.manual_seed(seed)
  return iresnet_ref.randomize_(
    iresnet_ref.Backbone(se_reduction=se_reduction, **TINY), seed
  )


def _apply(model, variables, batch, **kwargs):
  # One XLA compilation is much cheaper than eager op-by-op dispatch here.
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, batch)


@pytest.fixture(scope="module")
def av_reference():
  """Torch reference with a tiny backbone, its converted variables, a batch."""
  ref = lfan.randomize_(lfan.LeaderFollowerNet(_tiny_torch_backbone()), seed=1)
  config = _config()
  variables = convert.from_reference_state_dict(
    lfan.state_dict_numpy(ref), config
  )
  return ref, config, variables, _batch(2, 6)


def test_av_parity_with_reference(av_reference):
  ref, config, variables, batch = av_reference
  with torch.no_grad():
    want = ref(
      _torch_frames(batch["frames"]),
      torch.from_numpy(batch["vggish"]),
      torch.from_numpy(batch["mfcc"]),
    ).numpy()
  got = _apply(build_model(config), variables, batch, train=False)
  assert got.shape == (2, 6, 2)
  assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
  "b,feats,num_outputs",
  [
    (1, AUDIO, 2),  # batch size 1 (where the reference's squeeze breaks)
    (3, AUDIO + (("egemaps", 23),), 1),
  ],
)
def test_embeddings_mode_parity_with_reference(b, feats, num_outputs):
  ref = lfan.randomize_(
    lfan.LeaderFollowerNet(
      None, audio_dims=[d for _, d in feats], output_dim=num_outputs
    ),
    seed=4,
  )
  batch = {
    k: v
    for k, v in _batch(b, 7, seed=5, audio_features=feats).items()
    if k != "frames"
  }
  batch["embeddings"] = (
    np.random.default_rng(6).normal(size=(b, 7, 512)).astype(np.float32)
  )
  with torch.no_grad():
    want = ref(
      torch.from_numpy(batch["embeddings"]),
      *[torch.from_numpy(batch[n]) for n, _ in feats],
    ).numpy()
  config = _config(
    visual_input="embeddings", num_outputs=num_outputs, audio_features=feats
  )
  variables = convert.from_reference_state_dict(
    lfan.state_dict_numpy(ref), config
  )
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {
    "visual_tcn",
    "fusion",
    *(f"{n}_tcn" for n, _ in feats),
  }
  got = _apply(build_model(config), variables, batch, train=False)
  assert got.shape == (b, 7, num_outputs)
  assert _rel_err(got, want) < 1e-5


def test_visual_only_parity_with_reference():
  ref = lfan.randomize_(
    lfan.VisualOnlyNet(_tiny_torch_backbone(se_reduction=4), output_dim=1),
    seed=2,
  )
  batch = _batch(2, 6, seed=3)
  with torch.no_grad():
    want = ref(_torch_frames(batch["frames"])).numpy()
  config = _config(name="visual_only", backbone="tiny_se", num_outputs=1)
  variables = convert.from_reference_state_dict(
    lfan.state_dict_numpy(ref), config
  )
  assert set(variables["params"]) == {"backbone", "visual_tcn", "regressor"}
  got = _apply(
    build_model(config), variables, {"frames": batch["frames"]}, train=False
  )
  assert got.shape == (2, 6, 1)
  assert _rel_err(got, want) < 1e-5


def test_embeddings_mode_matches_frames_mode(av_reference):
  _, config, variables, batch = av_reference
  want = _apply(build_model(config), variables, batch, train=False)
  backbone = av_model.build_backbone(config.backbone)
  frames = batch["frames"].reshape(12, 40, 40, 3)
  emb = _apply(
    backbone,
    {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
    },
    frames,
    train=False,
  ).reshape(2, 6, 512)
  emb_params = {k: v for k, v in variables["params"].items() if k != "backbone"}
  emb_batch = {
    "embeddings": np.asarray(emb),
    "vggish": batch["vggish"],
    "mfcc": batch["mfcc"],
  }
  got = _apply(
    build_model(_config(visual_input="embeddings")),
    {"params": emb_params},
    emb_batch,
    train=False,
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_train_mode_dropout_and_batch_stats(av_reference):
  _, config, variables, batch = av_reference
  model = build_model(config)
  step = jax.jit(
    lambda key: model.apply(
      variables,
      batch,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
  )
  out1, updates = step(jax.random.key(1))
  out2, _ = step(jax.random.key(2))
  assert out1.shape == (2, 6, 2)
  assert not np.allclose(out1, out2)  # different dropout masks
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  new = flax.traverse_util.flatten_dict(updates["batch_stats"])
  assert old.keys() == new.keys()
  assert all(not np.allclose(old[k], new[k]) for k in old)


def test_init_gives_the_converted_layout():
  # Narrow, two-level TCNs: the layout check does not depend on the depth.
  config = _config(visual_input="embeddings")
  config.visual_channels, config.audio_channels = (16, 16), (8, 8)
  config.fusion_dim = 8
  model = build_model(config)
  batch = {
    "embeddings": np.ones((2, 5, 512), np.float32),
    **{k: v for k, v in _batch(2, 5).items() if k != "frames"},
  }
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), batch
  )
  ref = lfan.LeaderFollowerNet(
    None, visual_channels=(16, 16), audio_channels=(8, 8), fusion_dim=8
  )
  converted = convert.from_reference_state_dict(
    lfan.state_dict_numpy(ref), config
  )
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, converted)
  out = _apply(model, variables, batch, train=False)
  assert out.shape == (2, 5, 2) and np.all(np.isfinite(out))


def test_build_model_errors():
  with pytest.raises(ValueError, match="got 'lstm'"):
    build_model(_config(name="lstm"))
  with pytest.raises(ValueError, match="got 'pixels'"):
    build_model(_config(visual_input="pixels"))
  with pytest.raises(ValueError, match="got 'resnet18'"):
    build_model(_config(backbone="resnet18"))


def test_batch_errors_name_the_key():
  model = build_model(_config(visual_input="embeddings"))
  batch = {
    "embeddings": np.zeros((1, 3, 512), np.float32),
    "vggish": np.zeros((1, 3, 128), np.float32),
  }
  with pytest.raises(ValueError, match="no audio feature 'mfcc'"):
    model.init(jax.random.key(0), batch, train=False)
  batch["mfcc"] = np.zeros((1, 3, 40), np.float32)
  with pytest.raises(ValueError, match=r"mfcc must be \[batch, time, 39\]"):
    model.init(jax.random.key(0), batch, train=False)
  with pytest.raises(ValueError, match="no 'frames' key"):
    build_model(_config()).init(jax.random.key(0), batch, train=False)

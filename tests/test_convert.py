"""Reference checkpoint conversion: key mapping, errors, .pth reading."""

import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch

from affjax import convert
from affjax.models import iresnet
from tests.torch_reference import iresnet as iresnet_ref
from tests.torch_reference import lfan

TINY = {"stage_channels": (16, 32, 64, 128), "stage_units": (1, 1, 1, 1)}


def _config(
  visual_input="embeddings", name="av_leader_follower", kernel_size=5
):
  return ml_collections.ConfigDict(
    {
      "name": name,
      "input": visual_input,
      "backbone": {"name": "tiny", "dropout": 0.4},
      "visual_channels": (128, 128, 128, 128),
      "audio_channels": (32, 32, 32, 32),
      "audio_features": (("vggish", 128), ("mfcc", 39)),
      "kernel_size": kernel_size,
      "dropout": 0.1,
      "fusion_dim": 32,
      "num_outputs": 2,
    }
  )


@pytest.fixture(scope="module")
def av_state_dict():
  torch.manual_seed(0)
  return lfan.state_dict_numpy(
    lfan.randomize_(lfan.LeaderFollowerNet(None), seed=0)
  )


@pytest.fixture(scope="module")
def tiny_backbone():
  torch.manual_seed(1)
  return iresnet_ref.randomize_(iresnet_ref.Backbone(**TINY), seed=1)


def test_maps_reference_keys(av_state_dict):
  sd = av_state_dict
  params = convert.from_reference_state_dict(sd, _config())["params"]
  conv = params["vggish_tcn"]["block2"]["conv2"]
  np.testing.assert_array_equal(
    conv["v"], sd["temporal1.network.2.conv2.weight_v"].transpose(2, 1, 0)
  )
  np.testing.assert_array_equal(
    conv["g"], sd["temporal1.network.2.conv2.weight_g"][:, 0, 0]
  )
  np.testing.assert_array_equal(
    params["visual_tcn"]["block0"]["downsample"]["kernel"][0],
    sd["temporal.network.0.downsample.weight"][:, :, 0].T,
  )
  np.testing.assert_array_equal(
    params["fusion"]["query_2"]["kernel"], sd["encoderQ3.weight"].T
  )
  np.testing.assert_array_equal(
    params["fusion"]["layer_norm"]["scale"], sd["ln.weight"]
  )
  assert "downsample" not in params["mfcc_tcn"]["block1"]


def test_unknown_and_missing_keys_are_all_listed(av_state_dict):
  sd = dict(av_state_dict)
  sd["temporal.network.1.downsample.weight"] = np.zeros((128, 128, 1))
  sd["encoder4.weight"] = np.zeros((32, 32))
  del sd["encoderQ2.bias"]
  del sd["temporal2.network.3.net.4.weight_v"]
  with pytest.raises(ValueError) as err:
    convert.from_reference_state_dict(sd, _config())
  msg = str(err.value)
  assert (
    "missing keys ['encoderQ2.bias', 'temporal2.network.3.net.4.weight_v']"
  ) in msg
  assert (
    "unknown keys ['encoder4.weight', 'temporal.network.1.downsample.weight']"
  ) in msg


def test_unused_group_norms_are_optional(av_state_dict):
  sd = {k: v for k, v in av_state_dict.items() if not k.startswith("gn")}
  with_gn = convert.from_reference_state_dict(av_state_dict, _config())
  without_gn = convert.from_reference_state_dict(sd, _config())
  assert jax.tree.all(jax.tree.map(np.array_equal, with_gn, without_gn))


def test_duplicated_weight_norm_copies_must_agree(av_state_dict):
  sd = dict(av_state_dict)
  sd["temporal.network.2.net.0.weight_g"] = (
    sd["temporal.network.2.net.0.weight_g"] + 1.0
  )
  with pytest.raises(
    ValueError,
    match=r"temporal\.network\.2\.conv1\."
    r"weight_g and temporal\.network\.2\.net\.0\.weight_g",
  ):
    convert.from_reference_state_dict(sd, _config())


def test_shapes_are_checked_against_the_config(av_state_dict):
  with pytest.raises(
    ValueError,
    match=r"does not fit config.model.*"
    r"'visual_tcn'\]\['block0'\]\['conv1'\]\['v'\]: "
    r"expected \(3, 512, 128\), found \(5, 512, 128\)",
  ):
    convert.from_reference_state_dict(av_state_dict, _config(kernel_size=3))


def test_wrong_model_name_fails_on_keys(av_state_dict):
  with pytest.raises(ValueError, match=r"unknown keys \['encoder1.bias'"):
    convert.from_reference_state_dict(
      av_state_dict, _config(name="visual_only")
    )


def test_backbone_prefix_by_input_mode(av_state_dict, tiny_backbone):
  backbone_sd = lfan.state_dict_numpy(tiny_backbone)
  full = {
    **{"spatial." + k: v for k, v in backbone_sd.items()},
    **av_state_dict,
  }
  with pytest.raises(ValueError, match=r"missing keys \['spatial\.\*'\]"):
    convert.from_reference_state_dict(av_state_dict, _config("frames"))
  # Embeddings mode has no backbone: the reference's `spatial.*` is dropped.
  emb = convert.from_reference_state_dict(full, _config("embeddings"))
  assert "backbone" not in emb["params"] and "batch_stats" not in emb
  frames = convert.from_reference_state_dict(full, _config("frames"))
  want = iresnet.iresnet_variables_from_torch(backbone_sd)
  assert jax.tree.all(
    jax.tree.map(np.array_equal, frames["params"]["backbone"], want["params"])
  )
  assert jax.tree.all(
    jax.tree.map(
      np.array_equal, frames["batch_stats"]["backbone"], want["batch_stats"]
    )
  )
  bad = dict(full)
  del bad["spatial.body.1.res_layer.1.weight"]
  with pytest.raises(ValueError, match="spatial.body.1.res_layer.1.weight"):
    convert.from_reference_state_dict(bad, _config("frames"))


def test_backbone_from_full_model_or_pretrained_file(tiny_backbone):
  backbone_sd = lfan.state_dict_numpy(tiny_backbone)
  want = iresnet.iresnet_variables_from_torch(backbone_sd)
  pretrained = {"backbone." + k: v for k, v in backbone_sd.items()}
  pretrained["logits.weight"] = np.zeros((8, 512), np.float32)
  pretrained["logits.bias"] = np.zeros((8,), np.float32)
  full_model = {"spatial." + k: v for k, v in backbone_sd.items()}
  full_model["regressor.bias"] = np.zeros((2,), np.float32)
  for sd in (pretrained, full_model):
    got = convert.backbone_variables_from_reference(sd)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
  with pytest.raises(ValueError, match="No backbone keys"):
    convert.backbone_variables_from_reference({"regressor.bias": np.zeros(2)})


def test_tcn_params_from_reference_reports_unknown_keys():
  tcn = lfan.randomize_(lfan.TemporalConvNet(39, (32, 32)), seed=2)
  sd = {"temporal2." + k: v for k, v in lfan.state_dict_numpy(tcn).items()}
  params = convert.tcn_params_from_reference(sd, 39, (32, 32), "temporal2.")
  assert set(params) == {"block0", "block1"}
  with pytest.raises(
    ValueError,
    match=r"unknown keys \['temporal2\.network"
    r"\.2\.conv1\.bias'\]",
  ):
    convert.tcn_params_from_reference(
      {**sd, "temporal2.network.2.conv1.bias": np.zeros(32)},
      39,
      (32, 32),
      "temporal2.",
    )


def test_load_torch_checkpoint_round_trip(tmp_path):
  model = lfan.randomize_(lfan.LeaderFollowerNet(None), seed=3)
  path = tmp_path / "model_state_dict.pth"
  torch.save(model.state_dict(), path)
  loaded = convert.load_torch_checkpoint(path)
  want = lfan.state_dict_numpy(model)
  assert list(loaded) == list(want)  # the duplicated keys included
  for k, v in want.items():
    np.testing.assert_array_equal(loaded[k], v)
  a = convert.from_reference_state_dict(loaded, _config())
  b = convert.from_reference_state_dict(want, _config())
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_load_torch_checkpoint_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.load_torch_checkpoint(tmp_path / "nope.pth")
  corrupt = tmp_path / "corrupt.pth"
  corrupt.write_bytes(b"\x00not a checkpoint")
  with pytest.raises(
    ValueError, match="Cannot read PyTorch checkpoint .*corrupt.pth"
  ):
    convert.load_torch_checkpoint(corrupt)
  not_a_dict = tmp_path / "list.pth"
  torch.save([torch.zeros(2)], not_a_dict)
  with pytest.raises(ValueError, match="does not hold a state dict"):
    convert.load_torch_checkpoint(not_a_dict)
  good = tmp_path / "good.pth"
  torch.save({"w": torch.zeros(2)}, good)
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  with pytest.raises(ImportError, match=r"affjax\[torch\]"):
    convert.load_torch_checkpoint(good)

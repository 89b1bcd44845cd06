"""LeaderFollowerFusion: parity with the reference head, math, input checks."""

import jax
import ml_collections
import numpy as np
import pytest
import torch

from affjax import convert
from affjax.models import fusion
from tests.torch_reference import lfan


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _config(audio_features, num_outputs):
  return ml_collections.ConfigDict(
    {
      "name": "av_leader_follower",
      "input": "embeddings",
      "backbone": {"name": "ir50", "dropout": 0.4},
      "visual_channels": (128, 128, 128, 128),
      "audio_channels": (32, 32, 32, 32),
      "audio_features": audio_features,
      "kernel_size": 5,
      "dropout": 0.1,
      "fusion_dim": 32,
      "num_outputs": num_outputs,
    }
  )


@pytest.mark.parametrize(
  "audio_features,num_outputs",
  [
    ((("vggish", 128), ("mfcc", 39)), 2),
    ((("vggish", 128), ("mfcc", 39), ("egemaps", 23)), 1),
  ],
)
def test_parity_with_reference_head(audio_features, num_outputs):
  torch.manual_seed(0)
  ref = lfan.randomize_(
    lfan.LeaderFollowerNet(
      None, audio_dims=[d for _, d in audio_features], output_dim=num_outputs
    ),
    seed=3,
  )
  rng = np.random.default_rng(0)
  lead = rng.normal(size=(2, 7, 128)).astype(np.float32)
  follow = [
    rng.normal(size=(2, 7, 32)).astype(np.float32) for _ in audio_features
  ]
  with torch.no_grad():
    want = ref.fuse(
      torch.from_numpy(lead), [torch.from_numpy(f) for f in follow]
    ).numpy()
  params = convert.from_reference_state_dict(
    lfan.state_dict_numpy(ref), _config(audio_features, num_outputs)
  )["params"]
  got = fusion.LeaderFollowerFusion(num_outputs=num_outputs).apply(
    {"params": params["fusion"]}, [lead, *follow]
  )
  assert got.shape == (2, 7, num_outputs)
  assert _rel_err(got, want) < 1e-5


def _numpy_fusion(params, streams, qv_from_keys, eps=1e-5):
  """Float64 per-frame loop of the fusion head, written from the spec."""
  p = {
    k: {n: np.asarray(a, np.float64) for n, a in v.items()}
    for k, v in params.items()
  }

  def dense(name, x):
    return x @ p[name]["kernel"] + p[name]["bias"]

  b, t = streams[0].shape[:2]
  out = np.zeros((b, t, p["regressor"]["bias"].shape[0]))
  for bi in range(b):
    for ti in range(t):
      ks, qs, vs = [], [], []
      for i, s in enumerate(streams):
        h = np.asarray(s[bi, ti], np.float64)
        k = dense(f"key_{i}", h)
        src = k if (i > 0 and qv_from_keys) else h
        ks.append(k)
        qs.append(dense(f"query_{i}", src))
        vs.append(dense(f"value_{i}", src))
      k, q, v = np.stack(ks), np.stack(qs), np.stack(vs)
      s = k @ q.T / np.sqrt(k.shape[1])
      a = np.exp(s - s.max(axis=1, keepdims=True))
      a /= a.sum(axis=1, keepdims=True)
      z = a @ v + v
      z = (z - z.mean()) / np.sqrt(z.var() + eps)
      z = z * p["layer_norm"]["scale"] + p["layer_norm"]["bias"]
      joint = np.concatenate([streams[0][bi, ti], z.reshape(-1)])
      out[bi, ti] = dense("regressor", joint)
  return out


@pytest.mark.parametrize("qv_from_keys", [True, False])
def test_matches_float64_loop(qv_from_keys):
  rng = np.random.default_rng(1)
  streams = [rng.normal(size=(2, 3, w)).astype(np.float32) for w in (12, 6, 5)]
  model = fusion.LeaderFollowerFusion(
    num_outputs=2, fusion_dim=4, follower_qv_from_keys=qv_from_keys
  )
  variables = model.init(jax.random.key(0), streams)
  # Non-trivial LayerNorm affine.
  params = jax.tree.map(np.asarray, variables["params"])
  params["layer_norm"]["scale"] = rng.normal(size=(3, 4)).astype(np.float32)
  params["layer_norm"]["bias"] = rng.normal(size=(3, 4)).astype(np.float32)
  got = model.apply({"params": params}, streams)
  want = _numpy_fusion(params, streams, qv_from_keys)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  kernel_in = params["query_1"]["kernel"].shape[0]
  assert kernel_in == (4 if qv_from_keys else 6)


def test_mapping_input_uses_stream_names_order():
  rng = np.random.default_rng(2)
  lead = rng.normal(size=(1, 4, 8)).astype(np.float32)
  a = rng.normal(size=(1, 4, 3)).astype(np.float32)
  b = rng.normal(size=(1, 4, 5)).astype(np.float32)
  seq_model = fusion.LeaderFollowerFusion(num_outputs=1, fusion_dim=4)
  variables = seq_model.init(jax.random.key(0), [lead, b, a])
  map_model = fusion.LeaderFollowerFusion(
    num_outputs=1, fusion_dim=4, stream_names=("visual", "zz", "aa")
  )
  got = map_model.apply(variables, {"aa": a, "zz": b, "visual": lead})
  np.testing.assert_array_equal(got, seq_model.apply(variables, [lead, b, a]))
  with pytest.raises(ValueError, match="no stream_names"):
    seq_model.apply(variables, {"visual": lead, "zz": b, "aa": a})
  with pytest.raises(ValueError, match=r"Missing fusion streams \['aa'\]"):
    map_model.apply(variables, {"visual": lead, "zz": b})


def test_rejects_mismatched_streams():
  model = fusion.LeaderFollowerFusion()
  with pytest.raises(ValueError, match="Stream 1 has shape"):
    model.init(jax.random.key(0), [np.zeros((2, 5, 8)), np.zeros((2, 4, 3))])
  with pytest.raises(ValueError, match="leader and >= 1 follower"):
    model.init(jax.random.key(0), [np.zeros((2, 5, 8))])

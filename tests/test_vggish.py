"""Tests for the Flax VGGish, its converters, PCA postprocessing and the
log-mel front end (affjax.models.vggish, affjax.data.preprocess.vggish_input).
"""

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn

from affjax.data.preprocess import vggish_input
from affjax.models import vggish

TINY_CONV = (4, 8, 8, 8, 8, 8)
TINY_FC = (16, 16)


class TorchVGGish(tnn.Module):
  """PyTorch transcription of the torchvggish `VGG` layout (any widths)."""

  def __init__(
    self, conv=(64, 128, 256, 256, 512, 512), fc=(4096, 4096), final_relu=True
  ):
    super().__init__()
    layers, c_in = [], 1
    # Pools after conv1, conv2, conv3_2 and conv4_2, as in the port.
    for i, c_out in enumerate(conv):
      layers += [tnn.Conv2d(c_in, c_out, 3, padding=1), tnn.ReLU()]
      if i in (0, 1, 3, 5):
        layers.append(tnn.MaxPool2d(2, 2))
      c_in = c_out
    self.features = tnn.Sequential(*layers)
    emb = [
      tnn.Linear(c_in * 6 * 4, fc[0]),
      tnn.ReLU(),
      tnn.Linear(fc[0], fc[1]),
      tnn.ReLU(),
      tnn.Linear(fc[1], 128),
    ]
    if final_relu:
      emb.append(tnn.ReLU())
    self.embeddings = tnn.Sequential(*emb)

  def forward(self, x):  # x: [N, 1, 96, 64]
    x = self.features(x)
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC flatten.
    return self.embeddings(x)


def _torch_model(seed=0, final_relu=True, conv=TINY_CONV, fc=TINY_FC):
  torch.manual_seed(seed)
  model = TorchVGGish(conv, fc, final_relu).eval()
  with torch.no_grad():  # Non-zero biases so bias mapping is exercised.
    for p in model.parameters():
      if p.ndim == 1:
        p.uniform_(-0.1, 0.1)
  return model


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(0, 2, (n, 96, 64)).astype(np.float32)


def _torch_embed(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x)[:, None]).numpy()


def _rel_err(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("final_relu", [True, False])
def test_torch_state_dict_parity(final_relu):
  model = _torch_model(final_relu=final_relu)
  x = _examples(3)
  expected = _torch_embed(model, x)
  params = vggish.params_from_torch_state_dict(model.state_dict())
  flax_model = vggish.module_from_params(params, final_relu=final_relu)
  assert flax_model.conv_widths == TINY_CONV
  got = np.asarray(
    flax_model.apply({"params": params}, x[..., None], train=False)
  )
  assert got.shape == (3, 128)
  assert _rel_err(got, expected) < 1e-5
  if not final_relu:
    assert (got < 0).any()  # TF embedding: no ReLU on fc2.
  emb = vggish.embed(x, params, batch_size=2, final_relu=final_relu)
  assert _rel_err(emb, expected) < 1e-5


def test_full_size_architecture_parity():
  # Public sizes: checks the 6x4x512 = 12288 flatten with real widths.
  model = _torch_model(
    seed=1, conv=(64, 128, 256, 256, 512, 512), fc=(4096, 4096)
  )
  assert model.embeddings[0].in_features == 12288
  x = _examples(1, seed=1)
  expected = _torch_embed(model, x)
  params = vggish.params_from_torch_state_dict(model.state_dict())
  got = vggish.embed(x, params, final_relu=True)
  assert _rel_err(got, expected) < 1e-5
  shapes = {k: v["kernel"].shape for k, v in vggish.init_params(0).items()}
  assert shapes == {k: v["kernel"].shape for k, v in params.items()}


def _tf_variables(state_dict):
  scopes = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3/conv3_1",
    "features.8": "conv3/conv3_2",
    "features.11": "conv4/conv4_1",
    "features.13": "conv4/conv4_2",
    "embeddings.0": "fc1/fc1_1",
    "embeddings.2": "fc1/fc1_2",
    "embeddings.4": "fc2",
  }
  out = {"global_step": np.array(7)}
  for tkey, scope in scopes.items():
    w = state_dict[f"{tkey}.weight"].numpy()
    w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    out[f"vggish/{scope}/weights"] = w
    out[f"vggish/{scope}/biases"] = state_dict[f"{tkey}.bias"].numpy()
  return out


def test_tf_variables_parity():
  model = _torch_model(seed=2, final_relu=False)
  x = _examples(2, seed=2)
  expected = _torch_embed(model, x)
  params = vggish.params_from_tf_variables(_tf_variables(model.state_dict()))
  assert _rel_err(vggish.embed(x, params), expected) < 1e-5


def test_tf_checkpoint_file(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  model = _torch_model(seed=3, final_relu=False)
  variables = _tf_variables(model.state_dict())
  del variables["global_step"]
  graph = tf.Graph()
  with graph.as_default():
    tf_vars = [tf.compat.v1.Variable(v, name=k) for k, v in variables.items()]
    # The public vggish_model.ckpt is a V1 (single-file) checkpoint.
    saver = tf.compat.v1.train.Saver(
      tf_vars, write_version=tf.compat.v1.train.SaverDef.V1
    )
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      path = saver.save(sess, str(tmp_path / "vggish_model.ckpt"))
  params = vggish.load_tf_checkpoint(path)
  x = _examples(2, seed=3)
  assert _rel_err(vggish.embed(x, params), _torch_embed(model, x)) < 1e-5
  with pytest.raises(ValueError, match="nothing.ckpt"):
    vggish.load_tf_checkpoint(str(tmp_path / "nothing.ckpt"))


def test_load_params_by_file_kind(tmp_path):
  model = _torch_model(seed=4, final_relu=False)
  path = tmp_path / "vggish-tiny.pth"
  torch.save(model.state_dict(), path)
  x = _examples(2, seed=4)
  params = vggish.load_params(path)
  assert _rel_err(vggish.embed(x, params), _torch_embed(model, x)) < 1e-5
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    vggish.load_params(tmp_path / "absent.pth")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth"):
    vggish.load_params(junk)
  rng = np.random.default_rng(0)
  eig, means = rng.normal(size=(128, 128)), rng.normal(size=(128, 1))
  np.savez(tmp_path / "pca.npz", pca_eigen_vectors=eig, pca_means=means)
  got_eig, got_means = vggish.load_pca_params(tmp_path / "pca.npz")
  np.testing.assert_allclose(got_eig, eig, rtol=1e-6)
  assert got_means.shape == (128,)
  np.savez(tmp_path / "bad.npz", pca_means=means)
  with pytest.raises(KeyError, match="pca_eigen_vectors"):
    vggish.load_pca_params(tmp_path / "bad.npz")


def test_converter_key_and_shape_errors():
  sd = dict(_torch_model().state_dict())
  missing = dict(sd)
  del missing["features.8.weight"]
  with pytest.raises(KeyError, match="features.8.weight"):
    vggish.params_from_torch_state_dict(missing)
  extra = dict(sd, **{"features.99.weight": torch.zeros(1)})
  with pytest.raises(ValueError, match="features.99.weight"):
    vggish.params_from_torch_state_dict(extra)
  vggish.params_from_torch_state_dict(extra, strict=False)
  # PCA tensors next to the model are accepted; a prefix is honoured.
  prefixed = {f"vggish.{k}": v for k, v in sd.items()}
  prefixed["pproc.pca_means"] = torch.zeros(128, 1)
  vggish.params_from_torch_state_dict(prefixed, prefix="vggish.")
  bad = dict(sd, **{"embeddings.2.weight": torch.zeros(16, 15)})
  with pytest.raises(ValueError, match="fc1_2/kernel"):
    vggish.params_from_torch_state_dict(bad)
  tf_vars = _tf_variables(sd)
  del tf_vars["vggish/conv4/conv4_1/biases"]
  with pytest.raises(KeyError, match="vggish/conv4/conv4_1/biases"):
    vggish.params_from_tf_variables(tf_vars)
  with pytest.raises(ValueError, match=r"\[N, 96, 64"):
    vggish.embed(
      np.zeros((2, 95, 64), np.float32), vggish.init_params(0, tiny=True)
    )


def test_postprocess_matches_hand_computation():
  rng = np.random.default_rng(0)
  emb = rng.normal(0, 1, (5, 128)).astype(np.float32)
  eig = rng.normal(0, 0.5, (128, 128)).astype(np.float32)
  means = rng.normal(0, 0.1, (128, 1)).astype(np.float32)
  whitened = (eig @ (emb.T - means)).T
  clipped = np.clip(whitened, -2, 2)
  np.testing.assert_allclose(
    vggish.postprocess(emb, eig, means, quantize=False),
    clipped,
    rtol=1e-5,
    atol=1e-5,
  )
  q = np.asarray(jax.jit(vggish.postprocess)(emb, eig, means))
  assert q.dtype == np.uint8
  expected = np.floor((clipped - -2.0) * 255.0 / 4.0)
  # float32 rounding may move values sitting on an integer by one step.
  assert np.abs(q.astype(int) - expected).max() <= 1
  assert (q == expected).mean() > 0.99
  assert q.min() == 0 and q.max() == 255  # Clipping reached both ends.


def test_default_params_are_fixed():
  a = vggish.init_params(5, tiny=True)
  b = vggish.init_params(5, tiny=True)
  c = vggish.init_params(6, tiny=True)
  np.testing.assert_array_equal(a["fc2"]["kernel"], b["fc2"]["kernel"])
  assert not np.array_equal(a["fc2"]["kernel"], c["fc2"]["kernel"])
  std = a["fc1_1"]["kernel"].std()
  assert abs(std - 1 / np.sqrt(6 * 4 * 8)) < 0.01


# ----------------------------- front end -----------------------------------


def test_periodic_hann_and_htk_mel():
  np.testing.assert_allclose(
    vggish_input.periodic_hann(400), np.hanning(401)[:-1], atol=1e-12
  )
  np.testing.assert_allclose(
    vggish_input.hertz_to_mel(1000.0), 1127 * np.log(1 + 1000 / 700)
  )
  m = vggish_input.mel_matrix()
  assert m.shape == (257, 64)
  assert (m[0] == 0).all() and (m >= 0).all() and m.max() <= 1
  # Band b peaks at the FFT bin nearest its centre frequency.
  mel_lo, mel_hi = vggish_input.hertz_to_mel([125.0, 7500.0])
  centres_mel = np.linspace(mel_lo, mel_hi, 66)[1:-1]
  centres_hz = 700 * (np.exp(centres_mel / 1127) - 1)
  bins_hz = np.arange(257) * 8000 / 256
  for b in (0, 20, 63):
    assert abs(bins_hz[np.argmax(m[:, b])] - centres_hz[b]) <= 31.25 / 2 + 1e-9


def _loop_log_mel(wave):
  """Independent log-mel: explicit loops, DFT by matrix, own mel weights."""
  n, hop, nfft = 400, 160, 512
  window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / n) for i in range(n)])
  k = np.arange(257)[:, None]
  dft = np.exp(-2j * np.pi * k * np.arange(n)[None] / nfft)
  hz_to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  edges = np.linspace(hz_to_mel(125.0), hz_to_mel(7500.0), 66)
  fb = np.zeros((257, 64))
  for b in range(64):
    for j in range(1, 257):
      mj = hz_to_mel(j * 8000.0 / 256)
      up = (mj - edges[b]) / (edges[b + 1] - edges[b])
      down = (edges[b + 2] - mj) / (edges[b + 2] - edges[b + 1])
      fb[j, b] = max(0.0, min(up, down))
  rows = []
  for f in range(1 + (len(wave) - n) // hop):
    mag = np.abs(dft @ (wave[f * hop : f * hop + n] * window))
    rows.append(np.log(mag @ fb + 0.01))
  return np.array(rows)


def test_log_mel_matches_loop_implementation():
  rng = np.random.default_rng(0)
  wave = rng.uniform(-0.5, 0.5, 16000 // 4)
  got = vggish_input.log_mel_spectrogram(wave)
  np.testing.assert_allclose(got, _loop_log_mel(wave), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_pure_tone_peaks_in_its_mel_band(freq):
  t = np.arange(16000) / 16000
  wave = 0.5 * np.sin(2 * np.pi * freq * t)
  ex = vggish_input.waveform_to_examples(wave, 16000)
  assert ex.shape == (1, 96, 64) and ex.dtype == np.float32
  mel_lo, mel_hi = vggish_input.hertz_to_mel([125.0, 7500.0])
  centres = np.linspace(mel_lo, mel_hi, 66)[1:-1]
  nearest = np.argmin(np.abs(centres - vggish_input.hertz_to_mel(freq)))
  assert abs(int(np.argmax(ex[0].mean(axis=0))) - nearest) <= 1


@pytest.mark.parametrize(
  "seconds,hop,expected",
  [
    (1.0, 0.96, 1),  # 98 frames.
    (10.0, 0.96, 10),  # 998 frames: 1 + 902 // 96.
    (10.0, 1 / 25, 226),  # hop 4 frames: 1 + 902 // 4.
    (10.0, 1 / 30, 271),  # hop 3.33 frames: 1 + floor(902 / 3.333).
    (0.5, 0.96, 0),  # Shorter than one example.
  ],
)
def test_example_counts(seconds, hop, expected):
  wave = np.zeros(round(seconds * 16000), np.float32)
  ex = vggish_input.waveform_to_examples(wave, 16000, hop_seconds=hop)
  assert ex.shape == (expected, 96, 64)


def test_fractional_hop_starts_and_errors():
  rng = np.random.default_rng(1)
  wave = rng.normal(0, 0.1, 3 * 16000)
  log_mel = vggish_input.log_mel_spectrogram(wave)
  ex = vggish_input.waveform_to_examples(wave, 16000, hop_seconds=1 / 30)
  for k in (0, 1, 2, 3, 10, len(ex) - 1):
    start = round(k * (100 / 30))  # Half-to-even, as the reference.
    np.testing.assert_allclose(ex[k], log_mel[start : start + 96], rtol=1e-6)
  stereo = np.stack([wave, wave], axis=1)
  np.testing.assert_allclose(
    vggish_input.waveform_to_examples(stereo, 16000),
    vggish_input.waveform_to_examples(wave, 16000),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="16000 Hz"):
    vggish_input.waveform_to_examples(wave, 44100)
  with pytest.raises(ValueError, match="hop_frames"):
    vggish_input.frame_examples(log_mel, 0.0)

"""Tests for affjax.embed: per-frame equality, packing, resume, atomicity."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from affjax import embed
from tests.torch_reference import iresnet as torch_iresnet

LENGTHS = {"a_trial": 11, "b_empty": 0, "c_trial": 3, "d_trial": 20}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A frame's embedding does not depend on the other frames of its batch, but
# XLA:CPU may sum in another order when the batch is laid out differently
# (other neighbours, other position): a few float32 ulps of the unit-norm
# output (3e-8 seen). The tolerance is ~17 ulps of 1 (eps = 1.2e-7) with a
# relative term for the largest elements.
BATCHING_TOL = {"rtol": 1e-5, "atol": 2e-6}


def _frames(length, seed):
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (length, 48, 48, 3), dtype=np.uint8)
  if length > 2:
    frames[1] = 0  # a missing-face frame, as the cache stores it
  return frames


def _make_cache(root):
  for i, (name, length) in enumerate(LENGTHS.items()):
    d = os.path.join(root, "trials", name)
    os.makedirs(d)
    np.save(os.path.join(d, "frames.npy"), _frames(length, i))
    with open(os.path.join(d, "meta.json"), "w") as f:
      json.dump({"trial": name, "n_frames": length}, f)
  os.makedirs(os.path.join(root, "trials", ".tmp-e_unfinished-x"))
  return root


def _load(root, name):
  return np.load(os.path.join(root, "trials", name, "frames.npy"))


@pytest.fixture(scope="module")
def plain():
  """IRTiny as `--backbone=tiny --seed=3` initialises it."""
  return embed.load_backbone("tiny", seed=3)


@pytest.fixture(scope="module")
def embed_fn(plain):
  return embed.make_embed_fn(*plain)


@pytest.fixture(scope="module")
def tiny(plain):
  """IRTiny with non-trivial BatchNorm statistics (eval mode matters)."""
  backbone, variables = plain
  rng = np.random.default_rng(0)
  stats = jax.tree.map(
    lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, a.shape).astype(np.float32),
    variables["batch_stats"],
  )
  return backbone, dict(variables, batch_stats=stats)


def _reference(tiny, frames):
  """Backbone on each frame alone, numpy crop/normalisation."""
  backbone, variables = tiny
  apply = jax.jit(lambda v, x: backbone.apply(v, x, train=False))
  x = frames[:, 4:44, 4:44, :].astype(np.float32) / 255.0 * 2.0 - 1.0
  return (
    np.concatenate(
      [np.asarray(apply(variables, x[i : i + 1])) for i in range(len(x))]
    )
    if len(x)
    else np.zeros((0, 512), np.float32)
  )


def test_embed_cache_equals_backbone_per_frame(tmp_path, tiny):
  root = _make_cache(str(tmp_path))
  settings = embed.embedding_settings("tiny", seed=3)
  summary = embed.embed_cache(
    root, embed.make_embed_fn(*tiny), settings, batch_size=8
  )
  assert summary["embedded"] == sorted(LENGTHS)
  assert summary["frames"] == sum(LENGTHS.values())
  for name, length in LENGTHS.items():
    d = os.path.join(root, "trials", name)
    got = np.load(os.path.join(d, "embeddings.npy"))
    assert got.dtype == np.float32 and got.shape == (length, 512)
    np.testing.assert_allclose(
      got, _reference(tiny, _load(root, name)), **BATCHING_TOL
    )
    if length:
      np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    with open(os.path.join(d, "embeddings.json")) as f:
      info = json.load(f)
    assert info["n_frames"] == length
    assert info["backbone"] == "tiny" and info["seed"] == 3
    assert sorted(os.listdir(d)) == [
      "embeddings.json",
      "embeddings.npy",
      "frames.npy",
      "meta.json",
    ]


def test_embed_frames_packs_trials_into_fixed_batches():
  calls = []

  def fake(batch):
    calls.append(batch.shape)
    # Row r -> [mean pixel of r] * 512: tells frames apart, cheap.
    return np.repeat(
      batch.reshape(len(batch), -1).mean(1, keepdims=True), 512, axis=1
    )

  trials = [(n, _frames(t, i)) for i, (n, t) in enumerate(LENGTHS.items())]
  out = list(embed.embed_frames(fake, trials, batch_size=8))
  assert [n for n, _ in out] == list(LENGTHS)
  assert calls == [(8, 48, 48, 3)] * 5  # 34 frames -> 5 calls of 8
  for (name, frames), (_, emb) in zip(trials, out):
    want = frames.reshape(len(frames), 48 * 48 * 3).mean(1)
    np.testing.assert_allclose(emb[:, 0], want, rtol=1e-6)
    assert emb.shape == (len(frames), 512)
  with pytest.raises(ValueError, match="'x' given twice"):
    list(embed.embed_frames(fake, [("x", trials[0][1])] * 2, 8))


def test_resume_after_crash_skips_finished_trials(tmp_path, embed_fn):
  root = _make_cache(str(tmp_path))
  settings = embed.embedding_settings("tiny", seed=3)
  calls = []

  def crashing(batch):
    calls.append(1)
    if len(calls) == 4:  # dies with d_trial half done
      raise KeyboardInterrupt
    return embed_fn(batch)

  with pytest.raises(KeyboardInterrupt):
    embed.embed_cache(root, crashing, settings, batch_size=8)
  done = {
    n
    for n in LENGTHS
    if embed.read_info(os.path.join(root, "trials", n)) is not None
  }
  assert done == {"a_trial", "b_empty", "c_trial"}
  d = os.path.join(root, "trials", "d_trial")
  assert not [n for n in os.listdir(d) if "embeddings" in n]
  before = os.stat(os.path.join(root, "trials", "a_trial", "embeddings.npy"))

  summary = embed.embed_cache(root, embed_fn, settings, batch_size=8)
  assert summary["embedded"] == ["d_trial"]
  assert summary["skipped"] == ["a_trial", "b_empty", "c_trial"]
  after = os.stat(os.path.join(root, "trials", "a_trial", "embeddings.npy"))
  assert after.st_mtime_ns == before.st_mtime_ns
  clean = _make_cache(str(tmp_path / "clean"))
  embed.embed_cache(clean, embed_fn, settings, batch_size=8)
  for name in LENGTHS:
    got, want = (
      np.load(os.path.join(d, "trials", name, "embeddings.npy"))
      for d in (root, clean)
    )
    if name == "d_trial":
      # Resumed alone, its frames sit in other batches and rows than in the
      # uninterrupted run (which packs them after a_trial and c_trial).
      np.testing.assert_allclose(got, want, **BATCHING_TOL)
    else:
      # Written before the crash from the same batches as the clean run:
      # the same computation, so the same bits.
      np.testing.assert_array_equal(got, want, err_msg=name)
  assert embed.check_embeddings(root, sorted(LENGTHS))["backbone"] == "tiny"


def test_writes_are_atomic(tmp_path, embed_fn, monkeypatch):
  root = _make_cache(str(tmp_path))
  d = os.path.join(root, "trials", "c_trial")
  settings = embed.embedding_settings("tiny", seed=3)
  real_save = np.save

  def broken_save(f, arr):
    f.write(b"\x93NUMPY partial")
    raise OSError("disk full")

  monkeypatch.setattr(np, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    embed.write_embeddings(d, np.zeros((3, 512), np.float32), settings)
  assert sorted(os.listdir(d)) == ["frames.npy", "meta.json"]
  monkeypatch.setattr(np, "save", real_save)

  # Embeddings without their JSON (killed between the two renames) and a
  # stray temporary count as unfinished and are replaced / removed.
  np.save(os.path.join(d, "embeddings.npy"), np.ones((3, 512), np.float32))
  open(os.path.join(d, ".tmp-abc.npy"), "wb").close()
  summary = embed.embed_cache(
    root, embed_fn, settings, batch_size=8, trials=["c_trial"]
  )
  assert summary["embedded"] == ["c_trial"]
  assert sorted(os.listdir(d)) == [
    "embeddings.json",
    "embeddings.npy",
    "frames.npy",
    "meta.json",
  ]
  assert np.load(os.path.join(d, "embeddings.npy"))[0, 0] != 1.0
  with pytest.raises(ValueError, match=r"must be \[T, 512\]"):
    embed.write_embeddings(d, np.zeros((3, 4), np.float32), settings)


def test_other_settings_refused_unless_overwrite(tmp_path, embed_fn):
  root = _make_cache(str(tmp_path))
  embed.embed_cache(
    root,
    embed_fn,
    embed.embedding_settings("tiny", seed=3),
    batch_size=8,
    trials=["a_trial", "c_trial"],
  )
  other = embed.embedding_settings("tiny", seed=4)
  with pytest.raises(ValueError, match="seed: found 3, wanted 4"):
    embed.embed_cache(root, embed_fn, other, batch_size=8)
  summary = embed.embed_cache(
    root,
    embed_fn,
    other,
    batch_size=8,
    overwrite=True,
    trials=["a_trial", "c_trial"],
  )
  assert summary["embedded"] == ["a_trial", "c_trial"]
  with pytest.raises(FileNotFoundError, match="d_trial"):
    embed.check_embeddings(root, ["a_trial", "d_trial"])
  embed.embed_cache(
    root,
    embed_fn,
    embed.embedding_settings("tiny", seed=3),
    batch_size=8,
    trials=["d_trial"],
  )
  with pytest.raises(ValueError, match="different settings"):
    embed.check_embeddings(root, ["a_trial", "d_trial"])
  with pytest.raises(FileNotFoundError, match="not a feature cache"):
    embed.embed_cache(str(tmp_path / "nothing"), embed_fn, other)


def test_torch_checkpoint_matches_reference_backbone(tmp_path):
  net = torch_iresnet.Backbone(
    stage_channels=(16, 32, 64, 128), stage_units=(1, 1, 1, 1)
  )
  net = torch_iresnet.randomize_(net, seed=1).eval()
  path = str(tmp_path / "res50.pth")
  res50 = torch_iresnet.Res50(
    stage_channels=(16, 32, 64, 128), stage_units=(1, 1, 1, 1)
  )
  res50.backbone.load_state_dict(net.state_dict())
  torch.save(res50.state_dict(), path)

  backbone, variables = embed.load_backbone("tiny", path)
  frames = _frames(6, 9)
  got = np.asarray(embed.make_embed_fn(backbone, variables)(frames))
  x = frames[:, 4:44, 4:44].astype(np.float32) / 255.0 * 2.0 - 1.0
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  settings = embed.embedding_settings("tiny", checkpoint=path)
  assert len(settings["checkpoint_sha256"]) == 64 and settings["seed"] == 0
  with pytest.raises(ValueError, match="does not hold a 'ir50' backbone"):
    embed.load_backbone("ir50", path)
  with pytest.raises(ValueError, match="backbone must be one of"):
    embed.load_backbone("r18")


def test_cli_embeds_a_cache(tmp_path, embed_fn):
  root = _make_cache(str(tmp_path))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "affjax.embed",
      f"--cache={root}",
      "--backbone=tiny",
      "--batch_size=16",
      "--seed=3",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "4 trials embedded (34 frames" in result.stdout
  info = embed.check_embeddings(root, sorted(LENGTHS))
  assert info["backbone"] == "tiny" and info["seed"] == 3
  # Same weights as load_backbone('tiny', seed=3) -> same numbers.
  frames = np.zeros((8, 48, 48, 3), np.uint8)
  frames[:3] = _load(root, "c_trial")
  np.testing.assert_allclose(
    np.load(os.path.join(root, "trials", "c_trial", "embeddings.npy")),
    np.asarray(embed_fn(frames))[:3],
    **BATCHING_TOL,
  )


def test_full_model_layout_loads_as_backbone_checkpoint(tmp_path):
  """A full reference model (`spatial.*`) works as model.backbone_checkpoint,
  giving the same backbone as the bare backbone file."""
  from affjax import sharding, train_state
  from configs import test as test_config

  net = torch_iresnet.Backbone(
    stage_channels=(16, 32, 64, 128), stage_units=(1, 1, 1, 1)
  )
  net = torch_iresnet.randomize_(net, seed=2).eval()
  bare = str(tmp_path / "bare.pth")
  full = str(tmp_path / "full.pth")
  torch.save(net.state_dict(), bare)
  torch.save(
    {
      **{f"spatial.{k}": v for k, v in net.state_dict().items()},
      "regressor.weight": torch.zeros(2, 4),  # other parts: ignored
    },
    full,
  )
  config = test_config.get_config()
  mesh = sharding.make_mesh([("data", -1)])
  setup = train_state.build_setup(config, mesh)
  state = train_state.init_state(setup, jax.random.key(0))
  from_full = train_state.load_backbone_checkpoint(state, full)
  from_bare = train_state.load_backbone_checkpoint(state, bare)
  for collection in ("params", "batch_stats"):
    a = getattr(from_full, collection)["backbone"]
    b = getattr(from_bare, collection)["backbone"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
  conv = from_full.params["backbone"]
  assert not all(
    np.array_equal(x, y)
    for x, y in zip(
      jax.tree.leaves(conv), jax.tree.leaves(state.params["backbone"])
    )
  )

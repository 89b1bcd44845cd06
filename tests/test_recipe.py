"""The paper config's recipe switch and its guard against random weights.

`configs/lfan.py` defaults to the reference's recipe (docs/fidelity.md),
`:improved` to affjax's; a cache built by the preprocessing CLI with the
paper's flags is accepted by the paper config; without pretrained weights
the paper config stops at once, naming the key (the `allow_random_*`
overrides let a cheap smoke run through, end to end on the synthetic raw
layout).
"""

import json
import os
import subprocess
import sys
import time

import pytest
from reliability_helpers import child_env

from affjax import required_weights, train_state
from affjax.data import prepare, synthetic
from affjax.data.preprocess import __main__ as preprocess_cli
from affjax.data.preprocess import cache
from configs import common, lfan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lfan_defaults_to_the_reference_recipe():
  c = lfan.get_config(None)
  assert c.data.preprocess.vggish_hop_seconds is None  # one per frame
  assert c.data.unlabelled_frames == "drop"
  assert c.data.audio_stats == "per_partition"
  assert c.data.window_order == "once"
  assert c.data.padding_in_loss is True
  assert c.train.loss_weights == ()
  assert not c.data.allow_random_vggish
  assert not c.model.allow_random_backbone
  improved = lfan.get_config("improved")
  assert improved.data.preprocess.vggish_hop_seconds == 0.48
  assert improved.data.unlabelled_frames == "mask"
  assert improved.data.audio_stats == "train"
  assert improved.data.window_order == "every_epoch"
  assert improved.data.padding_in_loss is False
  # The base schema (other configs) keeps affjax's choices.
  assert common.base_config().data.window_order == "every_epoch"
  lead = lfan.get_config("lead=arousal")
  assert lead.data.emotions == ("valence", "arousal")
  assert lead.train.loss_weights == (1.0, 10.0)
  assert lead.train.select_by == "arousal"
  results = {
    "ccc_mean": 0.5,
    "overall": {"valence": {"ccc": 0.2}, "arousal": {"ccc": 0.8}},
  }
  assert train_state.selection_score(lead, results) == 0.8
  assert train_state.selection_score(c, results) == 0.5
  train_state.check_model_config(lead)
  bad = lfan.get_config(None)
  bad.train.select_by = "arousal"  # not trained
  with pytest.raises(ValueError, match="config.train.select_by"):
    train_state.check_model_config(bad)
  bad = lfan.get_config(None)
  bad.train.loss_weights = (1.0, 2.0)
  with pytest.raises(ValueError, match="one weight per emotion"):
    train_state.check_model_config(bad)
  with pytest.raises(ValueError, match="lead"):
    lfan.get_config("lead=both")


def test_cache_built_by_the_cli_is_accepted_by_the_paper_config(tmp_path):
  """The CLI's `--vggish_hop_seconds=none --vggish_checkpoint=X` and the
  config's `data.preprocess` name the same settings: no mismatch."""
  ckpt = str(tmp_path / "vggish_model.ckpt")
  args = preprocess_cli._parser().parse_args(
    [
      "--raw=r",
      "--out=o",
      "--vggish_hop_seconds=none",
      f"--vggish_checkpoint={ckpt}",
    ]
  )
  cli = cache.PreprocessSettings(
    **{f: getattr(args, f) for f in cache.PreprocessSettings().to_dict()}
  )
  c = lfan.get_config(None)
  c.data.preprocess.vggish_checkpoint = ckpt
  _, settings, run = prepare._split_options(c.data)
  assert cache.PreprocessSettings(**settings) == cli
  assert run == {"num_workers": 1, "test_list": None}
  out = str(tmp_path / "cache")
  os.makedirs(out)
  cache.atomic_write_json(
    os.path.join(out, cache.MANIFEST),
    {"version": cache.VERSION, "settings": cli.to_dict(), "trials": {}},
  )
  cache.open_manifest(out, cache.PreprocessSettings(**settings))
  c.data.preprocess.vggish_hop_seconds = 0.48
  _, other, _ = prepare._split_options(c.data)
  with pytest.raises(ValueError, match="vggish_hop_seconds"):
    cache.open_manifest(out, cache.PreprocessSettings(**other))


def test_paper_config_without_weights_is_refused(tmp_path):
  work = str(tmp_path / "w")
  c = lfan.get_config(None)
  with pytest.raises(
    ValueError,
    match=r"config.model.backbone_checkpoint.*res50_ir_0.887.pth.*drive.google",
  ):
    required_weights.check(c, work)
  c.model.allow_random_backbone = True
  with pytest.raises(
    ValueError,
    match=r"preprocess.vggish_checkpoint.*vggish_model.ckpt.*googleapis",
  ):
    required_weights.check(c, work)
  c.data.allow_random_vggish = True
  required_weights.check(c, work)
  # Given files must exist.
  c.data.preprocess.vggish_checkpoint = str(tmp_path / "none.ckpt")
  with pytest.raises(ValueError, match="none.ckpt' does not exist"):
    required_weights.check(c, work)
  # An imported sucv/ABAW2 cache carries its VGGish features.
  c.data.preprocess.vggish_checkpoint = ""
  c.data.allow_random_vggish = False
  c.data.cache_dir = str(tmp_path / "imported")
  os.makedirs(c.data.cache_dir)
  with open(os.path.join(c.data.cache_dir, "manifest.json"), "w") as f:
    json.dump({"settings": {required_weights.IMPORTED_KEY: "x"}}, f)
  required_weights.check(c, work)
  # Models without a backbone need no backbone weights.
  c.model.allow_random_backbone = False
  c.model.input = "embeddings"
  required_weights.check(c, work)


def _main(*overrides, workdir, timeout):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "affjax.main",
      "--config=configs/lfan.py",
      f"--workdir={workdir}",
      *overrides,
    ],
    cwd=ROOT,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


# Shrinks the paper config to seconds of CPU work (the recipe stays).
_SMALL = (
  "--config.data.preprocess.vggish_model=tiny",
  "--config.model.backbone.name=tiny",
  "--config.model.visual_channels=(8,8)",
  "--config.model.audio_channels=(4,4)",
  "--config.model.kernel_size=3",
  "--config.model.fusion_dim=4",
  "--config.data.window_length=16",
  "--config.data.hop_length=16",
  "--config.train.max_epochs=1",
  "--config.train.log_every_steps=1",
  "--config.eval.after_training=false",
  "--config.eval.plots=false",
)


def test_main_stops_at_once_then_runs_with_the_overrides(tmp_path):
  raw = str(tmp_path / "raw")
  settings = dict(common.test_synthetic())
  settings.pop("vggish_model")  # a preprocessing setting
  synthetic.generate(raw, **settings)
  start = time.time()
  out = _main(
    f"--config.data.raw_dir={raw}", workdir=tmp_path / "w0", timeout=300
  )
  assert out.returncode != 0
  assert "config.model.backbone_checkpoint is empty" in out.stderr
  # Seconds on an idle machine (mostly importing TF and JAX); the bound
  # leaves room for a loaded CI host.
  assert time.time() - start < 150
  assert not os.path.exists(tmp_path / "w0" / "data")  # no work done
  out = _main(
    f"--config.data.raw_dir={raw}",
    "--config.model.allow_random_backbone=true",
    "--config.data.allow_random_vggish=true",
    *_SMALL,
    workdir=tmp_path / "w2",
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Training done" in out.stderr
  manifest = cache.read_json(
    str(tmp_path / "w2" / "data" / "cache" / cache.MANIFEST)
  )
  assert manifest["settings"]["vggish_hop_seconds"] is None

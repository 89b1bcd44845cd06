"""Every config builds, variants parse, overrides are checked, models fit."""

import glob
import importlib
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from affjax import optim, sharding, train_state
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
  if not p.endswith(("common.py", "__init__.py"))
)
# (config, arg) pairs covering every variant flag at least once.
VARIANTS = [(name, None) for name in CONFIGS] + [
  ("lfan", "arousal,fold=3"),
  ("lfan", "both"),
  ("visual_only", "valence,fold=5"),
  ("cached_embeddings", "synthetic"),
  ("demo", "visual_only"),
  ("test", "visual_only"),
]


def _load(name):
  return importlib.import_module(f"configs.{name}")


def test_every_config_file_is_covered():
  assert set(CONFIGS) == {
    "demo",
    "lfan",
    "visual_only",
    "cached_embeddings",
    "test",
  }


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_config_builds_locked_with_the_common_schema(name, arg):
  config = _load(name).get_config(arg)
  assert config.is_locked
  base = common.base_config()
  flat = set(traverse_util.flatten_dict(config.to_dict(), sep="."))
  base_flat = set(traverse_util.flatten_dict(base.to_dict(), sep="."))
  # Same keys as the schema (data.synthetic holds generator settings).
  assert {k for k in flat if not k.startswith("data.synthetic")} == {
    k for k in base_flat if not k.startswith("data.synthetic")
  }
  train_state.check_model_config(config)
  with pytest.raises(AttributeError):
    config.train.not_a_key = 1


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_model_and_optimizer_groups_build(name, arg):
  """Abstract init only (no compute): shapes, groups and release regexes."""
  config = _load(name).get_config(arg)
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  batch = train_state.dummy_batch(config, 2)
  out = jax.eval_shape(
    lambda s, b: setup.model.apply(s.variables(), b, train=False),
    setup.abstract_state,
    batch,
  )
  assert out.shape == (2, config.data.window_length, len(config.data.emotions))
  labels = set(jax.tree.leaves(setup.labels))
  if config.optim.frozen:
    # The paper's IR-50 groups: output layer, body 21-23, body 18-20.
    assert labels == {"head", "frozen", "release_0", "release_1", "release_2"}
  else:
    assert labels == {"head"}


def test_lfan_variants_and_sweep():
  c = _load("lfan").get_config("arousal,fold=3")
  assert c.data.emotions == ("arousal",) and c.model.num_outputs == 1
  assert c.data.fold == 3
  # Paper settings.
  assert (
    c.optim.learning_rate,
    c.optim.weight_decay,
    c.train.batch_size,
    c.optim.patience,
    c.optim.factor,
    c.optim.min_learning_rate,
    c.train.early_stopping,
    c.train.max_epochs,
  ) == (1e-5, 1e-3, 8, 5, 0.1, 1e-6, 20, 100)
  assert c.model.backbone.name == "ir50" and c.data.window_length == 300
  assert _load("lfan").get_config(None).data.emotions == ("valence",)
  args = []
  _load("lfan").sweep(lambda **kw: args.append(kw["arg"]))
  assert len(args) == 12 and len(set(args)) == 12
  runs = {
    (cfg.data.fold, cfg.data.emotions)
    for cfg in map(_load("lfan").get_config, args)
  }
  assert runs == {(f, (e,)) for f in range(6) for e in ("valence", "arousal")}


def test_parse_arg():
  a = common.parse_arg(
    "arousal,fold=2,synthetic",
    positional="emotion",
    emotion="valence",
    fold=0,
    synthetic=False,
  )
  assert (a.emotion, a.fold, a.synthetic) == ("arousal", 2, True)
  a = common.parse_arg(None, positional="emotion", emotion="valence", fold=0)
  assert (a.emotion, a.fold) == ("valence", 0)
  with pytest.raises(ValueError, match=r"unknown config argument 'folds'"):
    common.parse_arg("folds=2", fold=0)
  with pytest.raises(ValueError, match=r"fold='x': expected a int"):
    common.parse_arg("fold=x", fold=0)
  with pytest.raises(ValueError, match="not key=value"):
    common.parse_arg("arousal", fold=0)
  with pytest.raises(ValueError, match="emotion must be"):
    _load("lfan").get_config("happy")


def _parse(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_command_line_overrides():
  config = _parse(
    [
      "prog",
      "--config=configs/lfan.py:arousal,fold=2",
      "--config.train.batch_size=16",
      "--config.optim.learning_rate=3e-4",
    ]
  )
  assert config.train.batch_size == 16
  assert config.optim.learning_rate == 3e-4 and config.data.fold == 2
  with pytest.raises(flags.IllegalFlagValueError, match="batch_size=x"):
    _parse(["prog", "--config=configs/lfan.py", "--config.train.batch_size=x"])


def test_unknown_override_fails_clearly_in_main():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "affjax.main",
      "--config=configs/test.py",
      "--workdir=/nonexistent",
      "--config.train.bogus=1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,  # a deadline only: a loaded machine starts Python slowly
    check=False,
  )
  assert out.returncode != 0
  assert "--config.train.bogus=1: the config has no field 'bogus'" in out.stderr


def test_plateau_config_from_config():
  config = _load("lfan").get_config("valence")
  cfg = optim.PlateauConfig.from_config(config, num_groups=3)
  assert cfg == optim.PlateauConfig(num_groups=3)  # defaults = reference
  assert isinstance(config.data.synthetic, ml_collections.ConfigDict)

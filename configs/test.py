r"""Tiny end-to-end config for tests: a few seconds of synthetic data.

  python -m affjax.main --config=configs/test.py --workdir=/tmp/affjax_test

Runs in well under a minute on a 2-core CPU (most of it data generation and
compilation); the numbers it reaches mean nothing. Variant `:visual_only`.
"""

from configs import common


def get_config(arg=None):
  """`arg`: `visual_only` for the visual-only model."""
  args = common.parse_arg(arg, visual_only=False)
  config = common.base_config()
  config.data.name = "synthetic"
  config.data.synthetic = common.test_synthetic()
  config.data.window_length = 16
  config.data.hop_length = 16
  config.model.backbone.name = "tiny"
  config.model.visual_channels = (8, 8)
  config.model.audio_channels = (4, 4)
  config.model.kernel_size = 3
  config.model.fusion_dim = 4
  if args.visual_only:
    config.model.name = "visual_only"
    common.set_audio(config, ())
  config.optim.frozen = "^backbone/"
  config.optim.release_groups = "auto"
  config.optim.learning_rate = 1e-3
  config.optim.patience = 0
  config.optim.min_learning_rate = 2e-4
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.max_epochs = 3
  config.train.log_every_steps = 2
  config.eval.plots = False
  # The many short training runs of the tests skip the final evaluation
  # (tests/test_train.py checks it).
  config.eval.after_training = False
  return config.lock()

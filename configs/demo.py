r"""The README demo: synthetic mini-Aff-Wild2, trained end to end on a CPU.

Generates the embedded synthetic dataset (videos with drawn faces whose
expression and voice follow valence/arousal curves), preprocesses it exactly
like Aff-Wild2 (face crops, MFCC, VGGish), then trains the audio-visual
leader-follower model with a tiny IResNet backbone trained end to end (not
frozen: there is no pretrained face model to start from), both emotions at
once, and evaluates on the validation trials.

  python -m affjax.main --config=configs/demo.py --workdir=/tmp/affjax_demo

Expected on a 2-core CPU: under 10 minutes in total (data generation and
preprocessing included), validation CCC >= 0.5 for valence and arousal.
Variant `configs/demo.py:visual_only` trains the visual-only model on the same
data (for the audio-visual vs visual-only comparison on arousal).
"""

from configs import common


def get_config(arg=None):
  """`arg`: `visual_only` for the visual-only model."""
  args = common.parse_arg(arg, visual_only=False)
  config = common.base_config()
  config.data.name = "synthetic"
  config.data.synthetic = common.demo_synthetic()
  config.data.window_length = 100
  config.data.hop_length = 50
  config.model.backbone.name = "tiny"
  config.model.visual_channels = (32, 32, 32, 32)
  config.model.audio_channels = (16, 16, 16, 16)
  config.model.fusion_dim = 16
  if args.visual_only:
    config.model.name = "visual_only"
    common.set_audio(config, ())
  # Whole model trainable from the start; the reference's plateau rule stays
  # (min lr reached with nothing left to release ends training).
  config.optim.frozen = ""
  config.optim.release_groups = ""
  config.optim.learning_rate = 1e-3
  config.optim.min_learning_rate = 1e-5
  config.optim.patience = 3
  config.train.batch_size = 8
  config.train.eval_batch_size = 8
  config.train.max_epochs = 12
  config.train.early_stopping = 6
  config.train.log_every_steps = 20
  return config.lock()

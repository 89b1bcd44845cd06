r"""Visual-only baseline (the reference's `my_2d1d`) on Aff-Wild2.

IR-50 + visual TCN + linear regressor, trained like `lfan.py` (same optimiser,
schedule, release and windows); no audio features are loaded.

  python -m affjax.main --config=configs/visual_only.py:arousal,fold=0 \
      --workdir=runs/visual_arousal_0 --config.data.raw_dir=/data/affwild2 \
      --config.model.backbone_checkpoint=/data/res50_ir_0.887.pth

Expected (ABAW2 leaderboard, fold 0 test): CCC about 0.27 (valence) / 0.30
(arousal); hours to days per run on one accelerator. On the synthetic data
use `configs/demo.py:visual_only` instead.
"""

from configs import common


def get_config(arg=None):
  """Visual-only configuration; `arg`: emotion and `fold=N`."""
  args = common.parse_arg(arg, positional="emotion", emotion="valence", fold=0)
  config = common.base_config()
  config.data.fold = args.fold
  config.model.name = "visual_only"
  common.set_audio(config, ())
  common.set_emotions(config, common.emotions_for(args.emotion))
  return config.lock()


def sweep(add):
  """6 folds x 2 emotions."""
  for fold in range(6):
    for emotion in common.EMOTIONS:
      add(arg=f"{emotion},fold={fold}")

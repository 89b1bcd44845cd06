r"""The paper's audio-visual leader-follower model on Aff-Wild2 (ABAW2 2021).

Settings of sucv/ABAW2 `main.py`: IR-50 backbone (start frozen, released in
3 groups), TCNs 4x128 (visual) and 4x32 (VGGish, MFCC), Adam lr 1e-5 with L2
weight decay 1e-3, ReduceLROnPlateau on validation CCC (patience 5, factor
0.1, min lr 1e-6 triggers a release), early stopping 20, at most 100 epochs,
batch 8, windows of 300 frames with hop 200, one emotion per run.

Variants (`:arg`): an emotion (`valence` default, `arousal`, `both`) and
`fold=N` (0..5; fold 0 is the official split), e.g.

  python -m affjax.main --config=configs/lfan.py:arousal,fold=2 \
      --workdir=runs/lfan_arousal_2 \
      --config.data.raw_dir=/data/affwild2 \
      --config.model.backbone_checkpoint=/data/res50_ir_0.887.pth

Needs the Aff-Wild2 layout in `data.raw_dir` (preprocessing fills the cache on
the first run). Expected: validation CCC about 0.47 (valence) / 0.65
(arousal) on fold 0 (paper); 1-2 days per run on one GPU (reference), on TPU
v4-8 a few hours. `sweep` lists the 12 runs of the 6-fold cross-validation,
merged afterwards with `--mode=merge`.
"""

from configs import common


def get_config(arg=None):
  """Paper configuration; `arg` as in the module docstring."""
  args = common.parse_arg(arg, positional="emotion", emotion="valence", fold=0)
  config = common.base_config()
  config.data.name = "affwild2"
  config.data.fold = args.fold
  common.set_emotions(config, common.emotions_for(args.emotion))
  return config.lock()


def sweep(add):
  """6 folds x 2 emotions, each an independent run (`add(arg=...)`)."""
  for fold in range(6):
    for emotion in common.EMOTIONS:
      add(arg=f"{emotion},fold={fold}")

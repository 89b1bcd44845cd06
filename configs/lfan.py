r"""The paper's audio-visual leader-follower model on Aff-Wild2 (ABAW2 2021).

Settings of sucv/ABAW2 `main.py`: IR-50 backbone (start frozen, released in
3 groups), TCNs 4x128 (visual) and 4x32 (VGGish, MFCC), Adam lr 1e-5 with L2
weight decay 1e-3, ReduceLROnPlateau on validation CCC (patience 5, factor
0.1, min lr 1e-6 triggers a release), early stopping 20, at most 100 epochs,
batch 8, windows of 300 frames with hop 200, one emotion per run.

The recipe around the model is the reference's too (docs/fidelity.md):
VGGish with the pretrained `vggish_model.ckpt` and one 0.96 s example per
video frame, frames labelled -5 deleted before windowing, each split
normalised with its own audio statistics, windows shuffled once and replayed
every epoch (last partial batch kept), zero-padding of short trials in the
loss. Both weight files are required: without
`data.preprocess.vggish_checkpoint` (vggish_model.ckpt,
https://storage.googleapis.com/audioset/vggish_model.ckpt) or
`model.backbone_checkpoint` (res50_ir_0.887.pth, shared by the authors on
Google Drive, linked from the sucv/ABAW2 ReadMe) the run stops at once;
`--config.data.allow_random_vggish=true` / `--config.model.
allow_random_backbone=true` let smoke runs through with random weights.

Variants (`:arg`): an emotion (`valence` default, `arousal`, `both`),
`fold=N` (0..5; fold 0 is the official split), `improved` (affjax's own
recipe choices instead of the reference's: VGGish on a 0.48 s grid, -5
frames masked, training statistics for every split, windows reshuffled each
epoch, padding masked)
and `lead=valence|arousal` (both outputs, the lead emotion's loss weighted
10:1 and its CCC picking the best epoch, the reference's two-head setting),
e.g.

  python -m affjax.main --config=configs/lfan.py:arousal,fold=2 \
      --workdir=runs/lfan_arousal_2 \
      --config.data.raw_dir=/data/affwild2 \
      --config.data.preprocess.vggish_checkpoint=/data/vggish_model.ckpt \
      --config.model.backbone_checkpoint=/data/res50_ir_0.887.pth

Needs the Aff-Wild2 layout in `data.raw_dir` (preprocessing fills the cache on
the first run), or the authors' preprocessed dataset imported with
`python -m affjax.data.import_reference` into `data.cache_dir` (then
`data.raw_dir` stays empty and no VGGish checkpoint is needed; add
`--config.data.audio_stats=imported` for their `mean_std_dict.pkl`).
Expected: validation CCC about 0.47 (valence) / 0.65 (arousal) on fold 0
(paper); 1-2 days per run on one GPU (reference), on TPU
v4-8 a few hours. `sweep` lists the 12 runs of the 6-fold cross-validation,
merged afterwards with `--mode=merge`.
"""

from configs import common


def get_config(arg=None):
  """Paper configuration; `arg` as in the module docstring."""
  args = common.parse_arg(
    arg,
    positional="emotion",
    emotion="valence",
    fold=0,
    improved=False,
    lead="",
  )
  config = common.base_config()
  config.data.name = "affwild2"
  config.data.fold = args.fold
  if not args.improved:
    common.reference_recipe(config)
  if args.lead:
    # The reference's multi-headed runs (base/trainer.py): both outputs,
    # the trained emotion's CCC loss weighted 10, the other 1.
    lead = common.emotions_for(args.lead)
    if len(lead) != 1:
      raise ValueError(f"lead must be 'valence' or 'arousal', got {args.lead}")
    common.set_emotions(config, common.EMOTIONS)
    config.train.loss_weights = tuple(
      10.0 if e == lead[0] else 1.0 for e in common.EMOTIONS
    )
    config.train.select_by = lead[0]
  else:
    common.set_emotions(config, common.emotions_for(args.emotion))
  return config.lock()


def sweep(add):
  """6 folds x 2 emotions, each an independent run (`add(arg=...)`)."""
  for fold in range(6):
    for emotion in common.EMOTIONS:
      add(arg=f"{emotion},fold={fold}")

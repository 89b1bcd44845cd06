r"""Leader-follower fusion on cached 512-d face embeddings (no backbone).

The visual stream reads `embeddings [B, T, 512]` computed once by a frozen
backbone instead of running IR-50 on every frame, so training is TCNs +
fusion only: minutes per epoch on a CPU instead of hours on a GPU. Nothing is
frozen or released (there is no backbone in the model).

  python -m affjax.main --config=configs/cached_embeddings.py:arousal \
      --workdir=runs/emb_arousal_0 --config.data.raw_dir=/data/affwild2

The embeddings must be in the cache first (`python -m affjax.embed`, see
`affjax/embed.py`). To fine-tune the backbone afterwards, start an end-to-end
run from this run's head (TCNs + fusion); the backbone then starts from its
checkpoint and is released group by group as usual:

  python -m affjax.main --config=configs/lfan.py:arousal \
      --workdir=runs/e2e_arousal_0 --config.data.raw_dir=/data/affwild2 \
      --config.model.backbone_checkpoint=/data/res50_ir_0.887.pth \
      --config.model.head_checkpoint=runs/emb_arousal_0

Expected: below the end-to-end model (the backbone is never fine-tuned); on
the synthetic data `configs/cached_embeddings.py:synthetic` runs in about as
long as the demo.
"""

from configs import common


def get_config(arg=None):
  """`arg`: emotion, `fold=N`, and `synthetic` for the embedded dataset."""
  args = common.parse_arg(
    arg, positional="emotion", emotion="valence", fold=0, synthetic=False
  )
  config = common.base_config()
  config.data.fold = args.fold
  config.model.input = "embeddings"
  common.set_audio(config, ("vggish", "mfcc"))
  config.optim.frozen = ""
  config.optim.release_groups = ""
  common.set_emotions(config, common.emotions_for(args.emotion))
  if args.synthetic:
    config.data.name = "synthetic"
  return config.lock()


def sweep(add):
  """6 folds x 2 emotions."""
  for fold in range(6):
    for emotion in common.EMOTIONS:
      add(arg=f"{emotion},fold={fold}")

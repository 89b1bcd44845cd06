"""Shared pieces of the experiment configs: the schema and `parse_arg`.

Every config in this folder starts from `base_config()` (the paper's settings,
sucv/ABAW2 `main.py`) and changes what its experiment needs, so all configs
have the same keys and a `--config.key=value` override means the same thing
everywhere. Configs are imported as `configs.<name>`: run commands from the
repository root.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from affjax.data.preprocess.cache import PreprocessSettings

EMOTIONS = ("valence", "arousal")
AUDIO_DIMS = {"vggish": 128, "mfcc": 39, "egemaps": 23}


def parse_arg(
  arg: str | None, *, positional: str | None = None, **defaults: Any
) -> ml_collections.ConfigDict:
  """Parses a config variant string such as `"arousal,fold=3"`.

  Args:
    arg: the text after `:` in `--config=configs/x.py:<arg>`, or None.
    positional: name of the key a bare value sets (`"arousal"` ->
      `emotion="arousal"` when `positional="emotion"`); a bare name of a bool
      key sets it True.
    **defaults: every allowed key with its default; values are converted to
      the default's type.

  Returns:
    A locked ConfigDict of the parsed values.

  Raises:
    ValueError: on unknown keys or values that do not convert.
  """
  values = dict(defaults)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, sep, value = token.partition("=")
    if not sep:
      if isinstance(defaults.get(token), bool):
        key, value = token, "true"
      elif positional is not None:
        key, value = positional, token
      else:
        raise ValueError(
          f"config argument {token!r} in {arg!r} is not "
          f"key=value; keys: {sorted(defaults)}"
        )
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r} in {arg!r}; "
        f"allowed: {sorted(defaults)}"
      )
    values[key] = _convert(key, value, defaults[key])
  return ml_collections.ConfigDict(values, type_safe=True).lock()


def _convert(key: str, value: str, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    return type(default)(value)
  except ValueError:
    raise ValueError(
      f"config argument {key}={value!r}: expected a {type(default).__name__}"
    ) from None


def emotions_for(emotion: str) -> tuple[str, ...]:
  """'valence' | 'arousal' | 'both' -> the emotions a run trains."""
  if emotion == "both":
    return EMOTIONS
  if emotion not in EMOTIONS:
    raise ValueError(
      f"emotion must be 'valence', 'arousal' or 'both', got {emotion!r}"
    )
  return (emotion,)


def base_config() -> ml_collections.ConfigDict:
  """The full schema with the paper's settings (IR-50, audio-visual, fold 0)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # (axis name, size) pairs; -1 = all remaining devices. Batches are split
  # over every axis, parameters replicated.
  c.mesh = (("data", -1),)

  c.data = ml_collections.ConfigDict()
  c.data.name = "affwild2"  # 'affwild2' | 'synthetic'
  c.data.raw_dir = ""  # '' -> <workdir>/data/raw
  c.data.cache_dir = ""  # '' -> <workdir>/data/cache
  c.data.tfds_dir = ""  # '' -> <workdir>/data/tfds
  # GiB of decoded trials each process keeps in memory across epochs; None =
  # 40% of the host's RAM split between the job's processes on the host.
  c.data.memory_cache_gb = ml_collections.config_dict.placeholder(float)
  c.data.synthetic = ml_collections.ConfigDict()  # generator settings
  c.data.fold = 0  # cross-validation fold, 0..5
  c.data.window_length = 300  # frames per window
  c.data.hop_length = 200  # frames between window starts
  c.data.emotions = EMOTIONS
  c.data.features = ("frames", "vggish", "mfcc")
  c.data.crop_size = 40  # pixels (of the 48x48 cache)
  c.data.time_delay = 0  # frames labels are shifted earlier
  # `PreprocessSettings` fields plus the run options `num_workers` and
  # `test_list`: they must equal the settings recorded in an existing
  # cache's manifest.json (a cache built by `python -m
  # affjax.data.preprocess` with the same flags is reused as is).
  c.data.preprocess = preprocess_defaults()
  # Without `data.preprocess.vggish_checkpoint`, VGGish runs with random
  # weights; False stops such a run before any work (paper configs).
  c.data.allow_random_vggish = True
  # The training recipe around the model (docs/fidelity.md compares it with
  # sucv/ABAW2; `reference_recipe` sets the reference's choices).
  # Frames whose valence or arousal is -5: 'mask' (kept in the windows,
  # left out of the loss and metrics) | 'drop' (deleted before windowing).
  c.data.unlabelled_frames = "mask"
  # Audio mean/std: 'train' (the fold's training trials, for every split) |
  # 'per_partition' (each split its own) | 'imported' (the statistics of an
  # imported sucv/ABAW2 dataset, `affjax.data.import_reference`).
  c.data.audio_stats = "train"
  # Training window order: 'every_epoch' (reshuffled each epoch, remainder
  # dropped) | 'once' (shuffled once with `seed`, the same order every
  # epoch, last partial batch kept).
  c.data.window_order = "every_epoch"
  # Zero-padded frames of trials shorter than a window: False = masked in
  # the loss (audio 0); True = in the loss with label 0 and raw audio 0
  # normalised like the rest ((0 - mean) / std).
  c.data.padding_in_loss = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "av_leader_follower"  # | 'visual_only'
  c.model.input = "frames"  # | 'embeddings'
  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.name = "ir50"  # 'ir50' | 'ir_se50' | 'tiny' | 'demo'
  c.model.backbone.dropout = 0.4
  # Images per convolution call in the backbone, 0 = the whole batch. A CPU
  # speed setting (XLA:CPU convs slow down on large batches; 64 measured
  # best in benchmarks/backbone_conv.py); the results are the same.
  c.model.backbone.conv_chunk = 0
  # Reference backbone weights (`res50_ir_0.887.pth`); '' = random init.
  c.model.backbone_checkpoint = ""
  # False: a run without `backbone_checkpoint` stops before any work.
  c.model.allow_random_backbone = True
  # Workdir of an earlier run (e.g. configs/cached_embeddings.py) whose best
  # checkpoint initialises every non-backbone parameter (TCNs, fusion or
  # regressor); '' = random init. Used only when a run starts, not on resume.
  c.model.head_checkpoint = ""
  c.model.visual_channels = (128, 128, 128, 128)
  c.model.audio_channels = (32, 32, 32, 32)
  c.model.audio_features = (("vggish", 128), ("mfcc", 39))
  c.model.kernel_size = 5
  c.model.dropout = 0.1
  c.model.fusion_dim = 32
  c.model.num_outputs = 2
  c.model.follower_qv_from_keys = True  # the reference's follower quirk
  # Activation dtype of backbone, TCNs and fusion: 'float32' | 'bfloat16'.
  # Parameters, BatchNorm statistics, loss, metrics, optimiser state and
  # checkpoints stay float32 either way.
  c.model.dtype = "float32"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-5
  c.optim.weight_decay = 1e-3  # torch-Adam L2 (added to the grad)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.factor = 0.1  # ReduceLROnPlateau on val CCC
  c.optim.patience = 5
  c.optim.min_learning_rate = 1e-6  # below this: release next group
  c.optim.milestones = (0,)  # epochs that release a group
  c.optim.release_count = 3
  c.optim.frozen = "^backbone/"  # regex: params frozen at the start
  # RELEASE_GROUPS entry ('auto' = the backbone's name, '' = none); the
  # entry's regexes are relative to the backbone, hence the prefix.
  c.optim.release_groups = "auto"
  c.optim.release_prefix = "^backbone/"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # global, split over devices/hosts
  c.train.eval_batch_size = 8
  c.train.max_epochs = 100
  c.train.early_stopping = 20  # epochs without improvement; 0 off
  c.train.min_num_epochs = 0
  c.train.load_best_at_each_epoch = True
  c.train.log_every_steps = 50
  c.train.max_in_flight = 8  # steps dispatched but not finished
  c.train.prefetch = 2  # batches transferred ahead
  # Loss weight of each emotion of `data.emotions` (CCC losses summed with
  # these weights, divided by their number); () = all 1.
  c.train.loss_weights = ()
  # The validation score of the best epoch and the plateau: '' = the mean
  # CCC over data.emotions, or one emotion's CCC.
  c.train.select_by = ""
  # "a,b": jax.profiler trace of steps a+1..b into the workdir ('' = off).
  c.train.profile_steps = ""
  # JAX's persistent compilation cache directory ('' = off).
  c.train.compilation_cache_dir = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "validation"
  c.eval.plots = True  # per-trial PNGs in --mode=evaluate
  # --mode=train ends by scoring the best checkpoint on `eval.split`
  # (results.json, per-trial predictions and plots under <workdir>/eval/).
  c.eval.after_training = True
  return c


def preprocess_defaults() -> ml_collections.ConfigDict:
  """`PreprocessSettings` defaults plus the preprocessing run options."""
  values = {f.name: f.default for f in dataclasses.fields(PreprocessSettings)}
  values.update(num_workers=1, test_list="")
  return ml_collections.ConfigDict(values)


def reference_recipe(config: ml_collections.ConfigDict) -> None:
  """The sucv/ABAW2 recipe around the model (docs/fidelity.md).

  VGGish with the pretrained weights, one 0.96 s example per video frame;
  frames labelled -5 deleted; each split normalised with its own audio
  statistics; windows shuffled once; padding in the loss; pretrained
  weights required (the `allow_random_*` keys let smoke runs through).
  """
  config.data.preprocess.vggish_hop_seconds = None
  config.data.allow_random_vggish = False
  config.data.unlabelled_frames = "drop"
  config.data.audio_stats = "per_partition"
  config.data.window_order = "once"
  config.data.padding_in_loss = True
  config.model.allow_random_backbone = False


def set_emotions(
  config: ml_collections.ConfigDict, emotions: tuple[str, ...]
) -> None:
  """Sets the trained emotions and the matching number of outputs."""
  config.data.emotions = tuple(emotions)
  config.model.num_outputs = len(emotions)


def set_audio(
  config: ml_collections.ConfigDict, features: tuple[str, ...]
) -> None:
  """Sets the audio streams (model) and the features to load (data)."""
  visual = config.model.input
  config.model.audio_features = tuple((f, AUDIO_DIMS[f]) for f in features)
  config.data.features = (visual,) + tuple(features)


def demo_synthetic() -> ml_collections.ConfigDict:
  """Generator settings of the demo dataset (`affjax.data.synthetic`)."""
  return ml_collections.ConfigDict(
    {
      "num_trials": 14,
      "seed": 0,
      "min_seconds": 20.0,
      "max_seconds": 40.0,
      "num_workers": 2,
    }
  )


def test_synthetic() -> ml_collections.ConfigDict:
  """Six trials of a few seconds, cheap to preprocess (narrow VGGish)."""
  return ml_collections.ConfigDict(
    {
      "num_trials": 6,
      "seed": 0,
      "min_seconds": 3.0,
      "max_seconds": 4.0,
      "vggish_model": "tiny",
    }
  )

"""Stops a run that would silently use random weights where the paper had
pretrained ones.

The paper's results depend on two pretrained networks: the IR-50 face
backbone (`res50_ir_0.887.pth`, trained on facial expressions; shared by the
authors on Google Drive, linked from the sucv/ABAW2 ReadMe) and VGGish
(`vggish_model.ckpt`, AudioSet; https://storage.googleapis.com/audioset/
vggish_model.ckpt, also linked there). Without them the code still runs,
with random weights, and the numbers mean something else. Configs that
reproduce the paper set `model.allow_random_backbone` and
`data.allow_random_vggish` to False; `check` then stops the run at its
start, naming the key to set, unless the weight files are given.
"""

from __future__ import annotations

import json
import os
from typing import Any

from affjax import io

BACKBONE_FILE = "res50_ir_0.887.pth"
BACKBONE_SOURCE = (
  "shared by the sucv/ABAW2 authors on Google Drive "
  "(https://drive.google.com/file/d/1izzZNtRIGchbyhf-aiTKB950IH1ZeJ4C, "
  "linked from their ReadMe)"
)
VGGISH_FILE = "vggish_model.ckpt"
VGGISH_SOURCE = "https://storage.googleapis.com/audioset/vggish_model.ckpt"
# `settings` key of a cache imported from the authors' preprocessed dataset
# (`affjax.data.import_reference`): its VGGish features are already there.
IMPORTED_KEY = "imported_from"


def imported_cache(cache_dir: str) -> bool:
  """Whether `cache_dir` holds a dataset imported from sucv/ABAW2."""
  try:
    with open(os.path.join(cache_dir, "manifest.json")) as f:
      settings = json.load(f).get("settings", {})
  except (OSError, ValueError, AttributeError):
    return False
  return isinstance(settings, dict) and IMPORTED_KEY in settings


def _exists(path: str) -> bool:
  if io.is_url(path):  # checked where it is read
    return True
  # TF checkpoints are prefixes of `.index` / `.data-*` files.
  return os.path.exists(path) or os.path.exists(path + ".index")


def check(config: Any, workdir: str) -> None:
  """Raises ValueError if the run would use random pretrained parts.

  Args:
    config: the run config.
    workdir: the run's directory (the default cache location).

  Raises:
    ValueError: naming the missing key, the file the reference used and
      where its authors publish it; or a given weight file that does not
      exist.
  """
  backbone = config.model.backbone_checkpoint
  if backbone and not _exists(backbone):
    raise ValueError(
      f"config.model.backbone_checkpoint={backbone!r} does not exist"
    )
  needs_backbone = config.model.input == "frames"
  if (
    needs_backbone
    and not backbone
    and not config.model.get("allow_random_backbone", True)
  ):
    raise ValueError(
      "config.model.backbone_checkpoint is empty: this config reproduces "
      f"the paper, whose IR-50 backbone starts from {BACKBONE_FILE} "
      f"({BACKBONE_SOURCE}). Pass --config.model.backbone_checkpoint="
      f"/path/{BACKBONE_FILE}, or --config.model.allow_random_backbone=true "
      "for a run with a random backbone (smoke tests)"
    )
  data = config.data
  preprocess = data.get("preprocess", None) or {}
  vggish = preprocess.get("vggish_checkpoint", "")
  if vggish and not _exists(vggish):
    raise ValueError(
      f"config.data.preprocess.vggish_checkpoint={vggish!r} does not exist"
    )
  if (
    "vggish" in data.features
    and not vggish
    and not data.get("allow_random_vggish", True)
  ):
    from affjax.data import prepare  # pylint: disable=g-import-not-at-top

    if imported_cache(prepare.resolve_paths(data, workdir).cache_dir):
      return
    raise ValueError(
      "config.data.preprocess.vggish_checkpoint is empty: this config "
      "reproduces the paper, whose VGGish features come from the pretrained "
      f"{VGGISH_FILE} (sucv/ABAW2 preprocessing.py, vggish/inference.py; "
      f"{VGGISH_SOURCE}, linked from the authors' ReadMe). Pass "
      f"--config.data.preprocess.vggish_checkpoint=/path/{VGGISH_FILE}, "
      "import the authors' preprocessed dataset (python -m "
      "affjax.data.import_reference), or set "
      "--config.data.allow_random_vggish=true for random VGGish weights "
      "(smoke tests)"
    )

"""Finding the trials of a raw Aff-Wild2 directory.

Expected layout (the synthetic generator writes the same):

```
<raw>/annotations/VA_Set/Train_Set/<trial>.txt
<raw>/annotations/VA_Set/Validation_Set/<trial>.txt
<raw>/cropped_aligned/<trial>/NNNNN.jpg
<raw>/videos/**/<video>.{mp4,avi,...}    (searched recursively: batch1/, ...)
<raw>/va_test_set.txt                    (test trial names, one a line)
```

A trial's video is its name without a `_left`/`_right` suffix (two annotated
subjects share one video). `cropped_aligned` may hold folders of trials that
are neither annotated nor listed (other ABAW tasks); they are ignored.
"""

import dataclasses
import os

ANNOTATION_DIR = os.path.join("annotations", "VA_Set")
PARTITION_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
CROPS_DIR = "cropped_aligned"
VIDEOS_DIR = "videos"
DEFAULT_TEST_LIST = "va_test_set.txt"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


@dataclasses.dataclass(frozen=True)
class TrialSource:
  name: str
  partition: str  # 'train' | 'validation' | 'test'
  video: str  # video name (file stem)
  video_path: str
  annotation_path: str | None  # None for test trials
  crop_dir: str


def video_name(trial: str) -> str:
  """The video of a trial: its name without a `_left`/`_right` suffix."""
  for suffix in ("_left", "_right"):
    if trial.endswith(suffix):
      return trial[: -len(suffix)]
  return trial


def _index_videos(videos_dir: str) -> dict[str, str]:
  if not os.path.isdir(videos_dir):
    raise FileNotFoundError(f"video directory {videos_dir} does not exist")
  index = {}
  for dirpath, _, files in os.walk(videos_dir, followlinks=True):
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in VIDEO_EXTENSIONS:
        continue
      path = os.path.join(dirpath, name)
      if stem in index:
        raise ValueError(f"two videos named {stem!r}: {index[stem]} and {path}")
      index[stem] = path
  return index


def read_test_list(path: str) -> list[str]:
  """Trial names from a test list (one a line; an extension is dropped)."""
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  return [os.path.splitext(n)[0] if n.endswith(".txt") else n for n in names]


def find_trials(
  raw_dir: str,
  test_list: str | None = None,
  trials: list[str] | None = None,
) -> list[TrialSource]:
  """Lists the trials of a raw dataset, sorted by name.

  Args:
    raw_dir: root of the raw layout.
    test_list: test list file; None → `<raw_dir>/va_test_set.txt` if it
      exists (else no test trials).
    trials: restrict to these trial names (each must exist).

  Raises:
    FileNotFoundError: raw_dir, an annotation folder, the videos folder, an
      explicit test list, a requested trial's annotation, or a trial's video
      is missing (named).
    ValueError: a trial is listed twice (e.g. annotated and in the test list).
  """
  if not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"raw data directory {raw_dir} does not exist")
  found = {}
  for partition, sub in PARTITION_DIRS.items():
    folder = os.path.join(raw_dir, ANNOTATION_DIR, sub)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"annotation directory {folder} does not exist")
    for name in sorted(os.listdir(folder)):
      if name.endswith(".txt"):
        stem = name[:-4]
        if stem in found:
          raise ValueError(f"trial {stem!r} is annotated in two partitions")
        found[stem] = (partition, os.path.join(folder, name))
  if test_list is None:
    default = os.path.join(raw_dir, DEFAULT_TEST_LIST)
    test_list = default if os.path.isfile(default) else None
  elif not os.path.isfile(test_list):
    raise FileNotFoundError(f"test list {test_list} does not exist")
  for name in read_test_list(test_list) if test_list else []:
    if name in found:
      raise ValueError(
        f"{test_list}: test trial {name!r} also has an annotation file "
        f"{found[name][1]}"
      )
    found[name] = ("test", None)
  if trials is not None:
    missing = sorted(set(trials) - set(found))
    if missing:
      where = os.path.join(raw_dir, ANNOTATION_DIR)
      raise FileNotFoundError(
        f"no annotation file under {where}/{{Train_Set,Validation_Set}} and "
        f"no test-list entry for trials {missing}"
      )
    found = {t: found[t] for t in trials}
  videos_dir = os.path.join(raw_dir, VIDEOS_DIR)
  videos = _index_videos(videos_dir)
  sources = []
  for name in sorted(found):
    partition, annotation = found[name]
    video = video_name(name)
    if video not in videos:
      raise FileNotFoundError(
        f"no video for trial {name!r}: expected {video}.mp4 (or "
        f"{'/'.join(VIDEO_EXTENSIONS[1:])}) under {videos_dir}"
      )
    sources.append(
      TrialSource(
        name=name,
        partition=partition,
        video=video,
        video_path=videos[video],
        annotation_path=annotation,
        crop_dir=os.path.join(raw_dir, CROPS_DIR, name),
      )
    )
  return sources

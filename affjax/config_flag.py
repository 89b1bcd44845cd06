"""The `--config` flag shared by the command lines, and its flag parser.

`--config=configs/<name>.py[:<variant>]` names an experiment config and
`--config.key=value` overrides any of its fields; a key the config does not
have is an error. Importing this module defines the flag; entry points pass
`parse_flags` to `absl.app.run(main, flags_parser=parse_flags)`.
"""

import difflib
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config: configs/<name>.py[:<variant>].",
  lock_config=True,
)

# `--config.<path>=value` and the boolean forms `--config.<path>` and
# `--noconfig.<path>`, as ml_collections recognises them.
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]+)")
_SOURCE = re.compile(r"-{1,2}config(?:=(.*))?")
_BAD_VALUE = re.compile(r"flag --config\.([^=]+)=")


def _base_config(argv: list[str]) -> ml_collections.ConfigDict | None:
  """The config named by `--config` in `argv`, without overrides; or None."""
  source = None
  for i, arg in enumerate(argv):
    found = _SOURCE.fullmatch(arg)
    if found:  # the last one wins, as in absl
      source = found.group(1)
      if source is None and i + 1 < len(argv):
        source = argv[i + 1]
  if source is None:
    return None
  try:
    config = FLAGS["config"].parser.parse(source)
  except Exception:  # noqa: BLE001  (only used to explain another error)
    return None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def _unknown_field(
  config: ml_collections.ConfigDict, argv: list[str]
) -> str | None:
  """Explains the first `--config.<path>` override naming no field, or None.

  The message names the argument, the missing key and the nearest existing
  key (difflib) or, when nothing is close, the keys that exist there.
  """
  for arg in argv:
    found = _OVERRIDE.match(arg)
    if not found:
      continue
    node, where = config, "config"
    for part in found.group(1).split("."):
      if "[" in part:  # an indexed field: leave it to ml_collections
        break
      if not isinstance(node, ml_collections.ConfigDict):
        return (
          f"{arg}: the config has no field {part!r}: {where} is a "
          f"value of type {type(node).__name__}, not a group of fields"
        )
      keys = sorted(node.keys())
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=1)
        hint = (
          f"did you mean --{where}.{near[0]}?"
          if near
          else f"{where} has {', '.join(keys)}"
        )
        return (
          f"{arg}: the config has no field {part!r} in {where}; {hint} "
          "(overrides must name existing keys; see configs/common.py)"
        )
      node, where = node[part], f"{where}.{part}"
  return None


def _expected_type(
  config: ml_collections.ConfigDict | None, error: Exception
) -> str:
  """' (config.<path> expects <type>)' for a bad override value, or ''."""
  found = _BAD_VALUE.match(str(error))
  if config is None or not found:
    return ""
  try:
    kind = config_path.get_type(found.group(1), config)
  except (AttributeError, KeyError, TypeError, ValueError):
    return ""
  return f" (config.{found.group(1)} expects {getattr(kind, '__name__', kind)})"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line naming the argument.

  A bad `--config.<key>` override fails inside ml_collections, either as a
  bare `AttributeError: "'key'"` (no such field) or as a flag error with a
  traceback (a value of the wrong type), because a custom `flags_parser`
  bypasses absl's own "FATAL Flags parsing error" handling. Both become a
  usage error naming the argument, without a traceback.
  """
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError):
    config = _base_config(argv)
    message = _unknown_field(config, argv) if config is not None else None
    if message is None:
      raise  # not a misspelled override: keep the real error
    sys.exit(f"FATAL Flags parsing error: {message}")
  except flags.Error as e:
    extra = _expected_type(_base_config(argv), e)
    sys.exit(f"FATAL Flags parsing error: {e}{extra}")

#!/usr/bin/env bash
# The README's test command: the whole suite on CPU with 8 fake devices.
# Arguments, if any, replace the default `tests` (e.g. one file or -k).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0
if [ "$#" -eq 0 ]; then set -- tests; fi
exec python -m pytest -q --durations=15 "$@"

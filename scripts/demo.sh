#!/usr/bin/env bash
# The main job on the bundled defaults (no downloads). Extra arguments go to it.
set -euo pipefail
. "$(dirname "$0")/env.sh"
exec python -m mpobert demo "$@"

#!/usr/bin/env bash
# The first GPU run in one command: set up (scripts/env.sh: ./.venv, the package and its
# extension), then scripts/gpu_check.py: the acceptance check, the quick benchmarks and
# decompose on the GPU, each step with its own timeout, every JSON under one folder, one
# summary table. `--cpu`: the same flow on the CPU at smoke sizes (CI). `--out DIR`: the folder
# (default results/gpu_check). GPU_CHECK_NO_SETUP=1 skips scripts/env.sh (use the current python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${GPU_CHECK_NO_SETUP:-0}" != "1" ]; then
  . "$ROOT/scripts/env.sh"
fi
exec python "$ROOT/scripts/gpu_check.py" "$@"

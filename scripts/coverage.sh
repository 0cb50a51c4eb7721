#!/usr/bin/env bash
# coverage.py over the test suite (or the pytest arguments given): prints every line of mpo_core/
# and benchmarks/ never executed and fails unless that is exactly the list of GPU-only lines in
# docs/gpu.md (see scripts/coverage_check.py). The whole suite under coverage takes longer than
# CI's plain run: run it by hand after changing GPU code paths. Installs coverage when missing.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -c "import coverage" >/dev/null 2>&1 || pip_or_die install -q "coverage>=7.10"
# the benchmarks' --plot paths run under coverage only with matplotlib (the test setup does not install it)
python -c "import matplotlib" >/dev/null 2>&1 || pip_or_die install -q matplotlib
exec python scripts/coverage_check.py "$@"

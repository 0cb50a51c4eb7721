#!/usr/bin/env bash
# Run the whole test suite on CPU (Triton kernels under TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k decompose`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -c "import mpo_core; print('[test] backends:', mpo_core.backends())"
exec python -m pytest -q "$@"

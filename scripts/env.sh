# Sourced by scripts/test.sh and scripts/demo.sh: make ./.venv with torch, the
# package (with its C++ extension) and the test tools. Idempotent and quick on a
# second run. Never pulls a CUDA torch: torch==2.13.0 is installed explicitly
# first, and the package is built with --no-build-isolation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[env] installing torch==2.13.0"
  pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch" || { echo "[env] torch failed to install" >&2; exit 1; }
fi
stamp=".venv/.mpo_core_deps"
want="$( (find setup.py pyproject.toml scripts/env.sh csrc -type f 2>/dev/null || true) | sort | xargs cat | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing dependencies and building mpo_core (with its extension)"
  pip install -q numpy scipy ninja pybind11 "triton==3.9.0" pytest hypothesis tensorly tntorch safetensors tqdm tokenizers pyyaml "transformers==5.24.0" 2>&1 | grep -v "^WARNING: Location" || true
  pip install -q --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import mpo_core" || { echo "[env] mpo_core failed to import" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

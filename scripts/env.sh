# Sourced by scripts/test.sh and scripts/demo.sh: make ./.venv with torch, the
# package (with its C++ extension) and the test tools. Idempotent and quick on a
# second run. Installs torch==2.13.0 only when no torch is importable (on a GPU
# machine install the CUDA torch wheel you want first: see README), and builds the
# package with --no-build-isolation. Any failure stops here with pip's own message;
# the stamp that skips this on the next run is written only after the installed
# package imports from outside the repository with the extension this machine builds.
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

# pip, quietly; on failure its whole output and a non-zero exit.
pip_or_die() {
  local log
  if ! log="$(pip "$@" 2>&1)"; then
    printf '%s\n' "$log" >&2
    echo "[env] FAILED: pip $*" >&2
    exit 1
  fi
  printf '%s\n' "$log" | sed '/^WARNING: Location/d;/^$/d'
}

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[env] installing torch==2.13.0"
  pip_or_die install -q torch==2.13.0
  python -c "import torch" || { echo "[env] torch failed to import after install" >&2; exit 1; }
fi
stamp=".venv/.mpo_core_deps"
want="$( (find setup.py pyproject.toml scripts/env.sh csrc -type f 2>/dev/null || true) | sort | xargs cat | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -f "$stamp"
  echo "[env] installing dependencies and building mpo_core (with its extension)"
  pip_or_die install -q numpy scipy ninja pybind11 "triton==3.9.0" pytest hypothesis "coverage>=7.10" tensorly tntorch safetensors tqdm tokenizers pyyaml "transformers==5.24.0" "peft==0.21.2"
  pip_or_die install -q --no-build-isolation -e .
  # From outside the repository, so that the installed package (not ./mpo_core) is what imports.
  (cd / && MPO_CORE_ROOT="$ROOT" python - <<'PY'
import glob, os, sys
import torch
from torch.utils.cpp_extension import CUDA_HOME
import mpo_core
from mpo_core._backends import extension
root = os.environ["MPO_CORE_ROOT"]
where = os.path.dirname(os.path.abspath(mpo_core.__file__))
if where != os.path.join(root, "mpo_core"):
    sys.exit(f"[env] mpo_core imports from {where}, not from {root}: the editable install did not take")
b = mpo_core.backends()
print(f"[env] mpo_core backends: {b}")
if os.environ.get("MPO_CORE_NO_EXT") != "1":
    if not b["cpp"]:
        sys.exit("[env] mpo_core._C (the C++ extension) is missing after the build: see the pip output above")
    cuda_sources = glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))
    want_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None \
        and os.environ.get("MPO_CORE_FORCE_CPU_EXT") != "1"
    if want_cuda and not extension().WITH_CUDA:
        sys.exit("[env] a CUDA torch and toolkit are present but mpo_core._C was built without its CUDA kernels")
PY
  ) || { echo "[env] the installed mpo_core is not usable (see above); not writing $stamp" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Set up canonwrap on a fresh Debian machine: system packages, a virtual
# environment in .venv, the CPU build of PyTorch and the project with its extras.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# gfortran: escnn's dependency py3nj compiles Fortran code at install time.
if ! command -v gfortran >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gfortran >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade "pip<26.2" wheel
# The CPU build of torch 2.13.0 is taken first so nothing later pulls a CUDA build.
$VPY -m pip install -q "torch==2.13.0"
# numpy<2 for escnn (lie_learn), pandas<3 for qm9pack, setuptools<81 keeps pkg_resources.
$VPY -m pip install -q -e ".[molecules,images,dev]" "torch==2.13.0"
$VPY -c "import torch, torch_geometric, numpy; print('canonwrap environment ready: torch', torch.__version__, 'numpy', numpy.__version__)"

# Optional: equiadapt (for canonwrap.canonicalizers.equiadapt) in a SEPARATE environment,
# .venv-equiadapt. equiadapt 0.1.2 imports torchvision, and the PyPI torchvision wheels only
# import beside the matching CUDA build of torch, not beside the CPU torch 2.13.0 of .venv
# ("operator torchvision::nms does not exist"). .venv-equiadapt holds the pair
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB with its libraries, runs on CPU),
# equiadapt without its declared dependencies plus the ones it imports (e2cnn, kornia,
# omegaconf, hydra-core), and canonwrap in editable mode. tests/canonicalizers/test_equiadapt.py
# runs its tests in it through a subprocess (and skips them when it is absent).
# Built by default (measured: 1-2 minutes from this machine's disk, 5.5 GB; an existing one is
# only checked, ~15 s); CANONWRAP_EQUIADAPT=0 bash scripts/setup.sh skips it.
EQ=.venv-equiadapt
EQ_CHECK="import canonwrap, torchvision
from equiadapt.images.canonicalization.discrete_group import GroupEquivariantImageCanonicalization"
if [ "${CANONWRAP_EQUIADAPT:-1}" != "0" ]; then
  if [ -x "$EQ/bin/python" ] && "$EQ/bin/python" -c "$EQ_CHECK" >/dev/null 2>&1; then
    echo "equiadapt environment ready: $EQ"
  else
    [ -x "$EQ/bin/python" ] || "$PY" -m venv "$EQ"
    EPY="$EQ/bin/python"
    "$EPY" -m pip install -q --no-compile "torch==2.14.1" "torchvision==0.29.1" "numpy<2" \
      e2cnn kornia hydra-core omegaconf "torch-geometric>=2.4" tqdm "pytest>=7" pytest-timeout
    "$EPY" -m pip install -q --no-compile --no-deps "equiadapt==0.1.2" -e .
    # equiadapt's wheel also installs top-level docs/, examples/, tests/, tutorials/ and utils/
    # folders into site-packages (~110 MB); remove them so that nothing can shadow this
    # repository's tests package (or any other "utils"/"examples").
    "$EPY" - <<'PYEOF'
import importlib.metadata as md
import shutil
from pathlib import Path

dist = md.distribution("equiadapt")
for top in sorted({f.parts[0] for f in dist.files or []}):
    path = Path(dist.locate_file(top))
    if top in {"docs", "examples", "tests", "tutorials", "utils"} and path.is_dir():
        shutil.rmtree(path)
        print("removed stray", path)
PYEOF
    "$EPY" -c "$EQ_CHECK; print('equiadapt environment ready: torch', __import__('torch').__version__)"
  fi
fi

#!/usr/bin/env bash
# Set up canonwrap on a fresh Debian machine: system packages, a virtual environment in
# .venv with the CPU build of PyTorch and the project with its extras. That is all the
# examples need.
#
#   bash scripts/setup.sh            # .venv only (examples, docs)
#   bash scripts/setup.sh --tests    # also .venv-equiadapt, where the equiadapt adapter's
#                                    # tests run (torch 2.14.1 + torchvision, about 5.5 GB)
#
# Idempotent: a second run only checks what is already there. Every step prints what it
# does and how long it took; pip shows its own progress.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "scripts/setup.sh: unknown option $arg (use --tests or nothing)" >&2; exit 2 ;;
  esac
done

SETUP_START=$(date +%s)
STEP_START=$SETUP_START
step() {  # step "what": announce a step and remember when it started
  STEP_START=$(date +%s)
  echo "==> $1"
}
done_step() {
  echo "    done in $(( $(date +%s) - STEP_START )) s"
}

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# gfortran: escnn's dependency py3nj compiles Fortran code at install time.
if ! command -v gfortran >/dev/null 2>&1; then
  step "installing gfortran with apt-get (escnn's py3nj compiles Fortran)"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y gfortran
  done_step
fi

PY=${PYTHON:-python3}
VPY=.venv/bin/python
if [ ! -x "$VPY" ]; then
  step "creating the virtual environment .venv with $PY"
  "$PY" -m venv .venv
  done_step
fi
step "pip and wheel in .venv"
$VPY -m pip install --upgrade "pip<26.2" wheel
done_step
# The CPU build of torch 2.13.0 is taken first so nothing later pulls a CUDA build.
step "torch 2.13.0 (CPU build) in .venv"
$VPY -m pip install "torch==2.13.0"
done_step
# numpy<2 for escnn (lie_learn), pandas<3 for qm9pack, setuptools<81 keeps pkg_resources.
step "canonwrap (editable) with the molecules, images and dev extras in .venv (escnn, RDKit, qm9pack, pytest, ruff, mkdocs)"
$VPY -m pip install -e ".[molecules,images,dev]" "torch==2.13.0"
done_step
$VPY -c "import torch, torch_geometric, numpy; print('canonwrap environment ready: torch', torch.__version__, 'numpy', numpy.__version__)"

# Tests only: equiadapt (for canonwrap.canonicalizers.equiadapt) in a SEPARATE environment,
# .venv-equiadapt. equiadapt 0.1.2 imports torchvision, and the PyPI torchvision wheels only
# import beside the matching CUDA build of torch, not beside the CPU torch 2.13.0 of .venv
# ("operator torchvision::nms does not exist"). .venv-equiadapt holds the pair
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB with its libraries, runs on CPU),
# equiadapt without its declared dependencies plus the ones it imports (e2cnn, kornia,
# omegaconf, hydra-core), and canonwrap in editable mode, also without its dependencies, so
# the ones `import canonwrap` needs beyond those (flow-matching) are listed here too.
# tests/canonicalizers/test_equiadapt.py
# runs its tests in it through a subprocess (and skips them when it is absent).
# Built by --tests (measured: 1-2 minutes from this machine's disk, 5.5 GB; an existing one is
# only checked, ~15 s); CANONWRAP_EQUIADAPT=0 skips it even then.
EQ=.venv-equiadapt
EQ_CHECK="import canonwrap, torchvision
from equiadapt.images.canonicalization.discrete_group import GroupEquivariantImageCanonicalization"
if [ "$WITH_TESTS" = 1 ] && [ "${CANONWRAP_EQUIADAPT:-1}" != "0" ]; then
  step "checking the equiadapt test environment $EQ"
  if [ -x "$EQ/bin/python" ] && "$EQ/bin/python" -c "$EQ_CHECK" >/dev/null 2>&1; then
    echo "equiadapt environment ready: $EQ"
    done_step
  else
    [ -x "$EQ/bin/python" ] || "$PY" -m venv "$EQ"
    EPY="$EQ/bin/python"
    done_step
    step "torch 2.14.1 + torchvision 0.29.1 and equiadapt's imports in $EQ (about 5.5 GB)"
    "$EPY" -m pip install --no-compile "torch==2.14.1" "torchvision==0.29.1" "numpy<2" \
      e2cnn kornia hydra-core omegaconf "torch-geometric>=2.4" tqdm "pytest>=7" pytest-timeout \
      "flow-matching>=1.0.10"
    done_step
    step "equiadapt 0.1.2 (without its declared dependencies) and canonwrap (editable) in $EQ"
    "$EPY" -m pip install --no-compile --no-deps "equiadapt==0.1.2" -e .
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
    done_step
  fi
elif [ "$WITH_TESTS" = 0 ]; then
  echo "(not building $EQ, the equiadapt test environment: bash scripts/setup.sh --tests does)"
fi
echo "setup finished in $(( $(date +%s) - SETUP_START )) s"

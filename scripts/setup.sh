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

#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install attnbench into it.
#
#   scripts/setup_env.sh [VENV_DIR]      (default .venv)
#
# torch comes first, so that pip never pulls the multi-GB CUDA build by accident:
#  - a torch already importable by $PYTHON (a CUDA build on a GPU machine, say) is kept: the venv
#    then sees the system site-packages;
#  - otherwise the CPU build torch==$TORCH_VERSION is installed (from $TORCH_INDEX_URL when set,
#    e.g. https://download.pytorch.org/whl/cpu; else from pip's configured sources).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch that $PYTHON already has ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing the CPU build torch==$TORCH_VERSION"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  fi
fi
echo "setup: installing attnbench and its dependencies"
"${PIP[@]}" install -q -e ".[dev,launchers]"
"$VENV/bin/python" -c "import torch, variants, harness; print('setup: ok, torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"

#!/usr/bin/env bash
# Install moetune into ./.venv (created if missing).
#
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --dev    # plus pytest, ruff and DeepSpeed (so the ZeRO tests run)
#
# torch comes first, chosen for the machine: with an NVIDIA GPU, PyPI's default (CUDA) build; without one, the
# CPU build pinned below, which avoids several GB of CUDA wheels (set MOETUNE_TORCH to override, e.g.
# MOETUNE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" on a machine with no local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,deepspeed]"
python=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if [ -n "${MOETUNE_TORCH:-}" ]; then
    torch_spec=($MOETUNE_TORCH)
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec=("torch>=2.10")
else
    torch_spec=("torch==2.13.0")
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "installing ${torch_spec[*]}"
    "${pip[@]}" install "${torch_spec[@]}"
fi
echo "installing moetune${extra}"
"${pip[@]}" install -e ".${extra}"
.venv/bin/python -c "import moetune, torch, transformers, peft, trl; print(f'moetune {moetune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}')"

#!/usr/bin/env bash
# The GPU check on the GPU machine: bash bench/gpu.sh [--budget SECONDS] [--out DIR] [--smoke]
#
# That machine has torch, transformers and pytest but not ramp's pure-Python Hydra stack, and nothing can
# be downloaded there: `make gpu-wheels` (here) puts those wheels into .whl/, and this script installs
# them into .gpu-site/ (no index, no dependencies), puts it on PYTHONPATH after the repository, and runs
# `python -m bench.gpu` offline. Set RAMP_COMMIT to the commit when the copy there has no .git.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-deps --no-index --no-compile --disable-pip-version-check \
        --upgrade --target .gpu-site .whl/*.whl
    export PYTHONPATH="$repo:$repo/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$python" -m bench.gpu "$@"

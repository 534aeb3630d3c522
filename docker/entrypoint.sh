#!/usr/bin/env bash
# The image's entrypoint: ramp's launcher for this node (python -m launch.run), so that
#
#   docker run --gpus all --init --ipc=host -v "$PWD/work:/workspace" ramp [launcher options] [--] [overrides]
#
# trains on every GPU the container sees, writing outputs/ and logs/ under RAMP_WORKDIR. The launcher
# replaces this script (exec), so `docker stop` reaches it: the trainers save a checkpoint and exit 0
# (give them time to: docker stop -t 120). Running the same command again resumes.
# Any other command runs as it is: docker run -it ramp bash
set -euo pipefail

cd "${RAMP_WORKDIR:-.}"
if [[ $# -gt 0 && $1 != -* && $1 != *=* ]] && command -v "$1" >/dev/null; then
    exec "$@"
fi
exec "${RAMP_PYTHON:-python}" -m launch.run "$@"

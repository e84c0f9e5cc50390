#!/usr/bin/env bash
# Build each peer in its own virtualenv from the package registry, pinned versions only.
#   benchmarks/peers/setup.sh [nvflare] [flower]     (default: both)
# Venvs go to $PEERS_VENVS (default benchmarks/peers/.venvs). A venv is built once: its `.ok`
# marker is written only after `pip install` succeeded, so a failed build is retried next
# time. pip is the only thing that touches the network; the runs themselves never do.
set -euo pipefail
CACHE="${PEERS_VENVS:-$(cd "$(dirname "$0")" && pwd)/.venvs}"
PY="${PYTHON:-python3.11}"
COMMON=(torch==2.13.0 monai==1.6.1 opacus==1.6.0)
declare -A PEER=(
  # nvflare's `pt` extra pulls torchvision, which fails to import with the CPU torch here
  [nvflare]="nvflare==2.9.0"
  [flower]="flwr[simulation]==1.41.0"
)
for name in "${@:-nvflare flower}"; do
  for n in $name; do
    dir="$CACHE/$n"
    [[ -f "$dir/.ok" ]] && continue
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check ${PEER[$n]} "${COMMON[@]}"
    touch "$dir/.ok"
  done
done

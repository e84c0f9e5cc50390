#!/usr/bin/env bash
# Collect every wheel the CareFL images need into ./wheelhouse (git-ignored), so
# `docker build` installs fully offline (`pip install --no-index`): build machines whose
# containers cannot reach a package index, and reproducible air-gapped hospital images.
#
#   docker/make_wheelhouse.sh            CPU torch (what pip resolves here: the +cpu wheel
#                                        when pip's find-links/index provides it)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 docker/make_wheelhouse.sh
#                                        CUDA torch (+ nvidia-* wheels, several GB) for the
#                                        GPU image
#
# Run it with the same Python minor version as the image (3.11) on x86_64 Linux. Re-running
# reuses wheels already there. Options: WHEELHOUSE=dir (default ./wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE="${WHEELHOUSE:-wheelhouse}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WHEELHOUSE"

"$PYTHON" - <<'EOF' > "$WHEELHOUSE/.requirements.txt"
import sys, tomllib
if sys.version_info[:2] != (3, 11):
    sys.exit(f"make_wheelhouse: needs Python 3.11 (the images' version), got {sys.version.split()[0]}")
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(["setuptools>=61", "wheel", *deps]))
EOF

extra=()
[ -n "${TORCH_INDEX_URL:-}" ] && extra+=(--extra-index-url "$TORCH_INDEX_URL")
# `pip wheel` keeps wheels as they are and builds the few sdists into wheels.
"$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" \
    "${extra[@]}" -r "$WHEELHOUSE/.requirements.txt"
echo "make_wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE"
ls "$WHEELHOUSE"/torch-*.whl

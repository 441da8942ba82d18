#!/usr/bin/env bash
# Replace DEST with a copy of the project's tracked and untracked-but-not-ignored files (what a clean
# clone plus the working tree's changes has; no build outputs, no venvs). Used by compat.sh and
# emulate.sh to build beside the main build without touching it.
#
#   scripts/copy_tree.sh DEST
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$1"
rm -rf "$DEST"
mkdir -p "$DEST"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar cf - --) | (cd "$DEST" && tar xf -)

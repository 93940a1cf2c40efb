#!/usr/bin/env bash
# Downloads the peers' wheels into the folder tools/gpu_check.sh installs from (default ./.whl, or
# $GPU_CHECK_WHEELS), so a GPU machine without registry access measures them too.
#
#   bash tools/fetch_wheels.sh            # liger-kernel and the pure-Python package it imports
#   bash tools/fetch_wheels.sh --list     # what would be fetched, and the folder's size limit
#
# Every wheel is pure Python (py3-none-any), so it installs on the GPU machine whatever its Python (3.12
# there) and pulls in nothing: the machine's own torch (2.11) and Triton (3.6) stay what Liger runs on.
#   liger-kernel 0.8.5   LayerNorm, GEGLU and fused linear cross-entropy peers; needs torch >= 2.1.2 and
#                        triton >= 2.3.1 (it declares nothing else; its kernels were run here with Triton 3.6
#                        and 3.9 in the CPU interpreter, the cross-entropy kernel only)
#   packaging            imported by Liger (usually present already; harmless when it is)
# Not fetched: QuACK (quack-kernels needs the CUTLASS DSL, whose wheels are far over the 60 MiB this folder
# may hold: the check measures QuACK only where it is installed already) and apex (it has no wheel; built
# from source with its CUDA extensions, it is measured where importable).
# The folder is checked against 60 MiB after the download (the device machine takes 64 MiB of carried files).
set -euo pipefail

LIST=0
for arg in "$@"; do
  case "$arg" in
    --list) LIST=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "fetch_wheels.sh: unknown argument '$arg' (use --list or --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${GPU_CHECK_WHEELS:-$REPO/.whl}
PY=${PYTHON:-python3}
LIMIT_MIB=60
WHEELS=("liger-kernel==0.8.5" "packaging")

if [ "$LIST" = 1 ]; then
  echo "would fetch into $DEST (limit ${LIMIT_MIB} MiB): ${WHEELS[*]}"
  exit 0
fi
mkdir -p "$DEST" || { echo "fetch_wheels.sh: cannot create $DEST" >&2; exit 2; }
for spec in "${WHEELS[@]}"; do
  # --only-binary and the none/any platform: a pure-Python wheel or nothing, never an sdist build
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.12 \
    --implementation py --dest "$DEST" "$spec" \
    || { echo "fetch_wheels.sh: could not download $spec (is the package registry reachable?)" >&2; exit 1; }
done
size_kib=$(du -sk "$DEST" | cut -f1)
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "fetch_wheels.sh: $DEST holds $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB limit; remove what the" \
       "check does not need" >&2
  exit 1
fi
echo "fetch_wheels.sh: $DEST ($((size_kib / 1024)).$(( (size_kib % 1024) * 10 / 1024 )) MiB):"
ls -1 "$DEST"

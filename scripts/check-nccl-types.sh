#!/usr/bin/env bash
# Type-checks (cargo clippy, no linking, nothing run) the `nccl` feature on a machine without
# the CUDA toolkit, against the locked candle and cudarc: a stand-in `nvcc` answers
# `--version` and "compiles" candle's kernels to empty files. It proves that the NCCL code
# compiles against the real APIs, and nothing about whether it works on a GPU.
#
#   scripts/check-nccl-types.sh          # uses target/nccl-typecheck as the target dir
set -euo pipefail
cd "$(dirname "$0")/.."
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
cat > "$fake/nvcc" <<'NVCC'
#!/bin/sh
case "$*" in
  *--version*)
    printf 'nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) NVIDIA Corporation\nBuilt on stand-in\nCuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4\n'
    exit 0;;
esac
out=""; dir=""; prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$prev" = "--output-directory" ] && dir="$a"
  prev="$a"
done
[ -n "$out" ] && : > "$out"
if [ -n "$dir" ]; then
  for a in "$@"; do
    case "$a" in *.cu) : > "$dir/$(basename "$a" .cu).ptx";; esac
  done
fi
exit 0
NVCC
chmod +x "$fake/nvcc"
export PATH="$fake:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/nccl-typecheck}"
# Stale empty kernels from an earlier run are fine; a real toolkit's would be too.
cargo clippy --features nccl --all-targets -- -D warnings
echo "nccl feature: type-checks (not built, not linked, not run)"

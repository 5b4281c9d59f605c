#!/usr/bin/env bash
# Builds pgrpo with `--features cuda` for real on a machine without a GPU: candle's CUDA kernels
# are compiled by NVIDIA's nvcc, and every library, test, bench and example binary is linked
# against cuBLAS, cuBLASLt, cuRAND, NVRTC and the CUDA runtime. Nothing is run on a GPU.
#
# The toolkit comes from PyPI, in a virtual environment outside the repository. Of NVIDIA's
# wheels only the CUDA 13 ones carry the `nvcc` driver (with cicc, cudafe++, fatbinary, nvlink);
# the `nvidia-cuda-nvcc-cu12` wheels, 12.0 to 12.9, hold ptxas and libnvvm only. So the toolkit
# is CUDA 13.0, which the locked cudarc supports (`cuda-13000`, chosen from `nvcc --version`),
# and which needs an NVIDIA driver of the 580 series or newer to run what it builds.
#
# No wheel ships `libcuda.so`, the driver library, not even as a link stub. The script makes a
# link-time stand-in (lib64/stubs/libcuda.so, soname libcuda.so.1): one C function for each
# driver entry point that the locked cudarc declares, each returning CUDA_ERROR_STUB_LIBRARY
# (34). It is only on the linker's search path. On a GPU machine the binaries load the real
# driver's libcuda.so.1; keep the stub off LD_LIBRARY_PATH there.
#
#   scripts/cuda-build.sh                 # wheels + toolkit dir + cargo build (target/cuda)
#   scripts/cuda-build.sh --env           # wheels + toolkit dir, then print `export` lines
#   PGRPO_CUDA_FEATURES=nccl scripts/cuda-build.sh   # also NCCL (needs MPI and libclang)
#
# Environment:
#   PGRPO_CUDA_VENV      the virtual environment (default ~/.cache/pgrpo-cuda-venv); reused
#                        when its pinned wheel set is already installed
#   PGRPO_CUDA_HOME      use this CUDA toolkit (bin/nvcc, lib64 or lib) instead of the wheels
#   PGRPO_CUDA_FEATURES  cargo features (default `cuda`; `nccl` adds the NCCL wheel)
#   PGRPO_CUDA_TARGETS   cargo's target selection (default `--all-targets`)
#   CUDA_COMPUTE_CAP     the GPU architecture candle's kernels are built for (default 90:
#                        H100/H200)
#   CARGO_TARGET_DIR     default target/cuda
#   PYTHON               the Python that makes the venv (default python3)
# Exits non-zero when an install, the kernel compilation or any link fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

mode=build
case "${1:-}" in
  --env) mode=env ;;
  "") ;;
  *) echo "usage: $0 [--env]" >&2; exit 2 ;;
esac

log() { printf '[cuda-build %s] %s\n' "$(date +%T)" "$*" >&2; }

features="${PGRPO_CUDA_FEATURES:-cuda}"
read -r -a targets <<< "${PGRPO_CUDA_TARGETS:---all-targets}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"

# The CUDA 13.0 wheel set (13.0 update 2). nvcc's own requirements (nvvm, crt, runtime) are
# pinned too, or pip would take their newest releases.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
# cudarc's `nccl` feature binds the NCCL 2.30 API.
case ",$features," in
  *,nccl,*) wheels+=(nvidia-nccl-cu13==2.30.7) ;;
esac

if [ -n "${PGRPO_CUDA_HOME:-}" ]; then
  cuda_root="$PGRPO_CUDA_HOME"
  [ -x "$cuda_root/bin/nvcc" ] || { echo "no nvcc in $cuda_root/bin" >&2; exit 1; }
  log "using the toolkit at $cuda_root"
else
  venv="${PGRPO_CUDA_VENV:-$HOME/.cache/pgrpo-cuda-venv}"
  stamp="$venv/.pgrpo-wheels"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${wheels[*]}" ]; then
    log "wheels already in $venv"
  else
    log "installing ${#wheels[@]} wheels into $venv"
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
      "${wheels[@]}"
    printf '%s' "${wheels[*]}" > "$stamp"
  fi
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cu="$site/nvidia/cu13"
  [ -x "$cu/bin/nvcc" ] || { echo "the wheels installed no $cu/bin/nvcc" >&2; exit 1; }

  # A toolkit-shaped folder: the wheels' bin, nvvm and include, and lib64 with the link names
  # (libcublas.so -> libcublas.so.13, ...) that `-lcublas` needs; the wheels ship only the
  # versioned names.
  cuda_root="$venv/cuda"
  rm -rf "$cuda_root"
  mkdir -p "$cuda_root/lib64/stubs"
  for d in bin nvvm include; do ln -s "$cu/$d" "$cuda_root/$d"; done
  for so in "$cu"/lib/lib*.so.* "$site"/nvidia/nccl/lib/lib*.so.*; do
    [ -e "$so" ] || continue
    name=$(basename "$so")
    ln -sf "$so" "$cuda_root/lib64/$name"
    ln -sf "$so" "$cuda_root/lib64/${name%%.so.*}.so"
  done
  [ -f "$site/nvidia/nccl/include/nccl.h" ] && ln -s "$site/nvidia/nccl/include" "$cuda_root/include-nccl"

  # The driver's link stub, from the entry points the locked cudarc declares.
  cudarc_src=$(cargo metadata --locked --format-version 1 --features cuda \
    | "$venv/bin/python" -c '
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
  stub_c="$cuda_root/lib64/stubs/libcuda-stub.c"
  {
    echo '/* Link-time stand-in for the CUDA driver (libcuda.so.1), made by scripts/cuda-build.sh.'
    echo '   Every entry point returns CUDA_ERROR_STUB_LIBRARY (34). Never load it at run time. */'
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc_src/src/driver/sys/mod.rs" \
      | sed -E 's/^pub unsafe fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 34; }/' | sort -u
  } > "$stub_c"
  [ "$(grep -c '^int cu' "$stub_c")" -gt 100 ] || { echo "found no driver entry points in $cudarc_src" >&2; exit 1; }
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$cuda_root/lib64/stubs/libcuda.so" "$stub_c"
  log "toolkit folder $cuda_root ($(grep -c '^int cu' "$stub_c") driver stubs)"
fi

# cudarc reads CUDA_HOME/CUDA_PATH/CUDA_ROOT/CUDA_TOOLKIT_ROOT_DIR (all of them, for the link
# search), cudaforge (candle-kernels' build) NVCC, PATH and CUDA_HOME.
export CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root" CUDA_ROOT="$cuda_root" \
  CUDA_TOOLKIT_ROOT_DIR="$cuda_root" NVCC="$cuda_root/bin/nvcc" PATH="$cuda_root/bin:$PATH"
libdir="$cuda_root/lib64"
[ -d "$libdir" ] || libdir="$cuda_root/lib"

if [ "$mode" = env ]; then
  printf 'export CUDA_HOME=%q CUDA_PATH=%q CUDA_ROOT=%q CUDA_TOOLKIT_ROOT_DIR=%q NVCC=%q\n' \
    "$cuda_root" "$cuda_root" "$cuda_root" "$cuda_root" "$NVCC"
  printf 'export PATH=%q CUDA_COMPUTE_CAP=%q CARGO_TARGET_DIR=%q\n' \
    "$PATH" "$CUDA_COMPUTE_CAP" "$CARGO_TARGET_DIR"
  # The real libraries (never the stubs folder) for running what was built.
  printf 'export LD_LIBRARY_PATH=%q\n' "$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  exit 0
fi

log "$(nvcc --version | tail -2 | head -1)"
log "cargo build --release --locked --features $features ${targets[*]} (target dir $CARGO_TARGET_DIR, sm_$CUDA_COMPUTE_CAP)"
cargo build --release --locked --features "$features" "${targets[@]}"

# What the build proves, checked rather than assumed: candle's kernels are real PTX for the
# requested architecture, and the binaries need the CUDA libraries.
ptx=$(find "$CARGO_TARGET_DIR/release/build" -path '*candle-kernels-*/out/*.ptx' -size +1k | head -1)
[ -n "$ptx" ] || { echo "no compiled PTX under $CARGO_TARGET_DIR/release/build" >&2; exit 1; }
grep -q "^.target sm_$CUDA_COMPUTE_CAP" "$ptx" || { echo "$ptx is not for sm_$CUDA_COMPUTE_CAP" >&2; exit 1; }
log "PTX: $(find "$CARGO_TARGET_DIR/release/build" -path '*candle-kernels-*/out/*.ptx' | wc -l) files, $(grep -m1 '^.version' "$ptx"), $(grep -m1 '^.target' "$ptx")"
bins=$(find "$CARGO_TARGET_DIR/release/deps" "$CARGO_TARGET_DIR/release/examples" -maxdepth 1 \
  -type f -perm -u+x ! -name '*.so' | sort)
[ -n "$bins" ] || { echo "no binaries found" >&2; exit 1; }
# The linker drops a library that a binary takes no symbol from (--as-needed): cuBLASLt and
# NVRTC are on cudarc's link line, but no binary of this crate uses them (they are counted, not
# required); each of the other four must be needed by at least one binary.
summary=""
libs="libcuda.so libcublas.so libcurand.so libcudart.so libcublasLt.so libnvrtc.so"
case ",$features," in *,nccl,*) libs="$libs libnccl.so" ;; esac
for lib in $libs; do
  count=0
  for b in $bins; do
    readelf -d "$b" | grep -q "NEEDED.*\[$lib\." && count=$((count + 1))
  done
  case "$lib" in
    libcublasLt.so | libnvrtc.so) ;;
    *) [ "$count" -gt 0 ] || { echo "no binary needs $lib: the CUDA code was not linked" >&2; exit 1; } ;;
  esac
  summary="$summary $lib:$count"
done
log "built and linked $(echo "$bins" | wc -l) binaries (${targets[*]}); binaries needing each library:$summary"

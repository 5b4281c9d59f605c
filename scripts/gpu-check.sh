#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (made for one H100/H200 and 16 cores), build
# with `--features cuda`, run the test suite, and run the training-step and sampling benches
# on the GPU; every number goes to ONE file, gpu-check.txt, in $PGRPO_GPU_CHECK_DIR, else
# $OUT, else target/. The full output of each part goes beside it, to gpu-check.log.
# Each part runs under its own `timeout`; the parts' limits add up to 8 minutes
# (PGRPO_GPU_CHECK_SCALE=2 doubles them all).
#
#   scripts/gpu-check.sh                # with cargo on the GPU machine
#   scripts/gpu-check.sh --bundle       # here, without a GPU: build and pack target/gpu-bundle
#   scripts/gpu-check.sh                # there, without cargo: runs target/gpu-bundle
#
# Two ways to run:
#  * cargo on the GPU machine (and crates.io, or a filled cargo cache): the toolkit is the
#    machine's own when an `nvcc` is on PATH or in /usr/local/cuda, else the CUDA 13.0 wheels
#    of scripts/cuda-build.sh (which need PyPI). Parts: build (scripts/cuda-build.sh for the
#    library, tests and benches; it checks that candle's kernels are real sm_XX PTX and that
#    the binaries link the CUDA libraries), `cargo test --release --features cuda --lib
#    --tests` (unit and integration tests; the doc tests and the examples' build, CPU-only,
#    are left to CI), then the two benches with PGRPO_BENCH_DEVICE=cuda. From a clean target
#    dir the build is the long part: the 240 s given to it are a guess for 16 cores (measured
#    on 2 shared cores: 38 min, 22 min of CPU time); PGRPO_GPU_CHECK_SCALE=3 gives more.
#  * no cargo there (a bare GPU machine with no network): `--bundle` here builds with the
#    wheels' toolkit and packs into target/gpu-bundle (about 10 MB: bin.tar.xz and BUILD) the
#    binaries of the unit tests, of every integration test and of the two benches; bring that
#    folder along (it is ignored by git) and run the script there (PGRPO_GPU_CHECK_MODE=bundle
#    forces this mode where cargo exists). The doc tests are not in the bundle.
#
# What touches the GPU: the tensor tests of tests/objective.rs and tests/objective_surrogates.rs
# run once per device, CUDA included when built with `cuda`; the benches with
# PGRPO_BENCH_DEVICE=cuda. Every other test is CPU-only and runs as on any machine. The NCCL
# check (`cargo test --release --features nccl --test nccl`, needs MPI) is not part of this.
#
# CUDA_COMPUTE_CAP defaults to what nvidia-smi reports (90 on H100/H200). Exit status: 0 when
# every part passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bundle="${PGRPO_GPU_BUNDLE:-$repo/target/gpu-bundle}"
bundle_benches=(train_step sampling)

if [ "${1:-}" = "--bundle" ]; then
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
  bash scripts/cuda-build.sh
  rm -rf "$bundle"
  stage=$(mktemp -d)
  mkdir -p "$bundle" "$stage/tests" "$stage/benches"
  # cargo prints each test and bench executable it built; take the newest of each name.
  listing=$(eval "$(bash scripts/cuda-build.sh --env)" &&
    cargo test --release --locked --features cuda --lib --tests --no-run --message-format json 2>/dev/null &&
    cargo bench --locked --features cuda --no-run --message-format json 2>/dev/null)
  pick() { # kind name -> executable path
    printf '%s\n' "$listing" | python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    t = m.get("target") or {}
    if m.get("executable") and t.get("name") == name and kind in t.get("kind", []):
        print(m["executable"])' "$1" "$2" | tail -1
  }
  cp "$(pick lib pgrpo)" "$stage/tests/lib"
  for t in tests/*.rs; do
    t=$(basename "$t" .rs)
    exe=$(pick test "$t")
    # mpi and nccl need their own features (and MPI); they are not built with `cuda` alone.
    [ -n "$exe" ] && cp "$exe" "$stage/tests/$t"
  done
  for b in "${bundle_benches[@]}"; do cp "$(pick bench "$b")" "$stage/benches/$b"; done
  strip "$stage"/tests/* "$stage"/benches/*
  # Each binary embeds candle's PTX and kernels (~50 MB), the same in all of them: xz -9 (its
  # 64 MiB window spans a binary) packs them together small enough to carry.
  XZ_OPT=-9 tar -C "$stage" -cJf "$bundle/bin.tar.xz" tests benches
  rm -rf "$stage"
  {
    echo "built: $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
    echo "source dir at build time: $repo"
    nvcc_line=$(eval "$(bash scripts/cuda-build.sh --env)" && nvcc --version | grep release)
    echo "toolkit: $nvcc_line; CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}"
  } > "$bundle/BUILD"
  du -sh "$bundle"
  cat "$bundle/BUILD"
  exit 0
fi

report_dir="${PGRPO_GPU_CHECK_DIR:-${OUT:-$repo/target}}"
mkdir -p "$report_dir"
report="$report_dir/gpu-check.txt"
log="$report_dir/gpu-check.log"
: > "$report"
: > "$log"
scale="${PGRPO_GPU_CHECK_SCALE:-1}"
# Panic messages without backtraces (candle's errors capture one when these ask for it).
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
t0=$(date +%s)
failed=0

say() { printf '%s\n' "$*" >> "$report"; }
section() { printf '\n== %s\n' "$*" >> "$report"; printf '\n===== %s (%s)\n' "$*" "$(date +%T)" >> "$log"; }

# part NAME LIMIT_S PATTERN COMMAND...: runs COMMAND under `timeout`, its whole output to the
# log, the lines matching PATTERN (grep -E) to the report, and its pass/fail and time.
part() {
  local name=$1 limit=$(( $2 * scale )) pattern=$3 rc start secs out
  shift 3
  section "$name (limit ${limit}s): $*"
  out=$(mktemp)
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  cat "$out" >> "$log"
  grep -E "$pattern" "$out" >> "$report" || true
  if [ "$rc" -eq 0 ]; then
    say "-> $name: PASS in ${secs}s"
  else
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && say "-> $name: TIMED OUT after ${secs}s (limit ${limit}s)"
    say "-> $name: FAIL (exit $rc) in ${secs}s; last lines:"
    tail -n 15 "$out" | sed 's/^/   | /' >> "$report"
    failed=1
  fi
  rm -f "$out"
  return 0
}

section "machine"
say "date: $(date -u +%FT%TZ)"
say "host: $(uname -n), $(uname -sr), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
if rev=$(git rev-parse --short HEAD 2> /dev/null); then
  say "commit: $rev$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
else
  say "commit: unknown (no git repository here)"
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv >> "$report" 2>&1
  nvidia-smi >> "$report" 2>&1
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
else
  say "nvidia-smi: not found (no NVIDIA driver here?)"
  failed=1
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-${cap:-90}}"
say "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

if command -v cargo > /dev/null && [ "${PGRPO_GPU_CHECK_MODE:-}" != bundle ]; then
  say "mode: cargo ($(cargo --version), $(rustc --version))"
  if [ -z "${PGRPO_CUDA_HOME:-}" ]; then
    nvcc_path=$(command -v nvcc || true)
    [ -n "$nvcc_path" ] || { [ -x /usr/local/cuda/bin/nvcc ] && nvcc_path=/usr/local/cuda/bin/nvcc; }
    if [ -n "$nvcc_path" ]; then
      export PGRPO_CUDA_HOME
      PGRPO_CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
    fi
  fi
  say "toolkit: ${PGRPO_CUDA_HOME:-CUDA 13.0 wheels (scripts/cuda-build.sh)}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
  # Installs the wheels when there is no toolkit (counted in the build part's limit).
  part "build: scripts/cuda-build.sh (lib, tests, benches)" 240 '^\[cuda-build' \
    env PGRPO_CUDA_TARGETS="--lib --tests --benches" bash scripts/cuda-build.sh
  if env_lines=$(bash scripts/cuda-build.sh --env 2>> "$log"); then
    eval "$env_lines"
    say "nvcc: $(nvcc --version | grep release)"
    part "tests: cargo test --release --features cuda --lib --tests" 120 \
      '^test result:|^     Running|FAILED|panicked' \
      cargo test --release --locked --features cuda --lib --tests
    for b in "${bundle_benches[@]}"; do
      part "bench $b on the GPU" 60 '^[a-z_]+/|time:|thrpt:|change:|panicked' \
        env PGRPO_BENCH_DEVICE=cuda cargo bench --locked --features cuda --bench "$b"
    done
  else
    say "no toolkit: tests and benches not run"
    failed=1
  fi
elif [ -f "$bundle/bin.tar.xz" ]; then
  say "mode: prebuilt binaries from $bundle (no cargo here)"
  sed 's/^/  /' "$bundle/BUILD" >> "$report"
  bin=$(mktemp -d)
  trap 'rm -rf "$bin"' EXIT
  tar -C "$bin" -xJf "$bundle/bin.tar.xz" 2> /dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$bundle/bin.tar.xz" "$bin"
  # The binaries need the CUDA 13 libraries: the toolkit's, or those of the CUDA wheels that
  # this machine's Python has.
  libs=""
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null); do
    [ -e "$d/libcublas.so.13" ] && libs="$libs${libs:+:}$d"
  done
  export LD_LIBRARY_PATH="$libs${libs:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"
  say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  # One part for all of them: the unit tests ("lib") and every integration test, each binary
  # run from the checkout's root as cargo test runs it.
  part "tests: $(ls "$bin/tests" | wc -l) test binaries (prebuilt)" 180 \
    '^== |^test result:|FAILED|panicked' \
    bash -c 'rc=0; for t in "$1"/tests/*; do echo "== $(basename "$t")"; "$t" || rc=1; done; exit $rc' _ "$bin"
  for b in "${bundle_benches[@]}"; do
    part "bench $b on the GPU (prebuilt)" 60 '^[a-z_]+/|time:|thrpt:|panicked' \
      env PGRPO_BENCH_DEVICE=cuda "$bin/benches/$b" --bench
  done
else
  say "neither cargo nor a bundle ($bundle): nothing to run (see the top of $0)"
  failed=1
fi

section "total"
say "$(( $(date +%s) - t0 ))s; $([ "$failed" -eq 0 ] && echo 'every part passed' || echo 'SOME PARTS FAILED')"
echo "gpu-check: $report"
exit "$failed"

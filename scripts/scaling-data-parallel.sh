#!/usr/bin/env bash
# The scaling table of docs/distributed.md: examples/data_parallel on 1 process (all cores,
# and one thread) and on 2 processes (one thread each), interleaved, `reps` times per
# configuration. Each run appends one JSON line (steps/s, all-reduce time) to $out.
#
#   scripts/scaling-data-parallel.sh [reps] [out]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
out=${2:-target/scaling-data-parallel.jsonl}
cargo build --release --features mpi --example data_parallel
bin=target/release/examples/data_parallel
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cores=$(nproc)
mlp=(--policy mlp --features 256 --hidden 2048 --prompts 128 --g 8 --steps 22 --warmup 2)
lm=(--policy lm --lm-hidden 128 --lm-tokens 8 --prompts 16 --g 8 --steps 7 --warmup 2)
: > "$out"
for rep in $(seq "$reps"); do
  for cfg in mlp lm; do
    declare -n args=$cfg
    echo "rep $rep, $cfg: 1 process x $cores threads, 1 process x 1 thread, 2 processes x 1 thread"
    RAYON_NUM_THREADS=$cores "$bin" "${args[@]}" --log-every 1000 --summary "$out" > /dev/null
    RAYON_NUM_THREADS=1 "$bin" "${args[@]}" --log-every 1000 --summary "$out" > /dev/null
    mpirun -np 2 --bind-to none -x RAYON_NUM_THREADS=1 "$bin" "${args[@]}" --log-every 1000 \
      --summary "$out" > /dev/null
  done
done
echo "results: $out"

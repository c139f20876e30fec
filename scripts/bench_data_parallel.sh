#!/usr/bin/env bash
# Data-parallel scaling of training throughput: img/s of one process against N ranks
# (`flowmap launch`) on the same config and global batch, plus c10d all-reduce bandwidth.
#   scripts/bench_data_parallel.sh [CONFIG] [NPROC] [STEPS]
# Defaults: experiments/tiny_cpu.toml --set model.depth=4 --set model.hidden_size=128, 2 ranks,
# 40 steps, global batch 64, the cores split evenly (1 rank × all threads vs N ranks × cores/N).
# Prints the median img/s of the last half of the steps (metrics.jsonl) and the ratio.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-$here/experiments/tiny_cpu.toml}
nproc=${2:-2}
steps=${3:-40}
bin=${FLOWMAP_BIN:-$here/target/release/flowmap}
[ -x "$bin" ] || { echo "no $bin: run 'make build' first (or set FLOWMAP_BIN)" >&2; exit 2; }
cores=$(nproc)
per_rank=$(( cores / nproc > 0 ? cores / nproc : 1 ))
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
sets=(--set run.steps="$steps" --set run.batch_size=64 --set run.log_every=1 --set run.checkpoint_every=0
      --set run.sample_every=1000000 --set model.depth=4 --set model.hidden_size=128 --set model.patch_size=4)
rate() {  # median img/s over the second half of metrics.jsonl
  python3 - "$1" <<'PY'
import json, statistics, sys
r = [json.loads(l)["img_per_s"] for l in open(sys.argv[1]) if l.strip()]
print(f"{statistics.median(r[len(r)//2:]):.1f}")
PY
}
"$bin" train "$config" "${sets[@]}" --set run.threads="$cores" --run-dir "$tmp/one" >/dev/null 2>&1
"$bin" launch --nproc "$nproc" -- train "$config" "${sets[@]}" --set run.threads="$per_rank" --run-dir "$tmp/many" >/dev/null 2>&1
one=$(rate "$tmp/one/metrics.jsonl"); many=$(rate "$tmp/many/metrics.jsonl")
echo "cores: $cores; global batch 64; DiT depth 4, width 128, patch 4 on 32x32 MNIST; $steps steps"
echo "1 process  x $cores threads: $one img/s"
echo "$nproc ranks x $per_rank threads: $many img/s  (ratio $(python3 -c "print(f'{$many/$one:.2f}')"))"

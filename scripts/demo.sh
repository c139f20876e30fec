#!/usr/bin/env bash
# `make demo`: does one-step generation work here? Two parts, timed:
#   1. flowmap demo-2d: flow matching, Shortcut, MeanFlow and consistency training on 2-D
#      distributions, sampled at 1, 2, 4 and 16 steps (figures + sliced-W1 table, about a minute);
#   2. flowmap table: the same comparison on class-conditional MNIST at 16x16 with a small DiT,
#      sampled with classifier-free guidance, FID and KID over two evaluation seeds
#      (experiments/demo_mnist.toml on the CPU, its three runs trained side by side with --jobs 3;
#      experiments/demo_mnist_gpu.toml, larger and longer, when libtorch sees a CUDA GPU).
# Outputs: runs/demo/2d/ and runs/demo/mnist/ (table.md, fid_vs_steps.png, each run's samples/).
# FLOWMAP_DEMO_DOCS=1 also copies the figures shown in the README into docs/demo/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bin=$here/target/release/flowmap
[ -x "$bin" ] || { echo "no $bin: run 'make build' first" >&2; exit 2; }
start=$(date +%s)
"$bin" demo-2d --out runs/demo/2d
t2d=$(( $(date +%s) - start ))
if "$bin" doctor 2>/dev/null | grep -q '^CUDA  *available'; then
  config=experiments/demo_mnist_gpu.toml jobs=1
else
  # Three small runs side by side, one thread each, beat three in a row with two threads each.
  config=experiments/demo_mnist.toml jobs=3
fi
"$bin" table "$config" --jobs "$jobs"
total=$(( $(date +%s) - start ))
printf '\ndemo wall time: %d s (2-D part %d s, image part %d s with %s)\n' "$total" "$t2d" "$(( total - t2d ))" "$config"
if [ "${FLOWMAP_DEMO_DOCS:-0}" = 1 ]; then
  out=$(sed -n 's/^out_dir *= *"\(.*\)"/\1/p' "$config")
  mkdir -p docs/demo
  cp runs/demo/2d/*.png runs/demo/2d/table.md docs/demo/
  cp "$out/table.md" docs/demo/mnist_table.md
  cp "$out/fid_vs_steps.png" docs/demo/mnist_fid_vs_steps.png
  for run in "$out"/*/; do
    name=$(basename "$run")
    for f in "$run"samples/step_*_steps{1,16}.png; do
      [ -f "$f" ] && cp "$f" "docs/demo/mnist_${name}_$(basename "$f" | sed 's/.*_\(steps[0-9]*\)\.png/\1/').png"
    done
  done
  echo "figures copied to docs/demo/ (wall time ${total} s)"
fi

#!/usr/bin/env bash
# The GPU acceptance run: flowmap beside a PyTorch reference of the same networks on the same GPU,
# in one command, into one report (README "GPU check").
#
#   scripts/gpu_check.sh OUT            full run on CUDA device 0 (about 8 minutes on one H100/H200)
#   scripts/gpu_check.sh --quick OUT    the same code paths with tiny models on the CPU (CI)
#   dist/bundle/gpu_check.sh OUT        the same from `make bundle-gpu-check` on a machine without
#                                       network or cargo: only python3 with torch 2.11 is needed
#
# Writes OUT/report.json (fixed schema), OUT/report.md, OUT/logs/*.log, the sections' JSON files and
# OUT/work/mnist/ (table, FID-vs-steps plot, sample grids). Exit status 0 when nothing failed on
# flowmap's side, 1 otherwise, 2 for a usage or set-up error.
#
# Options: --budget SECONDS (full run's deadline, default 470), --no-compile (skip torch.compile),
# --no-mnist (skip the real-data section). Environment: PYTHON (python with torch), FLOWMAP_BIN
# (the flowmap binary of a checkout), FLOWMAP_INCEPTION (an Inception TorchScript file).
set -uo pipefail

quick=0 budget="" compile=1 mnist=1 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --budget) budget=$2; shift ;;
    --no-compile) compile=0 ;;
    --no-mnist) mnist=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_check.sh: one output folder, got $out and $1" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "usage: gpu_check.sh [--quick] [--budget S] [--no-compile] [--no-mnist] OUT" >&2; exit 2; }
[ -n "$budget" ] || budget=$([ $quick = 1 ] && echo 600 || echo 470)
start=$(date +%s)
deadline=$((start + budget))

here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/run.sh" ] && [ -d "$here/bin" ]; then
  # The bundle: run.sh puts this machine's torch libraries on LD_LIBRARY_PATH.
  root=$here
  flowmap=("$here/run.sh" flowmap)
  export FLOWMAP_CACHE=${FLOWMAP_CACHE:-$here/data}
else
  root=$(cd "$here/.." && pwd)
  flowmap=("${FLOWMAP_BIN:-$root/target/release/flowmap}")
  [ -x "${flowmap[0]}" ] || { echo "gpu_check.sh: ${flowmap[0]} is missing: run \`cargo build --release -p flowmap-experiments --bin flowmap\` (or use the bundle)" >&2; exit 2; }
fi
cache=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}

# A python with torch: $PYTHON, python3, or the checkout's venv.
has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }
py=""
for cand in "${PYTHON:-}" python3 "$cache/venv-torch-2.11.0/bin/python"; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_torch "$cand"; then py=$(command -v "$cand"); break; fi
done
[ -n "$py" ] || { echo "gpu_check.sh: no python with torch found (set PYTHON)" >&2; exit 2; }
export PYTHON=$py  # run.sh finds the torch libraries through it
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$out/logs" "$out/work"
out=$(cd "$out" && pwd)
work=$out/work
rm -f "$out"/steps.tsv "$out"/*.json "$out"/report.md

if [ $quick = 1 ]; then
  device=cpu
  # Two shared cores: one intra-op thread per process avoids OpenMP oversubscription stalls.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export FLOWMAP_DERIVED_CACHE=$work/derived
  qflag=(--quick)
  compile_backend=eager
else
  device=cuda
  qflag=()
  compile_backend=inductor
  if ! gpu=$("$py" -m flowmap_ref cuda 2>&1); then
    echo "gpu_check.sh: $gpu; a full run needs a CUDA device (--quick runs the code paths on the CPU)" >&2
    exit 2
  fi
  echo "gpu_check.sh: $gpu, deadline in $budget s"
fi

remaining() { echo $((deadline - $(date +%s))); }
# step NAME MAX_SECONDS CMD...: runs CMD with a time limit of min(MAX, time left), logs it, records it.
step() {
  local name=$1 max=$2; shift 2
  local left; left=$(remaining)
  local limit=$((max < left ? max : left))
  local log=$out/logs/$name.log t0=$(date +%s) rc status
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped (budget)\t-1\t0\t%s\n' "$name" "logs/$name.log" >> "$out/steps.tsv"
    echo "== $name: skipped, the budget is spent"
    return 1
  fi
  echo "== $name (limit ${limit} s)"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%d\t%d\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "logs/$name.log" >> "$out/steps.tsv"
  [ $status = ok ] || { echo "   $status (exit $rc), last lines of logs/$name.log:"; tail -n 5 "$log" | sed 's/^/   | /'; }
  return $rc
}

# Inception weights: FLOWMAP_INCEPTION, the verified download, the bundle's float16 copy, or
# (timing only) torchvision's architecture with random weights.
inception="" inception_kind=none
real=$cache/data/inception/pt_inception-2015-12-05.pt
packed=$cache/data/inception/pt_inception-2015-12-05.fp16.pt
if [ -n "${FLOWMAP_INCEPTION:-}" ]; then
  inception=$FLOWMAP_INCEPTION inception_kind="FLOWMAP_INCEPTION=$FLOWMAP_INCEPTION"
elif [ $quick = 1 ] && [ -f "$real" ]; then
  # CI goes through the bundle's float16 route too, so it cannot rot.
  step inception_fp16 60 "$py" -m flowmap_ref inception roundtrip "$real" "$work/inception.pt" \
    && inception=$work/inception.pt inception_kind="pt_inception-2015-12-05 through its float16 copy (pack + unpack)"
elif [ -f "$real" ]; then
  inception=$real inception_kind="pt_inception-2015-12-05 (verified download)"
elif [ -f "$packed" ]; then
  step inception_fp16 60 "$py" -m flowmap_ref inception unpack "$packed" "$work/inception.pt" \
    && inception=$work/inception.pt inception_kind="pt_inception-2015-12-05 stored as float16 in the bundle (FID within about 0.04 %)"
elif step inception_random 120 "$py" -m flowmap_ref inception random "$work/inception_random.pt"; then
  inception=$work/inception_random.pt inception_kind="torchvision Inception-v3 with random weights (timing only; no FID)"
fi
[ -n "$inception" ] && [[ $inception_kind != torchvision* ]] && export FLOWMAP_INCEPTION=$inception
inc_arg=(); [ -n "$inception" ] && inc_arg=(--inception "$inception")

step flowmap_parity 90 "${flowmap[@]}" gpu-check parity "${qflag[@]}" --device $device --work "$work" --out "$out/flowmap_parity.json"
step pytorch_parity 90 "$py" -m flowmap_ref parity --device $device --flowmap-json "$out/flowmap_parity.json" --out "$out/pytorch_parity.json"
step flowmap_bench 180 "${flowmap[@]}" gpu-check bench "${qflag[@]}" --device $device --work "$work" "${inc_arg[@]}" --out "$out/flowmap_bench.json"
step pytorch_eager 180 "$py" -m flowmap_ref bench --variant eager --device $device --flowmap-json "$out/flowmap_bench.json" --parity-json "$out/flowmap_parity.json" "${inc_arg[@]}" --out "$out/pytorch_eager.json"
rm -f "$work"/*.safetensors  # parity weights (0.5 GB for DiT-B/2) are no longer needed
step flowmap_checks 90 "${flowmap[@]}" gpu-check checks "${qflag[@]}" --device $device --work "$work" --out "$out/flowmap_checks.json"
if [ $mnist = 1 ]; then
  # Three training runs share what is left, keeping about 25 s per objective for its FID and
  # 60 s for the compiled PyTorch run that follows ("where time allows": it is the last step and
  # keeps what it measured when the deadline stops it). The quick run uses its own small cap.
  left=$(remaining)
  train_s=$(( (left - 75 - (compile == 1 ? 60 : 0)) / 3 ))
  [ $train_s -gt 75 ] && train_s=75
  [ $train_s -lt 15 ] && train_s=15
  [ $quick = 1 ] && train_s=30
  step flowmap_mnist $((3 * train_s + 150)) "${flowmap[@]}" gpu-check mnist "${qflag[@]}" --device $device --work "$work" --train-seconds $train_s --out "$out/flowmap_mnist.json"
  rm -rf "$work"/mnist/*/checkpoints
fi
if [ $compile = 1 ]; then
  step pytorch_compiled 600 "$py" -m flowmap_ref bench --variant compiled --compile-backend $compile_backend --device $device --flowmap-json "$out/flowmap_bench.json" --out "$out/pytorch_compiled.json"
fi
rm -f "$work"/inception*.pt "$work"/inception*.fp16

"$py" - "$out/env.json" "$py" "$quick" "$(( $(date +%s) - start ))" "$inception_kind" <<'EOF'
import json, socket, sys
import torch
path, py, quick, duration, inception = sys.argv[1:]
json.dump({"python": py, "torch": torch.__version__, "quick": quick == "1", "duration_s": int(duration), "inception": inception, "hostname": socket.gethostname()}, open(path, "w"), indent=2)
EOF
"$py" -m flowmap_ref report "$out" > "$out/logs/report.log" 2>&1
rc=$?
cat "$out/report.md" 2>/dev/null || cat "$out/logs/report.log"
echo
echo "report: $out/report.md, $out/report.json"
exit $([ $rc = 0 ] && echo 0 || echo 1)

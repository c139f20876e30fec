#!/usr/bin/env bash
# Bundles stripped release binaries (and the test executables) plus run.sh into dist/bundle, for a
# GPU machine that has PyTorch 2.11 in its python3 but no network and no cargo. The GPU check
# (gpu_check.sh with the PyTorch reference in python/) comes with every bundle.
#   scripts/bundle.sh            binaries + tests + MNIST and Fashion-MNIST (gzip), about 54 MB
#   make bundle-gpu-check        what the GPU check needs in under 64 MiB: the flowmap binary
#                                (gzip), MNIST, the FID Inception weights stored as float16
# Variables (defaults in brackets):
#   FLOWMAP_BUNDLE_BINS      [all]  binaries to include, e.g. "flowmap"
#   FLOWMAP_BUNDLE_TESTS     [1]    include the test executables (0: no)
#   FLOWMAP_BUNDLE_DATA      ["mnist fashion-mnist"]
#   FLOWMAP_BUNDLE_WEIGHTS   [0]    1: the FID Inception weights (87 MB; over the 64 MiB carry
#                                   limit); fp16: stored as float16 (44 MB), restored to float32 by
#                                   gpu_check.sh (FID within about 0.04 %)
#   FLOWMAP_BUNDLE_GZIP_BINS [0]    1: gzip the binaries (run.sh unpacks them on first use)
# On that machine:  dist/bundle/run.sh flowmap doctor  |  dist/bundle/run.sh tests/glue-<hash>
#                   dist/bundle/gpu_check.sh OUT
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=dist/bundle
rm -rf "$out"; mkdir -p "$out/bin" "$out/tests" "$out/data"
bins=${FLOWMAP_BUNDLE_BINS:-all}
tests=${FLOWMAP_BUNDLE_TESTS:-1}
data=${FLOWMAP_BUNDLE_DATA:-mnist fashion-mnist}
weights=${FLOWMAP_BUNDLE_WEIGHTS:-0}
gzip_bins=${FLOWMAP_BUNDLE_GZIP_BINS:-0}
CACHE=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}

all_bins=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print("\n".join(t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "bin" in t["kind"]))')
if [ "$bins" = all ]; then
  cargo build --release --workspace --bins
  bins=$all_bins
else
  for b in $bins; do cargo build --release --workspace --bin "$b"; done
fi
for b in $bins; do
  [ -x "target/release/$b" ] || continue
  strip -o "$out/bin/$b" "target/release/$b"
  [ "$gzip_bins" = 1 ] && gzip -9 "$out/bin/$b"
done
# Test executables, so GPU code paths can be tested where the GPU is.
if [ "$tests" = 1 ]; then
  cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]: print(m["executable"])' \
    | while read -r exe; do strip -o "$out/tests/$(basename "$exe")" "$exe"; done
fi

# Data: MNIST re-compressed (run.sh unpacks it on first use), Fashion-MNIST as shipped.
for d in $data; do
  case $d in
    mnist) mkdir -p "$out/data/data/mnist"; for f in "$CACHE"/data/mnist/*-ubyte; do gzip -9 -c "$f" > "$out/data/data/mnist/$(basename "$f").gz"; done ;;
    fashion-mnist) mkdir -p "$out/data/data/fashion-mnist"; cp "$CACHE"/data/fashion-mnist/*.gz "$out/data/data/fashion-mnist/" ;;
    *) echo "bundle.sh: unknown data set $d (mnist, fashion-mnist)" >&2; exit 2 ;;
  esac
done
inception=$CACHE/data/inception/pt_inception-2015-12-05.pt
case $weights in
  0) ;;
  1) mkdir -p "$out/data/data/inception"; cp "$inception" "$out/data/data/inception/" ;;
  fp16)
    mkdir -p "$out/data/data/inception"
    PY=${FLOWMAP_VENV:-$CACHE/venv-torch-2.11.0}/bin/python
    PYTHONPATH=python "$PY" -m flowmap_ref inception pack "$inception" "$out/data/data/inception/pt_inception-2015-12-05.fp16.pt" ;;
  *) echo "bundle.sh: FLOWMAP_BUNDLE_WEIGHTS must be 0, 1 or fp16" >&2; exit 2 ;;
esac

# The GPU check: the script and the PyTorch reference (no compiled files).
cp scripts/gpu_check.sh "$out/gpu_check.sh"
mkdir -p "$out/python/flowmap_ref"
cp python/flowmap_ref/*.py "$out/python/flowmap_ref/"

cat > "$out/run.sh" <<'EOT'
#!/usr/bin/env bash
# Runs a bundled binary against this machine's own torch 2.11 (torch/lib and every nvidia/*/lib).
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
torch_dir=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
libs="$torch_dir/lib"
for d in "$torch_dir"/../nvidia/*/lib "$torch_dir"/../nvidia/cu13/lib; do [ -d "$d" ] && libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLOWMAP_CACHE=${FLOWMAP_CACHE:-$dir/data}
# First use: unpack gzipped binaries, and MNIST to the raw files the checksums name.
for f in "$dir"/bin/*.gz "$FLOWMAP_CACHE"/data/mnist/*-ubyte.gz; do
  [ -e "$f" ] && [ ! -e "${f%.gz}" ] && { gzip -dc "$f" > "${f%.gz}.part" && mv "${f%.gz}.part" "${f%.gz}"; }
done
chmod +x "$dir"/bin/* 2>/dev/null || true
cmd=$1; shift
if [ -x "$dir/bin/$cmd" ]; then exec "$dir/bin/$cmd" "$@"; else exec "$dir/$cmd" "$@"; fi
EOT
chmod +x "$out/run.sh" "$out/gpu_check.sh"
du -sh "$out" "$out"/* >&2
echo "$out"

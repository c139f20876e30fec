#!/usr/bin/env bash
# Bundles stripped release binaries (and the test executables) plus run.sh into dist/bundle, for a
# GPU machine that has PyTorch 2.11 in its python3 but no network and no cargo.
#   scripts/bundle.sh            binaries + tests + MNIST (gzip, ~11 MB)
#   FLOWMAP_BUNDLE_WEIGHTS=1 ... also the FID Inception weights (87 MB; over the 64 MiB carry limit)
# On that machine:  dist/bundle/run.sh flowmap doctor     |  dist/bundle/run.sh tests/glue-<hash>
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=dist/bundle
rm -rf "$out"; mkdir -p "$out/bin" "$out/tests" "$out/data"

cargo build --release --workspace --bins
for b in $(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print("\n".join(t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "bin" in t["kind"]))'); do
  [ -x "target/release/$b" ] && strip -o "$out/bin/$b" "target/release/$b"
done
# Test executables, so GPU code paths can be tested where the GPU is.
cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]: print(m["executable"])' \
  | while read -r exe; do strip -o "$out/tests/$(basename "$exe")" "$exe"; done

# Data: MNIST re-compressed (the readers take gzip), Fashion-MNIST as shipped; checksums for doctor.
CACHE=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}
mkdir -p "$out/data/data/mnist" "$out/data/data/fashion-mnist"
for f in "$CACHE"/data/mnist/*-ubyte; do gzip -c "$f" > "$out/data/data/mnist/$(basename "$f").gz"; done
cp "$CACHE"/data/fashion-mnist/*.gz "$out/data/data/fashion-mnist/"
if [ "${FLOWMAP_BUNDLE_WEIGHTS:-0}" = 1 ]; then
  mkdir -p "$out/data/data/inception"; cp "$CACHE"/data/inception/*.pt "$out/data/data/inception/"
fi

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
cmd=$1; shift
if [ -x "$dir/bin/$cmd" ]; then exec "$dir/bin/$cmd" "$@"; else exec "$dir/$cmd" "$@"; fi
EOT
chmod +x "$out/run.sh"
du -sh "$out" "$out"/* >&2
echo "$out"

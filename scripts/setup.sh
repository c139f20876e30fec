#!/usr/bin/env bash
# One-time (and idempotent) set-up for flowmap on a fresh machine:
#   1. a Python venv with torch==2.11.0 outside the checkout (per-user cache, keyed by version and
#      CUDA build: FLOWMAP_TORCH_CUDA = cu130 (default) | cu128 | cu126 | cpu; README "Set-up");
#      plus the small CUDA header packages flowmap-sys needs for ProcessGroupNCCL (cu130);
#   2. MNIST, Fashion-MNIST, the FID Inception weights and the gloo headers in the cache, sha256-verified;
#   3. .cargo/config.toml pointing cargo at that libtorch (rpath, libtorch_cuda kept).
# A second run finds everything in place and downloads nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSION=2.11.0
log() { printf '[setup] %s\n' "$*" >&2; }

# Which CUDA build of the torch wheel. PyPI's torch==2.11.0 is the CUDA 13.0 build (needs NVIDIA
# driver >= 580); the others come from PyTorch's own index for that variant.
TORCH_CUDA=${FLOWMAP_TORCH_CUDA:-cu130}
case "$TORCH_CUDA" in
  cu130) want_cuda=13.0 ;;
  cu128) want_cuda=12.8 ;;
  cu126) want_cuda=12.6 ;;
  cpu)   want_cuda=None ;; # torch.version.cuda of a CPU-only build
  *) log "FLOWMAP_TORCH_CUDA='$TORCH_CUDA' is not supported; allowed: cu130 (default, NVIDIA driver >= 580), cu128, cu126 (driver >= 525.60.13), cpu"
     exit 2 ;;
esac
if [ -n "${FLOWMAP_TORCH_INDEX_URL:-}" ]; then
  index_args=(--index-url "$FLOWMAP_TORCH_INDEX_URL")     # a mirror
elif [ "$TORCH_CUDA" = cu130 ]; then
  index_args=()                                            # plain PyPI (pip's configured index)
else
  index_args=(--index-url "https://download.pytorch.org/whl/$TORCH_CUDA")
fi

CACHE=${FLOWMAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flowmap}
# Keyed by version and variant, so switching FLOWMAP_TORCH_CUDA never reuses another build's venv.
# cu130 keeps the unsuffixed name that caches made before the variants existed already have.
venv_name=venv-torch-$TORCH_VERSION
[ "$TORCH_CUDA" = cu130 ] || venv_name=$venv_name-$TORCH_CUDA
VENV=${FLOWMAP_VENV:-$CACHE/$venv_name}
mkdir -p "$CACHE"

# ---- 1. venv with torch ----
# Prints the installed torch as "<version> <torch.version.cuda>", e.g. "2.11.0 13.0" or "2.11.0 None".
installed_torch() {
  "$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0], torch.version.cuda)" 2>/dev/null
}
want="$TORCH_VERSION $want_cuda"
if [ -x "$VENV/bin/python" ] && [ "$(installed_torch)" = "$want" ] && [ -f "$VENV/.flowmap-ready" ]; then
  log "venv ok: $VENV (torch $TORCH_VERSION, $TORCH_CUDA)"
else
  log "creating venv $VENV with torch==$TORCH_VERSION ($TORCH_CUDA${index_args[1]:+ from ${index_args[1]}}; up to 4.6 GB, a few minutes once)"
  rm -f "$VENV/.flowmap-ready"
  python3 -m venv "$VENV"
  got=$(installed_torch || true)
  if [ -n "$got" ] && [ "$got" != "$want" ]; then
    # pip would keep an installed 2.11.0 of another variant (same public version): remove it first.
    log "replacing torch '$got' in $VENV (want '$want')"
    "$VENV/bin/pip" uninstall --quiet --disable-pip-version-check -y torch
  fi
  "$VENV/bin/pip" install --quiet --disable-pip-version-check ${index_args[@]+"${index_args[@]}"} "torch==$TORCH_VERSION"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check numpy scipy
  got=$(installed_torch || true)
  if [ "$got" != "$want" ]; then
    log "installed torch is '$got', expected '$want' (torch version, torch.version.cuda): check FLOWMAP_TORCH_INDEX_URL"
    exit 1
  fi
  touch "$VENV/.flowmap-ready"
fi
TORCH_DIR=$("$VENV/bin/python" -c 'import torch,os;print(os.path.dirname(torch.__file__))')

# ---- 1b. CUDA headers for flowmap-sys' ProcessGroupNCCL (cu130 only; about 3 MB) ----
# The wheel's nvidia/cu13/include lacks crt/ and CCCL (<nv/target>), which ProcessGroupNCCL.hpp pulls
# in. These are the versions torch 2.11.0's cuda-toolkit 13.0.2 names for its crt and cccl extras.
# Optional: without them flowmap-sys builds without NCCL (Backend::Nccl then returns an error).
NV_INCLUDE="$(dirname "$TORCH_DIR")/nvidia/cu13/include"
if [ "$TORCH_CUDA" = cu130 ]; then
  if [ -f "$NV_INCLUDE/crt/host_config.h" ] && [ -f "$NV_INCLUDE/cccl/nv/target" ]; then
    log "CUDA headers for NCCL ok"
  elif "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85; then
    log "installed CUDA headers for NCCL (nvidia-cuda-crt, nvidia-cuda-cccl)"
  else
    log "WARNING: could not install nvidia-cuda-crt/nvidia-cuda-cccl: flowmap-sys will be built without NCCL"
  fi
fi

# ---- 1c. reference implementations for the evaluation cross-checks (tests only) ----
# torch-fidelity, pytorch-fid and what they import, pinned with sha256 (tests/python/requirements-eval.txt);
# --no-deps so that nothing replaces the venv's torch. A stamp holds the file's checksum: a changed pin installs again.
EVAL_REQ="$here/tests/python/requirements-eval.txt"
eval_want=$(sha256sum "$EVAL_REQ" | cut -d' ' -f1)
if [ "$(cat "$VENV/.flowmap-eval-ready" 2>/dev/null)" = "$eval_want" ]; then
  log "evaluation reference packages ok (torch-fidelity, pytorch-fid)"
else
  log "installing the evaluation reference packages (torch-fidelity, pytorch-fid, torchvision; about 16 MB)"
  if [ "$TORCH_CUDA" = cu130 ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r "$EVAL_REQ"
  else
    # PyPI's torchvision is built for PyPI's torch (cu130): take the one built for this variant from
    # the same index as torch (unhashed, as torch itself), and the rest of the file as pinned.
    awk '/^torchvision==/ { skip = 1; next } skip && /^ / { next } { skip = 0; print }' "$EVAL_REQ" > "$VENV/.eval-req-no-torchvision.txt"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r "$VENV/.eval-req-no-torchvision.txt"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps ${index_args[@]+"${index_args[@]}"} torchvision==0.26.0
  fi
  echo "$eval_want" > "$VENV/.flowmap-eval-ready"
fi

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

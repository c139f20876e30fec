#!/usr/bin/env python3
"""diffusers' own AutoencoderKL as the reference for flowmap's VAE (crates/models/tests/vae.rs).

    vae_reference.py OUT_DIR

Builds a small randomly initialised AutoencoderKL (block_out_channels (32, 64, 64), layers_per_block
2, norm_num_groups 8, latent_channels 4; GroupNorm affine parameters randomised too, so a swapped
weight/bias cannot pass), saves it with save_pretrained(OUT_DIR/vae, safe_serialization=True), and
writes OUT_DIR/reference.safetensors with fixed inputs and diffusers' outputs:

    x (2,3,32,32), mean, std          latent_dist.mean / .std of encode(x)
    x_odd (1,3,30,34), mean_odd, std_odd   odd sizes exercise Downsample2D's asymmetric (0,1,0,1) pad
    z (2,4,8,8), decoded              decode(z).sample

Prints "diffusers <version> torch <version>" on stdout.

diffusers is installed into this interpreter's environment from PyPI when missing (pinned to
DIFFUSERS_VERSION). Exit code 3 means it is missing and PyPI is unreachable (the Rust test skips);
any other failure is an error.
"""
import subprocess
import sys
from pathlib import Path

DIFFUSERS_VERSION = "0.42.1"  # the version the parity test was written against (torch 2.11)


def pip(*args, timeout):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def ensure_diffusers():
    try:
        import diffusers  # noqa: F401
        return
    except ImportError:
        pass
    print(f"installing diffusers=={DIFFUSERS_VERSION} from PyPI into {sys.prefix}", file=sys.stderr)
    try:
        r = pip("install", "--quiet", "--disable-pip-version-check", f"diffusers=={DIFFUSERS_VERSION}", timeout=900)
    except subprocess.TimeoutExpired:
        r = None
    if r is not None and r.returncode == 0:
        return
    # Did the install fail because the index cannot be reached? Ask pip itself (its config, proxy).
    try:
        probe = pip("index", "versions", "diffusers", "--disable-pip-version-check", timeout=60)
        reachable = probe.returncode == 0
    except subprocess.TimeoutExpired:
        reachable = False
    detail = (r.stderr.strip().splitlines() or ["timeout"])[-1] if r is not None else "pip install timed out"
    if not reachable:
        print(f"diffusers is not installed and PyPI is unreachable ({detail})", file=sys.stderr)
        sys.exit(3)
    print(f"pip install diffusers=={DIFFUSERS_VERSION} failed although PyPI is reachable:\n{r.stderr if r else detail}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out = Path(sys.argv[1])
    ensure_diffusers()
    import diffusers
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    torch.manual_seed(0)
    levels = 3
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.18215,
    ).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    vae.save_pretrained(out / "vae", safe_serialization=True)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_odd = torch.rand(1, 3, 30, 34) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        post_odd = vae.encode(x_odd).latent_dist
        decoded = vae.decode(z).sample
    tensors = {
        "x": x, "mean": post.mean, "std": post.std,
        "x_odd": x_odd, "mean_odd": post_odd.mean, "std_odd": post_odd.std,
        "z": z, "decoded": decoded,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    print(f"diffusers {diffusers.__version__} torch {torch.__version__}")


if __name__ == "__main__":
    main()

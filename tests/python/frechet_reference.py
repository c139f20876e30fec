#!/usr/bin/env python3
"""Independent reference for flowmap's FID / KID maths (used by crates/experiments/tests/fid_math.rs).

    frechet_reference.py frechet A.npz B.npz     print the Frechet distance of two {mu, sigma} files
    frechet_reference.py random OUT.npz DIM SEED write numpy-made random {mu, sigma} (float64)
    frechet_reference.py mmd XY.npz              print the unbiased polynomial-kernel MMD^2 of arrays x, y
    frechet_reference.py features MODEL.pt IMAGES.npz OUT.npz
        Inception features (torch, CPU) of `images` (uint8 NCHW), written as features_pytorch_fid
        (pytorch-fid: x/255, F.interpolate bilinear align_corners=False, 2x-1) and features_tf
        (TF1 resize_bilinear without half-pixel centres, gathered in numpy, then x/128-1)

`frechet` is pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm, the 1e-6*I fallback,
dropping a negligible imaginary part). Exit code 3 means numpy or scipy is missing (the test skips).
"""
import sys

try:
    import numpy as np
    from scipy import linalg
except ImportError as e:  # the Rust test turns this into a skip
    print(f"missing python dependency: {e}", file=sys.stderr)
    sys.exit(3)


def frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    # pytorch-fid 0.3.0, src/pytorch_fid/fid_score.py
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def mmd2_unbiased(x, y):
    # KID per subset as in torch-fidelity / clean-fid: k(a, b) = (a.b / d + 1)^3
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    off = lambda k: k.sum() - np.diagonal(k).sum()
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def tf1_resize(x, out):
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) of NCHW float64."""
    def coords(n_in):
        src = np.arange(out) * (n_in / out)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    ylo, yhi, fy = coords(x.shape[2])
    xlo, xhi, fx = coords(x.shape[3])
    rows = x[:, :, ylo, :] * (1 - fy)[:, None] + x[:, :, yhi, :] * fy[:, None]
    return rows[:, :, :, xlo] * (1 - fx) + rows[:, :, :, xhi] * fx


def features(model, images_npz, out):
    try:  # only this command needs torch
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"missing python dependency: {e}", file=sys.stderr)
        sys.exit(3)
    u8 = np.load(images_npz)["images"]
    assert u8.dtype == np.uint8 and u8.ndim == 4, (u8.dtype, u8.shape)
    if u8.shape[1] == 1:
        u8 = np.repeat(u8, 3, axis=1)
    x = torch.from_numpy(u8).float() / 255.0
    inputs = {
        "pytorch_fid": 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1,
        "tf": torch.from_numpy(tf1_resize(u8.astype(np.float64), 299) / 128.0 - 1.0).float(),
    }
    net = torch.jit.load(model, map_location="cpu").eval()
    result = {}
    with torch.no_grad():
        for name, x in inputs.items():
            result[f"features_{name}"] = net(x).reshape(x.shape[0], -1).double().numpy()
    np.savez(out, **result)


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "frechet" and len(argv) == 4:
        a, b = np.load(argv[2]), np.load(argv[3])
        print(repr(frechet(a["mu"], a["sigma"], b["mu"], b["sigma"])))
    elif cmd == "random" and len(argv) == 5:
        dim, seed = int(argv[3]), int(argv[4])
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((dim, 2 * dim))
        np.savez(argv[2], mu=rng.standard_normal(dim), sigma=a @ a.T / (2 * dim))
    elif cmd == "mmd" and len(argv) == 3:
        f = np.load(argv[2])
        print(repr(mmd2_unbiased(f["x"].astype(np.float64), f["y"].astype(np.float64))))
    elif cmd == "features" and len(argv) == 5:
        features(argv[2], argv[3], argv[4])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The training steps flowmap's benchmark times (crates/experiments/src/gpu_check/throughput.rs),
written the way a PyTorch user writes them, with the same passes, row counts and precisions:

* flow matching (crates/objectives/src/flow_matching.rs): t ~ U[0, 1], linear path, 10 % label
  dropout, one forward under bf16 autocast;
* MeanFlow, official objective (mean_flow.rs): (t, r) from two logit-normal(-0.4, 1) draws,
  floor(0.75 B) rows with r = t, leading 10 % of rows unconditional, one torch.func.jvp along
  (v, 1, 1) in (x_t, t, h) in float32 (autocast off, as the official code) through the math path,
  stop-gradient target, adaptive weighting (p = 1, c = 0.01);
* Shortcut, paper settings (shortcut.rs): a quarter of the rows bootstrap with dyadic h over 7
  levels (two no-grad half-step forwards for the target), the rest flow matching at h = 0; two
  forwards with gradient (flow rows, bootstrap rows), all under bf16 autocast.

Each function returns the scalar loss; the caller runs backward and the optimizer.
"""
import torch

LABEL_DROPOUT = 0.1
MEANFLOW_EQUAL_FRACTION = 0.75
MEANFLOW_LOGIT_MEAN, MEANFLOW_LOGIT_STD = -0.4, 1.0
MEANFLOW_C = 0.01
SHORTCUT_BOOTSTRAP_FRACTION = 0.25
SHORTCUT_LEVELS = 7  # h in {2^-6, ..., 1} for bootstrap rows


def per_sample(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


def autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def flow_matching(model, x, y, null_class, bf16):
    b = x.shape[0]
    t = torch.rand(b, device=x.device)
    eps = torch.randn_like(x)
    y = torch.where(torch.rand(b, device=x.device) < LABEL_DROPOUT, torch.full_like(y, null_class), y)
    x_t = per_sample(1 - t, x) * x + per_sample(t, x) * eps
    with autocast(x.device, bf16):
        out = model(x_t, t, torch.zeros_like(t), y)
    return (out.float() - (eps - x)).square().mean()


def meanflow_pairs(b, device):
    draw = lambda: torch.sigmoid(torch.randn(b, device=device) * MEANFLOW_LOGIT_STD + MEANFLOW_LOGIT_MEAN)
    a, c = draw(), draw()
    t, r = torch.maximum(a, c), torch.minimum(a, c)
    n_equal = int(b * MEANFLOW_EQUAL_FRACTION)
    r = torch.cat([t[:n_equal], r[n_equal:]])
    return t, r


def mean_flow(model, x, y, null_class, bf16):
    b = x.shape[0]
    t, r = meanflow_pairs(b, x.device)
    h = t - r
    eps = torch.randn_like(x)
    x_t = per_sample(1 - t, x) * x + per_sample(t, x) * eps
    v = eps - x
    n_drop = int(b * LABEL_DROPOUT)
    y = torch.cat([torch.full_like(y[:n_drop], null_class), y[n_drop:]])
    with autocast(x.device, False):
        f = lambda z, tt, hh: model(z, tt, hh, y, math_path=True)
        u, du = torch.func.jvp(f, (x_t, t, h), (v, torch.ones_like(t), torch.ones_like(t)))
    u_tgt = (v - per_sample(h.clamp(0, 1), v) * du).detach()
    per_row = (u - u_tgt).square().flatten(1).sum(1)
    return (per_row / (per_row.detach() + MEANFLOW_C)).mean()


def dyadic_pairs(n, device):
    per = n // SHORTCUT_LEVELS
    assert per >= 1, f"shortcut needs at least {SHORTCUT_LEVELS} bootstrap rows, got {n}"
    q = torch.arange(n, device=device) // per
    level = torch.where(q < SHORTCUT_LEVELS, (SHORTCUT_LEVELS - 1) - q, torch.zeros_like(q)).double()
    sections = torch.exp2(level)
    j = torch.floor(torch.rand(n, device=device, dtype=torch.float64) * sections) + 1
    return (j / sections).float(), (1.0 / sections).float()


def shortcut(model, x, y, null_class, bf16):
    b = x.shape[0]
    b_b = int(b * SHORTCUT_BOOTSTRAP_FRACTION)
    eps = torch.randn_like(x)
    # Flow rows b_b..b at h = 0 with label dropout.
    xf, ef, yf = x[b_b:], eps[b_b:], y[b_b:]
    tf = torch.rand(b - b_b, device=x.device)
    yf = torch.where(torch.rand(b - b_b, device=x.device) < LABEL_DROPOUT, torch.full_like(yf, null_class), yf)
    x_tf = per_sample(1 - tf, xf) * xf + per_sample(tf, xf) * ef
    # Bootstrap rows 0..b_b: target = mean of two half steps of the same (online) network.
    xb, eb, yb = x[:b_b], eps[:b_b], y[:b_b]
    tb, hb = dyadic_pairs(b_b, x.device)
    x_tb = per_sample(1 - tb, xb) * xb + per_sample(tb, xb) * eb
    with autocast(x.device, bf16):
        flow_err = (model(x_tf, tf, torch.zeros_like(tf), yf).float() - (ef - xf)).square()
        with torch.no_grad():
            half = hb / 2
            u1 = model(x_tb, tb, half, yb).float()
            x_mid = x_tb - per_sample(half, x_tb) * u1
            u2 = model(x_mid, tb - half, half, yb).float()
            target = (u1 + u2) / 2
        boot_err = (model(x_tb, tb, hb, yb).float() - target).square()
    return torch.cat([boot_err, flow_err]).mean()


STEPS = {"flow_matching": flow_matching, "mean_flow": mean_flow, "shortcut": shortcut}

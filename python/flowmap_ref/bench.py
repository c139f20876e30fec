"""`python -m flowmap_ref bench`: the PyTorch side of flowmap's `gpu-check bench`, with the same
protocol (reset the peak, warm up, synchronise, time, synchronise), sizes and JSON keys, read from
flowmap's own bench JSON so that both sides time the same configuration.

`--variant eager` is plain PyTorch; `--variant compiled` runs the same steps through
torch.compile (default mode; `--compile-backend eager` only traces, for the quick CPU run). The
compiled variant measures, in this order and writing its JSON after each: the flow-matching step,
the forward at the full batch, 1- and 128-step sampling, the batch-1 forward (a second compiled
module), the Shortcut step. MeanFlow is not compiled: compiling the JVP loss takes about 100 s on an
H100 (tables.md §6.3), more than the acceptance run's budget.
"""
import json
import os
import time

import torch

from . import objectives
from .dit import DiT
from .safetensors_io import load as load_safetensors
from .vae import VaeDecoder


class JsonReport:
    """The section's JSON, rewritten after every measurement (a killed run keeps what it did)."""

    def __init__(self, path, root):
        self.path, self.root = path, root
        self.flush()

    def set(self, key, value):
        self.root[key] = value
        self.flush()

    def set_in(self, group, key, value):
        self.root.setdefault(group, {})[key] = value
        self.flush()

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.root, f, indent=2)
        os.replace(tmp, self.path)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(device, batch, warmup_iters, call):
    warmup, iters = warmup_iters
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        call()
    sync(device)
    iters = max(iters, 1)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    sync(device)
    seconds = (time.perf_counter() - start) / iters
    gb = lambda v: v / 1e9 if device.type == "cuda" else None
    return {
        "batch": batch,
        "warmup": warmup,
        "iters": iters,
        "seconds_per_call": seconds,
        "items_per_s": batch / seconds,
        "peak_allocated_gb": gb(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "peak_reserved_gb": gb(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None,
    }


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def guarded(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": str(e).splitlines()[0][:400] if str(e) else type(e).__name__, "out_of_memory": is_oom(e)}


def with_batch_fallback(batch, min_batch, measure):
    """Halves the batch after each out-of-memory error, as flowmap's side does."""
    oom, b = [], batch
    while True:
        try:
            r = measure(b)
            r["oom_batches"] = oom
            return r
        except Exception as e:  # noqa: BLE001
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            oom.append(b)
            if is_oom(e) and b // 2 >= max(min_batch, 1):
                b //= 2
                continue
            return {"error": str(e).splitlines()[0][:400] if str(e) else type(e).__name__, "out_of_memory": is_oom(e), "oom_batches": oom}


def inputs(cfg, batch, device):
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device)
    k = cfg["num_classes"]
    y = torch.randint(k, (batch,), device=device) if k > 0 else torch.zeros(batch, dtype=torch.long, device=device)
    return x, y


def make_optimizer(model, device):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=device.type == "cuda")


def train_step_timing(cfg, name, batch, iters, device, bf16, compile_fn):
    model = DiT(cfg).to(device)
    run = compile_fn(model) if compile_fn else model
    opt = make_optimizer(model, device)
    x, y = inputs(cfg, batch, device)
    step = objectives.STEPS[name]

    def call():
        loss = step(run, x, y, cfg["num_classes"], bf16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_calls(device, batch, iters, call)


@torch.no_grad()
def euler(model, noise, y, steps, bf16):
    """flowmap's Euler sampler on the linear path: x <- x - (t - r) F(x, t, 0, y), t from 1 to 0."""
    x = noise
    b = x.shape[0]
    for i in range(steps):
        t, r = 1.0 - i / steps, 1.0 - (i + 1) / steps
        tt = torch.full((b,), t, device=x.device)
        with objectives.autocast(x.device, bf16):
            v = model(x, tt, torch.zeros_like(tt), y)
        x = x - v.float() * (t - r)
    return x


def sampling_timing(model, noise, y, steps, device, bf16):
    sync(device)
    start = time.perf_counter()
    x = euler(model, noise, y, steps, bf16)
    host_return = time.perf_counter() - start
    sync(device)
    return {"steps": steps, "images": noise.shape[0], "seconds": time.perf_counter() - start, "host_return_seconds": host_return, "finite": bool(torch.isfinite(x).all())}


def inception_features(module, images, batch):
    """flowmap's Inception::features: quantise, bilinear resize to 299 (pytorch-fid convention),
    normalise, forward, float64 on the CPU, batch by batch."""
    out = []
    for chunk in images.split(batch):
        x = (chunk.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).float()
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            y = module(x / 127.5 - 1.0)
        out.append(y.reshape(len(x), -1).to("cpu", torch.float64))
    return torch.cat(out)


def machine(device):
    m = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update({"device_name": p.name, "memory_gb": p.total_memory / 1e9, "capability": f"{p.major}.{p.minor}"})
    else:
        m["device_name"] = None
    return m


def run(args):
    device = torch.device(args.device)
    with open(args.flowmap_json) as f:
        fm = json.load(f)
    cfg = fm["model"]["config"]
    batch = fm["model"]["batch"]
    quick = fm["quick"]
    scale = {
        "iters": (1, 2) if quick else (3, 10),
        "jvp_iters": (1, 2) if quick else (2, 5),
        "latency_iters": (1, 3) if quick else (10, 50),
        "min_batch": 32,
        "long_steps": fm.get("sampling", {}).get("long", {}).get("steps", 128),
        "inception_iters": (0, 1) if quick else (2, 4),
    }
    compiled = args.variant == "compiled"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as flowmap's bench (set_tf32(true))
        torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda"  # flowmap's Precision::Bf16 runs float32 on the CPU
    torch.manual_seed(0)
    report = JsonReport(args.out, {"section": "bench", "side": "pytorch", "variant": args.variant, "quick": quick, "machine": machine(device), "complete": False})
    report.set("settings", {"precision": "Bf16" if bf16 else "F32", "tf32": device.type == "cuda", "optimizer": "torch.optim.AdamW(fused=True)" if device.type == "cuda" else "torch.optim.AdamW (CPU)", "jvp": "torch.func.jvp, float32 (autocast off), math attention and explicit LayerNorm", "compile": args.compile_backend if compiled else None})
    model0 = DiT(cfg)
    report.set("model", {"config": cfg, "parameters": model0.num_parameters(), "batch": batch})
    del model0
    started = time.perf_counter()

    def compile_fn(m, **kw):
        return torch.compile(m, backend=args.compile_backend, **kw)

    cf = compile_fn if compiled else None
    order = ["flow_matching", "mean_flow", "shortcut"] if not compiled else ["flow_matching"]
    for name in order:
        iters = scale["jvp_iters"] if name == "mean_flow" else scale["iters"]
        r = with_batch_fallback(batch, scale["min_batch"], lambda b: train_step_timing(cfg, name, b, iters, device, bf16, cf))
        report.set_in("train", name, r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if compiled:
        report.set_in("train", "mean_flow", {"error": "not compiled: compiling the JVP loss takes about 100 s (tables.md 6.3)", "skipped": True})

    model = DiT(cfg).to(device).eval()
    run_model = compile_fn(model, dynamic=False) if compiled else model
    x, y = inputs(cfg, batch, device)
    t = torch.rand(batch, device=device)

    def fwd(m, x, t, y):
        def call():
            with torch.no_grad(), objectives.autocast(device, bf16):
                m(x, t, torch.zeros_like(t), y)

        return call

    report.set_in("forward", "batch", with_batch_fallback(batch, scale["min_batch"], lambda b: time_calls(device, b, scale["iters"], fwd(run_model, x[:b], t[:b], y[:b]))))
    noise, yc = inputs(cfg, batch, device)
    report.set_in("sampling", "steps1", guarded(lambda: time_calls(device, batch, scale["iters"], lambda: euler(run_model, noise, yc, 1, bf16))))
    guarded(lambda: euler(run_model, noise, yc, 2, bf16))
    report.set_in("sampling", "long", guarded(lambda: sampling_timing(run_model, noise, yc, scale["long_steps"], device, bf16)))
    one = compile_fn(model, dynamic=False) if compiled else model
    report.set_in("forward", "batch1", guarded(lambda: time_calls(device, 1, scale["latency_iters"], fwd(one, x[:1], t[:1], y[:1]))))
    del model, run_model, one
    if compiled:
        r = with_batch_fallback(batch, scale["min_batch"], lambda b: train_step_timing(cfg, "shortcut", b, scale["iters"], device, bf16, cf))
        report.set_in("train", "shortcut", r)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not compiled:
        if args.inception:
            def inc():
                module = torch.jit.load(args.inception, map_location=device).eval()
                b = fm.get("inception", {}).get("batch") or (2 if quick else 250)
                images = torch.rand(b, 3, 256, 256, device=device) * 2 - 1
                return time_calls(device, b, scale["inception_iters"], lambda: inception_features(module, images, b))

            r = guarded(inc)
            r["weights_file"] = args.inception
            report.set("inception", r)
        else:
            report.set("inception", {"error": "no Inception TorchScript file given (--inception)"})

        def vae():
            with open(args.parity_json) as f:
                parity = json.load(f)
            vcfg = parity["vae"]["config"]
            dec = VaeDecoder(vcfg)
            missing, unexpected = dec.load_flowmap(load_safetensors(parity["vae"]["weights"]))
            if missing or unexpected:
                raise RuntimeError(f"VAE weights do not fit the reference decoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
            dec = dec.to(device).eval()
            lat = fm["vae_decode"]["latent"]
            b = fm["vae_decode"].get("batch") or (2 if quick else 32)
            z = torch.randn(b, *lat, device=device)

            def call():
                with torch.no_grad():
                    dec(z)

            r = time_calls(device, b, scale["iters"], call)
            r["latent"] = lat
            r["weights"] = "flowmap's random VAE (the parity file)"
            return r

        report.set("vae_decode", guarded(vae) if args.parity_json else {"error": "no parity JSON (the VAE weights) given"})
    report.set("seconds", time.perf_counter() - started)
    report.set("complete", True)

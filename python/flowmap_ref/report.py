"""`python -m flowmap_ref report OUT`: merges the JSON files of one GPU-check run (flowmap's sections,
the PyTorch reference, the script's step log) into OUT/report.json (a fixed schema: every key is
always present, null when it could not be measured) and OUT/report.md.

Conventions:
* ratio = flowmap / PyTorch of the row's value: above 1 is faster for img/s, slower for ms and s;
* MFU = model FLOPs per second / the device's dense bf16 peak (NVIDIA datasheets, below), with
  46 GFLOPs per DiT-B/2 forward per image and 3x that per training image (forward + backward) for
  every objective (MeanFlow's JVP and Shortcut's target passes are not counted: the MFU compares
  the useful work of one image's update);
* failures: what is wrong on flowmap's side (a failed step, a parity or correctness check, a
  flowmap measurement error, an MNIST run error); problems of the PyTorch reference are listed
  apart.
"""
import datetime
import json
import os

SCHEMA = "flowmap-gpu-check/1"

# Dense bf16 tensor-core peak in TFLOP/s by device-name fragment (first match wins).
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
]

THROUGHPUT_ROWS = [
    # name, label, unit, better
    ("train_flow_matching", "training step, flow matching", "img/s", "higher"),
    ("train_mean_flow", "training step, MeanFlow (JVP)", "img/s", "higher"),
    ("train_shortcut", "training step, Shortcut", "img/s", "higher"),
    ("forward_batch1", "forward latency, batch 1", "ms", "lower"),
    ("forward_batch", "forward throughput", "img/s", "higher"),
    ("sample_1_step", "sampling, 1 step", "s", "lower"),
    ("sample_128_steps", "sampling, 128 steps", "s", "lower"),
    ("inception", "Inception features (FID)", "img/s", "higher"),
    ("vae_decode", "SD-VAE decode", "img/s", "higher"),
]

CHECK_NAMES = ["bf16_vs_f32", "fused_adamw", "jvp_finite_differences", "sampler_host_syncs"]


def read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def peak_tflops(name):
    if not name:
        return None
    for frag, tf in PEAK_BF16_TFLOPS:
        if frag in name:
            return tf
    return None


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def value_of(side, row):
    """(value, batch, peak GB, error) of one throughput row from one side's bench JSON."""
    if side is None:
        return None, None, None, None
    src = {
        "train_flow_matching": ("train", "flow_matching"),
        "train_mean_flow": ("train", "mean_flow"),
        "train_shortcut": ("train", "shortcut"),
        "forward_batch1": ("forward", "batch1"),
        "forward_batch": ("forward", "batch"),
        "sample_1_step": ("sampling", "steps1"),
        "sample_128_steps": ("sampling", "long"),
        "inception": ("inception",),
        "vae_decode": ("vae_decode",),
    }[row]
    m = get(side, *src)
    if m is None:
        return None, None, None, None  # not part of this side's measurements
    if m.get("skipped"):
        return None, None, None, None
    if m.get("error"):
        return None, m.get("batch"), None, m["error"]
    if row == "forward_batch1":
        v = 1e3 * m["seconds_per_call"]
    elif row == "sample_1_step":
        v = m["seconds_per_call"]
    elif row == "sample_128_steps":
        v = m["seconds"]
    else:
        v = m["items_per_s"]
    batch = m.get("batch", m.get("images"))
    return v, batch, m.get("peak_allocated_gb"), None


def mfu(row, value, batch, flops, peak, steps=None):
    if value is None or not flops or not peak:
        return None
    per_s = {
        "train_flow_matching": lambda: value * 3 * flops,
        "train_mean_flow": lambda: value * 3 * flops,
        "train_shortcut": lambda: value * 3 * flops,
        "forward_batch": lambda: value * flops,
        "forward_batch1": lambda: flops / (value / 1e3),
        "sample_1_step": lambda: batch * flops / value if batch else None,
        "sample_128_steps": lambda: batch * (steps or 128) * flops / value if batch else None,
    }.get(row)
    if per_s is None:
        return None
    x = per_s()
    return None if x is None else x / (peak * 1e12)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def build(out):
    p = lambda name: os.path.join(out, name)
    fb, pe, pc = read(p("flowmap_bench.json")), read(p("pytorch_eager.json")), read(p("pytorch_compiled.json"))
    fpar, ppar = read(p("flowmap_parity.json")), read(p("pytorch_parity.json"))
    fchk, fmn = read(p("flowmap_checks.json")), read(p("flowmap_mnist.json"))
    env = read(p("env.json")) or {}
    steps = []
    if os.path.exists(p("steps.tsv")):
        with open(p("steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    steps.append({"name": parts[0], "status": parts[1], "exit_code": int(parts[2]), "seconds": float(parts[3]), "log": parts[4] if len(parts) > 4 else None})

    device_name = get(fb, "machine", "device_name") or get(pe, "machine", "device_name")
    peak = peak_tflops(device_name)
    flops = get(fb, "model", "forward_flops_per_image")
    cfg = get(fb, "model", "config")
    failures, reference_problems = [], []

    for s in steps:
        if s["status"] != "ok":
            (reference_problems if s["name"].startswith("pytorch") else failures).append(f"step {s['name']}: {s['status']} (exit {s['exit_code']}, {s['seconds']:.0f} s; log {s['log']})")

    rows = {}
    long_steps = get(fb, "sampling", "long", "steps") or 128
    for name, label, unit, better in THROUGHPUT_ROWS:
        fv, fbat, fmem, ferr = value_of(fb, name)
        ev, ebat, emem, eerr = value_of(pe, name)
        cv, cbat, cmem, cerr = value_of(pc, name)
        if ferr and fb is not None:
            failures.append(f"flowmap {label}: {ferr}")
        if eerr and pe is not None:
            reference_problems.append(f"PyTorch eager {label}: {eerr}")
        if fv is None and not ferr and fb is not None:
            failures.append(f"flowmap {label}: not measured")
        if cerr and pc is not None:
            reference_problems.append(f"PyTorch compiled {label}: {cerr}")
        rows[name] = {
            "label": label,
            "unit": unit,
            "better": better,
            "flowmap": fv,
            "pytorch_eager": ev,
            "pytorch_compiled": cv,
            "ratio_eager": ratio(fv, ev),
            "ratio_compiled": ratio(fv, cv),
            "flowmap_batch": fbat,
            "pytorch_batch": ebat,
            "flowmap_peak_gb": fmem,
            "pytorch_peak_gb": emem,
            "pytorch_compiled_peak_gb": cmem,
            "flowmap_mfu": mfu(name, fv, fbat, flops, peak, long_steps),
            "pytorch_mfu": mfu(name, ev, ebat, flops, peak, long_steps),
            "pytorch_compiled_mfu": mfu(name, cv, cbat, flops, peak, long_steps),
            "flowmap_error": ferr,
            "pytorch_error": eerr,
        }

    def mf_over_fm(side_rows, key):
        fm, mf = side_rows["train_flow_matching"][key], side_rows["train_mean_flow"][key]
        return fm / mf if fm and mf else None  # seconds per image, MeanFlow over flow matching

    parity = {
        "parameters_flowmap": get(ppar, "dit", "flowmap_parameters"),
        "parameters_pytorch": get(ppar, "dit", "pytorch_parameters"),
        "parameters_equal": get(ppar, "dit", "parameters_equal"),
        "missing_keys": get(ppar, "dit", "missing_keys"),
        "unexpected_keys": get(ppar, "dit", "unexpected_keys"),
        "forward_max_abs_diff": get(ppar, "dit", "forward_fused", "max_abs_diff"),
        "forward_max_abs_output": get(ppar, "dit", "forward_fused", "max_abs_flowmap"),
        "forward_math_max_abs_diff": get(ppar, "dit", "forward_math", "max_abs_diff"),
        "jvp_tangent_max_abs_diff": get(ppar, "dit", "jvp_tangent", "max_abs_diff"),
        "rel_tol": get(ppar, "rel_tol"),
        "vae_parameters_flowmap": get(ppar, "vae", "flowmap_parameters"),
        "vae_parameters_pytorch": get(ppar, "vae", "pytorch_parameters"),
        "vae_parameters_equal": get(ppar, "vae", "parameters_equal"),
        "vae_decode_max_abs_diff": get(ppar, "vae", "decode", "max_abs_diff"),
        "device": get(ppar, "machine", "device"),
        "pass": get(ppar, "pass"),
    }
    if parity["pass"] is not True:
        failures.append(f"parity: flowmap and the PyTorch reference disagree or did not run ({json.dumps({k: parity[k] for k in ('parameters_equal', 'forward_max_abs_diff', 'vae_parameters_equal', 'vae_decode_max_abs_diff')})})")
    if pe is not None and get(pe, "model", "parameters") is not None and get(fb, "model", "parameters") is not None and get(pe, "model", "parameters") != get(fb, "model", "parameters"):
        failures.append(f"benchmarked models differ in size: flowmap {get(fb, 'model', 'parameters')}, PyTorch {get(pe, 'model', 'parameters')}")

    checks = []
    by_name = {c.get("name"): c for c in (get(fchk, "checks") or [])}
    for n in CHECK_NAMES:
        c = by_name.get(n)
        if c is None:
            checks.append({"name": n, "pass": None, "value": None, "tolerance": None, "note": "not run", "error": None})
            failures.append(f"check {n}: not run")
            continue
        checks.append({"name": n, "pass": c.get("pass"), "value": c.get("value"), "tolerance": c.get("tolerance"), "note": c.get("note"), "error": c.get("error")})
        if c.get("pass") is not True:
            failures.append(f"check {n}: failed ({c.get('error') or json.dumps(c.get('value'))})")

    mnist_rows = get(fmn, "rows") or []
    for r in mnist_rows:
        if r.get("error"):
            failures.append(f"MNIST {r.get('label')}: {r['error']}")
    if fmn is None:
        failures.append("MNIST: not run")
    mnist = {
        "settings": get(fmn, "settings"),
        "rows": mnist_rows,
        "table_md": get(fmn, "table_md"),
        "plot_png": os.path.relpath(get(fmn, "plot_png"), out) if get(fmn, "plot_png") else None,
        "plot_svg": os.path.relpath(get(fmn, "plot_svg"), out) if get(fmn, "plot_svg") else None,
    }

    sampler = {
        "host_syncs_1_step": get(fb, "sampling", "steps1_counted", "host_syncs"),
        "host_syncs_long": get(fb, "sampling", "long", "host_syncs"),
        "long_steps": long_steps,
        "gpu_busy_at_return": get(fb, "sampling", "long", "gpu_busy_at_return"),
        "host_return_seconds": get(fb, "sampling", "long", "host_return_seconds"),
        "seconds": get(fb, "sampling", "long", "seconds"),
    }
    report = {
        "schema": SCHEMA,
        "mode": "quick" if get(fb, "quick") or env.get("quick") else "full",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": env.get("duration_s"),
        "machine": {
            "device": get(fb, "machine", "device"),
            "device_name": device_name,
            "peak_bf16_tflops": peak,
            "libtorch_flowmap": get(fb, "machine", "libtorch"),
            "libtorch_cuda": get(fb, "machine", "libtorch_cuda"),
            "cuda_driver": get(fb, "machine", "cuda_driver"),
            "torch_python": get(pe, "machine", "torch"),
            "python": env.get("python"),
            "hostname": env.get("hostname"),
            "cpu_threads": get(fb, "machine", "cpu_threads"),
        },
        "inception_weights": env.get("inception"),
        "settings": {"flowmap": get(fb, "settings"), "pytorch": get(pe, "settings"), "compiled": get(pc, "settings")},
        "model": {
            "config": cfg,
            "parameters_flowmap": get(fb, "model", "parameters"),
            "parameters_pytorch": get(pe, "model", "parameters"),
            "batch": get(fb, "model", "batch"),
            "forward_gflops_per_image": flops / 1e9 if flops else None,
            "train_gflops_per_image": 3 * flops / 1e9 if flops else None,
        },
        "parity": parity,
        "throughput": rows,
        "meanflow_over_flow_matching": {"flowmap": mf_over_fm(rows, "flowmap"), "pytorch_eager": mf_over_fm(rows, "pytorch_eager")},
        "sampler": sampler,
        "checks": checks,
        "mnist": mnist,
        "steps": steps,
        "failures": failures,
        "reference_problems": reference_problems,
        "pass": not failures,
    }
    return report


def fmt(v, unit=None, digits=None):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if digits is not None:
        return f"{v:.{digits}f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 1e-3:
        return f"{v:.4f}"
    return f"{v:.2e}"


def pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def cuda_version(code):
    """CUDA's 1000·major + 10·minor encoding as "13.0"."""
    return None if not code else f"{code // 1000}.{(code % 1000) // 10}"


def markdown(r):
    m = r["machine"]
    lines = [f"# flowmap GPU check ({r['mode']})", ""]
    lines.append(f"{r['created']} on {m['device_name'] or m['device']} ({m['device']}); flowmap's libtorch {m['libtorch_flowmap']} (CUDA {cuda_version(m['libtorch_cuda']) or 'none'}, driver up to CUDA {cuda_version(m['cuda_driver']) or 'none'}), PyTorch {m['torch_python']}; {fmt(r['duration_s'], digits=0)} s in all.")
    lines.append(f"**{'PASS' if r['pass'] else 'FAIL'}**: {len(r['failures'])} failure(s), {len(r['reference_problems'])} problem(s) on the PyTorch side.")
    lines.append("")
    mc = r["model"]["config"] or {}
    lines.append("## Same network")
    lines.append("")
    par = r["parity"]
    lines.append(
        f"DiT (depth {mc.get('depth')}, width {mc.get('hidden_size')}, patch {mc.get('patch_size')}, {mc.get('in_channels')}x{mc.get('input_size')}x{mc.get('input_size')}, {mc.get('num_classes')} classes, h-embedder {mc.get('h_embedding')}): "
        f"{fmt(par['parameters_flowmap'])} parameters in flowmap, {fmt(par['parameters_pytorch'])} in the PyTorch reference loaded with flowmap's weights "
        f"(equal: {fmt(par['parameters_equal'])}). Forward of the same weights and inputs on {par['device']}: max |diff| {fmt(par['forward_max_abs_diff'])} (outputs up to {fmt(par['forward_max_abs_output'])}), "
        f"math path {fmt(par['forward_math_max_abs_diff'])}, JVP tangent {fmt(par['jvp_tangent_max_abs_diff'])}. SD-VAE decoder: {fmt(par['vae_parameters_flowmap'])} / {fmt(par['vae_parameters_pytorch'])} parameters, decode max |diff| {fmt(par['vae_decode_max_abs_diff'])}. "
        f"{'PASS' if par['pass'] else 'FAIL'} (relative tolerance {par['rel_tol']})."
    )
    lines.append("")
    lines.append("## Throughput and memory, flowmap beside PyTorch on the same device")
    lines.append("")
    s = r["settings"]["flowmap"] or {}
    lines.append(f"Batch {fmt(r['model']['batch'])}, {s.get('precision')} (TF32 {fmt(s.get('tf32'))}), {s.get('optimizer')}; JVP: {s.get('jvp')}; no EMA, no data loading, no gradient clipping. MFU against {fmt(m['peak_bf16_tflops'])} TFLOP/s dense bf16 with {fmt(r['model']['forward_gflops_per_image'])} GFLOPs per forward per image (training: 3x). Ratio = flowmap / PyTorch of the value shown.")
    lines.append("")
    lines.append("| measurement | unit | flowmap | PyTorch eager | ratio | PyTorch compiled | ratio | flowmap peak GB | PyTorch peak GB | MFU flowmap / eager / compiled |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in r["throughput"].items():
        batches = [b for b in (row["flowmap_batch"], row["pytorch_batch"]) if b is not None]
        batch = ""
        if name != "forward_batch1" and any(b != r["model"]["batch"] for b in batches):
            batch = f" (batch {fmt(row['flowmap_batch'])}" + (f", PyTorch {fmt(row['pytorch_batch'])}" if row["pytorch_batch"] != row["flowmap_batch"] else "") + ")"
        lines.append(
            f"| {row['label']}{batch} | {row['unit']} | {fmt(row['flowmap'])} | {fmt(row['pytorch_eager'])} | {fmt(row['ratio_eager'], digits=2)} | {fmt(row['pytorch_compiled'])} | {fmt(row['ratio_compiled'], digits=2)} | {fmt(row['flowmap_peak_gb'], digits=1)} | {fmt(row['pytorch_peak_gb'], digits=1)} | {pct(row['flowmap_mfu'])} / {pct(row['pytorch_mfu'])} / {pct(row['pytorch_compiled_mfu'])} |"
        )
    mf = r["meanflow_over_flow_matching"]
    lines.append("")
    lines.append(f"MeanFlow step / flow-matching step (time per image): flowmap {fmt(mf['flowmap'], digits=2)}, PyTorch {fmt(mf['pytorch_eager'], digits=2)}.")
    sm = r["sampler"]
    lines.append(
        f"Host synchronisations while sampling (libtorch's sync-debug hook): {fmt(sm['host_syncs_1_step'])} at 1 step, {fmt(sm['host_syncs_long'])} at {sm['long_steps']} steps; "
        f"the {sm['long_steps']}-step call returned after {fmt(sm['host_return_seconds'])} s of {fmt(sm['seconds'])} s with the GPU still busy: {fmt(sm['gpu_busy_at_return'])}."
    )
    lines.append("")
    lines.append("## Correctness on the device")
    lines.append("")
    lines.append("| check | pass | measured | tolerance | note |")
    lines.append("|---|---|---|---|---|")
    for c in r["checks"]:
        val = c["error"] or (", ".join(f"{k} {fmt(v) if isinstance(v, (int, float)) else v}" for k, v in c["value"].items()) if isinstance(c["value"], dict) else fmt(c["value"]))
        tol = ", ".join(f"{k} {v}" for k, v in c["tolerance"].items()) if isinstance(c["tolerance"], dict) else fmt(c["tolerance"])
        lines.append(f"| {c['name']} | {fmt(c['pass'])} | {val} | {tol} | {c['note'] or ''} |")
    lines.append("")
    lines.append("## Real data: MNIST, three objectives")
    lines.append("")
    mn = r["mnist"]
    if mn["table_md"]:
        lines.append(mn["table_md"].rstrip())
    else:
        lines.append("(not run)")
    if mn["plot_png"]:
        lines.append("")
        lines.append(f"![FID vs sampling steps]({mn['plot_png']})")
    lines.append("")
    lines.append("## Steps")
    lines.append("")
    lines.append("| step | status | seconds |")
    lines.append("|---|---|---|")
    for st in r["steps"]:
        lines.append(f"| {st['name']} | {st['status']} | {st['seconds']:.1f} |")
    lines.append("")
    if r["failures"]:
        lines.append("## Failures")
        lines.append("")
        lines.extend(f"- {f}" for f in r["failures"])
        lines.append("")
    if r["reference_problems"]:
        lines.append("## Problems on the PyTorch side")
        lines.append("")
        lines.extend(f"- {f}" for f in r["reference_problems"])
        lines.append("")
    return "\n".join(lines)


def run(args):
    report = build(args.out)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0 if report["pass"] else 1

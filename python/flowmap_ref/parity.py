"""`python -m flowmap_ref parity`: loads flowmap's DiT and VAE weights (written by `flowmap
gpu-check parity`) into the PyTorch reference, recomputes flowmap's outputs on the same inputs and
reports parameter counts and the largest differences, so that the side-by-side benchmark is known
to compare one network. Float32, TF32 off, on the given device.
"""
import json

import torch

from .dit import DiT
from .safetensors_io import load as load_safetensors
from .vae import VaeDecoder

# Largest accepted max|diff| / max|flowmap output| in float32.
REL_TOL = 1e-4


def compare(ours, theirs):
    diff = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    return {"max_abs_diff": diff, "max_abs_flowmap": scale, "rel": diff / max(scale, 1e-30), "pass": diff <= REL_TOL * max(scale, 1e-30) and scale > 0}


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with open(args.flowmap_json) as f:
        fm = json.load(f)
    out = {"section": "parity", "side": "pytorch", "machine": {"device": str(device), "torch": torch.__version__}, "rel_tol": REL_TOL}

    cfg = fm["dit"]["config"]
    model = DiT(cfg)
    weights = load_safetensors(fm["dit"]["weights"])
    result = model.load_state_dict(weights, strict=False)
    model = model.to(device).eval()
    io = {k: v.to(device) for k, v in load_safetensors(fm["dit"]["io"]).items()}
    with torch.no_grad():
        fused = model(io["x"], io["t"], io["h"], io["class"])
        math = model(io["x"], io["t"], io["h"], io["class"], math_path=True)
    f = lambda z, t, h: model(z, t, h, io["class"], math_path=True)
    with torch.no_grad():
        u, du = torch.func.jvp(f, (io["x"], io["t"], io["h"]), (io["vx"], torch.ones_like(io["t"]), torch.ones_like(io["t"])))
    dit = {
        "flowmap_parameters": fm["dit"]["parameters"],
        "pytorch_parameters": model.num_parameters(),
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
        "forward_fused": compare(fused, io["out_fused"]),
        "forward_math": compare(math, io["out_math"]),
        "jvp_primal": compare(u, io["jvp_u"]),
        "jvp_tangent": compare(du, io["jvp_du"]),
    }
    dit["parameters_equal"] = dit["flowmap_parameters"] == dit["pytorch_parameters"]
    dit["pass"] = dit["parameters_equal"] and not dit["missing_keys"] and not dit["unexpected_keys"] and all(dit[k]["pass"] for k in ("forward_fused", "forward_math", "jvp_primal", "jvp_tangent"))
    out["dit"] = dit

    vcfg = fm["vae"]["config"]
    dec = VaeDecoder(vcfg)
    missing, unexpected = dec.load_flowmap(load_safetensors(fm["vae"]["weights"]))
    dec = dec.to(device).eval()
    vio = {k: v.to(device) for k, v in load_safetensors(fm["vae"]["io"]).items()}
    with torch.no_grad():
        image = dec(vio["z"])
    vae = {"flowmap_parameters": fm["vae"]["decoder_parameters"], "pytorch_parameters": dec.num_parameters(), "missing_keys": missing, "unexpected_keys": unexpected, "decode": compare(image, vio["image"])}
    vae["parameters_equal"] = vae["flowmap_parameters"] == vae["pytorch_parameters"]
    vae["pass"] = vae["parameters_equal"] and not missing and not unexpected and vae["decode"]["pass"]
    out["vae"] = vae
    out["pass"] = dit["pass"] and vae["pass"]
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"parity: DiT parameters flowmap {dit['flowmap_parameters']:,} / PyTorch {dit['pytorch_parameters']:,}; forward max |diff| {dit['forward_fused']['max_abs_diff']:.3e} (fused), {dit['forward_math']['max_abs_diff']:.3e} (math), JVP tangent {dit['jvp_tangent']['max_abs_diff']:.3e}; VAE decode {vae['decode']['max_abs_diff']:.3e}; {'PASS' if out['pass'] else 'FAIL'}")
    return 0 if out["pass"] else 1

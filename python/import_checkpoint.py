#!/usr/bin/env python3
"""Reads a PyTorch DiT / SiT checkpoint and writes its state dict as .safetensors (float32), for
`flowmap import-checkpoint` (which validates the names and shapes and writes the flowmap run).

    import_checkpoint.py CKPT.pt OUT.safetensors [--key ema|model|auto] [--allow-pickle]

CKPT.pt is either a bare state dict (facebookresearch/DiT `DiT-XL-2-256x256.pt`, SiT
`SiT-XL-2-256x256.pt`) or a training checkpoint {"model", "ema", "opt", "args"} (DiT/SiT
`train.py`): `--key auto` (default) takes "ema" when present, else "model", else the dict itself.
A DDP "module." prefix is removed. Training checkpoints pickle argparse.Namespace objects, which
torch.load's safe loader refuses: `--allow-pickle` loads them with weights_only=False, which runs
code from the file (only for files you trust). Prints one JSON line: the key used and the count.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flowmap_dit import write_safetensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--key", default="auto", choices=["auto", "ema", "model", "none"])
    ap.add_argument("--allow-pickle", action="store_true")
    a = ap.parse_args()
    try:
        obj = torch.load(a.checkpoint, map_location="cpu", weights_only=not a.allow_pickle)
    except Exception as e:  # the safe loader refuses pickled Python objects
        sys.exit(f"torch.load({a.checkpoint}) with weights_only={not a.allow_pickle} failed: {e}\n"
                 "A training checkpoint with pickled arguments needs --allow-pickle (runs code from the file: trusted files only).")
    key = a.key
    if key == "auto":
        key = "ema" if isinstance(obj, dict) and "ema" in obj else "model" if isinstance(obj, dict) and "model" in obj else "none"
    sd = obj if key == "none" else obj[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        sys.exit(f"{a.checkpoint}: `{key}` is not a state dict of tensors (keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj)})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    write_safetensors({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, a.out)
    print(json.dumps({"key": key, "tensors": len(sd)}))


if __name__ == "__main__":
    main()

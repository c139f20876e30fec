#!/usr/bin/env python3
"""PyTorch side of crates/experiments/tests/checkpoint_interop.rs (both directions of the DiT interop).

    dit_interop.py make-dit OUT_DIR
        A randomly initialised DiT-S/2 (4x32x32 latents, 1000 classes, learn_sigma) in the
        facebookresearch/DiT state-dict naming, saved with torch.save as OUT_DIR/dit.pt (a bare state
        dict, as DiT-XL-2-256x256.pt), and OUT_DIR/io.npz: inputs x (3, 4, 32, 32), the DDPM step
        indices t (DiT's convention: integers 0..999, fed to the timestep embedder as they are),
        labels y (1000 = the null class) and the network's output.
    dit_interop.py make-sit OUT_DIR
        The same for a SiT-S/2 (same module names; learn_sigma): t is SiT's continuous time with
        data at t = 1, and `out` is SiT's velocity, the first 4 of the 8 output channels (what
        SiT's forward returns with learn_sigma).
    dit_interop.py run-flowmap RUN_DIR IO.npz OUT.npz
        python/flowmap_dit.py rebuilds a flowmap run's network from its config.toml, loads the EMA
        safetensors of its latest checkpoint and runs x, t, h, class of IO.npz: OUT.npz holds `out`.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import flowmap_dit  # noqa: E402

torch.set_num_threads(2)

DIT_S2 = {"kind": "dit", "depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2, "mlp_ratio": 4.0, "in_channels": 4,
          "input_size": 32, "num_classes": 1000, "h_embedding": "none", "variance": "learned", "t_scale": 1.0}


def make_dit(out_dir):
    torch.manual_seed(0)
    net = flowmap_dit.FlowmapDiT(DIT_S2)  # t_scale 1: t is DiT's step index itself
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0.0, 0.05)  # every layer random, including DiT's zero-initialised adaLN and output layers
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(sd, os.path.join(out_dir, "dit.pt"))
    x = torch.randn(3, 4, 32, 32)
    t = torch.tensor([0.0, 17.0, 999.0])
    y = torch.tensor([3, 999, 1000])
    with torch.no_grad():
        out = net(x, t, torch.zeros(3), y)
    np.savez(os.path.join(out_dir, "io.npz"), x=x.numpy(), t=t.numpy(), y=y.numpy().astype(np.float64), out=out.numpy())
    print(len(sd))


def make_sit(out_dir):
    torch.manual_seed(1)
    net = flowmap_dit.FlowmapDiT(DIT_S2)  # t_scale 1: SiT embeds its raw t in [0, 1]
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0.0, 0.05)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(sd, os.path.join(out_dir, "sit.pt"))
    x = torch.randn(3, 4, 32, 32)
    t = torch.tensor([0.02, 0.3, 0.97])
    y = torch.tensor([3, 999, 1000])
    with torch.no_grad():
        out = net(x, t, torch.zeros(3), y)[:, :4]
    np.savez(os.path.join(out_dir, "sit_io.npz"), x=x.numpy(), t=t.numpy(), y=y.numpy().astype(np.float64), out=out.numpy())
    print(len(sd))


def run_flowmap(run_dir, io_path, out_path):
    io = np.load(io_path)
    net = flowmap_dit.load_run(run_dir, weights="ema")
    with torch.no_grad():
        out = net(torch.from_numpy(io["x"]).float(), torch.from_numpy(io["t"]).float(), torch.from_numpy(io["h"]).float(), torch.from_numpy(io["class"]).long())
    np.savez(out_path, out=out.numpy())


if __name__ == "__main__":
    {"make-dit": make_dit, "make-sit": make_sit, "run-flowmap": run_flowmap}[sys.argv[1]](*sys.argv[2:])

"""flowmap's DiT in PyTorch: rebuild a run's network from its config and load its safetensors, so
that a flowmap run can be sampled or evaluated from PyTorch (and PyTorch checkpoints compared).

    import flowmap_dit
    net = flowmap_dit.load_run("runs/my-run", weights="ema")      # latest complete checkpoint
    out = net(x_t, t, h, class_)                                  # same numbers as flowmap

The network is crates/models/src/dit.rs line for line (methods.md §15): flowmap's conventions,
t = 0 data and t = 1 noise, inputs (x_t, t, h = t - r, class) with class = num_classes for "no
label"; t (and a continuous h) are multiplied by `t_scale` before the sinusoid (1000 for DiT
checkpoints, whose t is the DDPM step index). Parameter names are flowmap's, which are those of
facebookresearch/DiT `models.py` (x_embedder.proj, t_embedder.mlp.0/2, y_embedder.embedding_table,
blocks.i.attn.qkv/proj, blocks.i.mlp.fc1/fc2, blocks.i.adaLN_modulation.1, final_layer.*), plus
h_embedder for flow maps. Needs torch only (and Python 3.11's tomllib for load_run).
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

TIMESTEP_FREQUENCIES = 256
MAX_PERIOD = 10000.0
SHORTCUT_MAX_LEVEL = 7.0
LN_EPS = 1e-6

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file (pure Python; no `safetensors` package needed)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=DTYPES[meta["dtype"]]) if b > a else torch.empty(0, dtype=DTYPES[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def write_safetensors(tensors, path):
    """Writes {name: tensor} as .safetensors (float32/float64/int64 as they are; others as float32)."""
    rev = {v: k for k, v in DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in (torch.float32, torch.float64, torch.int64):
            t = t.float()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": rev[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)


def timestep_embedding(s, dim=TIMESTEP_FREQUENCIES, max_period=MAX_PERIOD):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=s.dtype, device=s.device) * (-math.log(max_period) / half))
    args = s[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_pos_table(dim, grid):
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for i in range(grid):
        for j in range(grid):
            rows.append(torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)]))
    return torch.stack(rows)[None].float()


class TimestepEmbedder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, s):
        return self.mlp(timestep_embedding(s))


class Attention(nn.Module):
    def __init__(self, d, num_heads, scale):
        super().__init__()
        self.qkv, self.proj, self.num_heads, self.scale = nn.Linear(d, 3 * d), nn.Linear(d, d), num_heads, scale

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


class Block(nn.Module):
    def __init__(self, d, num_heads, m, scale):
        super().__init__()
        self.attn, self.mlp = Attention(d, num_heads, scale), Mlp(d, m)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c_act):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation[1](c_act).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, out)


class FlowmapDiT(nn.Module):
    """flowmap's DiT from its `[model]` table (kind = "dit", fully resolved as in a run's config.toml)."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        assert cfg.pop("kind", "dit") == "dit", "only kind = \"dit\" models"
        self.cfg = cfg
        d, nh, p, c = cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"], cfg["in_channels"]
        head_dim = d // nh
        scale = {"inv_sqrt_head_dim": 1 / math.sqrt(head_dim), "inv_head_dim": 1 / head_dim}[cfg.get("attn_scale", "inv_sqrt_head_dim")]
        self.out_channels = 2 * c if cfg.get("variance", "fixed") == "learned" else c
        grid = cfg["input_size"] // p
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c, d, p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_table(d, grid))
        self.t_embedder = TimestepEmbedder(d)
        self.h_embedding = cfg.get("h_embedding", "continuous")
        if self.h_embedding != "none":
            self.h_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Parameter(torch.zeros(cfg["num_classes"] + 1, d))
        m = int(d * cfg.get("mlp_ratio", 4.0))
        self.blocks = nn.ModuleList([Block(d, nh, m, scale) for _ in range(cfg["depth"])])
        self.final_layer = FinalLayer(d, p * p * self.out_channels)

    def flowmap_state_dict(self):
        """{flowmap variable name: tensor}: the module's state (pos_embed included, SiLU slots skipped)."""
        return dict(self.state_dict())

    def load_flowmap(self, tensors):
        """Loads flowmap-named tensors; every tensor must be used and every parameter given."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
        for k, v in tensors.items():
            assert own[k].shape == v.shape, f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
        return self

    def forward(self, x_t, t, h, class_):
        b, c, size, _ = x_t.shape
        p, ts = self.cfg["patch_size"], float(self.cfg.get("t_scale", 1.0))
        x = self.x_embedder.proj(x_t).flatten(2).transpose(1, 2) + self.pos_embed
        e = self.t_embedder(t * ts) + self.y_embedder.embedding_table[class_]
        if self.h_embedding == "continuous":
            e = e + self.h_embedder(h * ts)
        elif self.h_embedding == "log2_level":
            level = torch.clamp(torch.round(-torch.log2(torch.clamp(h, min=2 ** -SHORTCUT_MAX_LEVEL))), 0, SHORTCUT_MAX_LEVEL)
            e = e + self.h_embedder(level)
        c_act = F.silu(e)
        for block in self.blocks:
            x = block(x, c_act)
        shift, scale = self.final_layer.adaLN_modulation[1](c_act).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(layer_norm(x), shift, scale))
        g, co = size // p, self.out_channels
        return x.reshape(b, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, size, size)


def latest_checkpoint(run_dir):
    """The newest complete checkpoint folder of a run (checkpoints/LATEST, else the highest step with a MANIFEST)."""
    root = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(root, "LATEST")
    if os.path.exists(latest):
        d = os.path.join(root, open(latest).read().strip())
        if os.path.exists(os.path.join(d, "MANIFEST")):
            return d
    steps = sorted(n for n in os.listdir(root) if n.startswith("step_") and "." not in n and os.path.exists(os.path.join(root, n, "MANIFEST")))
    assert steps, f"{run_dir} has no complete checkpoint"
    return os.path.join(root, steps[-1])


def load_run(run_dir, weights="ema", model_table=None):
    """The run's network with its `weights` ("ema" or "online") from the latest checkpoint, in eval mode.
    `model_table`: the [model] table, default read from <run>/config.toml (or <run>/model.toml of an import)."""
    if model_table is None:
        import tomllib
        path = os.path.join(run_dir, "config.toml")
        if not os.path.exists(path):
            path = os.path.join(run_dir, "model.toml")
        model_table = tomllib.load(open(path, "rb"))["model"]
    part = {"ema": "ema", "online": "model"}[weights]
    net = FlowmapDiT(model_table)
    net.load_flowmap(read_safetensors(os.path.join(latest_checkpoint(run_dir), f"{part}.safetensors")))
    return net.eval()

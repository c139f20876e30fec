"""flowmap's DiT (crates/models/src/dit.rs) in PyTorch: adaLN-Zero blocks (Peebles and Xie,
arXiv 2212.09748; facebookresearch/DiT models.py) conditioned on (x_t, t, h = t - r, class) with a
second timestep embedder for h (MeanFlow, Shortcut). Parameter names are flowmap's (which are
DiT's), so flowmap's safetensors weights load with `load_state_dict(strict=True)`.

Two kernel paths, as in flowmap:
* fused (default): F.scaled_dot_product_attention and F.layer_norm;
* math (`math=True`): explicit matmul + softmax and an explicit LayerNorm. A JVP must take it:
  fused SDPA kernels have no forward derivative, and in PyTorch 2.11 torch.func.jvp through the
  native layer_norm followed by backward gives a wrong gradient (toolchain.md), which flowmap
  avoids the same way.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6
TIMESTEP_FREQUENCIES = 256
MAX_PERIOD = 10000.0
EMBED_INIT_STD = 0.02
SHORTCUT_MAX_LEVEL = 7.0


def timestep_embedding(s, dim=TIMESTEP_FREQUENCIES, max_period=MAX_PERIOD):
    """[cos(s f), sin(s f)], f_i = exp(-ln(max_period) i / half): (B,) -> (B, dim) (cos first, as DiT)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=s.dtype, device=s.device) * (-math.log(max_period) / half))
    args = s[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def log2_level(h):
    """Shortcut's integer level -log2 h in [0, 7] (h = 0 gives 7)."""
    return (-torch.log2(h.clamp_min(2.0**-SHORTCUT_MAX_LEVEL))).round().clamp(0.0, SHORTCUT_MAX_LEVEL)


def sincos_pos_table(dim, grid):
    """(T, D) 2-D sin-cos table, token (i, j) = [1-D(D/2, j), 1-D(D/2, i)] (DiT get_2d_sincos_pos_embed)."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    one_d = lambda p: torch.cat([torch.sin(p[:, None] * omega), torch.cos(p[:, None] * omega)], dim=1)  # (grid, D/2)
    emb_w = one_d(pos)  # column index j
    emb_h = one_d(pos)  # row index i
    table = torch.cat([emb_w[None, :, :].expand(grid, grid, -1), emb_h[:, None, :].expand(grid, grid, -1)], dim=2)
    return table.reshape(grid * grid, dim)


def layer_norm(x, math_path):
    if not math_path:
        return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)
    centred = x - x.mean(dim=-1, keepdim=True)
    var = centred.square().mean(dim=-1, keepdim=True)
    return centred * torch.rsqrt(var + LN_EPS)


def attention(q, k, v, scale, math_path):
    """softmax(q k^T scale) v; (B, NH, T, d)."""
    if not math_path:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    logits = q @ k.transpose(-2, -1) * scale
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, s):
        return self.mlp(timestep_embedding(s))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, d):
        super().__init__()
        self.embedding_table = nn.Parameter(torch.zeros(num_classes + 1, d))  # row K = null


class Attention(nn.Module):
    def __init__(self, d, num_heads, scale):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.num_heads, self.scale = num_heads, scale

    def forward(self, x, math_path):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = attention(qkv[0], qkv[1], qkv[2], self.scale, math_path)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d, num_heads, mlp_hidden, scale):
        super().__init__()
        self.attn = Attention(d, num_heads, scale)
        self.mlp = Mlp(d, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c_act, math_path):
        # The SiLU of the conditioning is computed once for all blocks (as flowmap does).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation[1](c_act).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x, math_path), shift_msa, scale_msa), math_path)
        return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, math_path), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, out)


class PatchEmbed(nn.Module):
    def __init__(self, c, d, p):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p)


class DiT(nn.Module):
    """F(x_t, t, h, class) -> (B, C_out, H, W). `cfg` is flowmap's DitConfig as JSON (serde names)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        d, nh, p = cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"]
        c, size, k = cfg["in_channels"], cfg["input_size"], cfg["num_classes"]
        head_dim = d // nh
        scale = {"inv_sqrt_head_dim": 1.0 / math.sqrt(head_dim), "inv_head_dim": 1.0 / head_dim}[cfg["attn_scale"]]
        self.c_out = 2 * c if cfg["variance"] == "learned" else c
        self.p, self.size = p, size
        self.t_scale, self.h_embedding = float(cfg["t_scale"]), cfg["h_embedding"]
        self.x_embedder = PatchEmbed(c, d, p)
        grid = size // p
        self.register_buffer("pos_embed", sincos_pos_table(d, grid).float()[None])
        self.t_embedder = TimestepEmbedder(d)
        self.h_embedder = None if self.h_embedding == "none" else TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(k, d)
        mlp_hidden = int(d * cfg["mlp_ratio"])
        self.blocks = nn.ModuleList([Block(d, nh, mlp_hidden, scale) for _ in range(cfg["depth"])])
        self.final_layer = FinalLayer(d, p * p * self.c_out)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation (as flowmap's): Xavier-uniform linears with zero bias, N(0, 0.02)
        embedders, zero adaLN modulation and final projection (the output starts at exactly 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table, std=EMBED_INIT_STD)
        for e in [self.t_embedder] + ([self.h_embedder] if self.h_embedder is not None else []):
            nn.init.normal_(e.mlp[0].weight, std=EMBED_INIT_STD)
            nn.init.normal_(e.mlp[2].weight, std=EMBED_INIT_STD)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for lin in [self.final_layer.adaLN_modulation[1], self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def num_parameters(self):
        """Trainable parameters (pos_embed is a buffer, as in flowmap it is not trainable)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def h_input(self, h):
        if self.h_embedding == "continuous":
            return h * self.t_scale
        if self.h_embedding == "log2_level":
            return log2_level(h)
        return None

    def forward(self, x_t, t, h, y, math_path=False):
        b, _, height, width = x_t.shape
        x = self.x_embedder.proj(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t * self.t_scale) + F.embedding(y, self.y_embedder.embedding_table)
        if self.h_embedder is not None:
            c = c + self.h_embedder(self.h_input(h))
        c_act = F.silu(c)
        for blk in self.blocks:
            x = blk(x, c_act, math_path)
        shift, scale = self.final_layer.adaLN_modulation[1](c_act).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(layer_norm(x, math_path), shift, scale))  # (B, T, p² C_out)
        g, p = self.size // self.p, self.p
        x = x.reshape(b, g, g, p, p, self.c_out).permute(0, 5, 1, 3, 2, 4).reshape(b, self.c_out, height, width)
        return x.to(x_t.dtype)


def forward_flops(cfg):
    """2 × multiply-adds of one image's forward (flowmap's gpu_check::dit_forward_flops)."""
    d, p = cfg["hidden_size"], cfg["patch_size"]
    m = int(d * cfg["mlp_ratio"])
    t = (cfg["input_size"] // p) ** 2
    c_in = cfg["in_channels"]
    c_out = 2 * c_in if cfg["variance"] == "learned" else c_in
    embedders = 1 if cfg["h_embedding"] == "none" else 2
    block = t * (4 * d * d + 2 * d * m) + 2 * t * t * d + 6 * d * d
    return 2.0 * (t * c_in * p * p * d + embedders * (TIMESTEP_FREQUENCIES * d + d * d) + cfg["depth"] * block + 2 * d * d + t * d * p * p * c_out)

"""The decoder half of flowmap's SD AutoencoderKL (crates/models/src/vae.rs, itself diffusers'
AutoencoderKL): post_quant_conv, then Decoder (conv_in, mid block with one single-head attention,
UpDecoderBlock2D levels of layers_per_block + 1 resnets with nearest-x2 upsampling, GroupNorm,
SiLU, conv_out). Names are diffusers' state-dict keys, so flowmap's `Vae::save` file loads as is.
Only the decoder is needed: FID of a latent model decodes every sample once."""
import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6


def group_norm(groups, c):
    return nn.GroupNorm(groups, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialAttention(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = group_norm(groups, c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (l(tokens)[:, None] for l in (self.to_q, self.to_k, self.to_v))
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)]) if attention else None

    def forward(self, x):
        h = self.resnets[0](x)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, c_in, c, n, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if j == 0 else c, c, groups) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(c)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        rev = list(reversed(cfg["block_out_channels"]))
        g = cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["latent_channels"], rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, cfg["mid_block_add_attention"])
        blocks, c_prev = [], rev[0]
        for i, c in enumerate(rev):
            blocks.append(UpBlock(c_prev, c, cfg["layers_per_block"] + 1, g, i + 1 < len(rev)))
            c_prev = c
        self.up_blocks = nn.ModuleList(blocks)
        c_first = cfg["block_out_channels"][0]
        self.conv_norm_out = group_norm(g, c_first)
        self.conv_out = nn.Conv2d(c_first, cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            h = blk(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VaeDecoder(nn.Module):
    """Unscaled latent (B, C_z, h, w) -> image (B, C, f h, f w), as flowmap's `Vae::decode`."""

    def __init__(self, cfg):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(cfg["latent_channels"], cfg["latent_channels"], 1) if cfg["use_post_quant_conv"] else None
        self.decoder = Decoder(cfg)

    def forward(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def load_flowmap(self, tensors):
        """Loads the decoder's tensors of a flowmap/diffusers VAE file (the encoder's are ignored);
        returns the names that did not fit."""
        wanted = {k: v for k, v in tensors.items() if k.startswith("decoder.") or k.startswith("post_quant_conv.")}
        result = self.load_state_dict({k: v.float() for k, v in wanted.items()}, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

"""The backbone: a DDPM-style U-Net conditioned on the noise level.

Residual blocks with GroupNorm + SiLU (no BatchNorm: batch statistics mix noise levels), a sinusoidal embedding of
the noise level added to every block, self-attention at the resolutions asked for, and skip connections between
the encoder and decoder. The input size must be a multiple of ``downsampling_factor``; ``Denoiser`` pads for that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    # c_noise is O(1); scale like a timestep in [0, 1000] so the high frequencies are used.
    args = 1000.0 * x.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"model.num_heads ({num_heads}) must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 64, channel_mult=(1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions=(16,), num_heads: int = 4, dropout: float = 0.1, groups: int = 32,
                 image_size: int = 32):
        super().__init__()
        self.emb_dim = emb_dim = 4 * base_channels
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        self.embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.base_channels = base_channels
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(c_i, c_o, res):
            attn = SelfAttention(c_o, num_heads, groups) if res in attention_resolutions else None
            return nn.ModuleList([ResBlock(c_i, c_o, emb_dim, dropout, groups), attn or nn.Identity()])

        self.down, skips, ch, res = nn.ModuleList(), [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, res))
                ch = base_channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, groups), SelfAttention(ch, num_heads, groups),
                                  ResBlock(ch, ch, emb_dim, dropout, groups)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), base_channels * mult, res))
                ch = base_channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(sinusoidal_embedding(c_noise, self.base_channels).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_layer(layer, h, emb)
        return self.out(h)

    @staticmethod
    def _run_layer(layer, h, emb):
        if isinstance(layer, nn.ModuleList):  # (ResBlock, attention or identity)
            return layer[1](layer[0](h, emb))
        return layer(h)


def build_unet(model_cfg) -> UNet:
    """U-Net from the ``model`` section of params (a pydantic model or anything with those attributes)."""
    return UNet(base_channels=model_cfg.base_channels, channel_mult=tuple(model_cfg.channel_mult),
                num_res_blocks=model_cfg.num_res_blocks, attention_resolutions=tuple(model_cfg.attention_resolutions),
                num_heads=model_cfg.num_heads, dropout=model_cfg.dropout, groups=model_cfg.groups)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

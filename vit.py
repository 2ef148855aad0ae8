"""
The CLIP vision transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), written from scratch in the shape OpenAI released it and
Hugging Face's `CLIPVisionModel` stores it.

Dragonfly (v2: ViT-L/14 at 336 px, v1: ViT-B/32 at 224 px) runs every crop through this
encoder and keeps the hidden state of the *penultimate* block, CLS token included and
without the final LayerNorm (docs/release-facts.md#features). `forward(pixels, layer=-2)` returns exactly that.

Data flow, in the order of the classes below:
    pixels (N, 3, S, S) -> conv patch embedding (no bias) -> [CLS] + patches + positions
    -> pre-LayerNorm ("pre_layrnorm", sic) -> pre-LN blocks (attention, quick_gelu MLP)
Weights load by name from `vision_model.*` (OpenAI's CLIP repo) or
`image_encoder.vision_model.*` (the Dragonfly release): lib/release_format.py maps the names.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ViTConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    eps: float = 1e-5

    @property
    def patches_per_side(self) -> int:  # 24 for L/14@336, 7 for B/32@224
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:  # CLS + patches_per_side^2: 577 for L/14@336, 50 for B/32@224
        return 1 + self.patches_per_side ** 2

    def blocks_run(self, layer: int) -> int:
        """How many blocks run to give hidden state `layer` (-2, Dragonfly's penultimate: all but one)."""
        return layer if layer >= 0 else self.layers + 1 + layer


PRESETS = {
    "l14-336": ViTConfig(336, 14, 1024, 24, 16, 4096),  # openai/clip-vit-large-patch14-336 (v2)
    "b32-224": ViTConfig(224, 32, 768, 12, 12, 3072),   # openai/clip-vit-base-patch32 (v1)
}


def quick_gelu(x):
    # CLIP was trained with this sigmoid approximation of GELU; the exact GELU changes outputs.
    if torch.is_grad_enabled():
        return x * torch.sigmoid(1.702 * x)
    # Speed only, not part of CLIP: at inference one temporary instead of three (the MLP
    # activations are the ViT's largest tensors); the same values (tests/test_golden.py's ViT test).
    return torch.mul(x, 1.702).sigmoid_().mul_(x)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        N, T, C = x.shape
        split = lambda t: t.view(N, T, self.heads, C // self.heads).transpose(1, 2)  # (N, h, T, d)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(N, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.grad_checkpoint = False  # train.py: recompute this block's activations in backward

    def forward(self, x):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls = nn.Parameter(torch.randn(cfg.width) * cfg.width ** -0.5)
        self.pos = nn.Parameter(torch.randn(cfg.tokens, cfg.width) * 0.02)
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.eps)  # in the checkpoint; Dragonfly skips it

    def forward(self, pixels, layer: int = -1):
        """Hidden state number `layer`, indexed like Hugging Face's `hidden_states`:
        0 is the embedding after pre_layrnorm, k the output of block k, -1 the last block,
        -2 the penultimate (Dragonfly). Blocks after the requested one are not run."""
        n_blocks = self.cfg.blocks_run(layer)
        if not 0 <= n_blocks <= self.cfg.layers:
            raise ValueError(f"layer {layer} out of range for a {self.cfg.layers}-block ViT")
        N, _, H, W = pixels.shape
        if (H, W) != (self.cfg.image_size,) * 2:
            raise ValueError(f"ViT expects {self.cfg.image_size}x{self.cfg.image_size} crops, got {H}x{W}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2)                                 # (N, g*g, C), row-major
        x = torch.cat([self.cls.expand(N, 1, -1), x], dim=1) + self.pos  # (N, 1+g*g, C)
        x = self.ln_pre(x)
        for block in self.blocks[:n_blocks]:
            x = block(x)
        return x

    def pooled(self, pixels):
        """CLIP's image feature before its projection: post-LayerNorm of the final CLS token."""
        return self.ln_post(self.forward(pixels)[:, 0])

"""
The Llama-3 decoder (Grattafiori et al. 2024, "The Llama 3 Herd of Models"), written from
scratch: RMSNorm, rotary position embeddings (with the optional "llama3" frequency scaling),
grouped-query attention through `scaled_dot_product_attention`, SwiGLU, and a preallocated
KV cache.

Dragonfly feeds it *embeddings* (image crops spliced in front of the text), so `forward`
takes embeddings plus explicit position ids; `embed` turns token ids into embeddings.

RoPE layout: Hugging Face stores q/k projections permuted for the "rotate-half" form (the two
halves of each head are the pairs), while Meta's `consolidated.pth` pairs adjacent channels.
We load Hugging Face names (`model.layers.*`, `lm_head`), so we rotate halves.

The released Dragonfly config has `rope_scaling: null`: the model runs Llama-3.1 *without*
the llama3 scaling. We read it from the config, never assume it
(docs/release-facts.md#config).

Not part of Llama-3 as Meta describes it, and marked where it sits (skip on a first read):
- "Release fidelity": RoPE frequencies rounded to bf16 and the rotation rounded in bf16
  (`rope_cos_sin`, `apply_rope`, `Llama.rope_dtype`), because the release ran and trained so
  (docs/release-facts.md#bf16-numerics);
- "Speed only": the one-token attention path in `Attention.forward`; it changes no value.
  (How the output matrix is laid out in memory for fast decoding on a CPU is lib/stored.py's.)
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads



def rope_frequencies(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with the llama3 rescaling when configured:
    long wavelengths (beyond original_context/low_freq_factor) are divided by `factor`, short
    ones (below original_context/high_freq_factor) kept, and the band between interpolated."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    s = cfg.rope_scaling
    if not s or s.get("rope_type", s.get("type")) in (None, "default"):
        return inv_freq
    if s.get("rope_type", s.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {s}; only 'llama3' is implemented")
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short waves
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos, sin tables of shape (B, 1, T, head_dim) in `dtype`, for integer positions (B, T)."""
    if dtype != torch.float32:
        # Release fidelity, not part of Llama-3: the release casts its whole module to bf16, which
        # rounds this buffer too (up to 0.4% off: > 1 rad at positions 2098+), and its weights were
        # trained so (docs/release-facts.md#bf16-numerics). tests/test_release_bf16.py needs it.
        inv_freq = inv_freq.to(dtype).float()
    angles = positions[..., None].float() * inv_freq  # (B, T, d/2): angles in float32, as the reference
    angles = torch.cat([angles, angles], dim=-1)       # rotate-half layout: halves are pairs
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate in the dtype of the tables (the compute dtype): each product and the sum round to it.
    Release fidelity: in bf16 that rounding is the release's (docs/release-facts.md#bf16-numerics;
    tests/test_release_bf16.py::test_bf16_rotation_rounds_each_product_as_the_release)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


def compute_dtype(x):
    """The dtype the layers compute in: autocast's when it is on (train.py on one process casts
    there), else the activations' (a bf16 model, or FSDP2's bf16 parameters). The meta device
    (tools/plan.py) has no autocast to ask about."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in float32, as the reference does, then cast back
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values for every position written so far, preallocated to `max_len`, so that
    decoding one token costs one new row per layer instead of recomputing the sequence."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def grow(self, max_len: int):
        """Reallocate to hold `max_len` positions, keeping every one written so far: a chat
        that outgrows its cache continues without recomputing its prefix (lib/conversation.py)."""
        B, H, old, D = self.k.shape
        if max_len <= old:
            return
        for name in ("k", "v"):
            bigger = self.k.new_zeros(B, H, max_len, D)
            bigger[:, :, :old] = getattr(self, name)
            setattr(self, name, bigger)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, start: int = 0, mask=None, cache: Optional[KVCache] = None):
        """x (B, T, dim) at positions start..start+T-1 -> (B, T, dim). With a cache, the new keys and
        values are written at those slots and the queries see every slot before them too."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, h, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, kv, start+T, d)
        if T == 1:
            # Speed only, not part of Llama-3: one new token's query heads that share a kv head
            # become rows of one product against that head's cache, (B, kv, heads/kv, d), instead
            # of copying the cache per head. Same values as the general path below
            # (tests/test_model.py::test_kv_cache_generation_equals_recomputing_the_sequence).
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, -1, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, -1))
        # A fresh causal prefill takes the fused causal path; otherwise `mask` says what is visible.
        causal = mask is None and start == 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.grad_checkpoint = False  # train.py: recompute this block's activations in backward

    def forward(self, x, cos, sin, start=0, mask=None, cache=None):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, start, mask, cache, use_reentrant=False)
        return self._forward(x, cos, sin, start, mask, cache)

    def _forward(self, x, cos, sin, start=0, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, start, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Release fidelity, not part of Llama-3: the dtype RoPE's frequencies are rounded to;
        # None: the compute dtype's (rope_cos_sin). Set by the loader when bf16-stored weights
        # compute in float32 (tools/quantize.py): the checkpoint was trained with bf16-rounded
        # frequencies, whatever the compute dtype (docs/release-facts.md#bf16-numerics;
        # tests/test_quantize.py::test_bf16_storage_rounds_rope_frequencies_as_the_bf16_release).
        self.rope_dtype: Optional[torch.dtype] = None

    def tie_weights(self):
        """Share the input embedding with the output projection when the config says so
        (moving a module to a new device or dtype unties them; call again after). Every
        parameter is shared: the table, and an int8 table's scales (tools/quantize.py)."""
        if self.cfg.tie_embeddings:
            for name, p in self.embed_tokens.named_parameters():
                setattr(self.lm_head, name, p)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def forward(self, x, positions=None, start: int = 0, mask=None, logits_from: int = 0, caches=None):
        """`hidden`, then logits (B, T - logits_from, vocab): only positions logits_from.. (e.g. -1
        for the last one) go through the vocabulary projection, the largest matmul at long prompts."""
        return self.lm_head(self.hidden(x, positions, start, mask, caches)[:, logits_from:])

    def hidden(self, x, positions=None, start: int = 0, mask=None, caches=None):
        """Embeddings x (B, T, dim) through every block -> the final normalised hidden states
        (B, T, dim), before the vocabulary projection. positions (B, T): RoPE position ids
        (default start..start+T-1; they differ from cache slots under left padding); mask: None
        for plain causal attention, else bool (B, 1, T, start+T), True = may attend; caches: one
        KVCache per block (model.py's prefill and decode_one_token), the new keys and values
        written at slots start..start+T-1."""
        B, T, _ = x.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        inv_freq = rope_frequencies(self.cfg, x.device)
        if self.rope_dtype is not None:
            inv_freq = inv_freq.to(self.rope_dtype).float()
        cos, sin = rope_cos_sin(inv_freq, positions, compute_dtype(x))
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            x = layer(x, cos, sin, start, mask, cache)
        return self.norm(x)

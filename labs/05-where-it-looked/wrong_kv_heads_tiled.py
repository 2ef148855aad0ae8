"""A known mistake for lab 05: grouped-query keys tiled (`repeat`) instead of repeated per head
(`repeat_interleave`), so query head j reads kv head j % kv instead of j // (heads / kv). The
toy has one kv head and cannot tell; the 4-head, 2-kv-head layer can.
Caught by: weights_times_values_is_sdpa
"""
import math

import torch

from llama import apply_rope


def attention_weights(attn, x, cos, sin, rows):
    B, S, _ = x.shape
    h, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x[:, rows]).view(B, len(rows), h, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos[:, :, rows], sin[:, :, rows]), apply_rope(k, cos, sin)
    k = k.repeat(1, h // kv, 1, 1)  # the mistake
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)
    future = torch.arange(S, device=x.device)[None, :] > rows[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

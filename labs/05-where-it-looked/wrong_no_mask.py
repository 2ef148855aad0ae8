"""A known mistake for lab 05: no causal mask, so an answer row also weighs the positions after
it (which SDPA's is_causal never lets it see).
Caught by: rows_are_causal_probabilities weights_times_values_is_sdpa
"""
import math

from llama import apply_rope


def attention_weights(attn, x, cos, sin, rows):
    B, S, _ = x.shape
    h, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x[:, rows]).view(B, len(rows), h, d).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos[:, :, rows], sin[:, :, rows]), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // kv, dim=1)
    return (q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)

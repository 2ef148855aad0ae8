"""A known mistake for lab 07: channels paired as neighbours (2i, 2i + 1), Meta's layout in
consolidated.pth, applied to Hugging Face weights, whose q/k rows are permuted for halves
(i, i + d/2). Still a rotation, still relative: only the weights can tell.
Caught by: pairs_are_the_two_halves llama_logits_match_hugging_face
"""
import torch


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]          # the tables hold each frequency twice
    even, odd = x[..., 0::2].to(cos.dtype), x[..., 1::2].to(cos.dtype)
    out = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1)   # pairs of neighbours: the mistake
    return out.flatten(-2).to(x.dtype)

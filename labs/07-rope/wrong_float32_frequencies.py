"""A known mistake for lab 07: bf16 tables built from float32 frequencies. Llama-3 as Meta
describes it, but the release cast its whole module to bf16, frequencies included, and its
weights were trained so: at the positions of a v2 prompt the phases are off by radians.
Caught by: bf16_tables_round_the_frequencies_first
"""
import torch


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    angles = positions[..., None].float() * inv_freq   # the mistake: inv_freq not rounded to dtype first
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]

"""A known mistake for lab 04: a side that does not divide the grid pooled with the divisible
path's kernel (g // side) and the extra cells cropped: 8 -> 3 averages 2x2 blocks of the top-left
6x6 patches and never sees the last two rows and columns.
Caught by: eight_to_three_windows_overlap adaptive_windows_for_every_side
"""
import math

import torch
import torch.nn.functional as F


def mean_pool(tokens, side: int, keep_cls: bool = True, adaptive: bool = False):
    N, T, D = tokens.shape
    g = math.isqrt(T - 1)
    patches = tokens[:, 1:].transpose(1, 2).reshape(N, D, g, g)
    if side != g:
        patches = F.avg_pool2d(patches, kernel_size=g // side)[:, :, :side, :side]  # the mistake
    patches = patches.flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], patches], dim=1) if keep_cls else patches

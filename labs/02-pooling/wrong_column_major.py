"""A known mistake for lab 02: the pooled cells come out column-major (the grid transposed
before flattening), so cell (0, 1) sits where (1, 0) belongs.
Caught by: cls_first_then_block_means release_pooling_is_24x24_to_6x6 paper_budgets_per_crop
"""
import math

import torch
import torch.nn.functional as F


def mean_pool(tokens, side: int, keep_cls: bool = True, adaptive: bool = False):
    N, T, D = tokens.shape
    g = math.isqrt(T - 1)
    patches = tokens[:, 1:].transpose(1, 2).reshape(N, D, g, g)
    patches = F.avg_pool2d(patches, kernel_size=g // side)          # (N, D, side, side)
    patches = patches.transpose(2, 3).flatten(2).transpose(1, 2)    # column-major: the mistake
    return torch.cat([tokens[:, :1], patches], dim=1) if keep_cls else patches

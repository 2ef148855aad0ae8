"""A known mistake for lab 04: adaptive windows that partition the grid (floor to floor) instead
of PyTorch's floor-to-ceil windows, which overlap where g/side is fractional: 8 -> 3 gives
{0,1}, {2,3,4}, {5,6,7} instead of {0,1,2}, {2,3,4,5}, {5,6,7}.
Caught by: eight_to_three_windows_overlap adaptive_windows_for_every_side
"""
import math

import torch
import torch.nn.functional as F


def mean_pool(tokens, side: int, keep_cls: bool = True, adaptive: bool = False):
    N, T, D = tokens.shape
    g = math.isqrt(T - 1)
    if g % side and not adaptive:
        raise ValueError(f"cannot mean-pool {g}x{g} patch tokens to {side}x{side}: {side} must divide {g}")
    grid = tokens[:, 1:].reshape(N, g, g, D)
    edges = [i * g // side for i in range(side + 1)]   # the mistake: (i+1)*g // side, not its ceiling
    cells = [grid[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(dim=(1, 2)) for i in range(side) for j in range(side)]
    patches = torch.stack(cells, dim=1)
    return torch.cat([tokens[:, :1], patches], dim=1) if keep_cls else patches

"""
Token reduction for the zoomed-in crops.

v2 (Dragonfly v2 paper, §3.2 "mean pooling"; docs/release-facts.md#pooling): every medium and
high crop keeps its CLS token and average-pools its g x g patch tokens to side x side cells —
24x24 -> 6x6 with kernel 4, stride 4 in the release. The paper's ablations pool to 3x3 ... 12x12
(9 ... 144 tokens). Pooling commutes with the linear projection, so it may run before or after it.

v1 (Dragonfly v1 paper, §3.2 "zoom-in patch selection"; docs/release-facts.md#zoom-in-selection):
no pooling; instead each crop gets a *summary* (the mean of its projected tokens), and each medium
crop keeps the k high crops of its region whose summaries have the largest dot product with its
own summary. Two definitions of "region" exist: the paper's spatial one (the high crops lying
inside the medium crop) and the released code's index runs (high crops [6i, 6i+6) of the
row-major list), which is what v1 checkpoints were trained with.

The learned alternative (v2 paper Table 1, "Perceiver Resampler"; Alayrac et al. 2022, Flamingo
§2.1): a fixed set of learned latents cross-attends to a crop's tokens and becomes its summary,
36 latents deep 3 as in the paper's IDEFICS-based baseline.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def mean_pool(tokens, side: int, keep_cls: bool = True, adaptive: bool = False):
    """(N, 1 + g*g, D) crop tokens (g patches per side) -> (N, [1 +] side*side, D): CLS first (if
    kept), then the average of each (g/side)^2 block of patch tokens, row-major.
    adaptive=True also allows a side that does not divide g (the zoom demo's 8x8 crops pooled to
    the paper's 3x3 or 6x6): cell i then averages rows and columns floor(i*g/side) to
    ceil((i+1)*g/side) - 1, windows of unequal size that overlap by one where g/side is fractional."""
    N, T, D = tokens.shape
    g = math.isqrt(T - 1)
    if g * g != T - 1:
        raise ValueError(f"expected CLS + a square grid of tokens, got {T} tokens")
    if g % side and not adaptive:
        raise ValueError(f"cannot mean-pool {g}x{g} patch tokens to {side}x{side}: {side} must divide {g}")
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if side != g:
        patches = patches.transpose(1, 2).reshape(N, D, g, g)               # (N, D, g, g)
        if g % side:
            patches = F.adaptive_avg_pool2d(patches, side)                  # (N, D, side, side)
        else:
            patches = F.avg_pool2d(patches, kernel_size=g // side)          # (N, D, side, side)
        patches = patches.flatten(2).transpose(1, 2)                        # (N, side*side, D)
    return torch.cat([cls, patches], dim=1) if keep_cls else patches


def summary(tokens):
    """(N, T, D) -> (N, D): a crop's summary embedding, the mean of its projected tokens."""
    return tokens.mean(dim=1)


def release_regions(n_high: int, n_medium: int):
    """The released v1 code's regions: consecutive runs of the row-major high-crop list
    ([0..5], [6..11], ... for 24 high crops and 4 medium crops), whatever the grid shapes."""
    run = n_high // n_medium
    return [list(range(i * run, (i + 1) * run)) for i in range(n_medium)]


def spatial_regions(high_grid, medium_grid):
    """The paper's regions: high crop (row r, col c) of a (cols, rows) grid belongs to the medium
    crop whose area holds its centre. Both grids are (cols, rows); indices are row-major."""
    hc, hr = high_grid
    mc, mr = medium_grid
    regions = [[] for _ in range(mc * mr)]
    for r in range(hr):
        for c in range(hc):
            # centre (c + 0.5) / hc, scaled to medium columns, in integer arithmetic
            m_col, m_row = (2 * c + 1) * mc // (2 * hc), (2 * r + 1) * mr // (2 * hr)
            regions[m_row * mc + m_col].append(r * hc + c)
    return regions


def select_region_topk(medium_summary, high_summary, regions, k: int):
    """For medium crop i, the k high crops of regions[i] with the largest dot product against
    its summary. Returns the chosen high-crop indices in ascending order (the release keeps the
    original order of the crops it keeps). medium_summary (M, D), high_summary (H, D).
    Ties (frequent in bf16) break as in the release: medium crop i scores *all* H high crops in
    one product, adds a float32 -inf mask outside its region and takes top-k of the whole list."""
    chosen = []
    for i, region in enumerate(regions):
        scores = (high_summary @ medium_summary[i][:, None])[:, 0]  # (H,), in the model's dtype
        mask = torch.full(scores.shape, float("-inf"), device=scores.device)
        mask[torch.tensor(region, device=scores.device, dtype=torch.long)] = 0
        chosen.append((scores + mask).topk(min(k, len(region))).indices)  # bf16 + float32 -> float32
    return torch.cat(chosen).sort().values


def select_global_topk(medium_summary, high_summary, k_total: int):
    """The paper's 'global selection' ablation (v1 Table 5): the medium summaries retrieve
    k_total high crops from the whole set. A high crop's score is its best dot product with
    any medium summary; the k_total best are kept in ascending order."""
    scores = (high_summary @ medium_summary.T).amax(dim=1)  # (H,)
    return scores.topk(min(k_total, len(scores))).indices.sort().values


class ResamplerLayer(nn.Module):
    """Pre-LN cross-attention of the latents over [crop tokens; latents] (Flamingo appends the
    latents to the keys so they also attend to each other), then a pre-LN MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim, bias=False), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim, bias=False))

    def forward(self, latents, media):
        N, L, D = latents.shape
        lat = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), lat], dim=1)            # (N, T + L, D)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, h, *, D/h)
        k, v = self.kv(context).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(split(self.q(lat)), split(k), split(v))  # (N, h, L, D/h)
        latents = latents + self.out(y.transpose(1, 2).reshape(N, L, D))
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """(N, T, D) crop tokens -> (N, n_latents, D): a learned token reduction in place of mean
    pooling. Whatever T, the output length is n_latents (36 = a 6x6 pool's budget)."""

    def __init__(self, dim: int, depth: int = 3, n_latents: int = 36, heads: int = 8, mlp_ratio: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * dim ** -0.5)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        x = self.latents.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # (N, 36, D)
        for layer in self.layers:
            x = layer(x, tokens)
        return self.norm(x)

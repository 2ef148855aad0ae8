"""Multi-resolution crops: the image side of Dragonfly, before the vision encoder.

One image becomes a stack of CLIP-sized crops at three resolutions (v2 paper §3.1, v1 paper
§3.1, docs/release-facts.md#crop-grids): a *low* crop (the whole image squashed to size x size),
*medium* tiles (the whole image resized to a best-fit grid of 4 tiles) and *high* tiles ("zoom
in": a finer grid). Order: [low] + medium row-major + high row-major.

v2 (released Llama-3.1-8B-Dragonfly-v2, size 336): medium grid chosen among (2,2), (1,4), (4,1)
by the LLaVA-NeXT best-fit rule; high grid = 3 x the medium grid, so 1 + 4 + 36 = 41 crops. v1
(docs/release-facts.md#v1-pipeline, size 224): the high grid is chosen by best fit on its own
among (6,4), (4,6), (3,8), (8,3), (2,12), (12,2), so 1 + 4 + 24 = 29 crops; the zoom-in
selection of 12 of the 24 happens later, in the model.

Release facts reproduced here (togethercomputer/Dragonfly, processing_dragonfly.py,
`process_anyres_image`): the whole original image is resized with PIL's default filter
(bicubic) straight to the grid resolution -- no padding, aspect ratio not kept -- then cut
into tiles; each tile goes through CLIPImageProcessor (shortest edge -> size, centre crop,
/255, CLIP mean/std). Grids are written (cols, rows) and resolutions (width, height).
The level flags give the v2 paper's resolution ablations (§4.3: L, M, H, L+M, L+H, L+M+H).

Quirks of the rules, kept because the checkpoints were trained with them:
- best fit caps "effective" pixels at the image's own area, so an image smaller than every
  candidate keeps the first grid whatever its shape (a 300x75 strip gets medium (2,2));
- v1's high grid ignores the medium grid: a square image gets medium (2,2) but high (6,4),
  and v1 small images always get (6,4). The release's zoom-in region i = high crops
  [6i, 6i+6) is then high row i, not medium tile i's quadrant
  (docs/release-facts.md#zoom-in-selection).

Opening the image file itself (the release's `convert("RGB")`, hardened against unreadable,
16-bit and huge files) is lib/images.py's `load_image`; the drawing of the grids is
tools/draw_crops.py.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The key under which lib/images.py keeps a huge JPEG's full size when it decodes it smaller: the
# grids follow the image's real size.
FULL_SIZE = "dragonfly_full_size"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CropConfig:
    size: int = 336                       # crop side = the vision encoder's input side
    medium_grids: tuple = ((2, 2), (1, 4), (4, 1))   # (cols, rows) candidates
    high_grids: tuple | None = None       # None: high_scale x medium (v2); else best fit (v1)
    high_scale: int = 3
    low: bool = True                      # which levels are kept: the paper's L/M/H ablations
    medium: bool = True
    high: bool = True
    from_low: bool = False                # v2 Table 3: tiles cut from the low crop, not the original


V2 = CropConfig(size=336)
V1 = CropConfig(size=224, high_grids=((6, 4), (4, 6), (3, 8), (8, 3), (2, 12), (12, 2)))


@dataclass
class Crops:
    pixels: np.ndarray      # (N, 3, S, S) float32, [low] + medium + high, enabled levels only
    medium_grid: tuple      # (cols, rows) chosen, reported even when the level is disabled
    high_grid: tuple        # (cols, rows)
    counts: tuple           # (n_low, n_medium, n_high)


# ---------------------------------------------------------------------------- best fit

def select_best_resolution(image_size, candidates):
    """LLaVA-NeXT best fit (docs/release-facts.md#crop-grids): among (W, H) candidates keep the one showing the
    most original pixels once the image is fitted inside it (never more than the image
    has); ties go to the candidate wasting the least area, then to the earlier one."""
    w, h = image_size
    best, best_effective, best_wasted = None, -1, float("inf")
    for W, H in candidates:
        scale = min(W / w, H / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = W * H - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (W, H), effective, wasted
    return best


def _best_grid(image_size, grids, size):
    W, H = select_best_resolution(image_size, [(c * size, r * size) for c, r in grids])
    return W // size, H // size


# ---------------------------------------------------------------------------- CLIP preprocessing

def normalize(tiles):
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32: x / 255, then (x - mean) / std per channel.
    Release fidelity: in CLIPImageProcessor's precisions (the rescale in float64, cast to float32,
    the normalisation in float32), so the pixels equal the release's bit for bit
    (tests/test_crops.py's goldens)."""
    x = (tiles.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess(img, size=336):
    """CLIPImageProcessor (PIL path) on one RGB image of any size -> (3, size, size) float32:
    bicubic resize of the shortest edge to `size` (long edge = int(size * long / short)), centre
    crop with offsets (dim - size) // 2, then `normalize`. The release runs it on every tile;
    `make_crops` cuts tiles of exactly size x size, where the resize and the crop do nothing, so
    it calls `normalize` alone (tests/test_crops.py checks both against the release)."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    a = np.asarray(img)[top:top + size, left:left + size]
    return normalize(a[None])[0]


# ---------------------------------------------------------------------------- the crops

def _tiles(img, grid, size):
    """Resize the whole image to grid * size (bicubic, no padding), cut row-major tiles."""
    cols, rows = grid
    a = np.asarray(img.resize((cols * size, rows * size), Image.BICUBIC))
    return a.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)


def make_crops(img, cfg=V2) -> Crops:
    """The low / medium / high crops of one RGB PIL image (docs/release-facts.md#crop-grids).
    Opening a file safely is lib/images.py's `load_image`."""
    img = img.convert("RGB") if img.mode != "RGB" else img   # the release's convert("RGB")
    S, size = cfg.size, img.info.get(FULL_SIZE, img.size)   # a huge JPEG's grids follow its full size
    medium_grid = _best_grid(size, cfg.medium_grids, S)
    if cfg.high_grids is None:
        high_grid = (medium_grid[0] * cfg.high_scale, medium_grid[1] * cfg.high_scale)
    else:
        high_grid = _best_grid(size, cfg.high_grids, S)
    # "Medium-Resolution from Low-Resolution" (v2 Table 3) zooms into the S x S image, not the original
    source = img.resize((S, S), Image.BICUBIC) if cfg.from_low else img
    parts, counts = [], []
    for keep, grid, src in ((cfg.low, (1, 1), img), (cfg.medium, medium_grid, source), (cfg.high, high_grid, source)):
        # tiles are already S x S, so the CLIP processor's resize and crop are identities
        parts.append(_tiles(src, grid, S) if keep else np.empty((0, S, S, 3), np.uint8))
        counts.append(len(parts[-1]))
    pixels = normalize(np.concatenate(parts))   # (N, 3, S, S)
    return Crops(pixels, medium_grid, high_grid, tuple(counts))

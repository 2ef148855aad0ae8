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
16-bit and huge files) is images.py's `load_image`.
"""
import argparse
import sys
from dataclasses import dataclass

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    import first_run
    first_run.one_line_for_missing_packages()

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import weights  # the command line's output-path guard
from images import FULL_SIZE, load_image  # opening a file safely: images.py

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

def _clip_table():
    # HF rescales in float64 then casts to float32, then normalises in float32; as every
    # step is per value, a (3, 256) table reproduces it bit for bit.
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    return (x[None, :] - mean[:, None]) / std[:, None]


_CLIP_TABLE = _clip_table()   # (3, 256) float32


def _normalize(tiles):
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 CLIP-normalised."""
    out = np.empty((tiles.shape[0], 3) + tiles.shape[1:3], np.float32)
    for c in range(3):
        out[:, c] = _CLIP_TABLE[c][tiles[..., c]]
    return out


def preprocess(img, size=336):
    """CLIPImageProcessor (PIL path) on one image -> (3, size, size) float32: bicubic
    resize of the shortest edge to `size` (long edge = int(size * long / short)), centre
    crop with offsets (dim - size) // 2, /255, CLIP mean/std."""
    img = load_image(img)
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    img = img.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    a = np.asarray(img)[top:top + size, left:left + size]
    return _normalize(a[None])[0]


# ---------------------------------------------------------------------------- the crops

def _tiles(img, grid, size):
    """Resize the whole image to grid * size (bicubic, no padding), cut row-major tiles."""
    cols, rows = grid
    a = np.asarray(img.resize((cols * size, rows * size), Image.BICUBIC))
    return a.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)


def make_crops(img, cfg=V2) -> Crops:
    """The low / medium / high crops of one image (docs/release-facts.md#crop-grids)."""
    img = load_image(img)
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
    pixels = _normalize(np.concatenate(parts))   # (N, 3, S, S)
    return Crops(pixels, medium_grid, high_grid, tuple(counts))


# ---------------------------------------------------------------------------- CLI

GRID_STYLE = {"medium": ((255, 0, 0), "thick red"), "high": ((0, 255, 255), "thin cyan")}


def legend(medium_grid, high_grid) -> list:
    """One line per drawn grid: which colour is which level, and the grid (cols x rows) chosen."""
    return [f"{level} grid {c}x{r}: {GRID_STYLE[level][1]} lines"
            for level, (c, r) in (("medium", medium_grid), ("high", high_grid))]


def draw_grids(img, medium_grid, high_grid):
    """The original image with the medium grid (thick red) and the high grid (thin cyan) drawn
    on it, above a dark band holding the legend."""
    canvas = img.copy()
    if max(canvas.size) < 512:               # tiny images: enlarge so the lines are visible
        k = -(-512 // max(canvas.size))
        canvas = canvas.resize((canvas.width * k, canvas.height * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for (cols, rows), level, width in ((high_grid, "high", 1), (medium_grid, "medium", max(3, min(w, h) // 150))):
        for i in range(1, cols):
            x = round(i * w / cols)
            draw.line([(x, 0), (x, h)], fill=GRID_STYLE[level][0], width=width)
        for j in range(1, rows):
            y = round(j * h / rows)
            draw.line([(0, y), (w, y)], fill=GRID_STYLE[level][0], width=width)
    size = max(14, w // 36)
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError):        # Pillow < 10.1, or no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    lines = legend(medium_grid, high_grid)
    text_w = max(round(draw.textlength(line, font=font)) for line in lines) + size   # a narrow image gets a wider band
    out = Image.new("RGB", (max(w, text_w), h + 3 * size), (24, 24, 24))
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (line, level) in enumerate(zip(lines, ("medium", "high"))):
        draw.text((size // 2, h + size // 3 + round(i * 1.3 * size)), line, fill=GRID_STYLE[level][0], font=font)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Show Dragonfly's medium/high crop grids on an image.")
    p.add_argument("image")
    p.add_argument("--out", help="write the image with the grids drawn on it (PNG)")
    p.add_argument("--v1", action="store_true", help="v1 rules (224px, best-fit high grid)")
    args = p.parse_args(argv)
    cfg = V1 if args.v1 else V2
    try:
        if args.out:
            weights.refuse_overwrite(args.out, [args.image], "--out")
            weights.require_writable(args.out, "--out", parents=False)  # before the work, not after it
        img = load_image(args.image)
        crops = make_crops(img, cfg)
        if args.out:
            draw_grids(img, crops.medium_grid, crops.high_grid).save(args.out, format="PNG")
    except (ValueError, OSError) as e:
        print(f"crops.py: {e}", file=sys.stderr)
        return 1
    S, (mc, mr), (hc, hr) = cfg.size, crops.medium_grid, crops.high_grid
    print(f"image {img.width}x{img.height}  ({'v1' if args.v1 else 'v2'}, crop {S})")
    print(f"low     {S}x{S}  grid 1x1")
    print(f"medium  {mc * S}x{mr * S}  grid {mc}x{mr}")
    print(f"high    {hc * S}x{hr * S}  grid {hc}x{hr}")
    n = crops.counts
    print(f"crops   {n[0]} + {n[1]} + {n[2]} = {sum(n)}")
    if args.out:
        print(f"wrote {args.out}:", "; ".join(legend(crops.medium_grid, crops.high_grid)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

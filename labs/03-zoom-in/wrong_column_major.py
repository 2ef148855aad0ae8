"""A known mistake for lab 03: the tiles are cut down the columns first (column-major), so the
second medium tile is the bottom-left one, not the top-right one the release puts there.
Caught by: pixels_match_the_release_pipeline table_3_medium_from_low
"""
import numpy as np
from PIL import Image

from crops import FULL_SIZE, V2, Crops, normalize, select_best_resolution


def tiles(img, grid, size):
    cols, rows = grid
    a = np.asarray(img.resize((cols * size, rows * size), Image.BICUBIC))
    return a.reshape(rows, size, cols, size, 3).transpose(2, 0, 1, 3, 4).reshape(-1, size, size, 3)  # the mistake


def best_grid(image_size, grids, size):
    W, H = select_best_resolution(image_size, [(c * size, r * size) for c, r in grids])
    return W // size, H // size


def make_crops(img, cfg=V2) -> Crops:
    img = img.convert("RGB") if img.mode != "RGB" else img
    S, size = cfg.size, img.info.get(FULL_SIZE, img.size)
    medium_grid = best_grid(size, cfg.medium_grids, S)
    if cfg.high_grids is None:
        high_grid = (medium_grid[0] * cfg.high_scale, medium_grid[1] * cfg.high_scale)
    else:
        high_grid = best_grid(size, cfg.high_grids, S)
    source = img.resize((S, S), Image.BICUBIC) if cfg.from_low else img
    parts, counts = [], []
    for keep, grid, src in ((cfg.low, (1, 1), img), (cfg.medium, medium_grid, source), (cfg.high, high_grid, source)):
        parts.append(tiles(src, grid, S) if keep else np.empty((0, S, S, 3), np.uint8))
        counts.append(len(parts[-1]))
    return Crops(normalize(np.concatenate(parts)), medium_grid, high_grid, tuple(counts))

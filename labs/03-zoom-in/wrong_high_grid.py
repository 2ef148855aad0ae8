"""A known mistake for lab 03: the high grid is twice the medium grid, not three times (a
2x2 medium gives 4x4 = 16 high tiles instead of 36).
Caught by: figure_1_has_41_crops levels_follow_the_table_2_flags high_grid_is_three_times_medium_in_v2_and_its_own_fit_in_v1 pixels_match_the_release_pipeline
"""
import numpy as np
from PIL import Image

from crops import FULL_SIZE, V2, Crops, normalize, select_best_resolution


def tiles(img, grid, size):
    cols, rows = grid
    a = np.asarray(img.resize((cols * size, rows * size), Image.BICUBIC))
    return a.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)


def best_grid(image_size, grids, size):
    W, H = select_best_resolution(image_size, [(c * size, r * size) for c, r in grids])
    return W // size, H // size


def make_crops(img, cfg=V2) -> Crops:
    img = img.convert("RGB") if img.mode != "RGB" else img
    S, size = cfg.size, img.info.get(FULL_SIZE, img.size)
    medium_grid = best_grid(size, cfg.medium_grids, S)
    if cfg.high_grids is None:
        high_grid = (medium_grid[0] * 2, medium_grid[1] * 2)   # the mistake: 2x, not cfg.high_scale (3)
    else:
        high_grid = best_grid(size, cfg.high_grids, S)
    source = img.resize((S, S), Image.BICUBIC) if cfg.from_low else img
    parts, counts = [], []
    for keep, grid, src in ((cfg.low, (1, 1), img), (cfg.medium, medium_grid, source), (cfg.high, high_grid, source)):
        parts.append(tiles(src, grid, S) if keep else np.empty((0, S, S, 3), np.uint8))
        counts.append(len(parts[-1]))
    return Crops(normalize(np.concatenate(parts)), medium_grid, high_grid, tuple(counts))

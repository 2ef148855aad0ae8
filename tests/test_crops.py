"""Specification of crops.py: the low / medium / high crops and the CLIP preprocessing.

Golden files (tests/golden/crops_*.npz) come from tests/make_golden_crops.py: the
release's rules written independently + transformers' PIL-backed CLIPImageProcessor.
The input images are regenerated here by `synthetic_image` (integer arithmetic only, so
they do not drift with numpy versions); each golden file keeps a CRC of its input.
"""
import dataclasses
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import crops
from conftest import ROOT, script
from crops import V1, V2, CropConfig, make_crops, preprocess, select_best_resolution
from lib import images
from lib.images import load_image
from tools import draw_crops

GOLDEN = ROOT / "tests" / "golden"


def synthetic_image(w, h, mode="RGB", seed=0):
    """A deterministic test picture: gradients + a disc + a box + stripes + hash noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = x * 255 // max(w - 1, 1)
    g = y * 255 // max(h - 1, 1)
    b = (x + 2 * y) * 3 % 256
    rgb = np.stack([r, g, b], -1)
    disc = (x - w // 3) ** 2 + (y - h // 2) ** 2 < (min(w, h) // 4) ** 2
    rgb[disc] = (250, 40, 40)
    box = ((x >= w // 2) & (x < w // 2 + max(w // 5, 1))
           & (y >= h // 5) & (y < h // 5 + max(h // 3, 1)))
    rgb[box] = (20, 200, 60)
    stripes = (y > 3 * h // 4) & ((x // max(w // 32, 1)) % 2 == 0)
    rgb[stripes] = 255 - rgb[stripes]
    noise = (((x * 73856093) ^ (y * 19349663) ^ (seed * 83492791 + 7)) >> 4) % 9 - 4
    rgb = np.clip(rgb + noise[..., None], 0, 255).astype(np.uint8)
    gray = rgb.astype(np.int64).sum(-1) // 3
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode in ("L", "1", "CMYK"):
        return Image.fromarray(rgb).convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = (x * 255 // max(w - 1, 1)).astype(np.uint8)
        base = Image.fromarray(rgb).convert(mode[:-1])
        base.putalpha(Image.fromarray(alpha))
        return base
    if mode in ("P", "PT"):   # palette; "PT" adds a transparent index
        r8, g8, b8 = rgb[..., 0] // 32, rgb[..., 1] // 32, rgb[..., 2] // 64
        index = (r8 * 32 + g8 * 4 + b8).astype(np.uint8)
        p = Image.fromarray(index)
        i = np.arange(256)
        palette = np.stack([i // 32 * 32 + 16, i % 32 // 4 * 32 + 16, i % 4 * 64 + 32], -1)
        p.putpalette(palette.astype(np.uint8).tobytes())
        if mode == "PT":
            p.info["transparency"] = 0
        return p
    if mode == "I;16":
        return Image.fromarray((gray * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((gray * 257).astype(np.int32))
    if mode == "F":
        return Image.fromarray((gray / 255).astype(np.float32))
    raise ValueError(mode)


def crc(img):
    return zlib.crc32(np.ascontiguousarray(np.asarray(img)).tobytes())


def golden_files(kind):
    return sorted(GOLDEN.glob(f"crops_{kind}_*.npz"))


def expected_pixels(g):
    """Golden uint8 tiles -> the transformers output (the table is transformers' own)."""
    tiles = np.cumsum(g["tiles_sub"], axis=2, dtype=np.uint8)  # undo the PNG 'Sub' filter
    table = g["table"]                                          # (3, 256) float32
    return np.stack([table[c][tiles[..., c]] for c in range(3)], 1)


# ---------------------------------------------------------------------------- golden

def test_golden_files_exist():
    assert golden_files("tiles") and golden_files("preprocess"), \
        "run python tests/make_golden_crops.py"


@pytest.mark.parametrize("path", golden_files("tiles"), ids=lambda p: p.stem)
def test_crops_match_release_pipeline(path):
    g = np.load(path)
    img = synthetic_image(int(g["w"]), int(g["h"]), str(g["mode"]))
    assert crc(img) == int(g["crc"]), "synthetic_image changed: regenerate the golden files"
    cfg = dataclasses.replace(V1 if str(g["version"]) == "v1" else V2, size=int(g["size"]))
    out = images.crop_image(img, cfg)   # opened as files are (16-bit rescaled, the release's convert("RGB"))
    assert out.medium_grid == tuple(g["medium_grid"]) and out.high_grid == tuple(g["high_grid"])
    step = int(g["step"])    # the 336-pixel files keep a strided subset of each crop
    pixels = out.pixels[g["index"]][..., ::step, ::step]
    np.testing.assert_allclose(pixels, expected_pixels(g), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", golden_files("preprocess"), ids=lambda p: p.stem)
def test_preprocess_matches_clip_image_processor(path):
    g = np.load(path)
    img = synthetic_image(int(g["w"]), int(g["h"]))
    assert crc(img) == int(g["crc"])
    out = preprocess(img, size=int(g["size"]))
    np.testing.assert_allclose(out[None], expected_pixels(g), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- grids

def test_high_res_grid_is_three_times_medium():
    for w, h in [(800, 600), (40, 2000), (2000, 40)]:
        out = make_crops(synthetic_image(w, h), CropConfig(size=14))
        assert out.high_grid == (3 * out.medium_grid[0], 3 * out.medium_grid[1])


@pytest.mark.parametrize("size,grid", [((1000, 1000), (2, 2)), ((4000, 500), (4, 1)),
                                       ((500, 4000), (1, 4))])
def test_best_fit_follows_aspect_ratio(size, grid):
    res = select_best_resolution(size, [(672, 672), (336, 1344), (1344, 336)])
    assert res == (grid[0] * 336, grid[1] * 336)


def test_best_fit_keeps_most_effective_pixels():
    # 1000x250 in 672x672 -> 672x168 = 112896 shown; in 1344x336 -> 1344x336 = 451584
    assert select_best_resolution((1000, 250), [(672, 672), (1344, 336)]) == (1344, 336)


def test_best_fit_breaks_ties_by_least_waste():
    # a 100x100 image fits whole in both: effective 10000 each; waste 40000-10000 < 90000-10000
    assert select_best_resolution((100, 100), [(300, 300), (200, 200)]) == (200, 200)
    # equal effective and equal waste: the first candidate wins
    assert select_best_resolution((100, 100), [(400, 100), (100, 400)]) == (400, 100)


def test_effective_resolution_is_capped_by_the_original():
    # 10x10 is upscaled by every candidate, so all show 100 pixels; least waste wins
    assert select_best_resolution((10, 10), [(672, 672), (336, 1344), (336, 336)]) == (336, 336)


def test_small_images_get_the_first_grid_whatever_their_shape():
    # 300x75 is 1:4, but every candidate shows all its 22500 pixels and wastes the same area
    assert select_best_resolution((300, 75), [(672, 672), (336, 1344), (1344, 336)]) == (672, 672)


# ---------------------------------------------------------------------------- counts

def test_v2_gives_41_crops():
    out = make_crops(synthetic_image(800, 600), CropConfig(size=14))
    assert out.counts == (1, 4, 36) and out.pixels.shape == (41, 3, 14, 14)


def test_v1_gives_1_4_24_crops():
    out = make_crops(synthetic_image(800, 600), dataclasses.replace(V1, size=14))
    assert out.counts == (1, 4, 24) and out.pixels.shape == (29, 3, 14, 14)


def test_v1_high_grid_ignores_medium_grid():
    out = make_crops(synthetic_image(300, 300), dataclasses.replace(V1, size=14))
    assert out.medium_grid == (2, 2) and out.high_grid == (6, 4)


@pytest.mark.parametrize("levels,counts", [
    ((1, 0, 0), (1, 0, 0)), ((0, 1, 0), (0, 4, 0)), ((0, 0, 1), (0, 0, 36)),
    ((1, 1, 0), (1, 4, 0)), ((1, 0, 1), (1, 0, 36)), ((1, 1, 1), (1, 4, 36))])
def test_ablation_flags_remove_levels(levels, counts):
    full = make_crops(synthetic_image(90, 60), CropConfig(size=14))
    low, medium, high = map(bool, levels)
    cfg = CropConfig(size=14, low=low, medium=medium, high=high)
    out = make_crops(synthetic_image(90, 60), cfg)
    assert out.counts == counts and len(out.pixels) == sum(counts)
    keep = np.concatenate([np.arange(a, a + n) for a, n, k in
                           ((0, 1, low), (1, 4, medium), (5, 36, high)) if k] or [np.arange(0)])
    np.testing.assert_array_equal(out.pixels, full.pixels[keep])


def test_low_crop_is_the_whole_image_squashed():
    img = synthetic_image(90, 30)
    out = make_crops(img, CropConfig(size=14))
    squashed = img.resize((14, 14), Image.BICUBIC)
    np.testing.assert_array_equal(out.pixels[0], preprocess(squashed, 14))


def test_full_size_crops_are_fast():
    import time
    img = synthetic_image(2016, 2016)
    t = time.perf_counter()
    out = make_crops(img)
    assert out.pixels.shape == (41, 3, 336, 336) and out.pixels.dtype == np.float32
    assert time.perf_counter() - t < 2.0   # generous: shared CPUs; typically ~0.3 s


# ---------------------------------------------------------------------------- odd inputs

@pytest.mark.parametrize("mode,w,h", [
    ("L", 40, 30), ("LA", 40, 30), ("RGBA", 40, 30), ("P", 40, 30), ("PT", 40, 30),
    ("CMYK", 40, 30),
    ("I;16", 40, 30), ("I", 40, 30), ("F", 40, 30), ("1", 40, 30), ("RGB", 1, 1), ("RGB", 20, 1000),
    ("RGB", 1000, 20)])
def test_odd_images_give_finite_crops(tmp_path, mode, w, h):
    img = synthetic_image(w, h, mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "F", "I") else "x.png")
    img.save(path)
    for src in (img, path):
        out = images.crop_image(src, CropConfig(size=14))
        assert out.pixels.shape == (41, 3, 14, 14) and np.isfinite(out.pixels).all()


def test_sixteen_bit_images_are_rescaled_not_saturated():
    rgb = np.asarray(load_image(synthetic_image(40, 30, "I;16")))
    assert 0 < rgb.mean() < 250 and rgb.std() > 20
    gray = np.asarray(synthetic_image(40, 30, "RGB")).astype(np.int64).sum(-1) // 3
    np.testing.assert_array_equal(rgb[..., 0], gray)


def test_transparency_is_dropped_by_default_and_composited_on_request():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(img).getpixel((0, 0)) == (10, 20, 30)   # release: plain convert
    assert load_image(img, background=(255, 255, 255)).getpixel((0, 0)) == (255, 255, 255)


def test_missing_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match="nope.jpg"):
        load_image(path)


def test_non_image_file_raises_value_error_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        images.crop_image(path, V2)


# ---------------------------------------------------------------------------- CLI

def test_cli_draws_grids_and_exits_0(tmp_path):
    synthetic_image(1600, 400).save(tmp_path / "in.png")
    r = subprocess.run([sys.executable, *script("tools/draw_crops.py"), str(tmp_path / "in.png"),
                        "--out", str(tmp_path / "grid.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "grid 4x1" in r.stdout and "12x3" in r.stdout and "= 41" in r.stdout
    with Image.open(tmp_path / "grid.png") as drawn:
        assert drawn.format == "PNG" and drawn.size[0] == 1600 and drawn.size[1] > 400  # + the legend's band


def test_grid_picture_has_a_legend_of_colours_and_grids(tmp_path, capsys):
    path, out = tmp_path / "wide.png", tmp_path / "grid.png"
    synthetic_image(1600, 400).save(path)
    assert draw_crops.main([str(path), "--out", str(out)]) == 0
    # a 4:1 image: medium 4 tiles in a row (best fit), high 3x that (v2)
    assert "medium grid 4x1: thick red lines; high grid 12x3: thin cyan lines" in capsys.readouterr().out
    band = np.asarray(Image.open(out).convert("RGB"))[400:]   # below the image
    assert len(band) > 0
    for colour in ([255, 0, 0], [0, 255, 255]):  # each legend line is written in its grid's colour
        assert (band == colour).all(axis=-1).any()


def test_cli_exits_1_with_one_line_on_a_bad_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    r = subprocess.run([sys.executable, *script("tools/draw_crops.py"), str(tmp_path / "bad.png"), "--v1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "bad.png" in r.stderr


# ---------------------------------------------------------------------------- huge images

def test_huge_jpeg_is_decoded_at_reduced_size_but_gridded_at_full_size(tmp_path, monkeypatch):
    # scaled down like the real thing: the floor is the longest grid side (12 x 14 px here, 12 x 336 there)
    monkeypatch.setattr(images, "DRAFT_FLOOR", 168)
    path = tmp_path / "wide.jpg"
    synthetic_image(807, 403).save(path, quality=95)
    img = load_image(path)
    assert img.size == (404, 202) and img.info[images.FULL_SIZE] == (807, 403)   # 1/2 scale, rounded up
    cfg = CropConfig(size=14)
    candidates = [(c * 14, r * 14) for c, r in cfg.medium_grids]
    # 807/403 is just over 2:1 but 404/202 is exactly 2:1, where best fit picks another grid
    assert select_best_resolution((807, 403), candidates) != select_best_resolution((404, 202), candidates)
    with Image.open(path) as f:
        whole = f.convert("RGB")
    out, ref = images.crop_image(path, cfg), make_crops(whole, cfg)
    assert (out.medium_grid, out.high_grid) == (ref.medium_grid, ref.high_grid) == ((4, 1), (12, 3))
    diff = np.abs(out.pixels - ref.pixels) * np.array(crops.CLIP_STD, np.float32)[:, None, None] * 255
    assert diff.mean() < 4.0   # grey levels (2.6 measured): resampling noise; neighbouring crops differ by ~60


def test_jpeg_under_twice_the_floor_is_decoded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "DRAFT_FLOOR", 168)
    path = tmp_path / "tall.jpg"
    synthetic_image(335, 900).save(path)                 # 335 < 2 x 168: one side too small to halve
    with Image.open(path) as f:
        whole = f.convert("RGB")
    img = load_image(path)
    assert images.FULL_SIZE not in img.info
    np.testing.assert_array_equal(np.asarray(img), np.asarray(whole))


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block until something writes to it
    with pytest.raises(ValueError, match=r"image .*pipe\.png is not a regular file \(a folder, FIFO or device\)"):
        images.load_image(tmp_path / "pipe.png")

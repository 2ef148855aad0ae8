"""Build tests/golden/crops_*.npz, the reference that tests/test_crops.py checks crops.py against.

Run by hand (needs transformers):  python tests/make_golden_crops.py

The reference is the released Dragonfly processor's rules (processing_dragonfly.py,
`process_anyres_image`), re-written here without crops.py: best fit, PIL `resize` with its
default filter, tiles cut with `Image.crop` top row first, and every tile through
transformers' PIL-backed CLIP processor (`CLIPImageProcessorPil` in transformers 5; the
class the release called `CLIPImageProcessor` in 2024; `CLIPImageProcessor` is now the
torchvision one). Inputs come from `synthetic_image` in test_crops.py.

Storage, to stay small: the CLIP output is a per-channel function of a uint8 value, so each
file keeps the uint8 tiles (PNG 'Sub'-filtered) plus transformers' (3, 256) output table,
and this script asserts that table[tiles] reproduces transformers' float32 output bit for
bit. Most cases use a 28-pixel crop (the rules scale with the crop side); one 336-pixel
case keeps low, the last medium and the last high crop whole, the other keeps every sixth
pixel of all 41 crops.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_crops import crc, synthetic_image  # noqa: E402

V1_HIGH = [(6, 4), (4, 6), (3, 8), (8, 3), (2, 12), (12, 2)]


def best_fit(size, candidates):
    """LLaVA-NeXT select_best_resolution: largest effective area, ties to least waste, then first."""
    w, h = size
    best, most, least = None, 0, float("inf")
    for cw, ch in candidates:
        s = min(cw / w, ch / h)
        shown = min(int(w * s) * int(h * s), w * h)
        waste = cw * ch - shown
        if shown > most or (shown == most and waste < least):
            best, most, least = (cw, ch), shown, waste
    return best


def release_rgb(img):
    if img.mode == "I;16":
        # The release's convert('RGB') clips 16-bit values to 255 (a white image); the
        # documented behaviour of crops.py is to rescale 0..65535 to 0..255 instead.
        img = Image.fromarray(np.round(np.asarray(img) / 257.0).astype(np.uint8))
    return img.convert("RGB")


def release_tiles(img, s, v1):
    medium = best_fit(img.size, [(2 * s, 2 * s), (s, 4 * s), (4 * s, s)])
    if v1:
        high = best_fit(img.size, [(c * s, r * s) for c, r in V1_HIGH])
    else:
        high = (3 * medium[0], 3 * medium[1])
    tiles = [img.resize((s, s))]
    for res in (medium, high):
        big = img.resize(res)
        for top in range(0, res[1], s):
            for left in range(0, res[0], s):
                tiles.append(big.crop((left, top, left + s, top + s)))
    return tiles, (medium[0] // s, medium[1] // s), (high[0] // s, high[1] // s)


def clip(img, s):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # here: best_fit imports without it
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return proc(img, return_tensors="np")["pixel_values"][0]   # (3, s, s) float32


def clip_table():
    levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    return clip(Image.fromarray(levels), 16).reshape(3, 256)


def as_uint8(pixels, table):
    """(N, 3, S, S) transformers output -> (N, S, S, 3) uint8 tiles; table[tiles] == pixels."""
    tiles = np.stack([np.searchsorted(table[c], pixels[:, c]) for c in range(3)], -1)
    tiles = tiles.astype(np.uint8)
    again = np.stack([table[c][tiles[..., c]] for c in range(3)], 1)
    assert np.array_equal(again, pixels), "CLIP output is not a per-value table lookup"
    return tiles


def sub_filter(tiles):
    """PNG's 'Sub' filter: each pixel minus its left neighbour (mod 256); deflate packs the
    differences of smooth images ~40% tighter. The test undoes it with a uint8 cumsum."""
    d = tiles.copy()
    d[:, :, 1:] -= tiles[:, :, :-1]
    assert np.array_equal(np.cumsum(d, axis=2, dtype=np.uint8), tiles)
    return d


def main():
    out = HERE / "golden"
    out.mkdir(exist_ok=True)
    table = clip_table()
    assert np.all(np.diff(table, axis=1) > 0)
    cases = [  # name, w, h, mode, crop size, version, kept crop indices (None = all), pixel step
        ("rgb_50x37", 50, 37, "RGB", 28, "v2", None, 1),
        ("rgb_800x600", 800, 600, "RGB", 28, "v2", None, 1),
        ("rgb_400x90_wide", 400, 90, "RGB", 28, "v2", None, 1),
        ("rgb_37x1850_tall", 37, 1850, "RGB", 28, "v2", None, 1),
        ("l_64x48", 64, 48, "L", 28, "v2", None, 1),
        ("rgba_60x45", 60, 45, "RGBA", 28, "v2", None, 1),
        ("p_40x30", 40, 30, "P", 28, "v2", None, 1),
        ("i16_70x50", 70, 50, "I;16", 28, "v2", None, 1),
        ("rgb_1x1", 1, 1, "RGB", 28, "v2", None, 1),
        ("v1_rgb_800x600", 800, 600, "RGB", 28, "v1", None, 1),
        ("v1_rgb_37x1850_tall", 37, 1850, "RGB", 28, "v1", None, 1),
        ("v1_rgb_900x300", 900, 300, "RGB", 28, "v1", None, 1),
        ("rgb_640x480_336_strided", 640, 480, "RGB", 336, "v2", None, 6),
        ("rgb_640x480_336_full", 640, 480, "RGB", 336, "v2", [0, 4, 40], 1),
    ]
    for name, w, h, mode, s, version, keep, step in cases:
        img = synthetic_image(w, h, mode)
        tiles, medium, high = release_tiles(release_rgb(img), s, version == "v1")
        index = np.arange(len(tiles)) if keep is None else np.array(keep)
        pixels = np.stack([clip(tiles[i], s)[:, ::step, ::step] for i in index])
        np.savez_compressed(out / f"crops_tiles_{name}.npz",
                            tiles_sub=sub_filter(as_uint8(pixels, table)), table=table,
                            index=index, step=step, medium_grid=medium, high_grid=high,
                            w=w, h=h, mode=mode, size=s, version=version, crc=crc(img))
        print(f"{name}: {len(tiles)} crops, medium {medium}, high {high}")
    preprocess_cases = [(50, 37, 28), (37, 50, 28), (333, 100, 28), (3, 200, 28), (1, 1, 28),
                        (500, 377, 224)]
    for w, h, s in preprocess_cases:
        img = synthetic_image(w, h)
        pixels = clip(img, s)[None]
        np.savez_compressed(out / f"crops_preprocess_{w}x{h}_{s}.npz",
                            tiles_sub=sub_filter(as_uint8(pixels, table)),
                            table=table, w=w, h=h, size=s, crc=crc(img))
    total = sum(p.stat().st_size for p in out.glob("crops_*.npz"))
    print(f"golden crops files: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

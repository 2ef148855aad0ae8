"""Opening an image file safely, as the release opens it: `Image.open(path).convert("RGB")`.

Everything here is hardening around that one line, kept out of crops.py so that file is
the any-resolution idea alone: a missing file, a folder or FIFO given as the image, a truncated or
unreadable file become one ValueError naming it; 16-bit and float images are rescaled to 8 bits
instead of clipped (the one deliberate departure from the release); a huge JPEG is decoded at a
reduced size and other huge images are refused, so one photo cannot take gigabytes of memory
(README, "Huge images").
"""
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import crops
from crops import FULL_SIZE


def to_8bit(img):
    """High-bit-depth modes -> 'L'. PIL's own convert clips them to 0..255, which turns a
    16-bit photo white and a [0, 1] float image black; we rescale instead."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0                  # float images in [0, 1]
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0   # 16-bit range -> 8-bit
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))   # 2-D uint8 -> "L"


# Huge images. Every grid here resizes the whole image to at most 4032 px a side (v2's (4, 1)
# medium grid -> (12, 3) high grid at 336 px; v1's largest is 12 x 224), so pixels beyond that
# are averaged away. A JPEG at least twice that on both sides is decoded by libjpeg at 1/2, 1/4
# or 1/8 scale (a low-pass in the DCT), never below DRAFT_FLOOR a side: the bicubic resize to the
# grid then starts from that instead of the full image, which moves crop pixels by resampling
# noise only, and the grids are still chosen from the full size (kept in img.info[FULL_SIZE]).
# Other formats cannot decode at reduced size, so more than MAX_PIXELS is refused: a 13000 x
# 13000 PNG took 10 s and 1.5 GB to become crops (2.4 GB in sample.py).
DRAFT_FLOOR = 4032
MAX_PIXELS = 8192 * 8192


def load_image(src, background=None, exif_transpose=False) -> Image.Image:
    """Open a path (or take a PIL image) and return it as RGB.

    Default = the release's `Image.open(path).convert('RGB')`: transparency is dropped
    (the colour under a transparent pixel shows), palette/CMYK/1-bit/LA use PIL's plain
    conversion, EXIF orientation is ignored. `background=(r, g, b)` composites alpha onto
    that colour instead (what transformers 5 does, with white); `exif_transpose=True`
    applies the EXIF rotation. 16-bit / 32-bit / float images are rescaled to 8 bits
    (see to_8bit) -- the one deliberate departure, where the release saturates.
    Huge JPEGs are decoded at reduced size and other huge images refused (see DRAFT_FLOOR).
    An unreadable file raises ValueError naming it.
    """
    if isinstance(src, Image.Image):
        img = ImageOps.exif_transpose(src) if exif_transpose else src
        return to_rgb(img, "<PIL image>", background)
    name = str(src)
    try:
        regular = stat.S_ISREG(os.stat(name).st_mode)
    except FileNotFoundError:
        raise ValueError(f"image file not found: {name}") from None
    except OSError as e:
        raise ValueError(f"cannot read image {name}: {e.strerror}") from None
    if not regular:  # opening a FIFO blocks until someone writes to it: forever, without a word
        raise ValueError(f"image {name} is not a regular file (a folder, FIFO or device); give an image file")
    try:
        with warnings.catch_warnings():     # PIL warns from 89 MP; MAX_PIXELS is our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(name)
        with opened as img:
            full = img.size
            if img.format in ("JPEG", "MPO") and min(full) >= 2 * DRAFT_FLOOR:
                img.draft(img.mode, (DRAFT_FLOOR, DRAFT_FLOOR))
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image {name} is {full[0]}x{full[1]} ({full[0] * full[1] / 1e6:.0f} megapixels); at "
                                 f"most {MAX_PIXELS / 1e6:.0f} are read (crops use at most {DRAFT_FLOOR} px a side): "
                                 f"shrink it first, e.g. to {DRAFT_FLOOR} px on its long side")
            img.load()                      # decode now so a truncated file fails here
            if exif_transpose:
                decoded = img.size
                img = ImageOps.exif_transpose(img)
                full = full if img.size == decoded else full[::-1]
            rgb = to_rgb(img, name, background)
    except FileNotFoundError:
        raise ValueError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from None
    if rgb.size != full:
        rgb.info[FULL_SIZE] = full
    return rgb


def to_rgb(img, name, background):
    if img.width < 1 or img.height < 1:
        raise ValueError(f"image {name} is empty ({img.width}x{img.height})")
    with warnings.catch_warnings():         # P images with byte transparency warn on convert
        warnings.simplefilter("ignore")
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = to_8bit(img)
        try:
            if background is not None and ("A" in img.getbands() or "transparency" in img.info):
                rgba = img.convert("RGBA")
                base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
                return Image.alpha_composite(base, rgba).convert("RGB")
            return img if img.mode == "RGB" else img.convert("RGB")  # no copy of an image already RGB
        except ValueError as e:
            raise ValueError(f"cannot convert image {name} (mode {img.mode}) to RGB: {e}") from None


def crop_image(image, cfg: crops.CropConfig) -> crops.Crops:
    """A path (or PIL image) -> its crops (`crops.make_crops`), opened as `load_image` opens it."""
    return crops.make_crops(load_image(image), cfg)

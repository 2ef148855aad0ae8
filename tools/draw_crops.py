"""Draw the medium and high crop grids crops.py chooses for an image, and print them.

    python -m tools.draw_crops photo.jpg --out grids.png        # v2 rules (336 px crops)
    python -m tools.draw_crops photo.jpg --v1                   # v1 rules, printed only
"""
import argparse
import sys

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from PIL import Image, ImageDraw, ImageFont

from crops import V1, V2, make_crops
from lib import weights
from lib.images import load_image


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
    p = argparse.ArgumentParser(prog="python -m tools.draw_crops", description="Show Dragonfly's medium/high crop grids on an image.")
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
        print(f"error: {e}", file=sys.stderr)
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

"""Zoom: a synthetic dataset whose answers need the high-resolution crops.

Each 672x672 image holds one small dark digit (0-9, 16-18 px tall) at a random place on a
faint background with a few large pale shapes, and 2-3 small dark marks that are not digits.
672 is the `tiny` model's high resolution (crop 112: low 112x112, medium 224x224 = 2x2
crops, high 672x672 = 6x6 crops): in the low crop the digit shrinks 6x to ~3 px and cannot
be read, in the high crop that contains it it is as sharp as drawn. A model that reads it
uses the zoom-in crops (v2 paper §3; the low/medium/high ablation of §4.3, in miniature).

    python data/zoom/prepare.py --out data/zoom --train 4000 --test 500 --seed 0

writes images/, example.png (one fixed sample, digit 7), train.jsonl (the release's record
format, SPEC §4, image_url relative to --out) and test.jsonl in the common eval format
({"id", "image", "question", "answers"}). About 10 KB per image, ~40 s for 4500 on one core.
Everything is a function of (seed, split, index): the same command gives the same bytes.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run as a script from anywhere
from data.formats import format_chat  # noqa: E402

SIZE = 672
QUESTIONS = ("What digit is written in the image?",
             "Which digit appears in this picture?",
             "Read the small digit in the image. Which one is it?")


def _pale(rng):
    return tuple(rng.randint(215, 245) for _ in range(3))


def _dark(rng):
    return tuple(rng.randint(0, 70) for _ in range(3))


def _near(colour, rng, spread=14):
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in colour)


def draw_sample(rng: random.Random, digit: int | None = None):
    """One image and its digit. The background is flat with a few large faint shapes, so
    the PNG stays small; the digit and the distractor marks are small and dark."""
    background = _pale(rng)
    img = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):                       # large faint shapes
        x, y = rng.randint(-100, SIZE - 100), rng.randint(-100, SIZE - 100)
        w, h = rng.randint(150, 400), rng.randint(150, 400)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=_near(background, rng))

    digit = rng.randrange(10) if digit is None else digit
    font = ImageFont.load_default(size=rng.randint(23, 26))   # glyph 16-18 px tall
    left, top, right, bottom = font.getbbox(str(digit))
    margin = 8
    x = rng.randint(margin - left, SIZE - margin - right)
    y = rng.randint(margin - top, SIZE - margin - bottom)
    draw.text((x, y), str(digit), fill=_dark(rng), font=font)
    box = (x + left, y + top, x + right, y + bottom)

    placed = [box]
    for _ in range(rng.randint(2, 3)):                       # distractors: not digits
        for _attempt in range(50):
            cx, cy, r = rng.randint(20, SIZE - 20), rng.randint(20, SIZE - 20), rng.randint(4, 8)
            mark = (cx - r, cy - r, cx + r, cy + r)
            if all(mark[2] + 12 < b[0] or b[2] + 12 < mark[0] or mark[3] + 12 < b[1] or b[3] + 12 < mark[1]
                   for b in placed):
                break
        placed.append(mark)
        kind, colour = rng.choice(("dot", "triangle", "cross", "bar", "square")), _dark(rng)   # no ring: it reads as 0
        if kind == "dot":
            draw.ellipse(mark, fill=colour)
        elif kind == "triangle":
            draw.polygon([(cx, mark[1]), (mark[2], mark[3]), (mark[0], mark[3])], outline=colour, width=2)
        elif kind == "cross":
            draw.line((mark[0], mark[1], mark[2], mark[3]), fill=colour, width=2)
            draw.line((mark[0], mark[3], mark[2], mark[1]), fill=colour, width=2)
        elif kind == "bar":
            draw.line((mark[0], cy, mark[2], cy), fill=colour, width=2)
        else:
            draw.rectangle(mark, outline=colour, width=2)
    return img, digit, box


def make_split(out: Path, split: str, n: int, seed: int):
    records = []
    for k in range(n):
        rng = random.Random(f"zoom/{seed}/{split}/{k}")
        img, digit, _ = draw_sample(rng)
        name = f"images/{split}_{k:05d}.png"
        img.save(out / name, compress_level=1)   # 2x faster than 6, files still ~10 KB
        question = rng.choice(QUESTIONS)
        if split == "train":
            records.append({"image_url": name, "source": "zoom",
                            "conversations": format_chat([("user", question), ("assistant", str(digit))])})
        else:
            records.append({"id": f"{split}_{k:05d}", "image": name, "question": question, "answers": [str(digit)]})
    with open(out / f"{split}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the synthetic Zoom dataset (small digits in large images).")
    p.add_argument("--out", default=str(Path(__file__).parent), help="output directory (default: data/zoom)")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_split(out, "train", args.train, args.seed)
    make_split(out, "test", args.test, args.seed)
    draw_sample(random.Random("zoom/example"), digit=7)[0].save(out / "example.png")   # the README's picture
    print(f"wrote {args.train} train + {args.test} test images to {out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()

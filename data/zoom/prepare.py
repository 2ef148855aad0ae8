"""Zoom: a synthetic dataset whose answers need the high-resolution crops.

Each 336x336 image is a page printed in one tiny digit (0-9), repeated in lines of "words"
on a 7 px grid: 5x6 px glyphs, random ink and paper colours, random gaps between words.
336 is the `tiny` model's high resolution (crop 56: low 56x56, medium 112x112 = 2x2 crops,
high 336x336 = 6x6 crops, patch 7): in a high crop each ViT patch holds exactly one glyph,
as sharp as drawn; the low crop shrinks the page 6x, so the 7 px pattern falls above its
Nyquist limit and is blurred away to a flat colour. Every glyph has the same number of ink
pixels (15), so that flat colour says nothing about the digit: only the zoom-in crops can
answer (v2 paper §3; the low/medium/high ablation of §4.3, in miniature).

Why a page and not one digit somewhere: the tiny model trains from scratch in minutes on a
CPU. One glyph among ~250 image positions is a needle its attention has to learn to find
first; a page puts the answer in every high-crop token, which mean pooling keeps.

    python -m data.zoom.prepare --out data/zoom --train 4000 --test 500 --seed 0

writes images/, example.png (one fixed sample, digit 7), train.jsonl (the release's record
format, docs/release-facts.md#training-records, image_url relative to --out) and test.jsonl in
the common eval format ({"id", "image", "question", "answers"}). About 3 KB per image, ~10 s for
4500 on one core.
Everything is a function of (seed, split, index): the same command gives the same bytes.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import numpy as np
from PIL import Image

from data.formats import format_chat

SIZE = 336    # the tiny model's high resolution: 6 x 56 px crops
CELL = 7      # glyph pitch = the ViT patch: one glyph per patch in a high crop
QUESTIONS = ("What digit is this page printed in?",
             "Which digit fills this picture?",
             "Read the tiny digits in the image. Which digit is it?")

# 5x6 glyphs, 15 ink pixels each: equal ink keeps the low crop's average colour the same for
# every digit (the zero is dotted so that it is not an 8 without a waist).
FONT = {
    0: (".###.", "#...#", "#.#.#", "#...#", "#...#", ".###."),
    1: ("..##.", ".###.", "..##.", "..##.", "..##.", ".####"),
    2: (".###.", "#...#", "...##", "..##.", ".#...", "#####"),
    3: ("####.", "....#", ".####", "....#", "....#", "####."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "..###"),
    5: ("####.", "#....", "####.", "....#", "....#", "####."),
    6: (".###.", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "...##", "..##.", "..##.", ".##..", ".##.."),
    8: (".###.", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", ".###."),
}


def glyph(digit: int) -> np.ndarray:
    """(CELL, CELL) bool ink mask: the 5x6 glyph at column 1, row 0; the rest is spacing."""
    cell = np.zeros((CELL, CELL), bool)
    cell[:6, 1:6] = np.array([[c == "#" for c in row] for row in FONT[digit]])
    return cell


def _colour(rng, lo, hi):
    return np.array([rng.randint(lo, hi) for _ in range(3)], np.uint8)


def draw_sample(rng: random.Random, digit: int | None = None):
    """One page and its digit: lines of words (runs of 2-7 glyphs, one blank cell between
    words, lines sometimes left short) in dark ink on pale paper, colours drawn per page.
    Returns (image, digit, ink) with ink the (SIZE, SIZE) bool mask of inked pixels."""
    digit = rng.randrange(10) if digit is None else digit
    n = SIZE // CELL
    printed = np.zeros((n, n), bool)                          # which cells hold a glyph
    for row in range(n):
        end = n if rng.random() < 0.8 else rng.randint(n // 3, n)
        col = rng.randint(0, 2)
        while col < end:
            run = rng.randint(2, 7)
            printed[row, col:min(col + run, end)] = True
            col += run + 1
    ink = np.kron(printed, glyph(digit)).astype(bool)         # (SIZE, SIZE)
    paper, colour = _colour(rng, 200, 250), _colour(rng, 0, 90)
    pixels = np.where(ink[..., None], colour, paper)
    return Image.fromarray(pixels.astype(np.uint8)), digit, ink


def make_split(out: Path, split: str, n: int, seed: int):
    records = []
    for k in range(n):
        rng = random.Random(f"zoom/{seed}/{split}/{k}")
        img, digit, _ = draw_sample(rng)
        name = f"images/{split}_{k:05d}.png"
        img.save(out / name, compress_level=1)
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
    p = argparse.ArgumentParser(prog="python -m data.zoom.prepare", description="Generate the synthetic Zoom dataset (pages of tiny digits).")
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

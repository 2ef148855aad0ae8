"""
Lab 01, crops (v2 paper §3.1 and Figure 1; docs/release-facts.md#crop-grids): the best-fit grid.

The student writes `crops.select_best_resolution`, the LLaVA-NeXT rule that picks the medium grid
(2x2, 1x4 or 4x1 tiles of 336 px) for an image. The checks hold it to hand-computed cases, to the
grids of the release's pipeline (tests/golden/crops_tiles_*.npz, made by
tests/make_golden_crops.py) and to the trained toy, which must still read its page; the run draws
the grids of a square, a tall and a wide image.
"""
import dataclasses

import numpy as np
from PIL import Image

import crops
from labs import grader, toy
from labs.grader import check
from tools import draw_crops

TITLE = "Crops: the best-fit grid"
PAPER = "v2 §3.1, Figure 1"
FUNCTIONS = ["crops.select_best_resolution"]
MINUTES = 30

GOLDEN = grader.ROOT / "tests" / "golden"
MEDIUM = [(672, 672), (336, 1344), (1344, 336)]   # v2's medium grids (2,2), (1,4), (4,1) of 336 px
SHAPES = {"square": (1000, 1000), "tall": (500, 2000), "wide": (2000, 500), "strip": (300, 75)}


def pick(size, candidates):
    return tuple(crops.select_best_resolution(size, candidates))


@check
def aspect_ratio_picks_the_grid(run):
    for shape in ("square", "wide", "tall"):
        want = {"square": (672, 672), "wide": (1344, 336), "tall": (336, 1344)}[shape]
        got = pick(SHAPES[shape], MEDIUM)
        assert got == want, f"{shape} {SHAPES[shape]}: got {got}, the release picks {want}"
    return "square -> (672, 672), wide -> (1344, 336), tall -> (336, 1344)"


@check
def most_shown_pixels_win(run):
    # 1000x250 fitted in 672x672 shows 672x168 = 112,896 pixels; in 1344x336 it shows 451,584
    got = pick((1000, 250), [(672, 672), (1344, 336)])
    assert got == (1344, 336), f"1000x250: got {got}; (1344, 336) shows 451,584 of its pixels, (672, 672) 112,896"
    return "1000x250 -> (1344, 336)"


@check
def shown_pixels_are_capped_at_the_image(run):
    # 150x150 fits whole in both: 22,500 pixels each, whatever the upscaling; then the least waste wins
    got = pick((150, 150), [(600, 600), (300, 300)])
    assert got == (300, 300), (f"150x150 in (600, 600) or (300, 300): got {got}; upscaling shows no new pixel, "
                               "so both show 22,500 and the one wasting less area wins")
    return "150x150 -> (300, 300): no credit for upscaling"


@check
def full_tie_goes_to_the_first_candidate(run):
    # a 300x75 strip is smaller than every candidate: each shows its 22,500 pixels and wastes 451,584 - 22,500
    got = pick(SHAPES["strip"], MEDIUM)
    other = pick(SHAPES["strip"], MEDIUM[::-1])
    run.record("strip", list(got))
    assert got == (672, 672) and other == (1344, 336), (
        f"300x75: got {got} (and {other} with the candidates reversed); every candidate ties, the release keeps "
        "the first: (672, 672), though the strip is wide")
    return "300x75 -> (672, 672): a full tie keeps the first candidate"


@check
def grids_match_the_release_pipeline(run):
    found = []
    for path in sorted(GOLDEN.glob("crops_tiles_*.npz")):
        g = np.load(path)
        cfg = dataclasses.replace(crops.V1 if str(g["version"]) == "v1" else crops.V2, size=int(g["size"]))
        out = crops.make_crops(Image.new("RGB", (int(g["w"]), int(g["h"]))), cfg)
        want = (tuple(g["medium_grid"].tolist()), tuple(g["high_grid"].tolist()))
        assert (out.medium_grid, out.high_grid) == want, (
            f"{path.name}: {int(g['w'])}x{int(g['h'])} ({g['version']}) got medium {out.medium_grid}, high "
            f"{out.high_grid}; the release: medium {want[0]}, high {want[1]}")
        found.append(path.name)
    return f"{len(found)} images (tests/golden/crops_tiles_*.npz): medium and high grids as the release's"


@check(after_pass=True)
def the_toy_still_reads_its_page(run):
    toy.reads_its_page(run)
    return "checkpoints/zoom-tiny answers '7' about data/zoom/example.png"


@check(after_pass=True)
def draw_the_crops(run):
    source = Image.open(GOLDEN / "dragonfly_image.png").convert("RGB")
    grids = {}
    for shape in ("square", "tall", "wide"):
        img = source.resize(SHAPES[shape])
        c = crops.make_crops(img, crops.V2)
        draw_crops.draw_grids(img, c.medium_grid, c.high_grid).save(run.out / f"{shape}.png")
        grids[shape] = dict(medium=list(c.medium_grid), high=list(c.high_grid), crops=list(c.counts))
        assert sum(c.counts) == 41, f"{shape}: {c.counts} crops, Figure 1 has 1 + 4 + 36 = 41"
    run.record("grids", grids)
    return f"wrote {', '.join(s + '.png' for s in grids)} in {grader.shown(run.out)}"


def observe(ref) -> str:
    v = ref["run"]["values"]
    rows = ["| image | medium grid (cols, rows) | high grid | crops (low + medium + high) |", "|---|---|---|---|"]
    for shape, g in v["grids"].items():
        w, h = SHAPES[shape]
        rows.append(f"| {shape} {w}x{h} | {tuple(g['medium'])} | {tuple(g['high'])} | {' + '.join(map(str, g['crops']))} |")
    strip = tuple(v["strip"])
    return "\n".join(rows + ["", f"The 300x75 strip gets {strip}, a {strip[0] // 336}x{strip[1] // 336} grid; the toy answers {v['toy_answer']!r}. "
                                 "Pictures: `out/labs/01-crops/project/square.png`, `tall.png`, `wide.png` "
                                 "(yours: `out/labs/01-crops/starter/`)."])

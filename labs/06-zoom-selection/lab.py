"""
Lab 06, v1's zoom-in selection (v1 paper §3.2 and Figure 1; docs/release-facts.md#zoom-in-selection).

v1 keeps 12 of its 24 high crops: each medium crop's summary (the mean of its projected tokens)
scores the high crops of its region by dot product and keeps the best k = 3. The student writes
`pool.release_regions` (which high crops form medium crop i's region in the released code: runs of
the row-major list, not the paper's quadrants) and `pool.select_region_topk` (the top-k, ties
broken as the release breaks them). The checks hold them to hand-computed cases, to the picks of
the release's rule on a tiny v1 checkpoint (tests/golden/dragonfly_v1.npz, made by
tests/make_golden.py) and to that checkpoint's logits; the run draws the picks under both rules.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import pool
from lib import looked, pretrained
from lib.images import crop_image
from labs import grader
from labs.grader import check

sys.path.insert(0, str(grader.ROOT / "tests"))
import tiny_checkpoints  # noqa: E402  the golden's tiny v1 checkpoint, written from its seed
import release_rules  # noqa: E402  the released selection rule, restated

TITLE = "v1's zoom-in selection"
PAPER = "v1 §3.2, Figure 1"
FUNCTIONS = ["pool.release_regions", "pool.select_region_topk"]
MINUTES = 35
GOLDEN = grader.ROOT / "tests" / "golden"


def region_only(medium, high, regions, k=3):
    """Top-k of each region's own scores (what a reading of the paper gives): the same crops as
    the release's rule unless scores tie."""
    chosen = []
    for i, region in enumerate(regions):
        index = torch.tensor(region)
        chosen.append(index[(high[index] @ medium[i][:, None])[:, 0].topk(k).indices])
    return torch.cat(chosen).sort().values


@check
def release_regions_are_runs(run):
    got = pool.release_regions(24, 4)
    want = [list(range(i, i + 6)) for i in (0, 6, 12, 18)]
    assert [list(r) for r in got] == want, f"release_regions(24, 4): got {got}, want runs of six {want}"
    small = pool.release_regions(12, 4)
    assert [list(r) for r in small] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], f"release_regions(12, 4): got {small}"
    return "24 high crops, 4 medium: [0..5], [6..11], [12..17], [18..23], whatever the grid shapes"


@check
def topk_keeps_the_most_similar_in_index_order(run):
    medium = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    high = torch.tensor([[0.1, 0], [0.9, 0], [0.5, 0], [0, 0.2], [0, 0.7], [0, 0.3]])
    got = pool.select_region_topk(medium, high, [[0, 1, 2], [3, 4, 5]], k=2).tolist()
    assert got == [1, 2, 4, 5], f"got {got}: medium 0 scores 0.1, 0.9, 0.5 and keeps 1, 2; medium 1 scores 0.2, 0.7, 0.3 and keeps 4, 5"
    return "[1, 2, 4, 5]: the 2 best of each region, ascending"


@check
def picks_match_the_release_on_the_golden(run):
    g = np.load(GOLDEN / "dragonfly_v1.npz")
    scores = torch.from_numpy(g["summary_scores"])          # (4 medium, 24 high) summary dot products
    medium, high = torch.eye(4), scores.T                     # high @ medium[i] = scores[i]
    release = pool.select_region_topk(medium, high, pool.release_regions(24, 4), 3).tolist()
    spatial = pool.select_region_topk(medium, high, pool.spatial_regions((4, 6), (2, 2)), 3).tolist()
    run.record("release", release)
    run.record("spatial", spatial)
    assert release == g["selected_release"].tolist(), f"release rule: kept {release}, the release keeps {g['selected_release'].tolist()}"
    assert spatial == g["selected_spatial"].tolist(), f"paper's quadrants: kept {spatial}, the reference keeps {g['selected_spatial'].tolist()}"
    return f"release rule keeps {release}; quadrants keep {spatial}"


@check
def ties_break_as_the_release(run):
    gen = torch.Generator().manual_seed(0)
    trials, tied, differ = 50, 0, 0
    for _ in range(trials):
        medium = torch.randint(-2, 3, (4, 8), generator=gen).to(torch.bfloat16)
        high = torch.randint(-1, 2, (24, 8), generator=gen).to(torch.bfloat16)  # few distinct scores: ties
        ours = pool.select_region_topk(medium, high, pool.release_regions(24, 4), k=3).tolist()
        want = release_rules.zoom_selection(medium, high).tolist()
        assert ours == want, f"bf16 scores with ties: kept {ours}, the release's top-k over the masked list keeps {want}"
        scores = high.float() @ medium.float().T
        tied += any(len(set(scores[6 * i:6 * i + 6, i].tolist())) < 6 for i in range(4))
        differ += region_only(medium, high, pool.release_regions(24, 4)).tolist() != want
    run.record("tied_trials", tied)
    run.record("region_only_differs", differ)
    return f"{trials} draws of bf16 summaries ({tied} with tied scores in a region): the release's picks every time"


@check(after_pass=True)
def the_v1_checkpoint_gives_the_golden_logits(run):
    g = np.load(GOLDEN / "dragonfly_v1.npz")
    with tempfile.TemporaryDirectory() as tmp:
        m = pretrained.load(tiny_checkpoints.write_tiny_dragonfly(Path(tmp), "v1", "bin", seed=int(g["checkpoint_seed"])))
    crops = crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops)
    pixels = torch.from_numpy(crops.pixels)[None]
    with torch.no_grad():
        medium, high = m.encode(pixels)[1:]
        kept = m.select_high(medium, high)[0].tolist()
        logits = m(torch.from_numpy(g["text_ids"])[None], pixels)[0][0, -1]
    assert kept == g["selected_release"].tolist(), f"the v1 model kept {kept}, the release keeps {g['selected_release'].tolist()}"
    grader.assert_close(logits, torch.from_numpy(g["logits_last"]), "the v1 model's last logits vs the release's", atol=1e-4)
    draw(crops, {"release (runs of 6)": (pool.release_regions(24, 4), run.values["release"]),
                 "paper (quadrants)": (pool.spatial_regions(crops.high_grid, crops.medium_grid), run.values["spatial"])},
         crops.high_grid).save(run.out / "selection.png")
    return f"a tiny v1 checkpoint keeps {kept} and its logits match the release's (1e-4); wrote selection.png"


def draw(crops, rules: dict, grid, tile=56):
    """The high crops under each rule: outlined in their region's colour, kept ones framed in
    black, dropped ones faded."""
    cols, rows = grid
    font = ImageFont.load_default(size=13)
    panel_w, head = cols * tile + 24, 22
    canvas = Image.new("RGB", (panel_w * len(rules), rows * tile + head + 8), "white")
    d = ImageDraw.Draw(canvas)
    first_high = crops.counts[0] + crops.counts[1]
    for p, (name, (regions, kept)) in enumerate(rules.items()):
        x0 = p * panel_w + 8
        d.text((x0, 4), name, fill="black", font=font)
        owner = {h: i for i, r in enumerate(regions) for h in r}
        for h in range(cols * rows):
            img = looked._tile(crops.pixels[first_high + h], tile)
            if h not in kept:
                img = Image.blend(img, Image.new("RGB", img.size, "white"), 0.7)
            x, y = x0 + (h % cols) * tile, head + (h // cols) * tile
            canvas.paste(img, (x, y))
            d.rectangle((x + 2, y + 2, x + tile - 3, y + tile - 3), outline=looked.REGION_COLOURS[owner[h] % 4], width=3)
            if h in kept:
                d.rectangle((x, y, x + tile - 1, y + tile - 1), outline="black", width=2)
    return canvas


def observe(ref) -> str:
    v = ref["run"]["values"]
    g = np.load(GOLDEN / "dragonfly_v1.npz")
    cols, rows = g["high_grid"].tolist()
    lines = [f"The golden v1 image ({g['image_size'][0]}x{g['image_size'][1]}) gets medium grid {tuple(g['medium_grid'].tolist())} "
             f"and high grid {(cols, rows)}: 24 high crops, row-major. Kept (the numbers are high-crop indices):", "",
             "| rule | regions | kept |", "|---|---|---|",
             f"| release | runs [0..5], [6..11], [12..17], [18..23] | {v['release']} |",
             f"| paper | quadrants of the {cols}x{rows} grid | {v['spatial']} |", "",
             f"Both rules keep {len(set(v['release']) & set(v['spatial']))} of the same crops. Picture: "
             "`out/labs/06-zoom-selection/project/selection.png`. In the ties check, "
             f"{v['tied_trials']} of 50 random bf16 draws had tied scores inside a region; top-k over each region's "
             f"own scores would have kept other crops than the release in {v['region_only_differs']} of them."]
    return "\n".join(lines)

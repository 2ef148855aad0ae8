"""
Lab 03, why zoom-in helps (v2 paper §4.3, Table 2; docs/release-facts.md#crop-grids and
#ablation-knobs).

The student writes `crops.make_crops`: the low crop (the whole image squashed), the medium tiles
and the high tiles at three times the medium grid, in that order, each level on or off as the
config says. The checks hold it to the release's pixels (tests/golden/crops_tiles_*.npz) and to
Table 2's levels; then the toy is trained from scratch with it on the rows L, L+M and L+H of
data/zoom/recipe.py: 2 steps each as a smoke test, 150 steps each with --full (the study's budget,
data/zoom/ablations.md), scored on held-out pages.
"""
import collections
import dataclasses
import sys

import numpy as np
import torch
from PIL import Image

import crops
from data.zoom.recipe import RUNS
from lib import images
from labs import grader, toy
from labs.grader import check

sys.path.insert(0, str(grader.ROOT / "tests"))
import test_crops  # noqa: E402  the goldens' input pictures (synthetic_image) and expected pixels

TITLE = "Why zoom-in helps"
PAPER = "v2 §4.3, Table 2"
FUNCTIONS = ["crops.make_crops"]
MINUTES = 45
FULL = True
ROWS = ("L", "L+M", "L+H")
PAPER_TEXTVQA = {"L": 40.0, "L+M": 60.9, "L+H": 65.2}   # v2 Table 2
SMOKE = dict(steps=1, n_train=16, n_test=8)
STUDY = dict(steps=150, n_train=4000, n_test=200)      # data/zoom/ablations.md's budget
LEVELS = {"L": (1, 0, 0), "M": (0, 4, 0), "H": (0, 0, 36), "L+M": (1, 4, 0), "L+H": (1, 0, 36), "L+M+H": (1, 4, 36)}


def level_config(name, size=28):
    return dataclasses.replace(crops.V2, size=size, low="L" in name, medium="M" in name, high="H" in name)


@check
def figure_1_has_41_crops(run):
    out = crops.make_crops(Image.new("RGB", (1000, 1000), "white"), crops.V2)
    assert out.counts == (1, 4, 36), f"a square image: {out.counts} crops, Figure 1 has (1, 4, 36)"
    assert out.pixels.shape == (41, 3, 336, 336), f"pixels {out.pixels.shape}, want (41, 3, 336, 336)"
    return "a square image: 1 + 4 + 36 crops of 3 x 336 x 336"


@check
def levels_follow_the_table_2_flags(run):
    img = Image.new("RGB", (100, 80), "white")
    for name, counts in LEVELS.items():
        out = crops.make_crops(img, level_config(name))
        assert out.counts == counts and len(out.pixels) == sum(counts), f"{name}: counts {out.counts}, {len(out.pixels)} crops; want {counts}"
        assert (out.medium_grid, out.high_grid) == ((2, 2), (6, 6)), f"{name}: grids {out.medium_grid}, {out.high_grid} (reported even for a level that is off)"
    return ", ".join(f"{n} {sum(c)}" for n, c in LEVELS.items()) + " crops"


@check
def high_grid_is_three_times_medium_in_v2_and_its_own_fit_in_v1(run):
    img = Image.new("RGB", (37, 1850))
    v2, v1 = crops.make_crops(img, dataclasses.replace(crops.V2, size=28)), crops.make_crops(img, dataclasses.replace(crops.V1, size=28))
    assert (v2.medium_grid, v2.high_grid) == ((1, 4), (3, 12)), f"v2, 37x1850: {v2.medium_grid}, {v2.high_grid}; want (1, 4), (3, 12)"
    assert (v1.medium_grid, v1.high_grid, v1.counts) == ((1, 4), (2, 12), (1, 4, 24)), (
        f"v1, 37x1850: {v1.medium_grid}, {v1.high_grid}, {v1.counts}; want (1, 4), (2, 12) by its own best fit, (1, 4, 24)")
    return "37x1850: v2 high (3, 12) = 3 x (1, 4); v1 high (2, 12), its own best fit"


@check
def pixels_match_the_release_pipeline(run):
    files = test_crops.golden_files("tiles")
    for path in files:
        g = np.load(path)
        img = test_crops.synthetic_image(int(g["w"]), int(g["h"]), str(g["mode"]))
        cfg = dataclasses.replace(crops.V1 if str(g["version"]) == "v1" else crops.V2, size=int(g["size"]))
        out = images.crop_image(img, cfg)
        (mc, mr), (hc, hr) = g["medium_grid"].tolist(), g["high_grid"].tolist()
        assert len(out.pixels) == 1 + mc * mr + hc * hr, (
            f"{path.name}: {len(out.pixels)} crops, the release cuts 1 + {mc}x{mr} + {hc}x{hr} = {1 + mc * mr + hc * hr}")
        step = int(g["step"])
        grader.assert_close(out.pixels[g["index"]][..., ::step, ::step], test_crops.expected_pixels(g),
                            f"{path.name}: the crops' pixels vs the release's")
    return f"{len(files)} images, low + medium + high, equal to the release's pixels (1e-5)"


@check
def table_3_medium_from_low(run):
    img = Image.open(toy.EXAMPLE).convert("RGB")
    cfg = dataclasses.replace(crops.V2, size=56, low=False, high=False, from_low=True)
    ours, release = crops.make_crops(img, cfg), grader.original("crops.make_crops")(img, cfg)
    grader.assert_close(ours.pixels, release.pixels, "from_low: the medium tiles cut from the 56 x 56 low image")
    return "from_low=True: the 4 medium tiles zoom into the low crop, not the original (v2 Table 3)"


@check(after_pass=True)
def the_toy_still_reads_its_page(run):
    toy.reads_its_page(run)
    return "checkpoints/zoom-tiny answers '7' with your crops"


@check(after_pass=True)
def train_l_lm_lh(run):
    budget = STUDY if run.full else SMOKE
    rows = toy.train_rows(run, {name: RUNS[name][1] for name in ROWS}, **budget)
    for name, r in rows.items():
        top, count = collections.Counter(r["answers"]).most_common(1)[0]
        run.record(name, {k: r[k] for k in ("positions", "accuracy", "step_s")} | {
            "last_loss": r["losses"][-1], "top_answer": top, "top_share": round(100 * count / len(r["answers"]), 1)}, stable=False)
    positions = {name: r["positions"] for name, r in rows.items()}
    assert positions == {"L": 18, "L+M": 42, "L+H": 234}, f"image positions {positions}; the toy's L, L+M, L+H have 18, 42, 234"
    if not run.full:
        return f"{budget['steps']} training step(s) of each row with your crops; positions {positions}"
    acc = {name: r["accuracy"] for name, r in rows.items()}
    assert acc["L+H"] >= 90, f"L+H scores {acc['L+H']:.1f}% after 150 steps; the study's L+H scores 100"
    assert acc["L"] <= 25, f"L scores {acc['L']:.1f}%; the low crop alone cannot see the digits (chance is about 10%)"
    return "held-out accuracy after 150 steps: " + ", ".join(f"{n} {a:.1f}%" for n, a in acc.items())


def observe(ref) -> str:
    lines = ["| row | image positions | held-out accuracy, 150 steps (toy) | commonest answer (share) | paper TextVQA "
             "(Table 2) | s per step |", "|---|---:|---:|---|---:|---:|"]
    full = ref.get("full", {}).get("values", {})
    for name in ROWS:
        r = full.get(name)
        if r is None:
            lines.append(f"| {name} | - | not recorded | - | {PAPER_TEXTVQA[name]} | - |")
            continue
        top = f"{r['top_answer'] or '(empty)'} ({r['top_share']}%)" if "top_answer" in r else "-"
        lines.append(f"| {name} | {r['positions']} | {r['accuracy']:.1f} | {top} | {PAPER_TEXTVQA[name]} | {r['step_s']} |")
    return "\n".join(lines + ["", f"The toy answers {(ref.get('run') or ref['full'])['values']['toy_answer']!r} with these crops. "
                                  f"Full form: {STUDY['steps']} steps of 16 on {STUDY['n_train']} pages, seed 0, scored on "
                                  f"{STUDY['n_test']} held-out pages."])

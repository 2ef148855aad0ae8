"""
Lab 02, pooling and the token budget (v2 paper §3.2, Appendix F, Table 11;
docs/release-facts.md#pooling and #image-block).

The student writes `pool.mean_pool`: each medium and high crop keeps its CLS token and averages
its 24x24 patch tokens to 6x6. The checks hold it to hand-computed blocks and an independent
restatement, count the image block it builds (2016 paper tokens, 2098 release positions), price
it with the appendix's FLOPs formula, and run the trained toy with it on 50 held-out pages.
`adaptive=True` (windows for sides that do not divide the grid) is lab 04's; it is not used here.
"""
import torch

import crops
import model as M
import pool
from lib import presets
from lib.images import crop_image
from labs import grader, toy
from labs.grader import check

TITLE = "Pooling and the token budget"
PAPER = "v2 §3.2, Appendix F, Table 11"
FUNCTIONS = ["pool.mean_pool"]
MINUTES = 35
PAGES = 50


def grid_tokens(g, D=2):
    """CLS = -1, then patch (r, c) holds r * g + c in every channel: (1, 1 + g*g, D)."""
    patches = torch.arange(g * g, dtype=torch.float32)[:, None].expand(g * g, D)
    return torch.cat([torch.full((1, D), -1.0), patches])[None]


def block_means(tokens, side):
    """The release's pooling restated with loops: cell (i, j) = mean of patch rows and columns
    [i*k, i*k + k) x [j*k, j*k + k), k = g / side, row-major after CLS."""
    g = int((tokens.shape[1] - 1) ** 0.5)
    k, grid = g // side, tokens[:, 1:].reshape(tokens.shape[0], g, g, -1)
    cells = [grid[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(dim=(1, 2)) for i in range(side) for j in range(side)]
    return torch.cat([tokens[:, :1], torch.stack(cells, dim=1)], dim=1)


@check
def cls_first_then_block_means(run):
    got = pool.mean_pool(grid_tokens(4), 2)[0, :, 0].tolist()
    # 4x4 patches 0..15: block (0,0) = {0,1,4,5} -> 2.5, (0,1) = {2,3,6,7} -> 4.5, (1,0) -> 10.5, (1,1) -> 12.5
    assert got == [-1.0, 2.5, 4.5, 10.5, 12.5], f"4x4 patches 0..15 pooled to 2x2: got {got}, want [-1 (CLS), 2.5, 4.5, 10.5, 12.5]"
    return "CLS, then the 2x2 block means 2.5, 4.5, 10.5, 12.5, row-major"


@check
def release_pooling_is_24x24_to_6x6(run):
    x = torch.randn(3, 577, 8, generator=torch.Generator().manual_seed(0))
    out = pool.mean_pool(x, 6)
    assert tuple(out.shape) == (3, 37, 8), f"(3, 577, 8) pooled to 6x6: got shape {tuple(out.shape)}, want (3, 37, 8)"
    grader.assert_close(out, block_means(x, 6), "(3, 577, 8) pooled to 6x6 vs the 4x4 block means, row-major")
    return "(3, 577, 8) -> (3, 37, 8), each cell the mean of its 4x4 block"


@check
def paper_budgets_per_crop(run):
    x = torch.randn(1, 577, 4, generator=torch.Generator().manual_seed(1))
    for side in (3, 4, 6, 12, 24):
        out = pool.mean_pool(x, side, keep_cls=False)
        assert out.shape[1] == side * side, f"pooled to {side}x{side} without CLS: {out.shape[1]} tokens, want {side * side}"
        grader.assert_close(out, block_means(x, side)[:, 1:], f"pooled to {side}x{side} vs the block means")
    return "3x3, 4x4, 6x6, 12x12, 24x24 -> 9, 16, 36, 144, 576 tokens (v2 Tables 7, 8); 24x24 is the identity"


@check(after_pass=True)
def the_block_is_2016_tokens_2098_positions(run):
    """A random model at the release's geometry (presets.tiny: 41 crops, 24x24 patches of one
    pixel) builds its image block with your pooling: count it, with and without CLS and separators."""
    torch.manual_seed(0)
    counts = {}
    for name, cls, sep in (("positions", True, True), ("paper", False, False)):
        cfg = presets.tiny(presets.variant(presets.V2, keep_cls=cls, separators=sep))
        m = M.Dragonfly(cfg).eval()
        c = crop_image(grader.ROOT / "tests" / "golden" / "dragonfly_image.png", cfg.crops)
        with torch.no_grad():
            pixels = torch.from_numpy(c.pixels)[None]
            counts[name] = m.image_block(pixels, [c.medium_grid], [c.high_grid]).shape[1]
            for level in m.encode(pixels)[1:]:  # the medium and high crops: (1, n, 577, dim)
                flat = level.flatten(0, 1)
                grader.assert_close(pool.mean_pool(flat, 6, keep_cls=cls), grader.original("pool.mean_pool")(flat, 6, keep_cls=cls),
                                    f"the ViT's crop tokens pooled to 6x6 (keep_cls={cls}) vs the release's pooling")
    tflops = presets.paper_flops(41, counts["paper"]) / 1e12
    run.record("paper_tokens", counts["paper"])
    run.record("positions", counts["positions"])
    run.record("tflops_paper", round(tflops, 2))
    parts = presets.flops_parts(presets.V2)
    run.record("tflops_vit", round(parts["vision"] / 1e12, 2))
    run.record("tflops_llm", round(parts["llm"] / 1e12, 2))
    run.record("tflops_as_built", round(presets.flops(presets.V2, paper=False) / 1e12, 2))
    run.record("tflops_llava_hd", round(presets.flops(presets.PRESETS["llava-1.5-hd"]) / 1e12, 2))
    run.record("tflops_star", round(presets.flops(presets.PRESETS["dragonfly-star"]) / 1e12, 2))
    run.record("star_tokens", presets.image_tokens_paper(presets.PRESETS["dragonfly-star"]))
    assert counts["paper"] == 576 + 4 * 36 + 36 * 36, f"without CLS and separators the block has {counts['paper']} positions; the paper counts 576 + 4x36 + 36x36 = 2016"
    assert counts["positions"] == M.image_positions(presets.V2) == 2098, f"the release's block has {counts['positions']} positions, want 2098"
    assert round(tflops, 2) == 41.65, f"appendix F over your {counts['paper']} tokens: {tflops:.2f} TFLOPs; Table 11 prints 41.65"
    return f"{counts['paper']} paper tokens, {counts['positions']} positions; appendix F: {tflops:.2f} TFLOPs (Table 11: 41.65)"


@check(after_pass=True)
def the_toy_still_reads_and_scores(run):
    model, tok = toy.trained()
    said = toy.answer(model, tok)
    assert said == "7", f"the trained toy answered {said!r} about data/zoom/example.png, not '7'"
    records = toy.pages(run.out.parent / "pages", PAGES)
    accuracy, _ = toy.score(model, tok, records, run.out.parent / "pages")
    run.record("toy_answer", said)
    run.record("toy_accuracy", accuracy)
    assert accuracy >= 90, f"the toy scores {accuracy:.0f}% on {PAGES} held-out pages with your pooling (the project's: 100%)"
    return f"the toy answers '7' and scores {accuracy:.0f}% on {PAGES} held-out pages"


def observe(ref) -> str:
    v = ref["run"]["values"]
    return "\n".join([
        "| count | value |", "|---|---:|",
        f"| paper image tokens (576 + 4x36 + 36x36, no CLS, no separators) | {v['paper_tokens']} |",
        f"| release image positions (CLS kept, a separator after each crop) | {v['positions']} |",
        f"| TFLOPs, appendix F over the paper's tokens (Table 11: 41.65) | {v['tflops_paper']} |",
        f"| of which the ViT over 41 crops / the LLM over the tokens | {v['tflops_vit']} / {v['tflops_llm']} |",
        f"| TFLOPs as built (ViT to its feature layer, 2098 positions, grouped-query K/V, SwiGLU) | {v['tflops_as_built']} |",
        f"| LLaVA-1.5-HD, 2880 tokens (Table 11: 40.33) | {v['tflops_llava_hd']} |",
        f"| Dragonfly*, {v['star_tokens']} tokens (Table 11 prints 25.10) | {v['tflops_star']} |",
        "",
        f"The toy answers {v['toy_answer']!r} and scores {v['toy_accuracy']:.0f}% on {PAGES} held-out pages."])

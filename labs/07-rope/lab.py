"""
Lab 07 (optional), loading the release: rotary position embeddings (Llama 3's RoPE, Su et al.
2021; docs/release-facts.md#bf16-numerics).

The student writes `llama.rope_cos_sin` (the cos and sin tables for integer positions) and
`llama.apply_rope` (the rotation, in the "rotate-half" pairing of the Hugging Face weights the
project loads). The checks hold them to RoPE's defining properties, to Hugging Face's Llama
(tests/golden/llama.npz: logits of a tiny checkpoint, made by tests/make_golden.py) and to the
release's bf16 numerics (tests/golden/dragonfly_v2_bf16.npz, made by tests/make_golden_bf16.py),
where the frequencies are rounded to bf16 before the tables are built.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import llama
from lib import pretrained
from lib.images import crop_image
from labs import grader, toy
from labs.grader import check

sys.path.insert(0, str(grader.ROOT / "tests"))
import tiny_checkpoints  # noqa: E402  the goldens' tiny checkpoints, written from their seeds

TITLE = "Loading the release: RoPE"
PAPER = "Llama 3 (RoPE), the release's bf16 numerics"
FUNCTIONS = ["llama.rope_cos_sin", "llama.apply_rope"]
MINUTES = 40
GOLDEN = grader.ROOT / "tests" / "golden"
HEAD128 = llama.LlamaConfig(dim=256, n_heads=2)          # head width 128, as Llama-3-8B
TEXT = torch.arange(2098, 2120)[None]                    # where a v2 prompt's text sits
KERNEL_ULPS = 16                                         # tests/test_release_bf16.py's bound


def rotate(x, positions, dtype=torch.float32, cfg=HEAD128):
    cos, sin = llama.rope_cos_sin(llama.rope_frequencies(cfg), positions, dtype)
    return llama.apply_rope(x.to(dtype), cos, sin)


@check
def position_zero_is_the_identity_and_norms_stay(run):
    x = torch.randn(1, 1, 4, 128, generator=torch.Generator().manual_seed(0))
    grader.assert_close(rotate(x, torch.zeros(1, 4, dtype=torch.long)), x, "RoPE at position 0")
    y = rotate(x, torch.tensor([[3, 50, 700, 2100]]))
    pairs = lambda t: (t[..., :64] ** 2 + t[..., 64:] ** 2).sqrt()  # each pair's length
    grader.assert_close(pairs(y), pairs(x), "each (i, i + 64) pair's length after the rotation", atol=1e-4)
    return "position 0 leaves x as it is; every (i, i + d/2) pair keeps its length"


@check
def pairs_are_the_two_halves(run):
    x = torch.zeros(1, 1, 1, 128)
    x[..., 1] = 1.0
    theta = float(llama.rope_frequencies(HEAD128)[1]) * 7
    y = rotate(x, torch.tensor([[7]]))[0, 0, 0]
    want = torch.zeros(128)
    want[1], want[65] = np.cos(theta), np.sin(theta)
    grader.assert_close(y, want, "channel 1 at position 7 (rotate-half: it pairs with channel 65)", atol=1e-5)
    return "channel i turns towards channel i + d/2 by position x frequency i (the Hugging Face layout)"


@check
def scores_depend_on_the_distance_only(run):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 128, generator=g), torch.randn(1, 1, 1, 128, generator=g)
    near = (rotate(q, torch.tensor([[5]])) * rotate(k, torch.tensor([[2]]))).sum()
    far = (rotate(q, torch.tensor([[105]])) * rotate(k, torch.tensor([[102]]))).sum()
    grader.assert_close(far, near, "q.k at positions (105, 102) vs (5, 2)", atol=1e-4)
    return f"q.k at (5, 2) = at (105, 102) = {float(near):.4f}"


@check
def bf16_tables_round_the_frequencies_first(run):
    inv = llama.rope_frequencies(HEAD128)
    cos, _ = llama.rope_cos_sin(inv, TEXT, torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and tuple(cos.shape) == (1, 1, 22, 128), f"got {cos.dtype} {tuple(cos.shape)}"
    rounded = torch.cat([TEXT[0, :, None].double() * inv.to(torch.bfloat16).double()] * 2, dim=-1).cos()
    exact = torch.cat([TEXT[0, :, None].double() * inv.double()] * 2, dim=-1).cos()
    off = float((cos[0, 0].double() - rounded).abs().max())
    assert off <= 2 ** -8, (f"the bf16 cos table is {off:.3f} away from cos(position x bf16-rounded frequency); "
                            "the release casts its frequencies to bf16 before building the tables")
    moved = float((cos[0, 0].double() - exact).abs().max())
    run.record("phase_moved", round(moved, 3))
    return f"bf16 tables from bf16-rounded frequencies (at positions 2098+ that moves cos by up to {moved:.2f})"


@check
def llama_logits_match_hugging_face(run):
    for file, scaling in (("llama.npz", None), ("llama_rope3.npz", "llama3")):
        g = np.load(GOLDEN / file)
        with tempfile.TemporaryDirectory() as tmp:
            llm = pretrained.load_llama(tiny_checkpoints.write_tiny_llama(Path(tmp), rope_scaling=scaling))
        ids = torch.from_numpy(g["input_ids"])
        with torch.no_grad():
            grader.assert_close(llm(llm.embed(ids)), g["logits"], f"{file}: logits at positions 0..11", atol=1e-4)
            gap = torch.from_numpy(g["gap_positions"]).expand_as(ids)
            grader.assert_close(llm(llm.embed(ids), gap), g["logits_gap"], f"{file}: logits at positions 100.., 3100..", atol=1e-4)
    return "a tiny Llama's logits equal Hugging Face's (1e-4), at positions 0.., 100.. and 3100.., llama3 scaling too"


def first_token_ulps(m, g, crops) -> float:
    """max |first-token logits - the golden's|, in bf16 ulps of its largest |logit|."""
    with torch.no_grad():
        first = m(torch.from_numpy(g["text_ids"])[None], torch.from_numpy(crops.pixels)[None])[0][0, -1].float()
    ref = torch.from_numpy(g["first_logits_sub"])
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(ref.abs().max()))
    return float((first[::int(g["vocab_step"])] - ref).abs().max() / ulp)


@check(after_pass=True)
def bf16_first_token_matches_the_release(run):
    g = np.load(GOLDEN / "dragonfly_v2_bf16.npz")
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_checkpoints.write_tiny_dragonfly(Path(tmp), "v2", "bin", seed=int(g["checkpoint_seed"]), llm=tiny_checkpoints.LLM_HEAD128)
        m = pretrained.load(path, dtype=torch.bfloat16)
    crops = crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops)
    ours = first_token_ulps(m, g, crops)
    project = grader.original("llama.rope_cos_sin")
    with grader.swapped({"llama.rope_cos_sin": lambda inv, pos, dtype=torch.float32: project(inv, pos)}):
        unrounded = first_token_ulps(m, g, crops)   # the tables and rotation in float32, as before the fix
    run.record("ulps", round(ours, 2), stable=False)
    run.record("ulps_float32_rope", round(unrounded, 1), stable=False)
    assert ours <= KERNEL_ULPS, f"first-token logits {ours:.1f} bf16 ulps from the release's (the bound: {KERNEL_ULPS})"
    return f"bf16 v2 (2098 image positions): {ours:.2f} ulps from the release's first token; float32 RoPE: {unrounded:.0f}"


@check(after_pass=True)
def the_toy_still_reads_its_page(run):
    toy.reads_its_page(run)
    return "checkpoints/zoom-tiny answers '7' with your RoPE"


def observe(ref) -> str:
    v = ref["run"]["values"]
    return "\n".join([
        f"- Rounding the frequencies to bf16 moves cos(position x frequency) by up to {v['phase_moved']} at the text "
        "positions 2098.. of a v2 prompt (head width 128).",
        f"- The bf16 v2 golden's first-token logits: {v['ulps']} bf16 ulps from the release's with the rounding, "
        f"{v['ulps_float32_rope']} with float32 RoPE (the bound is {KERNEL_ULPS}).",
        f"- The toy answers {v['toy_answer']!r}."])

"""
Lab 05, where the answer looked (the v2 paper's claim that zoomed-in crops carry the fine detail,
§1 and §4.3, seen from the inside; lib/looked.py).

SDPA returns the attention's output, not its weights, so the picture `sample.py --show` draws
recomputes them for the answer's rows. The student writes `lib.looked.attention_weights`: one
layer's softmax rows from its own projections, RoPE and the causal mask. The checks hold it to
probabilities that respect the mask and to SDPA itself (weights x values = the attention's
output), then draw where the toy looked on its example page and share its attention among the
crop levels over 50 held-out pages.
"""
import statistics

import torch
import torch.nn.functional as F

import llama
from lib import looked
from lib.images import crop_image
from labs import grader, toy
from labs.grader import check

TITLE = "Where the answer looked"
PAPER = "v2 §1 and §4.3 (zoom-in carries the detail), attention shares"
FUNCTIONS = ["lib.looked.attention_weights"]
MINUTES = 35
PAGES = 50


def a_layer():
    """A random grouped-query attention layer (4 query heads, 2 kv heads), its input and RoPE."""
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=32)
    attn = llama.Attention(cfg)
    x = torch.randn(2, 12, 64)
    cos, sin = llama.rope_cos_sin(llama.rope_frequencies(cfg), torch.arange(12).expand(2, 12))
    return attn, x, cos, sin, torch.tensor([0, 5, 11])


@check
def rows_are_causal_probabilities(run):
    attn, x, cos, sin, rows = a_layer()
    with torch.no_grad():
        w = looked.attention_weights(attn, x, cos, sin, rows)
    assert tuple(w.shape) == (2, 4, 3, 12) and w.dtype == torch.float32, f"got {tuple(w.shape)} {w.dtype}, want (2, 4, 3, 12) float32"
    grader.assert_close(w.sum(-1), torch.ones(2, 4, 3), "each row's sum")
    for i, r in enumerate(rows.tolist()):
        future = float(w[:, :, i, r + 1:].abs().max()) if r + 1 < 12 else 0.0
        assert future == 0, f"query at position {r} gives weight {future:.3g} to a later position; the causal mask gives 0"
    return "(B, heads, rows, S) float32, each row sums to 1, nothing right of the diagonal"


@check
def weights_times_values_is_sdpa(run):
    attn, x, cos, sin, rows = a_layer()
    B, S, _ = x.shape
    h, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    with torch.no_grad():
        w = looked.attention_weights(attn, x, cos, sin, rows)
        q = llama.apply_rope(attn.q_proj(x).view(B, S, h, d).transpose(1, 2), cos, sin)
        k = llama.apply_rope(attn.k_proj(x).view(B, S, kv, d).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(B, S, kv, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, rows]  # (B, h, 3, d)
        ours = w @ v.repeat_interleave(h // kv, dim=1)
    grader.assert_close(ours, out, "your weights x the values vs SDPA's output (grouped-query, causal, RoPE, 1/sqrt(d))")
    return "weights @ values equals scaled_dot_product_attention at the answer's rows (1e-5)"


@check(after_pass=True)
def the_toy_looks_at_its_high_crops(run):
    model, tok = toy.trained()
    crops = crop_image(toy.EXAMPLE, model.cfg.crops)
    prompt = tok.encode_prompt(toy.QUESTION)
    answer = toy.answer_ids(model, tok, [dict(question=toy.QUESTION, image=toy.EXAMPLE.name)], toy.EXAMPLE.parent)[0]
    look = looked.show(model, tok, prompt, answer, crops, run.out / "looked.png", toy.QUESTION)
    shares = {level: round(100 * s, 1) for level, (s, _) in look.levels.items()} | {"text": round(100 * look.text, 1)}
    run.record("example", shares)
    assert tok.decode(answer).strip() == "7", f"the toy answered {tok.decode(answer)!r}, not '7'"
    assert shares["high"] > 50, f"the answer gives its high crops {shares['high']}% of its attention; the project's weights give most of it to them (handout, Observe)"
    return f"example page: {looked.summary(look)}; wrote {grader.shown(run.out / 'looked.png')}"


@check(after_pass=True)
def fifty_pages(run):
    model, tok = toy.trained()
    root = run.out.parent / "pages"
    records = toy.pages(root, PAGES)
    answers = toy.answer_ids(model, tok, records, root)
    per_level, ratios, right = {}, [], 0
    for r, ids in zip(records, answers):
        right += tok.decode(ids).strip() == r["answers"][0]
        levels = looked.look(model, tok.encode_prompt(r["question"]), ids, crop_image(root / r["image"], model.cfg.crops)).levels
        for level, (share, positions) in levels.items():
            per_level.setdefault(level, []).append(100 * share)
        ratios.append((levels["high"][0] / levels["high"][1]) / (levels["low"][0] / levels["low"][1]))
    mean = {level: round(statistics.mean(s), 1) for level, s in per_level.items()}
    more = sum(x > 1 for x in ratios)
    run.record("pages", dict(right=right, shares=mean, high_beats_low=more, median_ratio=round(statistics.median(ratios), 2)))
    assert right >= 0.9 * PAGES, f"the toy answered {right} of {PAGES} pages right"
    assert more > PAGES / 2 and statistics.median(ratios) > 1, (
        f"a high crop's position gets more of the answer's attention than a low one's on only {more} of {PAGES} pages "
        f"(median ratio {statistics.median(ratios):.2f}); the project's weights: the handout's Observe block")
    return (f"{PAGES} pages: {right} right; mean shares " + ", ".join(f"{k} {v}%" for k, v in mean.items())
            + f"; per position, high > low on {more}, median ratio {statistics.median(ratios):.2f}")


def observe(ref) -> str:
    v = ref["run"]["values"]
    ex, p = v["example"], v["pages"]
    return "\n".join([
        "| answer's attention | low | medium | high | text |", "|---|---:|---:|---:|---:|",
        f"| example page (`out/labs/05-where-it-looked/project/looked.png`) | {ex['low']}% | {ex['medium']}% | {ex['high']}% | {ex['text']}% |",
        f"| mean over {PAGES} held-out pages | {p['shares']['low']}% | {p['shares']['medium']}% | {p['shares']['high']}% | - |",
        "",
        f"Positions: low 18, medium 4 x 6 = 24, high 36 x 6 = 216. The toy answered {p['right']} of {PAGES} pages right; "
        f"per position, a high crop got more of the answer's attention than the low crop on {p['high_beats_low']} of "
        f"{PAGES} pages (median ratio {p['median_ratio']})."])

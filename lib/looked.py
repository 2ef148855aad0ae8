"""
Where the answer looked: the share of the answer's attention that went to each crop of the
image block, drawn over the crops (low, medium tiles, high tiles, each in its place), and for
v1 checkpoints which high crops the zoom-in selection kept (v1 paper §3.2).

    python sample.py --image data/zoom/example.png --show looked.png
    python -m tools.eval ... --show-dir DIR --show-n 5
    python -m tools.looked --pages 50      # the zoom model: high crops vs low crop over held-out pages

SDPA returns the attention output, not its weights, so they are recomputed for the answer's
rows only: one more pass of the LLM over [image block][prompt][answer] with a forward hook on
each layer's attention, which rebuilds the post-RoPE queries (answer rows) and keys (every
position) from the layer's own projections and takes softmax(q k^T / sqrt(d)) under the
causal mask. Generation itself is untouched: the hooks exist only inside `answer_attention`.

The rows are the queries that produced the answer's tokens (the last prompt position, then
every answer token but the last), averaged over heads and layers. A crop's share counts all
of its positions: CLS, its pooled cells and its separator; "text" is <|begin_of_text|> +
prompt + answer. Per answer token the crops and the text share 1.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import crops as crops_lib
import model as M
import pool
from lib import pretrained
from llama import apply_rope
from lib.tokenizer import Tokenizer
from lib.images import crop_image

REGION_COLOURS = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14)]  # one per medium crop
HEAT = np.array([220, 30, 20], np.float32)
PANEL = 360  # display side of each level's panel (px)


# ---- the attention rows SDPA does not return -----------------------------------------------
def attention_weights(attn, x, cos, sin, rows):
    """One layer's softmax rows. x (B, S, dim): the attention's input (after its RMSNorm); cos,
    sin (B, 1, S, d): the layer's RoPE tables; rows (n,) query positions -> (B, heads, n, S)
    float32, zero right of the causal diagonal: what SDPA (is_causal) weighs the values by."""
    B, S, _ = x.shape
    h, kv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x[:, rows]).view(B, len(rows), h, d).transpose(1, 2)   # (B, h, n, d)
    k = attn.k_proj(x).view(B, S, kv, d).transpose(1, 2)                   # (B, kv, S, d)
    q, k = apply_rope(q, cos[:, :, rows], sin[:, :, rows]), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // kv, dim=1)  # grouped-query: query head j reads kv head j // (h / kv)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)       # (B, h, n, S)
    future = torch.arange(S, device=x.device)[None, :] > rows[:, None]    # (n, S)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def answer_attention(model, block, prompt_ids, answer_ids):
    """block (P, dim): the image block the model built (None: text only) -> (layers, n, S)
    float32: each of the n answer tokens' attention over the S positions, mean over heads."""
    llm = model.llm
    text = llm.embed(torch.tensor(prompt_ids + answer_ids[:-1], device=llm.lm_head.weight.device))
    x = (text if block is None else torch.cat([block.to(text.dtype), text]))[None]  # (1, S, dim)
    S = x.shape[1]
    rows = torch.arange(S - len(answer_ids), S, device=x.device)
    per_layer = []

    def hook(attn, args, _output):
        x_norm, cos, sin = args[:3]
        per_layer.append(attention_weights(attn, x_norm, cos, sin, rows)[0].mean(dim=0))  # (n, S)

    handles = [layer.attn.register_forward_hook(hook) for layer in llm.layers]
    try:
        llm.hidden(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(per_layer)


# ---- which positions belong to which crop --------------------------------------------------
def crop_spans(cfg, kept=None) -> list:
    """(level, index in its level, first position, end position, pooled side) of each crop in
    the image block, in block order. kept: v1's selected high crops (ascending, as the model
    keeps them); the side is None where tokens are resampler latents, not a spatial grid."""
    spans, pos = [], 0
    for level, n, grid in M.crop_levels(cfg):
        for i in (kept if level == "high" and kept is not None else range(n)):
            end = pos + M.crop_tokens(cfg, grid) + cfg.separators
            spans.append((level, i, pos, end, None if cfg.resampler and level != "low" else grid))
            pos = end
    if pos != M.image_positions(cfg):
        raise ValueError(f"looked.py: crop spans cover {pos} positions, the image block has {M.image_positions(cfg)}")
    return spans


@dataclass
class Look:
    crops: list        # per crop in block order: dict(level, index, share, cells (side, side) or None)
    levels: dict       # level -> (share, positions)
    text: float        # share of <|begin_of_text|> + prompt + answer
    kept: list         # v1: the high crops kept by zoom-in selection (None for v2)
    per_token: torch.Tensor  # (n, S): each answer token's attention, mean over heads and layers
    layers: int
    heads: int


def shares(cfg, per_token, kept=None) -> Look:
    """Split the answer's attention (n, S), averaged over its n tokens, among the crops."""
    w = per_token.mean(dim=0)
    looks, levels = [], {}
    for level, i, start, end, side in crop_spans(cfg, kept):
        first = start + cfg.keep_cls
        cells = None if side is None else w[first:first + side * side].view(side, side)
        looks.append(dict(level=level, index=i, share=float(w[start:end].sum()), cells=cells))
        share, positions = levels.get(level, (0.0, 0))
        levels[level] = (share + looks[-1]["share"], positions + end - start)
    return Look(looks, levels, float(w[M.image_positions(cfg):].sum()), kept, per_token, 0, 0)


@torch.no_grad()
def look(model, prompt_ids, answer_ids, crops) -> Look:
    """The answer's attention over one image's crops (crops: `crop_image(..., model.cfg.crops)`)."""
    if not answer_ids:
        raise ValueError("looked.py: the answer is empty, there is no attention to show")
    cfg, device = model.cfg, model.llm.lm_head.weight.device
    pixels = torch.as_tensor(crops.pixels)[None].to(device)
    grids = ([crops.medium_grid], [crops.high_grid])
    block = model.image_block(pixels, *grids)[0]                                 # (P, dim)
    kept = None
    if cfg.zoom_select and cfg.crops.medium and cfg.crops.high:  # the selection image_block made
        levels = model.encode(pixels)
        kept = model.select_high(levels[-2], levels[-1], *grids)[0].tolist()
    per_layer = answer_attention(model, block, prompt_ids, answer_ids)           # (layers, n, S)
    result = shares(cfg, per_layer.mean(dim=0), kept)
    result.layers, result.heads = cfg.llm.n_layers, cfg.llm.n_heads
    return result


# ---- the picture ---------------------------------------------------------------------------
def _tile(pixels, side):
    """A CLIP-normalised crop (3, S, S) -> the RGB image the model saw, at side x side."""
    rgb = pixels.transpose(1, 2, 0) * np.array(crops_lib.CLIP_STD) + np.array(crops_lib.CLIP_MEAN)
    img = Image.fromarray(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
    return img.resize((side, side), Image.NEAREST if side >= img.width else Image.LANCZOS)


def _shade(tile, cells, strength):
    """Grey and wash the tile out (so the tint is the only colour), then tint each pooled cell
    by its weight relative to the crop's hottest cell, scaled by the crop's own strength (0..1)."""
    a = np.asarray(tile.convert("L").convert("RGB"), np.float32) * 0.55 + 255 * 0.45
    if cells is not None and strength > 0:
        c = cells.float().cpu().numpy()
        rel = c / c.max() if c.max() > 0 else c
        side = tile.width
        edges = np.round(np.linspace(0, side, len(rel) + 1)).astype(int)
        alpha = np.zeros((side, side), np.float32)
        for r in range(len(rel)):
            for col in range(len(rel)):
                alpha[edges[r]:edges[r + 1], edges[col]:edges[col + 1]] = rel[r, col]
        alpha = (0.85 * strength * alpha)[..., None]
        a = a * (1 - alpha) + HEAT * alpha
    return Image.fromarray(a.astype(np.uint8))


def draw(look_: Look, crops, cfg, caption=()) -> Image.Image:
    """Low, medium tiles and high tiles side by side, each crop tinted by its share of the
    answer's attention (the darkest = the largest share), its pooled cells within it by their
    weight, the share in % written on it; v1: kept high crops framed, each medium region outlined."""
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    grids = {"low": (1, 1), "medium": crops.medium_grid, "high": crops.high_grid}
    offsets = dict(zip(("low", "medium", "high"), np.cumsum((0,) + crops.counts)[:3]))
    by_crop = {(c["level"], c["index"]): c for c in look_.crops}
    top = max(c["share"] for c in look_.crops)
    levels = [name for name, _, _ in M.crop_levels(cfg)]
    pad, head = 16, 24
    sizes = {lv: (PANEL // max(grids[lv]) * grids[lv][0], PANEL // max(grids[lv]) * grids[lv][1]) for lv in levels}
    lines = [*caption, *legend(look_, cfg)]
    W = pad + sum(w + pad for w, _ in sizes.values())
    H = head + max(h for _, h in sizes.values()) + pad + 16 * len(lines) + pad
    canvas = Image.new("RGB", (max(W, 900), H), "white")
    d = ImageDraw.Draw(canvas)
    x0 = pad
    regions = None
    if look_.kept is not None and cfg.zoom_select != "global":
        n_medium, n_high = crops.counts[1], crops.counts[2]
        regions = (pool.release_regions(n_high, n_medium) if cfg.zoom_select == "release"
                   else pool.spatial_regions(crops.high_grid, crops.medium_grid))
    for lv in levels:
        cols, rows = grids[lv]
        t = PANEL // max(cols, rows)
        d.text((x0, 4), f"{lv}: {cols * rows} crop{'s' * (cols * rows > 1)} of {crops.pixels.shape[-1]} px, "
                        f"{100 * look_.levels[lv][0]:.1f}% in all", fill="black", font=font)
        for i in range(cols * rows):
            x, y = x0 + (i % cols) * t, head + (i // cols) * t
            c = by_crop.get((lv, i))
            tile = _tile(crops.pixels[offsets[lv] + i], t)
            if c is None:  # v1: a high crop the selection dropped, never seen by the LLM
                canvas.paste(Image.blend(tile, Image.new("RGB", tile.size, "white"), 0.7), (x, y))
            else:
                canvas.paste(_shade(tile, c["cells"], c["share"] / top if top else 0), (x, y))
                label, at = f"{100 * c['share']:.1f}", (x + 5, y + 4)  # inside the region outlines
                d.rectangle(d.textbbox(at, label, font=small), fill="white")
                d.text(at, label, fill="black", font=small)
            d.rectangle((x, y, x + t - 1, y + t - 1), outline=(120, 120, 120))
            if regions is not None and lv in ("medium", "high"):
                owner = i if lv == "medium" else next(m for m, r in enumerate(regions) if i in r)
                inset = 2 if lv == "high" else 1
                d.rectangle((x + inset, y + inset, x + t - 1 - inset, y + t - 1 - inset),
                            outline=REGION_COLOURS[owner % 4], width=2 if lv == "high" else 4)
            if look_.kept is not None and lv == "high" and c is not None:
                d.rectangle((x, y, x + t - 1, y + t - 1), outline="black", width=2)
        x0 += cols * t + pad
    y = head + max(h for _, h in sizes.values()) + pad
    for line in lines:
        d.text((pad, y), line, fill="black", font=small)
        y += 16
    return canvas


def legend(look_: Look, cfg) -> list:
    n = look_.per_token.shape[0]
    parts = [f"{lv} {100 * s:.1f}% ({100 * s / p:.3f}%/position)" for lv, (s, p) in look_.levels.items()]
    lines = [f"share of the answer's attention ({n} token{'s' * (n > 1)}; mean over {look_.layers} layers x "
             f"{look_.heads} heads): " + ", ".join(parts) + f", text {100 * look_.text:.1f}%",
             "number on a crop: its % (CLS + pooled cells + separator); tint: darker = larger share; "
             "within a crop, each pooled cell by its weight relative to the crop's hottest cell"]
    if look_.kept is not None:
        rule = {"release": "release rule: region i = high crops [6i, 6i+6)", "spatial": "spatial rule: the quadrant",
                "global": "global selection: no regions"}[cfg.zoom_select]
        n_high = dict((lv, n) for lv, n, _ in M.crop_levels(cfg))["high"]
        lines.append(f"v1 zoom-in selection kept the framed high crops ({len(look_.kept)} of {n_high}), "
                     f"faded = dropped; coloured outlines: each medium crop's region ({rule})")
    return lines


def show(model, tok, prompt_ids, answer_ids, crops, path, question="") -> Look:
    """Compute the answer's attention over the crops and write the picture to `path` (PNG)."""
    result = look(model, prompt_ids, answer_ids, crops)
    caption = [f"Q: {question}   A: {tok.decode(answer_ids)!r}"] if question else []
    draw(result, crops, model.cfg, caption).save(path, format="PNG")
    return result


def summary(result: Look) -> str:
    return ", ".join(f"{lv} {100 * s:.1f}%" for lv, (s, _) in result.levels.items()) + f", text {100 * result.text:.1f}%"

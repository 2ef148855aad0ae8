"""
The configurations the Dragonfly papers compare, by name, and what each one costs.

Every ablation row of the v2 paper (Tables 1, 2, 3, 7, 8, 11, 12) and of the v1 paper
(Tables 1, 5, 6) is one `model.DragonflyConfig` in `PRESETS`; `ROWS` says which table row it is.
A row that appears in several tables (the paper reuses runs: Table 2 "L + M" is Table 7's
"36 tokens") is one preset. LLaVA-UHD (v2 Tables 1, 11, 12) is a different architecture
(variable slices compressed to 64 tokens each) and is not built; only its FLOPs are computed.

Two token counts (docs/release-facts.md#image-block): `image_tokens_paper` is the papers'
accounting (no CLS, no separators: 2016 for Dragonfly); `model.image_positions` is the layout
the model really runs (the release keeps each crop's CLS and adds a separator after it: 2098).
Every preset here keeps the release layout, so the ablations differ from the release in one knob
at a time.

FLOPs follow v2 appendix F (Chinchilla-style forward FLOPs: the ViT over every crop, the
projection over the image tokens, the LLM over the image tokens); `flops(cfg)` reproduces
Table 11 (see its docstring for where the paper disagrees with itself).

    python -m tools.presets --describe dragonfly-v2     # one preset: crops, tokens, positions, TFLOPs
    python -m tools.presets --table                     # every preset, as a markdown table
"""
from dataclasses import replace

import crops as crops_lib
import model
import vit as vit_lib
from llama import LlamaConfig
from vit import ViTConfig

L14, B32 = vit_lib.PRESETS["l14-336"], vit_lib.PRESETS["b32-224"]
V2, V1 = model.v2_config(), model.v1_config()


def variant(base, crops=None, **fields) -> model.DragonflyConfig:
    """`base` with some fields changed; `crops` is a dict of `crops.CropConfig` changes."""
    return replace(base, crops=replace(base.crops, **(crops or {})), **fields)


PRESETS, ROWS = {}, {}


def grid_set(grids) -> str:
    return "{" + ", ".join(f"({c},{r})" for c, r in grids) + "}"


def preset(name, row, cfg):
    PRESETS[name], ROWS[name] = cfg, row


# ---- v2 paper (Llama-3.1-8B, CLIP ViT-L/14 @336; low 576 + 4 x 36 + 36 x 36 = 2016 tokens)
preset("dragonfly-v2", "released Llama-3.1-8B-Dragonfly-v2; v2 Tables 1, 11, 12 'Dragonfly' = Table 2 'L + M + H'", V2)
preset("v2-L", "v2 Table 2 'L' = Table 3 'Low-Resolution'", variant(V2, dict(medium=False, high=False)))
preset("v2-M", "v2 Table 2 'M'", variant(V2, dict(low=False, high=False)))
preset("v2-H", "v2 Table 2 'H'", variant(V2, dict(low=False, medium=False)))
preset("v2-LM", "v2 Table 2 'L + M' = Table 7 '36 tokens'", variant(V2, dict(high=False)))
preset("v2-LH", "v2 Table 2 'L + H' = Table 8 '36 tokens'", variant(V2, dict(medium=False)))
# Table 3: 4 crops of a 672 x 672 resize (no best fit), each pooled 24x24 -> 12x12, 576 tokens in all
preset("v2-M144-from-low", "v2 Table 3 'Medium-Resolution from Low-Resolution'",
       variant(V2, dict(low=False, high=False, medium_grids=((2, 2),), from_low=True), medium_pool=12))
preset("v2-M144-from-native", "v2 Table 3 'Medium-Resolution from Native-Resolution'",
       variant(V2, dict(low=False, high=False, medium_grids=((2, 2),)), medium_pool=12))
for side in (12, 8, 4):
    preset(f"v2-LM-{side * side}", f"v2 Table 7 '{side * side} tokens' (L + M, medium pooled to {side}x{side})",
           variant(V2, dict(high=False), medium_pool=side))
for side in (8, 4, 3):
    preset(f"v2-LH-{side * side}", f"v2 Table 8 '{side * side} tokens' (L + H, high pooled to {side}x{side})",
           variant(V2, dict(medium=False), high_pool=side))
preset("llava-1.5-hd", "v2 Tables 1, 11, 12 'LLaVA-1.5-HD' = Table 7 '576 tokens' (L + M unpooled, 2880 tokens)",
       variant(V2, dict(high=False), medium_pool=None))
preset("dragonfly-star", "v2 Tables 11, 12 'Dragonfly*' (low 8x8, medium 6x6, high 4x4: 784 tokens)",
       variant(V2, low_pool=8, high_pool=4))
# The text says 576 + 40 x 49 = 2,536 tokens; the Table 1 caption's "2,576" does not add up.
# crops.py cuts 336 px tiles for the L/14; the B/32 sees each resized to 224 (model.encode).
preset("v2-dual-encoder", "v2 Table 1 'Dual Encoder' (L/14@336 low, B/32@224 medium + high, unpooled)",
       variant(V2, vit=B32, vit_low=L14, medium_pool=None, high_pool=None))
preset("v2-resampler", "v2 Table 1 'Perceiver Resampler' (depth 3, 36 latents per medium/high crop)",
       variant(V2, resampler=True))

# ---- v1 paper (Llama-3-8B, CLIP ViT-B/32 @224, 50 tokens per crop, no pooling)
preset("dragonfly-v1", "released Llama-3-8B-Dragonfly-v1; v1 Table 1 'Ours' = Table 5 'Region selection' "
       "= Table 6 row 2 (+ the release's (2,12), (12,2) grids; release regions)", V1)
# Baselines (v1 §4.1): LLaVA-1.6 style, low + one "medium" grid set, every crop kept.
for i, grids in enumerate((((2, 2), (1, 4), (4, 1)), ((4, 4), (2, 8), (8, 2)), ((6, 4), (4, 6), (3, 8), (8, 3))), 1):
    preset(f"v1-baseline-{i}", f"v1 Table 1 'Baseline-{i}' (low + medium grids {grid_set(grids)})",
           variant(V1, dict(medium_grids=grids, high=False), zoom_select=None))
preset("v1-global", "v1 Table 5 'Global selection' (12 of the 24 high crops, from anywhere)",
       variant(V1, zoom_select="global"))
preset("v1-region-spatial", "v1 Table 5 'Region selection' with the paper's spatial regions (§3.2 prose)",
       variant(V1, zoom_select="spatial"))
for i, grids in enumerate((((4, 4), (2, 8), (8, 2)), ((6, 4), (4, 6), (3, 8), (8, 3)), ((6, 8), (8, 6), (4, 12), (12, 4))), 1):
    preset("v1-grid-{}x{}".format(*grids[0]), f"v1 Table 6 row {i}: high grids {grid_set(grids)}, 12 kept",
           variant(V1, dict(high_grids=grids)))

UHD = dict(crops=6, tokens=384, resolution="672 x 1008")  # v2 Table 11's inputs for LLaVA-UHD
UHD_NOTE = ("LLaVA-UHD (v2 Tables 1, 11, 12) slices the image at its native aspect ratio into at most 6 "
            "variable-size crops and compresses each to 64 tokens: a different architecture, not built here. "
            "Its FLOPs come from the appendix F formula with 6 crops and 384 tokens.")


# ---- token counts ----------------------------------------------------------------------------
def kept_crops(cfg) -> list:
    """(level, crops through the ViT, crops kept, tokens per kept crop in the paper's count)."""
    levels = model.crop_levels(cfg)
    n_medium = dict((name, n) for name, n, _ in levels).get("medium", 0)
    out = []
    for name, n, grid in levels:
        kept = min(n, n_medium * cfg.zoom_k) if name == "high" and cfg.zoom_select and n_medium else n
        out.append((name, n, kept, grid * grid))
    return out


def image_tokens_paper(cfg) -> int:
    """The papers' image tokens: no CLS, no separators (2016 Dragonfly, 784 Dragonfly*, 2880
    LLaVA-1.5-HD). The release layout, `model.image_positions`, adds both (2098). The v1 paper
    gives no count; the same rule gives 17 x 49 = 833 where its release runs 17 x (50 + 1) = 867."""
    return model.image_positions(replace(cfg, keep_cls=False, separators=False))


# ---- FLOPs -----------------------------------------------------------------------------------
def layer_flops(n_ctx, d_model, n_heads, d_ff, kv_dim=None, ff_mats=2) -> int:
    """Forward FLOPs of one transformer block over n_ctx tokens, as v2 appendix F counts them
    (after Chinchilla, Hoffmann et al. 2022, app. F): 2 FLOPs per multiply-add, full n^2
    attention (no causal halving), 3 per softmax score. The defaults are the appendix's;
    kv_dim < d_model counts grouped-query K/V and ff_mats=3 a gated (SwiGLU) MLP."""
    kv = d_model if kv_dim is None else kv_dim
    qkv = 2 * n_ctx * d_model * (d_model + 2 * kv)
    scores = 2 * n_ctx * n_ctx * d_model + 3 * n_heads * n_ctx * n_ctx + 2 * n_ctx * n_ctx * d_model
    out = 2 * n_ctx * d_model * d_model
    return qkv + scores + out + 2 * n_ctx * ff_mats * d_model * d_ff


def vit_flops(v: ViTConfig, blocks=None) -> int:
    """One crop: the patch embedding, then `blocks` encoder blocks (the appendix runs all 24)."""
    embed = 2 * v.patches_per_side ** 2 * v.patch_size ** 2 * 3 * v.width
    return embed + (v.layers if blocks is None else blocks) * layer_flops(v.tokens, v.width, v.heads, v.mlp_dim)


def llm_flops_paper(llm: LlamaConfig, n_ctx: int) -> int:
    """The appendix's LLM: 2 n d "embeddings" + blocks with full K/V and a two-matrix MLP."""
    return 2 * n_ctx * llm.dim + llm.n_layers * layer_flops(n_ctx, llm.dim, llm.n_heads, llm.ffn_dim)


def paper_flops(n_crops: int, n_tokens: int, vit: ViTConfig = L14, llm: LlamaConfig = None) -> float:
    """v2 appendix F, Listing 1, verbatim in arithmetic: ViT x crops + projection over n_tokens
    + LLM over n_tokens. LLaVA-UHD: paper_flops(6, 384) = 6.91e12."""
    llm = llm or LlamaConfig()
    return float(n_crops * vit_flops(vit) + 2 * vit.width * llm.dim * n_tokens + llm_flops_paper(llm, n_tokens))


def flops_parts(cfg, text_tokens=0, paper=True, image=True) -> dict:
    """Forward FLOPs of one sample by part: vision, resampler, projection, llm.

    paper=True is appendix F applied to the config: every ViT block, the projection and the LLM
    over the paper's token count, the LLM's blocks as the appendix writes them, text only if
    asked. paper=False counts the modules as built: the ViT up to `vision_layer` (23 of 24
    blocks), the projection over every ViT token (it runs before pooling), the resampler, the
    LLM over the release's positions + text with grouped-query K/V, a SwiGLU MLP and the
    lm_head over the text positions (`logits_from`). Both count full (non-causal) attention."""
    parts = dict(vision=0, resampler=0, projection=0, llm=0)
    n_image = 0
    for name, n, kept, tokens in (kept_crops(cfg) if image else []):
        v = cfg.vit_low if name == "low" and cfg.vit_low else cfg.vit
        blocks = None if paper else v.blocks_run(cfg.vision_layer)
        parts["vision"] += n * vit_flops(v, blocks)
        resampled = cfg.resampler and name != "low"
        if resampled and not paper:  # per layer: q, k/v over [patches; latents], scores, out, 4x MLP
            W, T, L = v.width, v.patches_per_side ** 2, tokens
            per_layer = 2 * L * W * W * 2 + 2 * (T + L) * 2 * W * W + 2 * 2 * L * (T + L) * W + 2 * L * 2 * W * 4 * W
            parts["resampler"] += n * cfg.resampler_depth * per_layer
        projected = kept * tokens if paper else n * (1 + (tokens if resampled else v.patches_per_side ** 2))
        parts["projection"] += 2 * v.width * cfg.llm.dim * projected
        n_image += kept * tokens
    llm = cfg.llm
    if paper:
        parts["llm"] = llm_flops_paper(llm, n_image + text_tokens)
    else:
        n_ctx = (model.image_positions(cfg) if image else 0) + text_tokens
        blocks = llm.n_layers * layer_flops(n_ctx, llm.dim, llm.n_heads, llm.ffn_dim, llm.n_kv_heads * llm.head_dim, 3)
        parts["llm"] = blocks + 2 * text_tokens * llm.dim * llm.vocab_size
    return {k: float(v) for k, v in parts.items()}


def flops(cfg, text_tokens=0, paper=True) -> float:
    """Forward FLOPs for one image (v2 appendix F; Table 11 with paper=True, no text):
    LLaVA-1.5-HD 40.33e12, Dragonfly 41.65e12, Dragonfly* 25.27e12 (LLaVA-UHD: `paper_flops`).

    The paper disagrees with itself twice, and we reproduce its formula, not its prose:
    - Listing 1 comments "40.40 TFLOPs" under the LLaVA-1.5 lines, yet those lines give 40.33,
      which is what Table 11 prints;
    - Table 11 prints 25.10 for Dragonfly* (41 crops, 784 tokens), yet the formula gives 25.27.
      Dragonfly*'s ViT and projection are those of Dragonfly (41 crops); no choice of inputs to
      the formula yields 25.10 with 784 tokens, so the printed value is likely from an earlier
      token budget or a transcription slip.
    For a dual-encoder config each crop is charged to its own ViT and projection width."""
    return sum(flops_parts(cfg, text_tokens, paper).values())


TRAINABLE = ("vision", "projection", "llm")  # v2 Table 10's switches (docs/release-facts.md#training-recipe)
FORWARD_ORDER = (("vision", "vision"), ("resampler", "projection"), ("projection", "projection"), ("llm", "llm"))


def prefill_flops(cfg, text_tokens: int) -> float:
    """FLOPs of generate's prefill, which bench.py holds its time against: the modules as built
    (flops_parts, paper=False), with the LLM's attention causal (half the scores) and the
    vocabulary projection over the last position only (generate's logits_from=-1)."""
    llm, n = cfg.llm, model.image_positions(cfg) + text_tokens
    scores = llm.n_layers * (4 * n * n * llm.dim + 3 * llm.n_heads * n * n)  # layer_flops' n^2 terms
    return sum(flops_parts(cfg, text_tokens, paper=False).values()) - scores / 2 \
        - 2 * (text_tokens - 1) * llm.dim * llm.vocab_size


def decode_bytes(dragonfly, context: int) -> int:
    """Bytes one decoded token reads, which bench.py holds its time against: every LLM weight
    once (the token's embedding row aside), and the KV cache of `context` positions."""
    llm = dragonfly.llm
    table = {id(p) for p in llm.embed_tokens.parameters()} - {id(p) for p in llm.lm_head.parameters()}
    weights = sum(p.numel() * p.element_size() for p in llm.parameters() if id(p) not in table)
    cfg, act = llm.cfg, llm.norm.weight.element_size()
    return weights + cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * context * act


def train_flops_per_sample(cfg, text_tokens: int, trainable=TRAINABLE, image=True) -> float:
    """Model FLOPs of one training step on one sample, for MFU (as-built counts, paper=False).

    Convention (per part, in forward order vision -> resampler -> projection -> llm):
      trained part                          3 x forward  (forward, grads of inputs, grads of weights)
      frozen part after a trained one       2 x forward  (forward, grads of inputs, to reach it)
      frozen part with nothing trained before it   1 x forward
    So stage 1 (`trainable=("projection",)`): vision 1x, projection 3x, llm 2x; stage 2: all 3x.
    The resampler belongs to "projection" (the new connector weights). Gradient-checkpointing
    recomputation is not counted (MFU counts the model's FLOPs, not the hardware's)."""
    unknown = set(trainable) - set(TRAINABLE)
    if unknown:
        raise ValueError(f"presets.py: unknown trainable parts {sorted(unknown)}; choose from {TRAINABLE}")
    parts = flops_parts(cfg, text_tokens, paper=False, image=image)
    total, upstream = 0.0, False
    for part, switch in FORWARD_ORDER:
        trained = switch in trainable
        total += parts[part] * (3 if trained else 2 if upstream else 1)
        upstream |= trained
    return total


# ---- toy sizes ---------------------------------------------------------------------------------
def tiny(cfg, vit_width=64, llm_dim=16, layers=2) -> model.DragonflyConfig:
    """The same geometry (crops per level, token grids, pooling, zoom, positions) at toy widths:
    patch size 1, so a crop is grid x grid pixels (24 for L/14, 7 for B/32), and heads =
    width / 64 as `release_format.vit_from_weights` infers them. For tests and CPU smoke runs."""
    def shrink(v):
        return v and ViTConfig(v.patches_per_side, 1, vit_width, layers, max(1, vit_width // 64), 2 * vit_width)
    vit, vit_low = shrink(cfg.vit), shrink(cfg.vit_low)
    llm = LlamaConfig(dim=llm_dim, n_layers=layers, n_heads=2, n_kv_heads=1, ffn_dim=2 * llm_dim)
    return replace(cfg, vit=vit, vit_low=vit_low, llm=llm, crops=replace(cfg.crops, size=(vit_low or vit).image_size))


# ---- CLI ---------------------------------------------------------------------------------------
def vit_name(v: ViTConfig) -> str:
    names = {"l14-336": "CLIP ViT-L/14@336", "b32-224": "CLIP ViT-B/32@224"}
    return next((names[k] for k, p in vit_lib.PRESETS.items() if p == v), f"ViT {v.width}w/{v.layers}L/p{v.patch_size}@{v.image_size}")


def summary(name) -> dict:
    cfg = PRESETS[name]
    crops = kept_crops(cfg)
    return dict(name=name, row=ROWS[name],
                crops=" + ".join(f"{n}" if n == kept else f"{n}->{kept}" for _, n, kept, _ in crops),
                per_crop=" / ".join(f"{level[0].upper()} {t}" for level, _, _, t in crops),
                paper=image_tokens_paper(cfg), positions=model.image_positions(cfg), tflops=flops(cfg) / 1e12)


def describe(name) -> str:
    if name.lower() in ("llava-uhd", "uhd"):
        return f"llava-uhd  (not built)\n  {UHD_NOTE}\n  TFLOPs (v2 App. F)  {paper_flops(UHD['crops'], UHD['tokens']) / 1e12:.2f}"
    if name not in PRESETS:
        raise KeyError(f"presets.py: unknown preset {name!r}; known: {', '.join(PRESETS)}, llava-uhd")
    cfg, s = PRESETS[name], summary(name)
    lines = [f"{name}  --  {s['row']}",
             f"  vision              {vit_name(cfg.vit)}" + (f" (medium/high), {vit_name(cfg.vit_low)} (low)" if cfg.vit_low else ""),
             f"  crops               " + ", ".join(f"{lv} {n}" + (f" ({kept} kept by zoom-in selection)" if kept != n else "")
                                                  for lv, n, kept, _ in kept_crops(cfg)) + f"  ({cfg.crops.size} px)",
             f"  tokens per crop     " + ", ".join(f"{lv} {t}" for lv, _, _, t in kept_crops(cfg))
             + ("  (Perceiver Resampler on medium/high)" if cfg.resampler else ""),
             f"  paper tokens        {s['paper']}  (no CLS, no separators)",
             f"  release positions   {s['positions']}  (CLS {'kept' if cfg.keep_cls else 'dropped'}, "
             f"{'a separator after each crop' if cfg.separators else 'no separators'})",
             f"  TFLOPs (v2 App. F)  {s['tflops']:.2f}   as built: {flops(cfg, paper=False) / 1e12:.2f}",
             f"  (the paper's figure: appendix F's formula over the {s['paper']} paper tokens; as built: the modules this "
             f"code runs, the ViT to its feature layer, the projection before pooling, the LLM over {s['positions']} positions)"]
    return "\n".join(lines)


# ---- the zoom demo's model (train.py --model tiny) -----------------------------------------
def tiny_config(low_only=False, preset="", high_pool=0) -> model.DragonflyConfig:
    """The zoom demo's model: 56 px crops (medium 112, high 336) cut into 7 px patches, a 3-block
    ViT read at block 2, a 2-layer Llama with the real Llama-3 vocabulary and tied embeddings so
    the checkpoint stays small. The medium and high crops pool their 8x8 grids to 2x2 (kernel 4,
    the release's 24x24 -> 6x6): the zoom data repeat the answer all over the page, so averaging
    loses nothing and the LLM reads 258 image positions instead of 738.
    The paper's ablations at this scale (data/zoom/ablations.py): `preset` keeps the resolution
    levels of a preset above (v2 Table 2); `high_pool` pools the high crops to the
    paper's sides (v2 Table 8), adaptively where the side does not divide 8 (3x3, 6x6)."""
    cfg = model.v2_config(ViTConfig(56, 7, 64, 3, 1, 256),
                          LlamaConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                                      tie_embeddings=True, max_seq_len=1024))
    cfg = replace(cfg, crops=replace(crops_lib.V2, size=56), low_pool=4, medium_pool=2, high_pool=2)
    if low_only:
        cfg = replace(cfg, crops=replace(cfg.crops, medium=False, high=False))
    if preset:
        levels = PRESETS[preset].crops
        cfg = replace(cfg, crops=replace(cfg.crops, low=levels.low, medium=levels.medium, high=levels.high))
    if high_pool:  # 8x8 unpooled: 36 x 66 high positions, beyond the demo's context of 1024
        cfg = replace(cfg, high_pool=high_pool, adaptive_pool=bool(8 % high_pool), llm=replace(cfg.llm, max_seq_len=4096))
    return cfg


def table() -> str:
    rows = ["| preset | paper row | crops (L + M + H) | tokens per crop | paper tokens | positions | TFLOPs |",
            "|---|---|---|---|---:|---:|---:|"]
    for name in PRESETS:
        s = summary(name)
        rows.append(f"| `{name}` | {s['row']} | {s['crops']} | {s['per_crop']} | {s['paper']} | {s['positions']} | {s['tflops']:.2f} |")
    uhd = paper_flops(UHD["crops"], UHD["tokens"]) / 1e12
    rows.append(f"| llava-uhd (not built) | v2 Tables 1, 11, 12 'LLaVA-UHD' | <= 6 | 64 | {UHD['tokens']} | – | {uhd:.2f} |")
    return "\n".join(rows)

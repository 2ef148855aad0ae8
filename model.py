"""
Dragonfly: a Llama-3 decoder that reads an image as multi-resolution crops (Dragonfly v2
paper, "Multi-Crop Zoom-In + Mean Pooling", Figure 1; Dragonfly v1 paper for zoom-in selection).

Figure 1, in the order of `Dragonfly.image_block`:
  1. crops.py cuts the image into low (1) + medium (4) + high (36) crops of 336 px;
  2. all 41 crops go through the CLIP ViT in one batched call (penultimate layer, CLS kept);
  3. one linear projection maps every token into the LLM's embedding space;
  4. the low crop keeps its 577 tokens; each medium/high crop keeps CLS + 6x6 mean-pooled
     tokens (pool.py) — v1 instead keeps 12 of 24 high crops by zoom-in selection;
  5. each crop's tokens are followed by one separator embedding (<|reserved_special_token_1|>);
  6. the image block (2098 positions in the release) comes first, then <|begin_of_text|> and
     the chat prompt; positions run 0..L-1 and attention is causal over everything.
Paper vs release: the paper counts 2016 image tokens (no CLS, no separators); the release,
whose weights we load, keeps CLS and adds separators. We follow the release
(docs/release-facts.md#image-block).
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import crops as crops_lib
import pool
import vit as vit_lib
from llama import KVCache, Llama, LlamaConfig
from vit import ViTConfig, VisionTransformer

SEPARATOR_ID = 128003  # <|reserved_special_token_1|>: after every crop


@dataclass
class DragonflyConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    crops: crops_lib.CropConfig = field(default_factory=lambda: crops_lib.V2)
    vision_layer: int = -2            # penultimate ViT block (docs/release-facts.md#features)
    low_pool: Optional[int] = None    # pooled cells per side of each crop; None keeps every patch
    medium_pool: Optional[int] = 6
    high_pool: Optional[int] = 6
    adaptive_pool: bool = False       # allow pooled sides that do not divide the patches per side (pool.mean_pool)
    keep_cls: bool = True             # the release keeps each crop's CLS token
    separators: bool = True           # one separator embedding after each crop
    zoom_select: Optional[str] = None  # v1: "release" | "spatial" | "global" selection of high crops
    zoom_k: int = 3                    # high crops kept per medium crop (v1)
    # Ablations of the v2 paper, Table 1 (lib/presets.py); the defaults are the release.
    vit_low: Optional[ViTConfig] = None  # dual encoder: the low crop gets its own ViT + projection
    resampler: bool = False              # Perceiver Resampler instead of mean pooling (medium/high)
    resampler_depth: int = 3


def v2_config(vit: ViTConfig = None, llm: LlamaConfig = None) -> DragonflyConfig:
    return DragonflyConfig(vit=vit or vit_lib.PRESETS["l14-336"], llm=llm or LlamaConfig())


def v1_config(vit: ViTConfig = None, llm: LlamaConfig = None) -> DragonflyConfig:
    return DragonflyConfig(vit=vit or vit_lib.PRESETS["b32-224"], llm=llm or LlamaConfig(), crops=crops_lib.V1,
                           medium_pool=None, high_pool=None, zoom_select="release")


def crop_tokens(cfg: DragonflyConfig, side: Optional[int]) -> int:
    n = (side or cfg.vit.patches_per_side) ** 2
    return n + 1 if cfg.keep_cls else n


def crop_levels(cfg: DragonflyConfig) -> list:
    """(level, crops, side kept) of each level present, in crops.py order. Crops are those the
    ViT sees (before v1's zoom-in selection); the side is the pooled one (cells per side), else the
    encoder's patches per side."""
    c = cfg.crops
    n_medium = math.prod(c.medium_grids[0])  # every candidate grid of a set has as many tiles
    n_high = math.prod(c.high_grids[0]) if c.high_grids else n_medium * c.high_scale ** 2
    levels = [("low", 1, cfg.low_pool or (cfg.vit_low or cfg.vit).patches_per_side),
              ("medium", n_medium, cfg.medium_pool or cfg.vit.patches_per_side),
              ("high", n_high, cfg.high_pool or cfg.vit.patches_per_side)]
    return [level for level, present in zip(levels, (c.low, c.medium, c.high)) if present]


def kept_levels(cfg: DragonflyConfig) -> list:
    """`crop_levels` after v1's zoom-in selection: (level, crops in the image block, side kept)."""
    levels = crop_levels(cfg)
    n_medium = dict((name, n) for name, n, _ in levels).get("medium", 0)
    if cfg.zoom_select and n_medium:
        levels = [(name, min(n, n_medium * cfg.zoom_k) if name == "high" else n, side) for name, n, side in levels]
    return levels


def image_positions(cfg: DragonflyConfig) -> int:
    """Length of the image block: 2098 for the released v2, 867 for v1
    (docs/release-facts.md#image-block)."""
    return sum(count * (crop_tokens(cfg, side) + cfg.separators) for _, count, side in kept_levels(cfg))


class Dragonfly(nn.Module):
    def __init__(self, cfg: DragonflyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vit)
        self.projection = nn.Linear(cfg.vit.width, cfg.llm.dim)  # "vision_embed_tokens" in the release
        self.llm = Llama(cfg.llm)
        # v2 Table 1 ablations: a second encoder for the low crop, a learned token reduction
        self.vision_low = VisionTransformer(cfg.vit_low) if cfg.vit_low else None
        self.projection_low = nn.Linear(cfg.vit_low.width, cfg.llm.dim) if cfg.vit_low else None
        self.resampler = new_resampler(cfg) if cfg.resampler else None

    # ---- the image block -------------------------------------------------------------------
    def encode(self, pixels):
        """pixels (B, N, 3, S, S) -> projected tokens of each level present [(B, n, T, dim)], in
        crops.py order. The shared ViT sees every crop in one batched call (Figure 1, steps 2-3)."""
        cfg, B = self.cfg, pixels.shape[0]
        counts = [n for _, n, _ in crop_levels(cfg)]
        if sum(counts) != pixels.shape[1]:
            raise ValueError(f"this config expects {sum(counts)} crops per image, got {pixels.shape[1]}")
        if self.vision_low is not None or self.resampler is not None:
            return self.encode_ablation(pixels)
        tokens = self.vision(pixels.flatten(0, 1), layer=cfg.vision_layer)  # (B*N, 577, 1024), penultimate block
        return list(self.projection(tokens).unflatten(0, (B, -1)).split(counts, dim=1))  # [(B, n, 577, 4096)]

    def encode_ablation(self, pixels):
        """`encode` for the v2 paper's Table 1 baselines (not the release): a dual encoder (the low
        crop through its own ViT and projection, the medium and high crops through a smaller ViT at
        its own resolution), or a Perceiver Resampler reducing each medium/high crop's patches."""
        cfg, B = self.cfg, pixels.shape[0]
        levels = crop_levels(cfg)
        out = []
        if self.vision_low is not None and levels[0][0] == "low":
            out.append(self.projection_low(self.vision_low(pixels[:, 0], layer=cfg.vision_layer))[:, None])
            pixels, levels = pixels[:, 1:], levels[1:]                      # (B, 1, 577, dim) done
        if not levels:
            return out
        x = pixels.flatten(0, 1)
        if x.shape[-1] != cfg.vit.image_size:  # B/32 sees the sub-images at 224 (v2 §4.2)
            x = F.interpolate(x, size=cfg.vit.image_size, mode="bicubic", antialias=True, align_corners=False)
        tokens = self.vision(x, layer=cfg.vision_layer).unflatten(0, (B, -1))  # (B, N', T, width)
        for (name, _, _), part in zip(levels, tokens.split([n for _, n, _ in levels], dim=1)):
            if self.resampler is not None and name != "low":  # reads the patch tokens; CLS kept as with pooling
                latents = self.resampler(part[:, :, 1:].flatten(0, 1)).unflatten(0, part.shape[:2])
                part = torch.cat([part[:, :, :1], latents], dim=2)           # (B, n, 1 + 36, width)
            out.append(self.projection(part))
        return out

    def image_block(self, pixels, medium_grid=None, high_grid=None):
        """pixels (B, N, 3, S, S), the crops of B images in crops.py order -> (B, P, dim)."""
        cfg, c = self.cfg, self.cfg.crops
        B = pixels.shape[0]
        # side: the grid side each level keeps (pooled, else the encoder's); the medium_grid and
        # high_grid arguments are the tile grids (cols, rows) crops.py chose for each image
        levels = [(tokens, side) for tokens, (_, _, side) in zip(self.encode(pixels), crop_levels(cfg))]
        if cfg.zoom_select and c.high and c.medium:  # v1: keep k high crops per medium crop (v1 §3.2)
            (medium, _), (high, side) = levels[-2], levels[-1]
            idx = self.select_high(medium, high, medium_grid, high_grid)                # (B, 4k)
            levels[-1] = (high[torch.arange(B, device=idx.device)[:, None], idx], side)  # (B, 4k, T, dim)
        sep = self.llm.embed(torch.tensor([SEPARATOR_ID], device=pixels.device))  # (1, dim)
        block = []
        for level, side in levels:                               # (B, n, T, dim)
            b, n, T, D = level.shape
            x = level.flatten(0, 1)                              # (B*n, 1 + side_in^2, dim)
            side_in = math.isqrt(T - 1)  # the grid the ViT (or the resampler) gave: 24 for L/14@336
            # the pooling rule (v2 §3.2): a level kept at a smaller side than it was encoded is
            # mean-pooled to side x side (low: 24 = 24, kept; medium and high: 24 -> 6)
            if side < side_in or not cfg.keep_cls:
                x = pool.mean_pool(x, side, keep_cls=cfg.keep_cls, adaptive=cfg.adaptive_pool)  # (B*n, 1 + 36, dim)
            if cfg.separators:
                x = torch.cat([x, sep.to(x.dtype).expand(x.shape[0], 1, D)], dim=1)
            block.append(x.reshape(b, -1, D))
        return torch.cat(block, dim=1)

    def select_high(self, medium, high, medium_grid=None, high_grid=None):
        """v1 zoom-in selection: which high crops to keep, k per medium crop (global: 4k in all).
        medium (B, 4, T, D), high (B, H, T, D) projected tokens -> indices (B, 4k), ascending.
        The grids (per image, (cols, rows)) are needed only for the paper's spatial regions."""
        cfg = self.cfg
        m_sum, h_sum = pool.summary(medium.flatten(0, 1)), pool.summary(high.flatten(0, 1))
        m_sum, h_sum = m_sum.unflatten(0, medium.shape[:2]), h_sum.unflatten(0, high.shape[:2])  # (B, 4|H, D)
        chosen = []
        for b in range(high.shape[0]):
            if cfg.zoom_select == "global":
                chosen.append(pool.select_global_topk(m_sum[b], h_sum[b], cfg.zoom_k * medium.shape[1]))
                continue
            if cfg.zoom_select == "release":
                regions = pool.release_regions(high.shape[1], medium.shape[1])
            elif medium_grid is None or high_grid is None:
                raise ValueError("spatial zoom selection needs the medium and high grids of each image")
            else:
                regions = pool.spatial_regions(high_grid[b], medium_grid[b])
            chosen.append(pool.select_region_topk(m_sum[b], h_sum[b], regions, cfg.zoom_k))
        return torch.stack(chosen)

    # ---- the language model over [image block][text] ----------------------------------------
    def forward(self, tokens, pixels=None, labels=None, grids=(None, None), reduction="mean"):
        """tokens (B, T) text ids starting with <|begin_of_text|>; pixels (B, N, 3, S, S) or None.
        Without labels: (logits over the text positions (B, T, vocab), None).
        With labels (B, T; -100 = ignored): (None, next-token cross-entropy, position t predicting
        labels[t + 1], "mean" or "sum" over the supervised positions). Only those positions go
        through the vocabulary projection: (B, T, 128256) float32 logits would dominate memory."""
        h = self.text_hidden(tokens, pixels, grids)                     # (B, T, dim)
        if labels is None:
            return self.llm.lm_head(h), None
        rows, targets = h[:, :-1], labels[:, 1:]
        supervised = targets != -100
        logits = self.llm.lm_head(rows[supervised])                     # (n supervised, vocab)
        return None, F.cross_entropy(logits.float(), targets[supervised], reduction=reduction)

    def text_hidden(self, tokens, pixels=None, grids=(None, None)):
        """[image block][text] through the LLM -> the final hidden states of the text positions
        (B, T, dim). grids: per-image (cols, rows) lists, for v1's "spatial" selection only."""
        x = self.llm.embed(tokens)
        P = 0
        if pixels is not None:
            image = self.image_block(pixels, *grids).to(x.dtype)        # (B, P, dim)
            P = image.shape[1]
            x = torch.cat([image, x], dim=1)  # the image block comes first (docs/release-facts.md#image-block)
        if P + tokens.shape[1] > self.cfg.llm.max_seq_len:
            raise ValueError(f"sequence of {P + tokens.shape[1]} positions exceeds the context of {self.cfg.llm.max_seq_len}")
        return self.llm.hidden(x)[:, P:]

    @torch.no_grad()
    def generate(self, prompts, images=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
                 stop_ids=(), generator=None, progress=None):
        """Yield (token ids (B,), log-probabilities (B,)) one step at a time.
        prompts: list of B token-id lists (each starting with <|begin_of_text|>); images: list of
        B `crops.Crops` (`crops.make_crops`) or None (text only). Prompts are left-padded to a common
        length; padding is masked out and does not shift positions. Stops when every row has
        produced a stop id. Log-probabilities are log-softmax of the float32 logits.
        progress: called with what the prefill is doing, before each of its slow parts."""
        say = progress or (lambda what: None)
        device = self.llm.lm_head.weight.device
        images = images or [None] * len(prompts)
        seqs = [self.llm.embed(torch.tensor(p, device=device)) for p in prompts]
        with_image = [i for i, im in enumerate(images) if im is not None]
        if with_image:
            pix = torch.stack([torch.as_tensor(images[i].pixels) for i in with_image]).to(device)
            say(f"ViT over {pix.shape[0] * pix.shape[1]} crops")
            blocks = self.image_block(pix, [images[i].medium_grid for i in with_image],
                                      [images[i].high_grid for i in with_image])
            for j, i in enumerate(with_image):
                seqs[i] = torch.cat([blocks[j].to(seqs[i].dtype), seqs[i]])
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        B, L, ctx = len(seqs), int(lengths.max()), self.cfg.llm.max_seq_len
        if L >= ctx:
            raise ValueError(f"prompt is {L} positions (image block included); the context is {ctx}")
        max_new_tokens = min(max_new_tokens, ctx - L)
        x = torch.stack([F.pad(s, (0, 0, L - len(s), 0)) for s in seqs])    # (B, L, dim)
        pad = L - lengths                                                   # left padding per row
        pad = pad if bool(pad.any()) else None
        caches = new_caches(self.llm, B, L + max_new_tokens)
        say(f"LLM over {B * L} positions")
        logits = prefill(self.llm, caches, x, pad=pad)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
        for step in range(max_new_tokens):
            token, logprob = next_token(logits, temperature, top_p, generator)
            yield token, logprob
            done |= torch.isin(token, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = decode_one_token(self.llm, caches, token, L + step, pad)


def new_resampler(cfg: DragonflyConfig) -> pool.PerceiverResampler:
    """The v2 Table 1 resampler: depth 3, one latent per pooled token (6x6 = 36), at the ViT's
    width, before the projection (IDEFICS resamples the vision features, not the LLM inputs)."""
    if cfg.medium_pool != cfg.high_pool or not cfg.high_pool:
        raise ValueError(f"resampler: medium_pool and high_pool set its latents and must agree, got {cfg.medium_pool}, {cfg.high_pool}")
    return pool.PerceiverResampler(cfg.vit.width, cfg.resampler_depth, cfg.high_pool ** 2, heads=cfg.vit.heads)


# ---- generation: one prefill, then one token at a time (gpt-fast's generate.py) ----------------
# Dragonfly.generate (a batch of prompts), lib/conversation.py (turns after a cached prefix), tools/eval.py's
# and lib/looked.py's greedy answers (`greedy_ids`) all generate with these functions.
def new_caches(llm: Llama, batch: int, size: int) -> list:
    """Empty KV caches (one llama.KVCache per layer) for `batch` rows of `size` positions, in the
    activations' dtype."""
    cfg, norm = llm.cfg, llm.norm.weight
    return [KVCache(batch, size, cfg.n_kv_heads, cfg.head_dim, norm.dtype, norm.device) for _ in llm.layers]


def prefill(llm: Llama, caches: list, x, start: int = 0, pad=None):
    """Embeddings x (B, T, dim) (image block and text) through the LLM, their keys and values
    written to `caches` at slots start..start+T-1, after the `start` positions already there
    -> the last position's logits (B, vocab). pad (B,): a batch's left padding per row (start 0),
    masked out and not counted in the positions; None: no row is padded."""
    T = x.shape[1]
    positions = mask = None  # positions = slots; a fresh prefill is causal (llama.Attention)
    if pad is not None:
        slots = torch.arange(T, device=x.device)
        positions = (slots - pad[:, None]).clamp(min=0)                 # (B, T)
        real = slots[None, :] >= pad[:, None]                           # (B, T) not padding
        causal = slots[:, None] >= slots[None, :]                       # (T, T)
        # Not part of the paper: a padding position sees no real position, and a query row
        # with nothing to attend to is NaN on some attention kernels (PyTorch before 2.5; on
        # 2.13's CPU kernels it is zeros, so no test here fails without it). Letting each
        # position see itself keeps every row finite; real positions never see padding.
        mask = (causal & real[:, None]) | torch.eye(T, dtype=torch.bool, device=x.device)
        mask = mask[:, None]                                            # (B, 1, T, T)
    elif start > 0 and T > 1:  # new tokens see the cache and each other causally, no later slot
        slots = torch.arange(start + T, device=x.device)
        mask = (slots[None, :] <= slots[start:, None])[None, None]      # (1, 1, T, start+T)
    return cached_forward(llm, caches, x, positions, start, mask)


def decode_one_token(llm: Llama, caches: list, token, slot: int, pad=None):
    """One token per row (B,) at cache slot `slot`, seeing every slot before it but `prefill`'s
    padding -> its logits (B, vocab). Its position is the slot less the row's padding."""
    positions = mask = None  # one new token sees the whole cache
    if pad is not None:
        positions = (slot - pad)[:, None]                               # (B, 1)
        real = torch.arange(slot + 1, device=pad.device)[None, :] >= pad[:, None]
        mask = real[:, None, None]                                      # (B, 1, 1, slot+1)
    return cached_forward(llm, caches, llm.embed(token[:, None]), positions, slot, mask)


def cached_forward(llm: Llama, caches: list, x, positions, start: int, mask):
    """The LLM's last logits (B, vocab), reading and writing `caches`. The caches belong to the
    caller (a conversation, a batch of prompts), not to the model, which meanwhile serves other
    work (another conversation, training, lib/looked.py)."""
    return llm(x, positions, start=start, mask=mask, logits_from=-1, caches=caches)[:, -1]


def next_token(logits, temperature: float, top_p: float, generator=None):
    """logits (B, vocab) -> the chosen ids (B,) (`sample`) and their log-probabilities (B,),
    log-softmax of the float32 logits."""
    token = sample(logits, temperature, top_p, generator)
    return token, torch.log_softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]


def sample(logits, temperature: float, top_p: float, generator=None):
    """Greedy when temperature is 0; otherwise softmax(logits / T) restricted to the smallest
    set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def greedy_ids(model: Dragonfly, prompts, images, max_new_tokens: int, stop_ids) -> list:
    """Batched greedy answers as token-id lists (generate's arguments); each row ends before its
    first stop id, the batch when every row has stopped."""
    ids, stopped = [[] for _ in prompts], [False] * len(prompts)
    for token, _ in model.generate(prompts, images, max_new_tokens=max_new_tokens, stop_ids=stop_ids):
        for i, t in enumerate(token.tolist()):
            stopped[i] = stopped[i] or t in stop_ids
            if not stopped[i]:
                ids[i].append(t)
    return ids


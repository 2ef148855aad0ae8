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
whose weights we load, keeps CLS and adds separators. We follow the release (SPEC §2.8).
"""
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import crops as crops_lib
import pool
import vit as vit_lib
import weights
from llama import Llama, LlamaConfig
from llama import checkpoint_key as llama_key
from vit import ViTConfig, VisionTransformer
from vit import checkpoint_key as vit_key

# Buffers older transformers versions saved next to the weights: recomputed here, never loaded.
SAVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")


def saved_buffer(key: str) -> bool:
    return key.endswith(SAVED_BUFFERS)


IMAGE_ID = 128002      # <|reserved_special_token_0|>: placeholder at image positions
SEPARATOR_ID = 128003  # <|reserved_special_token_1|>: after every crop


@dataclass
class DragonflyConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    crops: crops_lib.CropConfig = field(default_factory=lambda: crops_lib.V2)
    vision_layer: int = -2            # penultimate ViT block (SPEC §2.5)
    low_pool: Optional[int] = None    # pooled grid side per crop; None keeps the full grid
    medium_pool: Optional[int] = 6
    high_pool: Optional[int] = 6
    keep_cls: bool = True             # the release keeps each crop's CLS token
    separators: bool = True           # one separator embedding after each crop
    zoom_select: Optional[str] = None  # v1: "release" | "spatial" | "global" selection of high crops
    zoom_k: int = 3                    # high crops kept per medium crop (v1)


def v2_config(vit: ViTConfig = None, llm: LlamaConfig = None) -> DragonflyConfig:
    return DragonflyConfig(vit=vit or vit_lib.PRESETS["l14-336"], llm=llm or LlamaConfig())


def v1_config(vit: ViTConfig = None, llm: LlamaConfig = None) -> DragonflyConfig:
    return DragonflyConfig(vit=vit or vit_lib.PRESETS["b32-224"], llm=llm or LlamaConfig(), crops=crops_lib.V1,
                           medium_pool=None, high_pool=None, zoom_select="release")


def crop_tokens(cfg: DragonflyConfig, grid: Optional[int]) -> int:
    n = (grid or cfg.vit.grid) ** 2
    return n + 1 if cfg.keep_cls else n


def image_token_ids(cfg: DragonflyConfig) -> list:
    """The image block as `input_ids`: the placeholder at every image position, the separator
    after every crop (the release's processor builds this list; the model replaces placeholders)."""
    c = cfg.crops
    n_high = (c.high_grids[0][0] * c.high_grids[0][1]) if c.high_grids else 4 * c.high_scale ** 2
    if cfg.zoom_select:
        n_high = min(n_high, 4 * cfg.zoom_k)
    ids = []
    for present, count, grid in [(c.low, 1, cfg.low_pool), (c.medium, 4, cfg.medium_pool), (c.high, n_high, cfg.high_pool)]:
        ids += present * count * ([IMAGE_ID] * crop_tokens(cfg, grid) + [SEPARATOR_ID] * cfg.separators)
    return ids


def image_positions(cfg: DragonflyConfig) -> int:
    """Length of the image block: 2098 for the released v2, 867 for v1 (SPEC §2.8, §3)."""
    return len(image_token_ids(cfg))


class Dragonfly(nn.Module):
    def __init__(self, cfg: DragonflyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vit)
        self.projection = nn.Linear(cfg.vit.width, cfg.llm.dim)  # "vision_embed_tokens" in the release
        self.llm = Llama(cfg.llm)

    # ---- the image block -------------------------------------------------------------------
    def image_block(self, pixels, medium_grid=None, high_grid=None):
        """pixels (B, N, 3, S, S), the crops of B images in crops.py order -> (B, P, dim)."""
        cfg, c = self.cfg, self.cfg.crops
        B, N = pixels.shape[:2]
        tokens = self.vision(pixels.flatten(0, 1), layer=cfg.vision_layer)  # (B*N, 577, 1024)
        tokens = self.projection(tokens).unflatten(0, (B, N))                # (B, N, 577, 4096)
        levels, i = [], 0
        for present, count, grid in [(c.low, 1, cfg.low_pool), (c.medium, 4, cfg.medium_pool),
                                     (c.high, N - c.low - 4 * c.medium, cfg.high_pool)]:
            if present:
                levels.append((tokens[:, i:i + count], grid))
                i += count
        if cfg.zoom_select and c.high and c.medium:
            (medium, _), (high, grid) = levels[-2], levels[-1]
            idx = self.select_high(medium, high, medium_grid, high_grid)                # (B, 4k)
            levels[-1] = (high[torch.arange(B, device=idx.device)[:, None], idx], grid)  # (B, 4k, T, dim)
        sep = self.llm.embed(torch.tensor([SEPARATOR_ID], device=pixels.device))  # (1, dim)
        block = []
        for level, grid in levels:                               # (B, n, T, dim)
            b, n, T, D = level.shape
            x = level.flatten(0, 1)
            if grid is not None or not cfg.keep_cls:
                x = pool.mean_pool(x, grid or cfg.vit.grid, keep_cls=cfg.keep_cls)
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

    def crop_image(self, image):
        """A path or PIL image -> `crops.Crops`: pixels (N, 3, S, S) and the chosen grids."""
        return crops_lib.make_crops(crops_lib.load_image(image), self.cfg.crops)

    # ---- the language model over [image block][text] ----------------------------------------
    def forward(self, tokens, pixels=None, labels=None, grids=(None, None)):
        """tokens (B, T) text ids starting with <|begin_of_text|>; pixels (B, N, 3, S, S) or None.
        Returns logits over the text positions (B, T, vocab) and, with labels (B, T; -100 =
        ignored), the mean next-token cross-entropy: position t predicts labels[t + 1]."""
        x = self.llm.embed(tokens)
        P = 0
        if pixels is not None:
            image = self.image_block(pixels, *grids).to(x.dtype)  # grids: per-image lists, for v1 "spatial"
            P = image.shape[1]
            x = torch.cat([image, x], dim=1)  # the image block comes first (SPEC §2.8)
        if P + tokens.shape[1] > self.cfg.llm.max_seq_len:
            raise ValueError(f"sequence of {P + tokens.shape[1]} positions exceeds the context of {self.cfg.llm.max_seq_len}")
        logits = self.llm(x, logits_from=P)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, images=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
                 stop_ids=(), generator=None):
        """Yield (token ids (B,), log-probabilities (B,)) one step at a time.
        prompts: list of B token-id lists (each starting with <|begin_of_text|>); images: list of
        B `crops.Crops` (from `crop_image`) or None (text only). Prompts are left-padded to a common
        length; padding is masked out and does not shift positions. Stops when every row has
        produced a stop id. Log-probabilities are log-softmax of the float32 logits."""
        device = self.llm.lm_head.weight.device
        images = images or [None] * len(prompts)
        seqs = [self.llm.embed(torch.tensor(p, device=device)) for p in prompts]
        with_image = [i for i, im in enumerate(images) if im is not None]
        if with_image:
            pix = torch.stack([torch.as_tensor(images[i].pixels) for i in with_image]).to(device)
            blocks = self.image_block(pix, [images[i].medium_grid for i in with_image],
                                      [images[i].high_grid for i in with_image])
            for j, i in enumerate(with_image):
                seqs[i] = torch.cat([blocks[j].to(seqs[i].dtype), seqs[i]])
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        B, L, ctx = len(seqs), int(lengths.max()), self.cfg.llm.max_seq_len
        if L >= ctx:
            raise ValueError(f"prompt is {L} positions (image block included); the context is {ctx}")
        max_new_tokens = min(max_new_tokens, ctx - L)
        pad = L - lengths                                                   # left padding per row
        x = torch.stack([F.pad(s, (0, 0, L - len(s), 0)) for s in seqs])    # (B, L, dim)
        slots = torch.arange(L + max_new_tokens, device=device)
        positions = (slots[:L] - pad[:, None]).clamp(min=0)                 # (B, L)
        mask = None
        if bool(pad.any()):
            valid = slots[None, :] >= pad[:, None]                          # (B, S) real positions
            causal = slots[:L, None] >= slots[None, :L]                     # (L, L)
            mask = (causal & valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
            mask = mask[:, None]                                            # (B, 1, L, L)
        self.llm.setup_cache(B, L + max_new_tokens)
        try:
            logits = self.llm(x, positions, start=0, mask=mask, logits_from=-1)[:, -1]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
            for step in range(max_new_tokens):
                token = sample(logits, temperature, top_p, generator)
                logprob = torch.log_softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]
                yield token, logprob
                done |= torch.isin(token, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                slot = L + step
                step_mask = None if mask is None else valid[:, None, None, :slot + 1]
                logits = self.llm(self.llm.embed(token[:, None]), (lengths + step)[:, None],
                                  start=slot, mask=step_mask)[:, -1]
        finally:
            self.llm.clear_cache()

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint_names(self) -> dict:
        """Our parameter names -> the released checkpoint's names (SPEC §1)."""
        names = {}
        for name, _ in self.named_parameters():
            part, rest = name.split(".", 1)
            names[name] = {"vision": lambda r: "image_encoder.vision_model." + vit_key(r),
                           "projection": lambda r: "vision_embed_tokens." + r,
                           "llm": lambda r: "language_model." + llama_key(r)}[part](rest)
        return names

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Dragonfly":
        """Load a released Dragonfly directory (v2 or v1; .bin or safetensors shards), or one
        saved by `save_pretrained`. The vision tower's shape is inferred from the weights."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise weights.CheckpointError(f"{path}: no config.json (is this a Dragonfly checkpoint directory?)")
        hf = json.loads(cfg_file.read_text())
        shapes = weights.read_shapes(path)
        vcfg = vit_lib.config_from_weights(shapes, "image_encoder.vision_model.")
        text = {**{k: v for k, v in hf.items() if k != "text_config"}, **(hf.get("text_config") or {})}
        llm = LlamaConfig.from_hf(text)
        cfg = (v1_config if vcfg.patch_size == 32 else v2_config)(vcfg, llm)
        if "dragonfly_nano" in hf:  # settings of a model trained here (ablation presets)
            cfg = config_from_dict(hf["dragonfly_nano"], vcfg, llm)
        model = build(cfg, dtype, device)
        weights.load_into(model, path, model.checkpoint_names(), ignore=saved_buffer)
        return model.eval()

    @classmethod
    def from_backbones(cls, clip_dir, llama_dir, cfg: DragonflyConfig = None, dtype=torch.float32, device="cpu"):
        """A fresh Dragonfly before training: OpenAI's CLIP vision tower and a Hugging Face
        Llama checkpoint, joined by a newly initialised projection."""
        vision, llm = load_clip_vision(clip_dir, dtype, device), load_llama(llama_dir, dtype, device)
        cfg = replace(cfg or (v1_config() if vision.cfg.patch_size == 32 else v2_config()), vit=vision.cfg, llm=llm.cfg)
        model = build(cfg, dtype, device)
        model.vision, model.llm = vision, llm
        with torch.no_grad():
            model.projection.weight.normal_(0, cfg.vit.width ** -0.5)
            model.projection.bias.zero_()
        return model

    def save_pretrained(self, path, dtype=torch.bfloat16):
        """Write config.json (the release's fields plus our own settings) and safetensors shards
        with the release's names, so `from_pretrained` and other readers load it."""
        path = Path(path)
        names = self.checkpoint_names()
        state = {names[n]: p.detach().to(dtype) for n, p in self.named_parameters()}
        weights.save(state, path)
        c = self.cfg.llm
        text = {"model_type": "llama", "hidden_size": c.dim, "intermediate_size": c.ffn_dim,
                "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                "rope_scaling": c.rope_scaling, "max_position_embeddings": c.max_seq_len,
                "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings}
        hf = {"architectures": ["DragonflyForCausalLM"], "model_type": "dragonfly", **text,
              "bos_token_id": 128000, "eos_token_id": 128001, "text_config": text,
              "torch_dtype": str(dtype).removeprefix("torch."),
              "dragonfly_nano": config_to_dict(self.cfg)}
        (path / "config.json").write_text(json.dumps(hf, indent=2))


def build(cfg, dtype, device, cls=None):
    """Construct on the meta device (no memory), then allocate once in the target dtype."""
    with torch.device("meta"):
        model = (cls or Dragonfly)(cfg).to(dtype)
    return model.to_empty(device=device)


def load_clip_vision(clip_dir, dtype=torch.float32, device="cpu") -> VisionTransformer:
    """The vision tower of an OpenAI CLIP checkpoint (`vision_model.*`; the text tower is skipped)."""
    vision = build(vit_lib.config_from_weights(weights.read_shapes(clip_dir), "vision_model."), dtype, device, VisionTransformer)
    weights.load_into(vision, clip_dir, {n: "vision_model." + vit_key(n) for n, _ in vision.named_parameters()},
                      ignore=lambda k: not k.startswith("vision_model.") or saved_buffer(k))
    return vision.eval()


def load_llama(llama_dir, dtype=torch.float32, device="cpu") -> Llama:
    """A Hugging Face Llama checkpoint (`model.*`, `lm_head.weight`)."""
    llm = build(LlamaConfig.from_hf(json.loads((Path(llama_dir) / "config.json").read_text())), dtype, device, Llama)
    weights.load_into(llm, llama_dir, {n: llama_key(n) for n, _ in llm.named_parameters()}, ignore=saved_buffer)
    return llm.eval()


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


def config_to_dict(cfg: DragonflyConfig) -> dict:
    d = asdict(cfg)
    del d["vit"], d["llm"]  # those are recorded by the weights and the Hugging Face fields
    return d


def config_from_dict(d: dict, vcfg: ViTConfig, llm: LlamaConfig) -> DragonflyConfig:
    c = dict(d["crops"])
    c = crops_lib.CropConfig(**{k: tuple(map(tuple, v)) if k.endswith("grids") and v is not None else v
                                for k, v in c.items()})
    return DragonflyConfig(**{**d, "crops": c, "vit": vcfg, "llm": llm})

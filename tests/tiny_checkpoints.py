"""Tiny checkpoints written in the released on-disk formats, for the weight-loader tests.

No model hub is reachable, so the loaders are tested on small deterministic checkpoints
that copy the released layouts: the same tensor names, the same files and index files, the
same config.json fields, the same dtypes (docs/release-facts.md#checkpoints). Golden outputs for these exact
weights are made once by `tests/make_golden.py` with the Hugging Face reference models.

    write_tiny_clip(dir, variant="l14-336" | "b32-224", fmt="safetensors" | "bin")
        like `openai/clip-vit-large-patch14-336` / `openai/clip-vit-base-patch32`:
        config.json (CLIPConfig) + model.safetensors or pytorch_model.bin, float32,
        vision tower `vision_model.*` plus a text tower and projections the loaders must skip.
    write_tiny_llama(dir, rope_scaling=None | "llama3")
        like `meta-llama/Llama-3.1-8B-Instruct`: config.json + model-0000N-of-00002.safetensors
        + model.safetensors.index.json, bf16, names `model.*`, `lm_head.weight`.
    write_tiny_dragonfly(dir, version="v2" | "v1", fmt="bin" | "safetensors", shards=None)
        like `togethercomputer/Llama-3.1-8B-Dragonfly-v2` (two pickled bf16 shards + index) or
        `Llama-3-8B-Dragonfly-v1` (one `pytorch_model.bin`, as the Med-v1 repo ships it).
    make_test_image(w, h, seed) -> PIL RGB image; make_test_pixels(n, size, seed) -> array
    load_tensors(dir) -> {name: tensor}; fingerprint(dir) -> float (detects an RNG change)

Tiny shapes: vision width 128, 3 layers, 2 heads (head dim 64), MLP 256, at the real geometry
(336/14 -> 577 tokens, 224/32 -> 50 tokens); LLM hidden 64, MLP 128, 2 layers, 4 heads,
2 kv heads. Weights come from numpy.random.default_rng(seed): matrices std 0.02, except
attention q/k (std 0.1 in the ViT, 0.15 in the LLM) and the ViT position embedding (0.1),
so that attention is far from uniform and position bugs change the outputs; norm weights
1 + N(0, 0.1); biases N(0, 0.02). bf16 files hold the bf16 rounding of those values.
This file imports no transformers: the tests import it.
"""

import collections
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
# The bf16 goldens' LLM: head width 128 as in Llama-3-8B (64 RoPE frequencies, the fastest at
# 1 rad/position, where bf16 rounding of the frequencies shows), and sharper attention.
LLM_HEAD128 = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, qk_std=0.2)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 vocab_size=512, max_position_embeddings=16)
CLIP_VARIANTS = {
    "l14-336": dict(name="openai/clip-vit-large-patch14-336", image_size=336, patch_size=14),
    "b32-224": dict(name="openai/clip-vit-base-patch32", image_size=224, patch_size=32),
}
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
DRAGONFLY_VOCAB = 128256  # the real vocabulary: ids 128000..128009 must be real rows


class _Init:
    """Draws every tensor from one numpy Generator, in call order, as float32."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std):
        return torch.from_numpy(self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def norm(self, n):
        return 1.0 + self.normal((n,), 0.1)


def _clip_layer(sd, init, p, w, mlp, qk_std=0.02, fc1_std=0.02):
    """One CLIP encoder layer (vision and text towers share the names)."""
    for name, std in (("q_proj", qk_std), ("k_proj", qk_std), ("v_proj", 0.02), ("out_proj", 0.02)):
        sd[p + f"self_attn.{name}.weight"] = init.normal((w, w), std)
        sd[p + f"self_attn.{name}.bias"] = init.normal((w,), 0.02)
    sd[p + "layer_norm1.weight"] = init.norm(w)
    sd[p + "layer_norm1.bias"] = init.normal((w,), 0.02)
    sd[p + "mlp.fc1.weight"] = init.normal((mlp, w), fc1_std)
    sd[p + "mlp.fc1.bias"] = init.normal((mlp,), 0.02)
    sd[p + "mlp.fc2.weight"] = init.normal((w, mlp), 0.02)
    sd[p + "mlp.fc2.bias"] = init.normal((w,), 0.02)
    sd[p + "layer_norm2.weight"] = init.norm(w)
    sd[p + "layer_norm2.bias"] = init.normal((w,), 0.02)


def _vision_tower(init, prefix, image_size, patch_size, position_ids=False):
    w, mlp, layers = VISION["hidden_size"], VISION["intermediate_size"], VISION["num_hidden_layers"]
    n_pos = (image_size // patch_size) ** 2 + 1
    sd = {}
    e = prefix + "embeddings."
    sd[e + "class_embedding"] = init.normal((w,), 0.1)
    sd[e + "patch_embedding.weight"] = init.normal((w, 3, patch_size, patch_size), 0.02)
    sd[e + "position_embedding.weight"] = init.normal((n_pos, w), 0.1)
    if position_ids:  # persistent buffer in files saved by transformers < 4.31 (the openai repos)
        sd[e + "position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    sd[prefix + "pre_layrnorm.weight"] = init.norm(w)  # sic: the CLIP spelling
    sd[prefix + "pre_layrnorm.bias"] = init.normal((w,), 0.02)
    for i in range(layers):
        _clip_layer(sd, init, f"{prefix}encoder.layers.{i}.", w, mlp, qk_std=0.1, fc1_std=0.06)
    sd[prefix + "post_layernorm.weight"] = init.norm(w)
    sd[prefix + "post_layernorm.bias"] = init.normal((w,), 0.02)
    return sd


def _clip_text_tower(init, proj_dim):
    t = CLIP_TEXT
    w, mlp = t["hidden_size"], t["intermediate_size"]
    sd = {}
    sd["text_model.embeddings.token_embedding.weight"] = init.normal((t["vocab_size"], w), 0.02)
    sd["text_model.embeddings.position_embedding.weight"] = init.normal((t["max_position_embeddings"], w), 0.02)
    sd["text_model.embeddings.position_ids"] = torch.arange(t["max_position_embeddings"], dtype=torch.int64)[None]
    for i in range(t["num_hidden_layers"]):
        _clip_layer(sd, init, f"text_model.encoder.layers.{i}.", w, mlp)
    sd["text_model.final_layer_norm.weight"] = init.norm(w)
    sd["text_model.final_layer_norm.bias"] = init.normal((w,), 0.02)
    sd["visual_projection.weight"] = init.normal((proj_dim, VISION["hidden_size"]), 0.02)
    sd["text_projection.weight"] = init.normal((proj_dim, w), 0.02)
    sd["logit_scale"] = torch.tensor(math.log(100.0), dtype=torch.float32)
    return sd


def _llama(init, prefix, vocab_size, shape=LLM):
    h, mlp, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    qk_std = shape.get("qk_std", 0.15)
    sd = {}
    sd[prefix + "model.embed_tokens.weight"] = init.normal((vocab_size, h), 0.02)
    for i in range(layers):
        p = f"{prefix}model.layers.{i}."
        # q/k stored in the Hugging Face "rotate-half" layout, as in the released files
        sd[p + "self_attn.q_proj.weight"] = init.normal((h, h), qk_std)
        sd[p + "self_attn.k_proj.weight"] = init.normal((kv, h), qk_std)
        sd[p + "self_attn.v_proj.weight"] = init.normal((kv, h), 0.02)
        sd[p + "self_attn.o_proj.weight"] = init.normal((h, h), 0.02)
        sd[p + "mlp.gate_proj.weight"] = init.normal((mlp, h), 0.02)
        sd[p + "mlp.up_proj.weight"] = init.normal((mlp, h), 0.02)
        sd[p + "mlp.down_proj.weight"] = init.normal((h, mlp), 0.02)
        sd[p + "input_layernorm.weight"] = init.norm(h)
        sd[p + "post_attention_layernorm.weight"] = init.norm(h)
    sd[prefix + "model.norm.weight"] = init.norm(h)
    sd[prefix + "lm_head.weight"] = init.normal((vocab_size, h), 0.02)
    return sd


# ---------------------------------------------------------------------------------------------
# writing files

def _bf16(sd):
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}


def _nbytes(t):
    return t.numel() * t.element_size()


def _split(sd, n_shards, first_fraction=0.85):
    """Cut the names, in order, into shards; shard 1 takes about `first_fraction` of the bytes."""
    if n_shards == 1:
        return [list(sd)]
    assert n_shards == 2
    total = sum(_nbytes(v) for v in sd.values())
    first, acc = [], 0
    for k, v in sd.items():  # names keep the state-dict order, as save_pretrained writes them
        if acc + _nbytes(v) > first_fraction * total and first:
            break
        first.append(k)
        acc += _nbytes(v)
    taken = set(first)
    return [first, [k for k in sd if k not in taken]]


def _write_weights(d, sd, fmt, n_shards, first_fraction=0.85):
    """Write `sd` as HF does: one file, or N shards plus an index with total_size + weight_map."""
    d = Path(d)
    stem, ext, index_name = {
        "safetensors": ("model", "safetensors", "model.safetensors.index.json"),
        "bin": ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
    }[fmt]
    groups = _split(sd, n_shards, first_fraction)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"{stem}.{ext}" if n_shards == 1 else f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        part = collections.OrderedDict((k, sd[k].contiguous().clone()) for k in names)
        if fmt == "safetensors":
            save_file(part, str(d / fname), metadata={"format": "pt"})
        else:
            torch.save(part, d / fname)
        weight_map.update({k: fname for k in names})
    if n_shards > 1:
        index = {"metadata": {"total_size": sum(_nbytes(v) for v in sd.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (d / index_name).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(d, cfg):
    (Path(d) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_tiny_clip(d, variant="l14-336", fmt="safetensors", seed=0):
    """An openai/clip-vit-* directory: CLIPConfig json and a float32 model.safetensors or
    pytorch_model.bin holding vision_model.* and a text tower (text_model.*, visual_projection,
    text_projection, logit_scale) that a vision loader must ignore."""
    v = CLIP_VARIANTS[variant]
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    proj_dim = 32
    init = _Init(seed)
    sd = _vision_tower(init, "vision_model.", v["image_size"], v["patch_size"], position_ids=True)
    sd.update(_clip_text_tower(init, proj_dim))
    vision = dict(VISION, image_size=v["image_size"], patch_size=v["patch_size"], projection_dim=proj_dim)
    text = dict(CLIP_TEXT, projection_dim=proj_dim, bos_token_id=CLIP_TEXT["vocab_size"] - 2,
                eos_token_id=CLIP_TEXT["vocab_size"] - 1, pad_token_id=1)
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-05, attention_dropout=0.0, dropout=0.0,
                  initializer_factor=1.0, initializer_range=0.02)
    cfg = {
        "_name_or_path": v["name"],
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": proj_dim,
        "text_config": dict(common, model_type="clip_text_model", **text),
        "text_config_dict": dict(text),
        "torch_dtype": "float32",
        "transformers_version": "4.21.3",
        "vision_config": dict(common, model_type="clip_vision_model", num_channels=3, **vision),
        "vision_config_dict": dict(vision),
    }
    _write_config(d, cfg)
    _write_weights(d, sd, fmt, 1)
    return d


def write_tiny_llama(d, rope_scaling=None, seed=0):
    """A meta-llama/Llama-3*-8B-Instruct directory, two bf16 safetensors shards + index.

    rope_scaling=None gives a Llama-3 config (max_position_embeddings 8192, no scaling);
    "llama3" gives the Llama-3.1 one: the real scaling dict (factor 8, original 8192) and
    max_position_embeddings 131072. With head_dim 16 and theta 500000, the four lowest of the
    eight frequencies have wavelengths above 2048 and are scaled, so the scaling changes the
    outputs visibly at positions of a few hundred and more (the goldens use 2000..2011).
    The vocabulary is 512, so bos/eos keep the Llama-3 pattern inside it (500, 501/508/509).
    """
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = 512
    sd = _bf16(_llama(_Init(seed), "", vocab))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 500,
        "eos_token_id": [501, 508, 509] if rope_scaling else 509,
        "hidden_act": "silu",
        "hidden_size": LLM["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": LLM["intermediate_size"],
        "max_position_embeddings": 131072 if rope_scaling else 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": LLM["num_attention_heads"],
        "num_hidden_layers": LLM["num_hidden_layers"],
        "num_key_value_heads": LLM["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if rope_scaling == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    elif rope_scaling is not None:
        raise ValueError(f"rope_scaling must be None or 'llama3', got {rope_scaling!r}")
    _write_config(d, cfg)
    _write_weights(d, sd, "safetensors", 2, first_fraction=0.55)  # layer 1 straddles the shards
    return d


def _dragonfly_config(version, h=LLM):
    """The released config.json, with the tiny LLM shape.

    v2: the fields of togethercomputer/Llama-3.1-8B-Dragonfly(-Med)-v2/config.json.
    v1: the fields of Llama-3-8B-Dragonfly-Med-v1/config.json (seen through a public mirror;
    the list is cut after "use_imgconst_loss_ve", whose value false and the final vocab_size
    are our guess). Fuyu leftovers (partial_rotary_factor, qk_layernorm, layer_norm_eps,
    image_size 300, patch_size 30) are kept on purpose: a loader must not read them.
    The released text_config leaves hidden_size / num_hidden_layers / num_attention_heads to the
    Llama defaults (4096 / 32 / 32); the tiny model cannot, so they are written out.
    """
    text = {
        "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_size": h["hidden_size"], "num_hidden_layers": h["num_hidden_layers"],
        "num_attention_heads": h["num_attention_heads"],
        "intermediate_size": h["intermediate_size"], "max_position_embeddings": 8192,
        "model_type": "llama", "num_key_value_heads": h["num_key_value_heads"],
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": DRAGONFLY_VOCAB,
    }
    cfg = {
        "_name_or_path": "",
        "architectures": ["DragonflyForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": h["hidden_size"],
        "image_encoder": "openai/clip-vit-large-patch14-336",
        "image_size": 300,
        "initializer_range": 0.02,
        "intermediate_size": h["intermediate_size"],
        "max_position_embeddings": 8192,
        "model_type": "dragonfly",
        "num_attention_heads": h["num_attention_heads"],
        "num_channels": 3,
        "num_hidden_layers": h["num_hidden_layers"],
        "num_key_value_heads": h["num_key_value_heads"],
        "patch_size": 30,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "text_config": text,
        "text_pretrained_model_name_or_path": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.2",
        "use_cache": True,
        "vocab_size": DRAGONFLY_VOCAB,
    }
    if version == "v1":
        text.update({"attention_bias": False, "hidden_act": "silu", "pretraining_tp": 1})
        cfg.update({
            "_name_or_path": "togethercomputer/Dragonfly-med-v1-llama8b",
            "hidden_dropout": 0.0,
            "image_encoder": "openai/clip-vit-base-patch32",
            "layer_norm_eps": 1e-05,
            "partial_rotary_factor": 0.5,
            "qk_layernorm": True,
            "text_pretrained_model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
            "transformers_version": "4.40.0",
            "use_imgconst_loss": False,
            "use_imgconst_loss_ve": False,
        })
    cfg["text_config"] = dict(sorted(text.items()))
    return dict(sorted(cfg.items()))  # save_pretrained writes the keys sorted


def write_tiny_dragonfly(d, version="v2", fmt="bin", seed=0, shards=None, llm=LLM):
    """A togethercomputer Dragonfly directory: config.json + bf16 weights named
    language_model.model.*, language_model.lm_head.weight, image_encoder.vision_model.*,
    vision_embed_tokens.{weight,bias}.

    v2: CLIP ViT-L/14@336 geometry (577 tokens); v1: ViT-B/32@224 geometry (50 tokens).
    fmt "bin": torch.save'd dicts (pytorch_model*.bin), "safetensors": model*.safetensors.
    shards: 2 gives NAME-0000N-of-00002 files + NAME.index.json (how v2 ships); 1 gives a
    single pytorch_model.bin / model.safetensors (how Med-v1 ships). Default: 2 for v2, 1 for v1.
    llm: the LLM's shape (LLM, or LLM_HEAD128 for the bf16 goldens).
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    shards = shards or (2 if version == "v2" else 1)
    image_size, patch_size = (336, 14) if version == "v2" else (224, 32)
    init = _Init(seed)
    sd = _llama(init, "language_model.", DRAGONFLY_VOCAB, llm)
    sd.update(_vision_tower(init, "image_encoder.vision_model.", image_size, patch_size))
    sd["vision_embed_tokens.weight"] = init.normal((llm["hidden_size"], VISION["hidden_size"]), 0.02)
    sd["vision_embed_tokens.bias"] = init.normal((llm["hidden_size"],), 0.02)
    _write_config(d, _dragonfly_config(version, llm))
    _write_weights(d, _bf16(sd), fmt, shards)
    return d


# ---------------------------------------------------------------------------------------------
# reading back, inputs

def load_tensors(d):
    """Every tensor in a checkpoint directory (any of the layouts above), as stored."""
    d = Path(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    for f in sorted(d.glob("*.bin")):
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def fingerprint(d):
    """Sum of |w| over all floating tensors, in float64: a golden stores it, so a changed
    random stream (new numpy) shows up as a fingerprint mismatch, not as a model bug."""
    return float(sum(v.double().abs().sum().item() for v in load_tensors(d).values() if v.is_floating_point()))


def make_test_image(w, h, seed=0):
    """An RGB test image with structure: colour gradients, a few shapes, and 16x16-block noise,
    so that every crop of it differs (and its PNG stays small). Deterministic for (w, h, seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = x / max(w - 1, 1), y / max(h - 1, 1)
    img = np.stack([235.0 * fx + 10.0, 235.0 * fy + 10.0, 235.0 * (1.0 - fx) * fy + 10.0], axis=-1)
    blocks = rng.normal(0.0, 10.0, ((h + 15) // 16, (w + 15) // 16, 3)).astype(np.float32)
    img += np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)[:h, :w]
    im = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for i in range(10):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        rx, ry = int(rng.integers(w // 30 + 2, w // 6 + 3)), int(rng.integers(h // 30 + 2, h // 6 + 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=color)
    return im


def make_test_pixels(n, image_size, seed=0):
    """(n, 3, image_size, image_size) float32 standard-normal pixels, the ViT golden's input."""
    return np.random.default_rng(seed).standard_normal((n, 3, image_size, image_size), dtype=np.float32)

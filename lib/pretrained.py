"""
Loading and saving a Dragonfly: a released or saved checkpoint directory -> a model with its
weights (nanoGPT's `from_pretrained`), a model -> a directory others can load, and a new model
from OpenAI's CLIP and a Hugging Face Llama (the paper's initialisation, before stage 1).

`load`, `from_backbones` and `save` are how every caller loads and saves a Dragonfly: model.py
holds only the architecture. What the files mean (config.json's fields, the weight names) is
release_format.py; reading and writing the files themselves is weights.py.
"""
import json
from dataclasses import replace
from pathlib import Path

import torch

import model as M
from lib import release_format, stored, weights
from lib.release_format import VIT_NAMES, LLAMA_NAMES, checkpoint_key, checkpoint_names
from llama import Llama
from vit import VisionTransformer

# Buffers older transformers versions saved next to the weights: recomputed here, never loaded.
SAVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")


def saved_buffer(key: str) -> bool:
    return key.endswith(SAVED_BUFFERS)


def load(path, dtype=torch.float32, device="cpu", compute=None, quantize=None) -> M.Dragonfly:
    """Load a released Dragonfly directory (v2 or v1; .bin or safetensors shards), or one
    saved by `save` or quantize.py. The vision tower's shape is inferred from the weights.
    dtype: the model's (its weights' dtype, the one it was trained in); compute: the dtype the
    layers compute in when it differs (float32 on CPUs slow in bf16, devices.compute_dtype), the
    matrices then kept in `dtype`; quantize="int8": int8 matrices, quantized while loading
    unless already int8."""
    cfg, stored_as = release_format.read_config(path)
    quantize = stored_as or quantize
    model = allocate(cfg, dtype, device, compute, quantize)
    names = checkpoint_names(model)
    convert = stored.int8_converter(model, names) if quantize == "int8" else None
    weights.load_into(model, Path(path), names, ignore=saved_buffer, convert=convert)
    stored.lay_out_for_decoding(model.llm)  # speed only, on a CPU
    return model.eval()


def from_backbones(clip_dir, llama_dir, cfg: M.DragonflyConfig = None, dtype=torch.float32, device="cpu",
                   clip_low_dir=None) -> M.Dragonfly:
    """A fresh Dragonfly before training: OpenAI's CLIP vision tower and a Hugging Face Llama
    checkpoint, joined by a newly initialised projection. A dual-encoder config also needs
    `clip_low_dir`, the low crop's CLIP (ViT-L/14@336 in the v2 paper)."""
    vision, llm = load_clip_vision(clip_dir, dtype, device), load_llama(llama_dir, dtype, device)
    cfg = replace(cfg or (M.v1_config() if vision.cfg.patch_size == 32 else M.v2_config()), vit=vision.cfg, llm=llm.cfg)
    vision_low = None
    if cfg.vit_low is not None:
        if clip_low_dir is None:
            raise ValueError("model.py: a dual-encoder config needs clip_low_dir, the low crop's CLIP checkpoint")
        vision_low = load_clip_vision(clip_low_dir, dtype, device)
        cfg = replace(cfg, vit_low=vision_low.cfg)
    model = build(cfg, dtype, device)
    model.vision, model.llm = vision, llm
    if vision_low is not None:
        model.vision_low = vision_low
    if model.resampler is not None:  # new weights: a normal initialisation, not build's empty memory
        model.resampler = M.new_resampler(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for proj in (model.projection, model.projection_low):
            if proj is not None:
                proj.weight.normal_(0, proj.in_features ** -0.5)
                proj.bias.zero_()
    return model


def save(model: M.Dragonfly, path, dtype=torch.bfloat16):
    """Write config.json (the release's fields plus our own settings) and safetensors shards
    with the release's names, so `load` and other readers load it."""
    path = Path(path)
    names = checkpoint_names(model)
    state = {names[n]: p.detach().to(dtype) for n, p in model.named_parameters()}
    weights.save(state, path)
    hf = {**release_format.release_config(model.cfg.llm), "torch_dtype": str(dtype).removeprefix("torch."),
          "dragonfly_nano": release_format.config_to_dict(model.cfg)}
    (path / "config.json").write_text(json.dumps(hf, indent=2))


# ---- building and the backbones --------------------------------------------------------------
def build(cfg, compute_dtype, device, cls=None, weights_dtype=None, quantize=None):
    """Construct on the meta device (no memory), then allocate once in `compute_dtype`, the dtype
    the layers compute in. Weights stored in another dtype (`weights_dtype`, the checkpoint's) or
    int8 keep their matrices so (stored.py); RoPE's frequencies are then rounded to the
    checkpoint's dtype, the ones it was trained with. A model larger than the memory available
    stops with one line, before allocating (stored.allocate)."""
    with torch.device("meta"):
        model = (cls or M.Dragonfly)(cfg).to(compute_dtype)
    model = stored.allocate(model, device, weights_dtype or compute_dtype, compute_dtype, quantize)
    if weights_dtype not in (None, compute_dtype):
        model.llm.rope_dtype = weights_dtype
    return model


def allocate(cfg, weights_dtype, device, compute_dtype=None, quantize=None):
    """`build` for a model whose weights are `weights_dtype` (the checkpoint's) and whose layers
    compute in `compute_dtype` (devices.compute_dtype; default `weights_dtype`)."""
    return build(cfg, compute_dtype or weights_dtype, device, weights_dtype=weights_dtype, quantize=quantize)


def load_clip_vision(clip_dir, dtype=torch.float32, device="cpu") -> VisionTransformer:
    """The vision tower of an OpenAI CLIP checkpoint (`vision_model.*`; the text tower is skipped)."""
    vit = release_format.vit_from_weights(weights.read_shapes(clip_dir), "vision_model.")
    vision = build(vit, dtype, device, VisionTransformer)
    weights.load_into(vision, clip_dir, {n: "vision_model." + checkpoint_key(VIT_NAMES, n) for n, _ in vision.named_parameters()},
                      ignore=lambda k: not k.startswith("vision_model.") or saved_buffer(k))
    return vision.eval()


def load_llama(llama_dir, dtype=torch.float32, device="cpu") -> Llama:
    """A Hugging Face Llama checkpoint (`model.*`, `lm_head.weight`)."""
    llm = build(release_format.read_llama_config(llama_dir), dtype, device, Llama)
    weights.load_into(llm, llama_dir, {n: checkpoint_key(LLAMA_NAMES, n) for n, _ in llm.named_parameters()}, ignore=saved_buffer)
    return llm.eval()

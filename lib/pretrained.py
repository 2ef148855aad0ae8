"""
Dragonfly checkpoints as released: config.json <-> DragonflyConfig, our parameter names <-> the
release's (docs/release-facts.md#weight-names), loading a released or saved directory, and
starting a new model from OpenAI's CLIP and a Hugging Face Llama (the paper's initialisation,
before stage 1).

`load` (nanoGPT's `from_pretrained`), `from_backbones` and `save` are how every caller loads and
saves a Dragonfly: model.py holds only the architecture and imports nothing above it (README,
"Layers"). weights.py reads and writes the files themselves.
"""
import json
import math
import re
import types
import typing
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path

import torch

import crops as crops_lib
import model as M
from lib import stored
import llama
import vit as vit_lib
from lib import weights
from llama import Llama, LlamaConfig
from vit import ViTConfig, VisionTransformer

# Buffers older transformers versions saved next to the weights: recomputed here, never loaded.
SAVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")


def saved_buffer(key: str) -> bool:
    return key.endswith(SAVED_BUFFERS)


def checkpoint_key(renames, name: str) -> str:
    """Our parameter `name` under a checkpoint's naming: the first of `renames` (a building
    block's CHECKPOINT_NAMES, regular expression -> replacement) that matches."""
    for pattern, repl in renames:
        name, n = re.subn(pattern, repl, name)
        if n:
            return name
    raise KeyError(name)


def checkpoint_names(model: "M.Dragonfly") -> dict:
    """Our parameter names -> the released checkpoint's names (docs/release-facts.md#weight-names)."""
    prefix = {"vision": lambda r: "image_encoder.vision_model." + checkpoint_key(vit_lib.CHECKPOINT_NAMES, r),
              "projection": lambda r: "vision_embed_tokens." + r,
              "llm": lambda r: "language_model." + checkpoint_key(llama.CHECKPOINT_NAMES, r),
              # ablation modules (not in any release): our own names
              "vision_low": lambda r: "low_image_encoder.vision_model." + checkpoint_key(vit_lib.CHECKPOINT_NAMES, r),
              "projection_low": lambda r: "low_vision_embed_tokens." + r,
              "resampler": lambda r: "resampler." + r}
    return {name: prefix[name.split(".", 1)[0]](name.split(".", 1)[1]) for name, _ in model.named_parameters()}


def load(path, dtype=torch.float32, device="cpu", compute=None, quantize=None) -> "M.Dragonfly":
    """Load a released Dragonfly directory (v2 or v1; .bin or safetensors shards), or one
    saved by `save` or quantize.py. The vision tower's shape is inferred from the weights.
    dtype: the model's (its weights' dtype, the one it was trained in); compute: the dtype the
    layers compute in when it differs (float32 on CPUs slow in bf16, devices.compute_dtype), the
    matrices then kept in `dtype`; quantize="int8": int8 matrices, quantized while loading
    unless already int8."""
    path = weights.require_checkpoint(path)
    hf = weights.read_config(path / "config.json")
    vcfg = vit_lib.config_from_weights(weights.read_shapes(path), "image_encoder.vision_model.")
    llm = llm_config(hf, path / "config.json")
    cfg = (M.v1_config if vcfg.patch_size == 32 else M.v2_config)(vcfg, llm)
    if "dragonfly_nano" in hf:  # settings of a model trained here (ablation presets)
        check_fields(hf["dragonfly_nano"], M.DragonflyConfig, f"{path / 'config.json'}: dragonfly_nano")
        cfg = config_from_dict(hf["dragonfly_nano"], vcfg, llm)
    if hf.get("quantization") not in (None, "int8"):
        raise weights.CheckpointError(f"{path / 'config.json'}: quantization: expected \"int8\" or null, found "
                                      f"{hf['quantization']!r}")
    quantize = hf.get("quantization") or quantize
    model = allocate(cfg, dtype, device, compute, quantize)
    names = checkpoint_names(model)
    convert = stored.int8_converter(model, names) if quantize == "int8" else None
    weights.load_into(model, path, names, ignore=saved_buffer, convert=convert)
    return model.eval()


def from_backbones(clip_dir, llama_dir, cfg: "M.DragonflyConfig" = None, dtype=torch.float32, device="cpu",
                   clip_low_dir=None) -> "M.Dragonfly":
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


def save(model: "M.Dragonfly", path, dtype=torch.bfloat16):
    """Write config.json (the release's fields plus our own settings) and safetensors shards
    with the release's names, so `load` and other readers load it."""
    path = Path(path)
    names = checkpoint_names(model)
    state = {names[n]: p.detach().to(dtype) for n, p in model.named_parameters()}
    weights.save(state, path)
    hf = {**release_config(model.cfg.llm), "torch_dtype": str(dtype).removeprefix("torch."),
          "dragonfly_nano": config_to_dict(model.cfg)}
    (path / "config.json").write_text(json.dumps(hf, indent=2))


# ---- config.json ---------------------------------------------------------------------------
def llm_config(hf: dict, file="config.json") -> LlamaConfig:
    """The LLM's config as the release builds it: `LlamaConfig(**text_config)` alone, absent
    fields taking transformers' LlamaConfig defaults; the top-level fields (with the release's
    DragonflyConfig defaults, Llama-3-8B's) only when there is no text_config. Checked first
    (`check_llm_fields`): a wrong value is one line naming `file` and the field."""
    if hf.get("text_config"):
        check_llm_fields(hf["text_config"], f"{file}: text_config")
        return check_heads(LlamaConfig.from_hf(hf["text_config"]), f"{file}: text_config")
    check_llm_fields(hf, str(file))
    return check_heads(LlamaConfig.from_hf(hf, defaults=LlamaConfig().to_hf()), str(file))


# The LLM fields read, with their bounds: far above any Llama (405B: 126 layers, 16384 wide,
# 128 heads), so only a damaged or hand-made file reaches them, before 10**9 layers are built.
LLM_FIELDS = {"hidden_size": (int, 2**17), "intermediate_size": (int, 2**19), "num_hidden_layers": (int, 2**12),
              "num_attention_heads": (int, 2**12), "num_key_value_heads": (int, 2**12), "vocab_size": (int, 2**24),
              "max_position_embeddings": (int, 2**24), "rms_norm_eps": (float, 1.0), "rope_theta": (float, math.inf),
              "tie_word_embeddings": (bool, math.inf)}
NULLABLE = {"num_key_value_heads", "rope_theta"}  # null takes the default (LlamaConfig.from_hf)


def check_llm_fields(hf, where: str):
    """CheckpointError naming the field when a value of the LLM's config cannot build a model: a
    wrong type (a string, a float for a count, null), zero or negative, or absurdly large.
    `check_heads` then checks the heads against the width, defaults filled in."""
    if not isinstance(hf, dict):
        raise weights.CheckpointError(f"{where}: expected a JSON object, found {type(hf).__name__}")
    for key, (kind, most) in LLM_FIELDS.items():
        if key in hf and not (hf[key] is None and key in NULLABLE):
            check_value(hf[key], kind, f"{where}: {key}", most, least=0 if kind is float else 1)
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise weights.CheckpointError(f"{where}: {key}: expected an object or null, found {json.dumps(hf[key])}")
        scaling = hf.get(key) or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":  # llama.rope_frequencies reads these
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                check_value(scaling.get(k), float, f"{where}: {key}.{k}", math.inf, least=0)


def check_heads(llm: LlamaConfig, where: str) -> LlamaConfig:
    if llm.dim % llm.n_heads or llm.n_heads % llm.n_kv_heads or llm.head_dim % 2:
        raise weights.CheckpointError(f"{where}: hidden_size {llm.dim}, num_attention_heads {llm.n_heads} and "
                                      f"num_key_value_heads {llm.n_kv_heads}: the heads must divide the width (into "
                                      "an even head size) and the key-value heads the heads")
    return llm


def check_value(value, kind, where: str, most=2**16, least=1):
    """One value of a config file: of `kind` (bool, int, float, str), from `least` to `most`."""
    ok = isinstance(value, bool) if kind is bool else isinstance(value, str) if kind is str else (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
    if ok and kind in (int, float):
        ok = math.isfinite(value) and (value > least if kind is float else value >= least) and value <= most
    if not ok:
        want = {bool: "true or false", str: "a string", int: f"an integer from {least} to {most}",
                float: f"a number above {least}" + (f", at most {most}" if most < math.inf else "")}[kind]
        raise weights.CheckpointError(f"{where}: expected {want}, found {json.dumps(value)}")


ZOOM_SELECT = ("release", "spatial", "global")  # model.DragonflyConfig.zoom_select


def check_fields(d, cls, where: str):
    """A `dragonfly_nano` section (or a part of it) against dataclass `cls`: known keys only, each
    value of its field's type (Optional: null allowed; a nested config checked in turn)."""
    if not isinstance(d, dict):
        raise weights.CheckpointError(f"{where}: expected a JSON object, found {json.dumps(d)}")
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if key not in hints or key == "llm":  # the LLM's fields are the Hugging Face ones
            raise weights.CheckpointError(f"{where}: unknown field {key!r} (known: {', '.join(h for h in hints if h != 'llm')})")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X], X | None
            if value is None:
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if is_dataclass(kind):
            check_fields(value, kind, f"{where}.{key}")
        elif key.endswith("grids"):
            if not (isinstance(value, list) and value and all(isinstance(g, list) and len(g) == 2 for g in value)):
                raise weights.CheckpointError(f"{where}.{key}: expected a list of [cols, rows] grids, found {json.dumps(value)}")
            for g in value:
                for n in g:
                    check_value(n, int, f"{where}.{key}", 64)
        elif key == "zoom_select" and value not in ZOOM_SELECT:
            raise weights.CheckpointError(f"{where}.{key}: expected one of {', '.join(ZOOM_SELECT)} or null, found {json.dumps(value)}")
        else:
            least = 0 if kind is float else -2**16 if key == "vision_layer" else 1
            check_value(value, kind, f"{where}.{key}", most=math.inf if kind is float else 2**16, least=least)


def release_config(llm: LlamaConfig) -> dict:
    """The released config.json's fields: the LLM's at the top level and again as text_config,
    model_type dragonfly. The vision tower's shape is not in it (read from the weights)."""
    text = llm.to_hf()
    return {"architectures": ["DragonflyForCausalLM"], **text, "model_type": "dragonfly",
            "bos_token_id": 128000, "eos_token_id": 128001, "text_config": text}


def config_to_dict(cfg: "M.DragonflyConfig") -> dict:
    d = asdict(cfg)
    del d["llm"]  # recorded by the Hugging Face fields; the ViT is kept, its heads can't be inferred
    return d


def config_from_dict(d: dict, vcfg: ViTConfig, llm: LlamaConfig) -> "M.DragonflyConfig":
    c = dict(d["crops"])
    c = crops_lib.CropConfig(**{k: tuple(map(tuple, v)) if k.endswith("grids") and v is not None else v
                                for k, v in c.items()})
    vit_low = ViTConfig(**d["vit_low"]) if d.get("vit_low") else None
    vcfg = ViTConfig(**d["vit"]) if d.get("vit") else vcfg
    return M.DragonflyConfig(**{**d, "crops": c, "vit": vcfg, "llm": llm, "vit_low": vit_low})


# ---- building and the backbones --------------------------------------------------------------
def build(cfg, compute_dtype, device, cls=None, storage=None):
    """Construct on the meta device (no memory), then allocate once in `compute_dtype`, the dtype
    the layers compute in; with `storage`, the linear and embedding matrices are kept in that
    dtype instead (stored.py). A model larger than the memory available stops here with one line,
    before allocating."""
    with torch.device("meta"):
        model = (cls or M.Dragonfly)(cfg).to(compute_dtype)
        if storage is not None:
            stored.store_weights(model, storage, compute_dtype)
    if torch.device(device).type == "cpu":
        weights.ensure_memory(sum(p.numel() * p.element_size() for p in model.parameters()))
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Llama):
            m.tie_weights()
    return model


def allocate(cfg, weights_dtype, device, compute_dtype=None, quantize=None):
    """`build` for a model whose weights are `weights_dtype` (the checkpoint's) and whose layers
    compute in `compute_dtype` (devices.compute_dtype; default `weights_dtype`): its matrices kept
    as stored.storage_dtype says, RoPE's frequencies rounded to `weights_dtype`, the ones the
    checkpoint was trained with."""
    compute_dtype = compute_dtype or weights_dtype
    storage = stored.storage_dtype(weights_dtype, compute_dtype, quantize)
    model = build(cfg, compute_dtype, device, storage=storage)
    if compute_dtype != weights_dtype:
        model.llm.rope_dtype = weights_dtype
    return model


def load_clip_vision(clip_dir, dtype=torch.float32, device="cpu") -> VisionTransformer:
    """The vision tower of an OpenAI CLIP checkpoint (`vision_model.*`; the text tower is skipped)."""
    vision = build(vit_lib.config_from_weights(weights.read_shapes(clip_dir), "vision_model."), dtype, device, VisionTransformer)
    weights.load_into(vision, clip_dir, {n: "vision_model." + checkpoint_key(vit_lib.CHECKPOINT_NAMES, n) for n, _ in vision.named_parameters()},
                      ignore=lambda k: not k.startswith("vision_model.") or saved_buffer(k))
    return vision.eval()


def load_llama(llama_dir, dtype=torch.float32, device="cpu") -> Llama:
    """A Hugging Face Llama checkpoint (`model.*`, `lm_head.weight`)."""
    hf = weights.read_config(Path(llama_dir) / "config.json")
    check_llm_fields(hf, str(Path(llama_dir) / "config.json"))
    llm = build(check_heads(LlamaConfig.from_hf(hf), str(Path(llama_dir) / "config.json")), dtype, device, Llama)
    weights.load_into(llm, llama_dir, {n: checkpoint_key(llama.CHECKPOINT_NAMES, n) for n, _ in llm.named_parameters()}, ignore=saved_buffer)
    return llm.eval()

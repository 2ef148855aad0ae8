"""
A checkpoint's format as released, read in one place: config.json -> DragonflyConfig (every
field checked once, a wrong one is one line naming the file and the field), the config written
back, and our parameter names <-> the release's (docs/release-facts.md#weight-names,
docs/release-facts.md#config).

`read_config` is the one way in: `pretrained.load` calls it and nothing else reads a Dragonfly
config.json. The architecture files (vit.py, llama.py) know nothing of Hugging Face's field
names or weight names: they are all here.
"""
import json
import math
import re
import types
import typing
from dataclasses import asdict, is_dataclass
from pathlib import Path

import crops as crops_lib
import model as M
from lib import weights
from lib.weights import CheckpointError
from llama import LlamaConfig
from vit import ViTConfig


def read_config(path) -> tuple:
    """A checkpoint directory -> (DragonflyConfig, quantization: None or "int8"). The LLM's shape
    comes from config.json, the vision tower's from the weights' shapes (the release does not
    record it), our own settings from the `dragonfly_nano` section of a model saved here."""
    path = weights.require_checkpoint(path)  # a folder with weights and a config.json, or one line
    file = path / "config.json"
    hf = weights.read_config(file)
    vit = vit_from_weights(weights.read_shapes(path), "image_encoder.vision_model.")
    llm = llm_config(hf, file)
    if "dragonfly_nano" in hf:  # settings of a model trained here (ablation presets)
        check_fields(hf["dragonfly_nano"], M.DragonflyConfig, f"{file}: dragonfly_nano")
        cfg = config_from_dict(hf["dragonfly_nano"], vit, llm)
    else:  # a release: v1 is the B/32 tower at 224 px, v2 the L/14 at 336
        cfg = (M.v1_config if vit.patch_size == 32 else M.v2_config)(vit, llm)
    if hf.get("quantization") not in (None, "int8"):
        raise CheckpointError(f"{file}: quantization: expected \"int8\" or null, found {hf['quantization']!r}")
    return cfg, hf.get("quantization")


def read_llama_config(path) -> LlamaConfig:
    """A Hugging Face Llama checkpoint's config.json (the backbone before stage 1), checked."""
    file = Path(path) / "config.json"
    hf = weights.read_config(file)
    check_llm_fields(hf, str(file))
    return check_heads(llama_from_hf(hf), str(file))


# ---- the LLM's fields ----------------------------------------------------------------------
# transformers' LlamaConfig() defaults (Llama-1/2 values, not Llama-3's): a config that leaves a
# field out gets these, as the release's `LlamaConfig(**text_config)` does.
HF_LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 32000,
                     "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
                     "max_position_embeddings": 2048, "tie_word_embeddings": False}


def llama_from_hf(hf: dict, defaults: dict = None) -> LlamaConfig:
    """From a Hugging Face config dict. Absent fields take `defaults` (Hugging Face field
    names; default: transformers' LlamaConfig class defaults, what `LlamaConfig(**d)` gives).
    transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of
    `rope_theta` + `rope_scaling`; both spellings are read."""
    d = HF_LLAMA_DEFAULTS if defaults is None else defaults
    get = lambda key: hf[key] if key in hf else d[key]
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return LlamaConfig(dim=get("hidden_size"), n_layers=get("num_hidden_layers"), n_heads=get("num_attention_heads"),
               n_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
               vocab_size=get("vocab_size"), ffn_dim=get("intermediate_size"), norm_eps=get("rms_norm_eps"),
               rope_theta=hf.get("rope_theta") or rope.get("rope_theta") or d["rope_theta"],
               rope_scaling=scaling, max_seq_len=get("max_position_embeddings"),
               tie_embeddings=get("tie_word_embeddings"))

def llama_to_hf(cfg: LlamaConfig) -> dict:
    """The Hugging Face LlamaConfig fields (the inverse of `llama_from_hf`)."""
    return {"model_type": "llama", "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}


def llm_config(hf: dict, file="config.json") -> LlamaConfig:
    """The LLM's config as the release builds it: `LlamaConfig(**text_config)` alone, absent
    fields taking transformers' LlamaConfig defaults; the top-level fields (with the release's
    DragonflyConfig defaults, Llama-3-8B's) only when there is no text_config. Checked first
    (`check_llm_fields`): a wrong value is one line naming `file` and the field."""
    if hf.get("text_config"):
        check_llm_fields(hf["text_config"], f"{file}: text_config")
        return check_heads(llama_from_hf(hf["text_config"]), f"{file}: text_config")
    check_llm_fields(hf, str(file))
    return check_heads(llama_from_hf(hf, defaults=llama_to_hf(LlamaConfig())), str(file))


# The LLM fields read, with their bounds: far above any Llama (405B: 126 layers, 16384 wide,
# 128 heads), so only a damaged or hand-made file reaches them, before 10**9 layers are built.
LLM_FIELDS = {"hidden_size": (int, 2**17), "intermediate_size": (int, 2**19), "num_hidden_layers": (int, 2**12),
              "num_attention_heads": (int, 2**12), "num_key_value_heads": (int, 2**12), "vocab_size": (int, 2**24),
              "max_position_embeddings": (int, 2**24), "rms_norm_eps": (float, 1.0), "rope_theta": (float, math.inf),
              "tie_word_embeddings": (bool, math.inf)}
NULLABLE = {"num_key_value_heads", "rope_theta"}  # null takes the default (llama_from_hf)


def check_llm_fields(hf, where: str):
    """CheckpointError naming the field when a value of the LLM's config cannot build a model: a
    wrong type (a string, a float for a count, null), zero or negative, or absurdly large.
    `check_heads` then checks the heads against the width, defaults filled in."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(hf).__name__}")
    for key, (kind, most) in LLM_FIELDS.items():
        if key in hf and not (hf[key] is None and key in NULLABLE):
            check_value(hf[key], kind, f"{where}: {key}", most, least=0 if kind is float else 1)
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"{where}: {key}: expected an object or null, found {json.dumps(hf[key])}")
        scaling = hf.get(key) or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":  # llama.rope_frequencies reads these
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                check_value(scaling.get(k), float, f"{where}: {key}.{k}", math.inf, least=0)


def check_heads(llm: LlamaConfig, where: str) -> LlamaConfig:
    if llm.dim % llm.n_heads or llm.n_heads % llm.n_kv_heads or llm.head_dim % 2:
        raise CheckpointError(f"{where}: hidden_size {llm.dim}, num_attention_heads {llm.n_heads} and "
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
        raise CheckpointError(f"{where}: expected {want}, found {json.dumps(value)}")


ZOOM_SELECT = ("release", "spatial", "global")  # model.DragonflyConfig.zoom_select


def check_fields(d, cls, where: str):
    """A `dragonfly_nano` section (or a part of it) against dataclass `cls`: known keys only, each
    value of its field's type (Optional: null allowed; a nested config checked in turn)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {json.dumps(d)}")
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if key not in hints or key == "llm":  # the LLM's fields are the Hugging Face ones
            raise CheckpointError(f"{where}: unknown field {key!r} (known: {', '.join(h for h in hints if h != 'llm')})")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X], X | None
            if value is None:
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if is_dataclass(kind):
            check_fields(value, kind, f"{where}.{key}")
        elif key.endswith("grids"):
            if not (isinstance(value, list) and value and all(isinstance(g, list) and len(g) == 2 for g in value)):
                raise CheckpointError(f"{where}.{key}: expected a list of [cols, rows] grids, found {json.dumps(value)}")
            for g in value:
                for n in g:
                    check_value(n, int, f"{where}.{key}", 64)
        elif key == "zoom_select" and value not in ZOOM_SELECT:
            raise CheckpointError(f"{where}.{key}: expected one of {', '.join(ZOOM_SELECT)} or null, found {json.dumps(value)}")
        else:
            least = 0 if kind is float else -2**16 if key == "vision_layer" else 1
            check_value(value, kind, f"{where}.{key}", most=math.inf if kind is float else 2**16, least=least)


def release_config(llm: LlamaConfig) -> dict:
    """The released config.json's fields: the LLM's at the top level and again as text_config,
    model_type dragonfly. The vision tower's shape is not in it (read from the weights)."""
    text = llama_to_hf(llm)
    return {"architectures": ["DragonflyForCausalLM"], **text, "model_type": "dragonfly",
            "bos_token_id": 128000, "eos_token_id": 128001, "text_config": text}


def config_to_dict(cfg: M.DragonflyConfig) -> dict:
    d = asdict(cfg)
    del d["llm"]  # recorded by the Hugging Face fields; the ViT is kept, its heads can't be inferred
    return d


def config_from_dict(d: dict, vcfg: ViTConfig, llm: LlamaConfig) -> M.DragonflyConfig:
    c = dict(d["crops"])
    c = crops_lib.CropConfig(**{k: tuple(map(tuple, v)) if k.endswith("grids") and v is not None else v
                                for k, v in c.items()})
    vit_low = ViTConfig(**d["vit_low"]) if d.get("vit_low") else None
    vcfg = ViTConfig(**d["vit"]) if d.get("vit") else vcfg
    return M.DragonflyConfig(**{**d, "crops": c, "vit": vcfg, "llm": llm, "vit_low": vit_low})


# ---- the vision tower's shape, from its weights ---------------------------------------------
def vit_from_weights(shapes: dict, prefix: str) -> ViTConfig:
    """Infer the tower's shape from tensor shapes (the Dragonfly config does not record it):
    width from the patch embedding, layers from the keys, heads = width / 64, patches per
    side from the position table. `shapes` maps checkpoint key -> shape."""
    patch = shapes[prefix + "embeddings.patch_embedding.weight"]  # (width, 3, p, p)
    n_pos = shapes[prefix + "embeddings.position_embedding.weight"][0]
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1:
        raise CheckpointError(f"position table of {n_pos} rows is not 1 + a square number of patches")
    width = patch[0]
    return ViTConfig(image_size=side * patch[-1], patch_size=patch[-1], width=width, layers=len(layer_ids),
                     heads=width // 64, mlp_dim=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0])


# ---- parameter names -------------------------------------------------------------------------
# vit.py's parameter names -> a Hugging Face CLIP checkpoint's (after `vision_model.`), first
# match wins.
VIT_NAMES = [
    (r"^patch_embed\.", "embeddings.patch_embedding."),
    (r"^cls$", "embeddings.class_embedding"),
    (r"^pos$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),  # sic, the released spelling
    (r"^ln_post\.", "post_layernorm."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),
    (r"^blocks\.(\d+)\.ln(\d)\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]

# llama.py's parameter names -> a Hugging Face Llama checkpoint's (before the release's
# `language_model.` prefix), first match wins.
LLAMA_NAMES = [
    (r"^embed_tokens\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^lm_head\.", "lm_head."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.ffn\.", r"model.layers.\1.mlp."),
]


def checkpoint_key(renames, name: str) -> str:
    """Our parameter `name` under a checkpoint's naming: the first of `renames` (VIT_NAMES or
    LLAMA_NAMES, regular expression -> replacement) that matches."""
    for pattern, repl in renames:
        name, n = re.subn(pattern, repl, name)
        if n:
            return name
    raise KeyError(name)


def checkpoint_names(model: M.Dragonfly) -> dict:
    """Our parameter names -> the released checkpoint's names (docs/release-facts.md#weight-names)."""
    prefix = {"vision": lambda r: "image_encoder.vision_model." + checkpoint_key(VIT_NAMES, r),
              "projection": lambda r: "vision_embed_tokens." + r,
              "llm": lambda r: "language_model." + checkpoint_key(LLAMA_NAMES, r),
              # ablation modules (not in any release): our own names
              "vision_low": lambda r: "low_image_encoder.vision_model." + checkpoint_key(VIT_NAMES, r),
              "projection_low": lambda r: "low_vision_embed_tokens." + r,
              "resampler": lambda r: "resampler." + r}
    return {name: prefix[name.split(".", 1)[0]](name.split(".", 1)[1]) for name, _ in model.named_parameters()}

"""
What train.py and plan.py share: the model a run starts from, which parts of it train (v2 Table
10's switches), FSDP2's units, the optimiser's groups and the learning-rate schedule. train.py
runs the loop over them; plan.py measures their memory and time on the meta device before GPUs
are rented. The flags and the stages as data: train_config.py.
"""
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import model as M
from lib import presets
from lib import pretrained
from lib import weights

# Training switches (v2 Table 10: projection / vision encoder / LLM) -> the modules each covers,
# the ablation modules included (presets.py counts their FLOPs the same way).
PARTS = {"vision": ("vision", "vision_low"), "projection": ("projection", "projection_low", "resampler"), "llm": ("llm",)}


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def init_weights(model):
    """A fresh model's initialisation: matrices N(0, 1/fan_in) (so activations keep their scale
    at any width; GPT-2's fixed 0.02 suits width ~768 and starves a 32-wide model of signal),
    embeddings N(0, 0.02) (the initial loss is then ~ln(vocab)), zero biases, unit norms."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def build_model(cfg, device):
    """The model a run starts from (cfg: train_config.TrainConfig): the tiny demo model, fresh;
    --init's checkpoint; or OpenAI's CLIP and a Hugging Face Llama joined by a new projection."""
    if cfg.model == "tiny":
        torch.manual_seed(cfg.seed)
        return init_weights(M.Dragonfly(presets.tiny_config(cfg.low_only, cfg.preset, cfg.high_pool))).to(device)
    if cfg.init:
        return pretrained.load(weights.require_checkpoint(cfg.init), device=device)
    if cfg.clip and cfg.llama:
        return pretrained.from_backbones(cfg.clip, cfg.llama, presets.PRESETS.get(cfg.preset), device=device)
    raise SystemExit("error: give --model tiny, --init DIR, or --clip DIR and --llama DIR")


def freeze(model, trainable):
    """requires_grad only on the trained parts (PARTS maps each switch of v2 Table 10 to
    its modules). The ViT blocks after the feature layer and its final LayerNorm never run
    (Dragonfly reads the penultimate layer), so they stay frozen too."""
    model.requires_grad_(False)
    for switch in trainable:
        for name in PARTS[switch]:
            if getattr(model, name, None) is not None:
                getattr(model, name).requires_grad_(True)
    for block in model.vision.blocks[model.cfg.vit.blocks_run(model.cfg.vision_layer):]:
        block.requires_grad_(False)
    model.vision.ln_post.requires_grad_(False)


def shard(model, dtype):
    """FSDP2: one unit per ViT block that runs and per Llama block, then the rest at the root
    (with the ViT blocks that never run: a unit whose forward never runs breaks FSDP2's
    mixed-precision backward)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)  # fp32 master weights and reduction
    ran = model.cfg.vit.blocks_run(model.cfg.vision_layer)
    for block in [*model.vision.blocks[:ran], *model.llm.layers]:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms and the CLS vector (all 1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def lr_at(step, total, cfg):
    """Cosine schedule with linear warmup over the first `cfg.warmup` fraction of the steps, down to
    `cfg.min_lr_ratio` of the peak (a multiplier of the learning rate: LambdaLR)."""
    warm = max(1, math.ceil(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""
Train Dragonfly: one flat script for both stages of the v2 paper's recipe (Table 10; SPEC §4)
and Dragonfly-Med's vision stage (Table 16), on one CPU process or many GPUs.

    torchrun --nproc_per_node=8 train.py --stage pretrain --data llava_pretrain.jsonl --images DIR --clip DIR --llama DIR
    torchrun --nproc_per_node=8 train.py --stage sft --data mix.jsonl --images DIR --init out/pretrain/final
    python train.py --model tiny --data data/zoom/train.jsonl --images data/zoom --out out/zoom

Plain torch.distributed: FSDP2 (`fully_shard`) per ViT block and per Llama block, bf16 compute
with fp32 gradient reduction on CUDA; NCCL on GPUs, gloo on CPU. Checkpoints with
torch.distributed.checkpoint every --save-every steps and on SIGTERM, written under a temporary
name and renamed; --resume continues from the latest one. The end exports a safetensors
directory that `Dragonfly.from_pretrained` and `sample.py` load.
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import crops
import llama
import model as M
import presets
import vit
from data import ShardedSampler, VLDataset, collate
from tokenizer import Tokenizer

# ---- configuration -------------------------------------------------------------------------
STAGES = {  # v2 Table 10 (pretrain, sft) and Dragonfly-Med Table 16 stage 1 (med-vision)
    "pretrain":   dict(trainable=("projection",), batch_size=64, lr=2e-5, grad_checkpoint=False),
    "sft":        dict(trainable=("projection", "vision", "llm"), batch_size=16, lr=2e-6, grad_checkpoint=True),
    "med-vision": dict(trainable=("projection", "vision"), batch_size=64, lr=2e-5, grad_checkpoint=False),
}


@dataclass
class TrainConfig:
    stage: str = "sft"
    model: str = ""               # "tiny" = a small random model (the zoom demo); else from --init / --clip + --llama
    init: str = ""                # a Dragonfly checkpoint directory to start from
    clip: str = ""                # OpenAI CLIP directory (stage 1 from backbones)
    llama: str = ""               # Hugging Face Llama-3 directory (stage 1 from backbones)
    tokenizer: str = ""           # tokenizer file/dir; default: --init, then --llama
    data: str = ""                # records file, or a folder holding train.jsonl (data/zoom)
    images: str = ""
    text_data: str = ""           # text-only conversations, mixed in at --text-prob
    text_prob: float = 0.0        # the release used 0.1 in stage 2
    loss_on: str = "assistant"    # "all" reproduces the release: every text token after <|begin_of_text|>
    max_seq: int = 4096
    low_only: bool = False        # ablation: the low-resolution crop only (paper's "L")
    preset: str = ""              # a presets.py name: from --clip/--llama the whole config; with --model tiny its levels
    high_pool: int = 0            # --model tiny: pooled side of each high crop's 8x8 grid (0: the demo's 2)
    trainable: tuple = ()
    batch_size: int = 16          # global batch, whatever the number of processes
    micro_batch: int = 1
    lr: float = 2e-6
    min_lr_ratio: float = 0.0
    warmup: float = 0.01          # fraction of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0            # 0: from epochs
    grad_checkpoint: bool = True
    dtype: str = "auto"           # auto: bf16 compute on CUDA, float32 on CPU
    workers: int = 2
    seed: int = 0
    out: str = "out/run"
    save_every: int = 1000
    resume: bool = False
    stop_after: int = 0           # testing aid: exit after this many steps as if interrupted
    export_dtype: str = "float32"  # dtype of the exported safetensors (bfloat16 halves the size)


def parse_config(argv=None) -> TrainConfig:
    """Stage defaults first, then every field overridable from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "trainable":
            p.add_argument(flag, nargs="+", choices=["projection", "vision", "llm"], default=None)
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    stage = args.get("stage", TrainConfig.stage)
    if stage not in STAGES:
        p.error(f"--stage must be one of {list(STAGES)}")
    if args.get("preset") and (args["preset"] not in presets.PRESETS or args.get("init")):
        p.error("--preset: a name from `python presets.py --list`, with --model tiny or --clip/--llama, not --init")
    return replace(TrainConfig(), **{**STAGES[stage], **args})


def tiny_config(low_only=False, preset="", high_pool=0) -> M.DragonflyConfig:
    """The zoom demo's model: 56 px crops (medium 112, high 336) cut into 7 px patches, a 3-block
    ViT read at block 2, a 2-layer Llama with the real Llama-3 vocabulary and tied embeddings so
    the checkpoint stays small. The medium and high crops pool their 8x8 grids to 2x2 (kernel 4,
    the release's 24x24 -> 6x6): the zoom data repeat the answer all over the page, so averaging
    loses nothing and the LLM reads 258 image positions instead of 738.
    The paper's ablations at this scale (data/zoom/ablations.py): `preset` keeps the resolution
    levels of a presets.py configuration (v2 Table 2); `high_pool` pools the high crops to the
    paper's sides (v2 Table 8), adaptively where the side does not divide 8 (3x3, 6x6)."""
    cfg = M.v2_config(vit.ViTConfig(56, 7, 64, 3, 1, 256),
                      llama.LlamaConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128,
                                        tie_embeddings=True, max_seq_len=1024))
    cfg = replace(cfg, crops=replace(crops.V2, size=56), low_pool=4, medium_pool=2, high_pool=2)
    if low_only:
        cfg = replace(cfg, crops=replace(cfg.crops, medium=False, high=False))
    if preset:
        levels = presets.PRESETS[preset].crops
        cfg = replace(cfg, crops=replace(cfg.crops, low=levels.low, medium=levels.medium, high=levels.high))
    if high_pool:  # 8x8 unpooled: 36 x 66 high positions, beyond the demo's context of 1024
        cfg = replace(cfg, high_pool=high_pool, adaptive_pool=bool(8 % high_pool), llm=replace(cfg.llm, max_seq_len=4096))
    return cfg


# ---- setup ---------------------------------------------------------------------------------
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


def build_model(cfg: TrainConfig, device):
    if cfg.model == "tiny":
        torch.manual_seed(cfg.seed)
        return init_weights(M.Dragonfly(tiny_config(cfg.low_only, cfg.preset, cfg.high_pool))).to(device)
    if cfg.init:
        return M.Dragonfly.from_pretrained(cfg.init, device=device)
    if cfg.clip and cfg.llama:
        return M.Dragonfly.from_backbones(cfg.clip, cfg.llama, presets.PRESETS.get(cfg.preset), device=device)
    raise SystemExit("error: give --model tiny, --init DIR, or --clip DIR and --llama DIR")


def find_tokenizer(cfg: TrainConfig) -> Path:
    for c in [cfg.tokenizer, cfg.init, cfg.llama and Path(cfg.llama) / "original" / "tokenizer.model", cfg.llama]:
        if c and Path(c).exists():
            return Path(c)
    try:  # the tiny demo: Meta's Llama-3 tokenizer from the llama-models package
        import llama_models
        return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    except ImportError:
        raise SystemExit("error: no tokenizer; pass --tokenizer (a tokenizer.model or tokenizer.json)")


def freeze(model, trainable):
    """requires_grad only on the trained parts (model.PARTS maps each switch of v2 Table 10 to
    its modules). The ViT blocks after the feature layer and its final LayerNorm never run
    (Dragonfly reads the penultimate layer), so they stay frozen too."""
    model.requires_grad_(False)
    for switch in trainable:
        for name in M.PARTS[switch]:
            if getattr(model, name, None) is not None:
                getattr(model, name).requires_grad_(True)
    for block in model.vision.blocks[model.cfg.vit.blocks_run(model.cfg.vision_layer):]:
        block.requires_grad_(False)
    model.vision.ln_post.requires_grad_(False)


def shard(model, dtype):
    """FSDP2: one unit per ViT block that runs and per Llama block, then the rest at the root
    (with the ViT blocks that never run: a unit whose forward never runs breaks FSDP2's
    mixed-precision backward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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


def lr_at(step, total, cfg: TrainConfig):
    """Cosine schedule with linear warmup over the first `warmup` fraction of the steps."""
    warm = max(1, math.ceil(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(out: Path, step, model, optim, scheduler, sampler_state, rank):
    """model + optimizer through torch.distributed.checkpoint (sharded), the rest per rank;
    written to step_N.tmp and renamed, and `latest` is replaced atomically afterwards."""
    final, tmp = out / f"step_{step:07d}", out / f"step_{step:07d}.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    extra = {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
    barrier()


def load_checkpoint(out: Path, model, optim, scheduler, rank):
    path = out / (out / "latest").read_text().strip()
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"extra_rank{rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"])
    np.random.set_state(extra["rng"]["numpy"])
    random.setstate(extra["rng"]["python"])
    if extra["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return extra["step"], extra["sampler"]


def export(out: Path, model, mcfg, tokenizer_path, rank, dtype):
    """Gather the full weights on rank 0 and write a from_pretrained-loadable directory."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final = M.build(mcfg, torch.float32, "cpu")
        final.load_state_dict(state)
        final.save_pretrained(out / "final", dtype=getattr(torch, dtype))
        tok = Path(tokenizer_path)
        tok = tok if tok.is_file() else next(p for p in (tok / "tokenizer.model", tok / "tokenizer.json") if p.exists())
        shutil.copy(tok, out / "final" / tok.name)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- the loop ------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=2))
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    model = build_model(cfg, device)
    mcfg = model.cfg
    dtype = torch.bfloat16 if (cfg.dtype == "auto" and device.type == "cuda") or cfg.dtype == "bfloat16" else torch.float32
    freeze(model, cfg.trainable)
    for block in [*model.vision.blocks, *model.llm.layers]:
        block.grad_checkpoint = cfg.grad_checkpoint
    if world > 1:
        model = shard(model, dtype)
    model.train()
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                              fused=device.type == "cuda")

    tok_path = find_tokenizer(cfg)
    tok = Tokenizer.from_file(tok_path)
    data = Path(cfg.data) / "train.jsonl" if Path(cfg.data).is_dir() else Path(cfg.data)  # a file, or a prepared folder
    images_dir = cfg.images or str(data.parent)
    dataset = VLDataset(data, images_dir, tok, mcfg.crops, M.image_positions(mcfg), max_seq=cfg.max_seq,
                        loss_on=cfg.loss_on, text_path=cfg.text_data or None, text_prob=cfg.text_prob, seed=cfg.seed)
    per_step = cfg.micro_batch * world
    if cfg.batch_size % per_step:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not a multiple of micro batch x processes = {per_step}")
    accum = cfg.batch_size // per_step
    sampler = ShardedSampler(len(dataset), rank, world, cfg.seed)
    steps_per_epoch = len(sampler) // (cfg.micro_batch * accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(s, total, cfg))

    step = 0
    if cfg.resume and (out / "latest").exists():
        step, sampler_state = load_checkpoint(out, model, optim, scheduler, rank)
        sampler.load_state(sampler_state)
        if rank == 0:
            print(f"resumed from step {step}", file=sys.stderr)

    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=partial(collate, pad_id=tok.eos_id), persistent_workers=False)

    # Workers prefetch ahead of the loop, so the data position saved is what the loop consumed.
    consumed = {"n": sampler.position}

    def micro_batches():
        while True:
            for batch in loader:
                parts = [p for p in (batch["image"], batch["text"]) if p]
                consumed["n"] += sum(batch["skipped"].values()) + sum(len(p["index"]) for p in parts)
                yield batch
            sampler.set_epoch(sampler.epoch + 1)
            consumed["n"] = 0

    batches = micro_batches()
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc=cfg.stage)
    skipped, truncated = Counter(), 0
    # one process has no FSDP to cast for it: autocast gives the same bf16 compute on fp32 weights
    autocast = torch.autocast(device.type, dtype=dtype, enabled=world == 1 and dtype != torch.float32)
    while step < total:
        t0 = time.time()
        group = [next(batches) for _ in range(accum)]  # the whole global step, to count its tokens first
        parts = [p for b in group for p in (b["image"], b["text"]) if p]
        n_tokens = torch.tensor(float(sum(p["n_labels"] for p in parts)), device=device)
        n_samples = torch.tensor(float(sum(len(p["tokens"]) for p in parts)), device=device)
        if world > 1:
            dist.all_reduce(n_tokens)
            dist.all_reduce(n_samples)
        loss_sum = torch.zeros((), device=device)
        positions = 0
        for i, p in enumerate(parts):
            if world > 1:
                model.set_requires_gradient_sync(i == len(parts) - 1)
            pixels = p.get("pixels")
            with autocast:
                _, loss = model(p["tokens"].to(device), None if pixels is None else pixels.to(device),
                                p["labels"].to(device), grids=p.get("grids") or (None, None), reduction="sum")
            # normalise by the global step's token count; FSDP averages gradients over ranks
            (loss * world / n_tokens.clamp(min=1)).backward()
            loss_sum += loss.detach()
            positions += p["tokens"].numel() + (0 if pixels is None else len(pixels) * M.image_positions(mcfg))
        for b in group:
            skipped.update(b["skipped"])
            truncated += b["truncated"]
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optim.step()
        optim.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        sampler_state = sampler.state(consumed["n"])
        if world > 1:
            dist.all_reduce(loss_sum)
        dt = time.time() - t0
        if rank == 0:
            rec = {"step": step, "loss": loss_sum.item() / max(1.0, n_tokens.item()), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm.item(), "samples_per_s": n_samples.item() / dt,
                   "tokens_per_s": positions * world / dt, "skipped": dict(skipped), "truncated": truncated}
            if device.type == "cuda":
                peak = {torch.bfloat16: 989e12, torch.float32: 67e12}[dtype]  # H100 SXM dense
                flops = sum(presets.train_flops_per_sample(mcfg, p["tokens"].shape[1], cfg.trainable, image="pixels" in p)
                            * len(p["tokens"]) for p in parts)
                rec["mfu"] = flops * world / dt / peak
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rec.items()
                             if k in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gib")})
            bar.update(1)
        interrupted = stop["signal"] or (cfg.stop_after and step == cfg.stop_after)
        if world > 1:
            flag = torch.tensor(float(interrupted), device=device)
            dist.all_reduce(flag)
            interrupted = bool(flag.item())
        if interrupted or step % cfg.save_every == 0 or step == total:
            save_checkpoint(out, step, model, optim, scheduler, sampler_state, rank)
        if interrupted:
            if rank == 0:
                print(f"\nstopped at step {step}; continue with --resume", file=sys.stderr)
            break
    else:
        export(out, model, mcfg, tok_path, rank, cfg.export_dtype)
        if rank == 0:
            print(f"\nexported {out / 'final'}", file=sys.stderr)
    if bar:
        bar.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()

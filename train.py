"""
Train Dragonfly: one flat script for both stages of the v2 paper's recipe (Table 10;
docs/release-facts.md#training-recipe) and Dragonfly-Med's vision stage (Table 16), on one CPU
process or many GPUs.

    torchrun --nproc_per_node=8 train.py --stage pretrain --data llava_pretrain.jsonl --images DIR --clip DIR --llama DIR
    torchrun --nproc_per_node=8 train.py --stage sft --data mix.jsonl --images DIR --init out/pretrain/final
    python train.py --model tiny --data data/zoom/train.jsonl --images data/zoom --out out/zoom

Plain torch.distributed: FSDP2 (`fully_shard`) per ViT block and per Llama block, bf16 compute
with fp32 gradient reduction on CUDA; NCCL on GPUs, gloo on CPU. Checkpoints (checkpoint.py)
every --save-every steps and on SIGTERM; --resume continues from the newest intact one. Data
that cannot train (missing, empty, mostly skipped) stop the run with one line. The end exports
a safetensors directory that `Dragonfly.from_pretrained` and `sample.py` load.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    import first_run
    first_run.one_line_for_missing_packages()

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import model as M
import presets
import weights
from data import RecordFile, ShardedSampler, SkipCount, VLDataset, collate
from tokenizer import Tokenizer

# ---- configuration -------------------------------------------------------------------------
STAGES = {  # v2 Table 10 (pretrain, sft) and Dragonfly-Med Table 16 stage 1 (med-vision)
    "pretrain":   dict(trainable=("projection",), batch_size=64, lr=2e-5, grad_checkpoint=False),
    "sft":        dict(trainable=("projection", "vision", "llm"), batch_size=16, lr=2e-6, grad_checkpoint=True),
    "med-vision": dict(trainable=("projection", "vision"), batch_size=64, lr=2e-5, grad_checkpoint=False),
}


def opt(default, help, choices=None):
    """A TrainConfig field with its --help line (and the values it accepts)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    stage: str = opt("sft", "what trains, with the stage's batch, lr and checkpointing (v2 Table 10, Med Table 16)", tuple(STAGES))
    model: str = opt("", "tiny: the zoom demo's small random model; omit to start from --init, or --clip + --llama", ("tiny",))
    init: str = opt("", "a Dragonfly checkpoint directory to start from (e.g. stage 1's OUT/final)")
    clip: str = opt("", "OpenAI CLIP directory (Hugging Face layout): stage 1 from the backbones, with --llama")
    llama: str = opt("", "Llama-3 directory (Hugging Face layout), with --clip")
    tokenizer: str = opt("", "tokenizer.model/.json or a folder with one; default: from --init, then --llama "
                             "(--model tiny: the shipped checkpoints/zoom-tiny one)")
    data: str = opt("", "training records (LLaVA JSON or release JSONL), or a folder holding train.jsonl; required")
    images: str = opt("", "folder the records' image paths are relative to; empty: the records file's folder")
    text_data: str = opt("", "text-only conversations to mix in at --text-prob")
    text_prob: float = opt(0.0, "chance that a sample comes from --text-data (the release: 0.1 in stage 2)")
    loss_on: str = opt("assistant", "the text that gets a loss; all = every token after <|begin_of_text|>, as the release",
                       ("assistant", "all"))
    max_seq: int = opt(4096, "positions per sample, image block included; longer text is cut from the end")
    low_only: bool = opt(False, "the low-resolution crop only (the paper's L ablation; --model tiny)")
    preset: str = opt("", "a presets.py name: from --clip/--llama the whole config; with --model tiny its resolution levels")
    high_pool: int = opt(0, "--model tiny: pooled side of each high crop's 8x8 grid (0: the demo's 2)")
    trainable: tuple = opt((), "the parts that train", ("projection", "vision", "llm"))
    batch_size: int = opt(16, "global batch in samples, whatever the number of processes")
    micro_batch: int = opt(1, "samples per forward pass and process; gradient accumulation makes up the batch")
    lr: float = opt(2e-6, "peak learning rate (AdamW, betas 0.9, 0.999)")
    min_lr_ratio: float = opt(0.0, "the cosine schedule's last lr, as a fraction of --lr")
    warmup: float = opt(0.01, "linear warmup, as a fraction of the steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (none on biases, norms and CLS)")
    grad_clip: float = opt(1.0, "clip the gradient norm to this")
    epochs: float = opt(1.0, "passes over --data (fractions allowed)")
    max_steps: int = opt(0, "optimizer steps; 0: from --epochs")
    grad_checkpoint: bool = opt(True, "recompute each block in the backward: less memory, ~1/3 more compute")
    dtype: str = opt("auto", "compute dtype; auto: bfloat16 on CUDA, float32 on CPU", ("auto", "float32", "bfloat16"))
    workers: int = opt(2, "DataLoader worker processes per training process")
    seed: int = opt(0, "seed of the data order, the captions' instructions and a fresh model's weights")
    out: str = opt("out/run", "output folder: config.json, log.jsonl, checkpoints step_N, the exported final")
    save_every: int = opt(1000, "a checkpoint every N steps (also on SIGTERM and at the end)")
    resume: bool = opt(False, "continue from the newest intact checkpoint in --out")
    stop_after: int = opt(0, "testing aid: stop after N steps as if interrupted; 0: never")
    export_dtype: str = opt("float32", "dtype of OUT/final's weights (bfloat16 halves the size)", ("float32", "bfloat16", "float16"))
    max_skip: float = opt(0.5, "stop once more than this fraction of the records read is skipped (malformed, missing image, ...)")


def show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return (" ".join(value) if isinstance(value, tuple) else str(value)) or "none"


def parse_config(argv=None) -> TrainConfig:
    """Stage defaults first, then every field overridable from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        by_stage = {stage: d[f.name] for stage, d in STAGES.items() if f.name in d}
        default = ", ".join(f"{stage} {show(v)}" for stage, v in by_stage.items()) if by_stage else show(f.default)
        kw = dict(default=None, choices=f.metadata["choices"], help=f"{f.metadata['help']} (default: {default})")
        if f.type in (bool, "bool"):
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=str if f.name == "trainable" else type(f.default),
                           nargs="+" if f.name == "trainable" else None, **kw)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "trainable" in args:
        args["trainable"] = tuple(args["trainable"])
    if args.get("preset") and (args["preset"] not in presets.PRESETS or args.get("init")):
        p.error("--preset: a name from `python presets.py --list`, with --model tiny or --clip/--llama, not --init")
    return replace(TrainConfig(), **{**STAGES[args.get("stage", TrainConfig.stage)], **args})


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
        return init_weights(M.Dragonfly(presets.tiny_config(cfg.low_only, cfg.preset, cfg.high_pool))).to(device)
    if cfg.init:
        return M.Dragonfly.from_pretrained(weights.require_checkpoint(cfg.init), device=device)
    if cfg.clip and cfg.llama:
        return M.Dragonfly.from_backbones(cfg.clip, cfg.llama, presets.PRESETS.get(cfg.preset), device=device)
    raise SystemExit("error: give --model tiny, --init DIR, or --clip DIR and --llama DIR")


def find_tokenizer(cfg: TrainConfig) -> Path:
    shipped = cfg.model == "tiny" and Path(__file__).parent / "checkpoints" / "zoom-tiny" / "tokenizer.model"  # Meta's Llama-3
    for c in [cfg.tokenizer, cfg.init, cfg.llama and Path(cfg.llama) / "original" / "tokenizer.model", cfg.llama, shipped]:
        if c and Path(c).exists():
            return Path(c)
    raise SystemExit("error: no tokenizer; pass --tokenizer (a tokenizer.model or tokenizer.json)")


def open_records(cfg: TrainConfig) -> RecordFile:
    """--data's records (a folder means its train.jsonl), checked before anything slow starts."""
    if not cfg.data:
        raise SystemExit("error: no --data: give a records file (LLaVA JSON or release JSONL) or a folder holding train.jsonl")
    data = Path(cfg.data) / "train.jsonl" if Path(cfg.data).is_dir() else Path(cfg.data)
    for path, flag in ((data, "--data"), (cfg.text_data and Path(cfg.text_data), "--text-data")):
        if path and not path.is_file():
            raise SystemExit(f"error: {flag} {path}: no such file")
    try:
        records = RecordFile(data)
    except ValueError as e:                  # a JSON list that does not parse
        raise SystemExit(f"error: --data {data}: {e}") from None
    if len(records) == 0:
        raise SystemExit(f"error: --data {data} holds no records")
    return records


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


# ---- the loop ------------------------------------------------------------------------------
def loss_warning(log: Path):
    """A loss still near where it started means a model that has not learned yet (the zoom demo
    after 20 steps: 12.2 -> 8.2, and it answers "" to every page): say so, since the export
    otherwise looks like a finished run. "Near": above half the first step's loss, and above
    2 nats per token, so fine-tuning a pretrained model, whose loss starts low, is not flagged."""
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    if losses and losses[-1] > max(0.5 * losses[0], 2.0):
        return (f"warning: the loss is still {losses[-1]:.2f} after {len(losses)} steps ({losses[0]:.2f} at step 1): "
                "this model has hardly learned and may answer nothing; train longer, or check --lr")


def step_counts(parts, group, world):
    """This global step's supervised tokens, samples, skipped records (by reason) and truncated
    samples, summed over the processes."""
    mine = [sum(p["n_labels"] for p in parts), sum(len(p["tokens"]) for p in parts),
            sum((b["skipped"] for b in group), Counter()), sum(b["truncated"] for b in group)]
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return [sum((e[k] for e in every), start) for k, start in enumerate((0, 0, Counter(), 0))]


def main(argv=None):
    cfg = parse_config(argv)
    records = open_records(cfg)
    data = records.path
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
    images_dir = cfg.images or str(data.parent)
    dataset = VLDataset(records, images_dir, tok, mcfg.crops, M.image_positions(mcfg), max_seq=cfg.max_seq,
                        loss_on=cfg.loss_on, text_path=cfg.text_data or None, text_prob=cfg.text_prob, seed=cfg.seed)
    per_step = cfg.micro_batch * world
    if cfg.batch_size % per_step:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not a multiple of micro batch x processes = {per_step}")
    accum = cfg.batch_size // per_step
    sampler = ShardedSampler(len(dataset), rank, world, cfg.seed)
    steps_per_epoch = len(sampler) // (cfg.micro_batch * accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(s, total, cfg))

    step, sampler_state = checkpoint.resume(out, model, optim, scheduler, rank) if cfg.resume else (0, None)
    if sampler_state:
        sampler.load_state(sampler_state)
    if rank == 0:
        checkpoint.trim_log(out / "log.jsonl", step)   # the steps after the checkpoint are trained again

    stop = checkpoint.Stop()
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
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc=cfg.stage) if rank == 0 else None
    health = SkipCount(len(dataset), cfg.max_skip)
    saved, interrupted, waiting = step, False, False    # saved: the step of the newest checkpoint
    # one process has no FSDP to cast for it: autocast gives the same bf16 compute on fp32 weights
    autocast = torch.autocast(device.type, dtype=dtype, enabled=world == 1 and dtype != torch.float32)
    try:
        while step < total and not interrupted:
            t0 = time.time()
            with stop.waiting_for_data():
                group = [next(batches) for _ in range(accum)]  # the whole global step, to count its tokens first
            parts = [p for b in group for p in (b["image"], b["text"]) if p]
            n_tokens, n_samples, skipped, truncated = step_counts(parts, group, world)
            health.add(n_samples, skipped, truncated)
            if health.problem():
                raise SystemExit(f"error: --data {data}: {health.problem()}")
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
                (loss * world / max(1, n_tokens)).backward()
                loss_sum += loss.detach()
                positions += p["tokens"].numel() + (0 if pixels is None else len(pixels) * M.image_positions(mcfg))
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
                rec = {"step": step, "loss": loss_sum.item() / max(1, n_tokens), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm.item(), "samples_per_s": n_samples / dt, "tokens_per_s": positions * world / dt,
                       "skipped": dict(health.skipped), "truncated": health.truncated}
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
            interrupted = stop.requested or (cfg.stop_after and step == cfg.stop_after)
            if world > 1:
                flag = torch.tensor(float(interrupted), device=device)
                dist.all_reduce(flag)
                interrupted = bool(flag.item())
            if not interrupted and (step % cfg.save_every == 0 or step == total):
                checkpoint.save(out, step, model, optim, scheduler, sampler_state, rank)
                saved = step
    except checkpoint.Interrupted:
        interrupted = waiting = True
    finally:
        if bar:
            bar.close()
    if interrupted:
        # Interrupted while waiting for data, several processes may be at different points: no collective save.
        if step > saved and not (waiting and world > 1):
            checkpoint.save(out, step, model, optim, scheduler, sampler_state, rank)
            saved = step
        checkpoint.say(rank, f"stopped at step {step}; " + (f"continue from step {saved} with --resume" if saved else "nothing to save"))
    else:
        if health.problem(final=True):
            raise SystemExit(f"error: --data {data}: {health.problem(final=True)}")
        checkpoint.export(out / "final", model, mcfg, tok_path, rank, cfg.export_dtype)
        checkpoint.say(rank, f"exported {out / 'final'}")
        checkpoint.say(rank, loss_warning(out / "log.jsonl") if rank == 0 else None)
    checkpoint.say(rank, health.summary())
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    try:
        main()
    except weights.CheckpointError as e:  # a wrong --init, --clip or --llama: one line, not a traceback
        sys.exit(f"error: {e}")

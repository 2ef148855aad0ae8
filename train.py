"""
Train Dragonfly: one flat script for both stages of the v2 paper's recipe (Table 10;
docs/release-facts.md#training-recipe) and Dragonfly-Med's vision stage (Table 16), on one CPU
process or many GPUs.

    torchrun --nproc_per_node=8 train.py --stage pretrain --data llava_pretrain.jsonl --images DIR --clip DIR --llama DIR
    torchrun --nproc_per_node=8 train.py --stage sft --data mix.jsonl --images DIR --init out/pretrain/final
    python train.py --model tiny --data data/zoom/train.jsonl --images data/zoom --out out/zoom

Plain torch.distributed: FSDP2 (`fully_shard`) per ViT block and per Llama block, bf16 compute
with fp32 gradient reduction on CUDA; NCCL on GPUs, gloo on CPU. The flags: lib/train_config.py.
Checkpoints (lib/checkpoint.py) every --save-every steps and on SIGTERM or Ctrl-C; --resume
continues the run in --out from its newest intact one. Data that cannot train (missing, empty,
mostly skipped) and a loss or weight that is no longer a finite number stop the run with one
line. The end exports a safetensors directory that `pretrained.load` and `sample.py` load.
"""
import json
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lib import checkpoint
import model as M
from lib import presets
from lib import release_recipe
from lib import weights
from data import release_recipe as release_data
from data.dataset import ShardedSampler, SkipCount, VLDataset, collate
from data.show import show
from data.formats import RecordFile
from lib.tokenizer import Tokenizer
from lib.train_config import TrainConfig, inputs, parse_config, run_identity
from lib.training import build_model, freeze, lr_at, param_groups, setup_distributed, shard


# ---- setup ---------------------------------------------------------------------------------
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
    opened = {}
    for path, flag in ((data, "--data"), (cfg.text_data and Path(cfg.text_data), "--text-data"),
                       (cfg.math_data and Path(cfg.math_data), "--math-data")):
        if path and not path.is_file():
            raise SystemExit(f"error: {flag} {path}: no such file")
        try:
            opened[flag] = path and RecordFile(path)
        except ValueError as e:              # a JSON list that does not parse, a first line that is not JSON
            raise SystemExit(f"error: {flag} {path}: {e}") from None
    records = opened["--data"]
    if cfg.text_prob > 0 and not cfg.text_data:
        raise SystemExit(f"error: --text-prob {cfg.text_prob:g} mixes in text-only records: give them with --text-data")
    if len(records) == 0:
        raise SystemExit(f"error: --data {data} holds no records")
    return records


# ---- the loop ------------------------------------------------------------------------------
def loss_warning(log: Path):
    """A loss still near where it started means a model that has not learned yet (the zoom demo
    after 20 steps: 12.2 -> 8.2, and it answers "" to every page): say so, since the export
    otherwise looks like a finished run. "Near": above half the first step's loss, and above
    2 nats per token, so fine-tuning a pretrained model, whose loss starts low, is not flagged."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if r["loss"] is not None]  # a step with no usable sample has none
    if losses and not losses[-1][1] <= max(0.5 * losses[0][1], 2.0):   # `not <=`: a NaN is flagged too
        return (f"warning: the loss is still {losses[-1][1]:.2f} after {records[-1]['step']} steps ({losses[0][1]:.2f} "
                f"at step {losses[0][0]}): this model has hardly learned and may answer nothing; train longer, or check --lr")


def diverged(step, what, out: Path, saved: int) -> str:
    """The line that ends a run whose numbers stopped being numbers (--lr far too high, say)."""
    kept = f"{out / f'step_{saved:07d}'} is the newest checkpoint, kept" if saved else "no checkpoint was saved"
    return (f"error: step {step}: {what}: training diverged; stopped, {kept}, nothing exported; "
            "lower --lr (in a new --out, or with --force) or check the data")


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
    """Check the flags, data and --out, claim --out for this run, train, release --out. A run that
    cannot go on (checkpoint.RunError) ends in one `error:` line and exit status 1."""
    try:
        return run(argv)
    except checkpoint.RunError as e:
        raise SystemExit(f"error: {e}") from None


def run(argv):
    cfg = parse_config(argv, __doc__)
    records = open_records(cfg)
    tok_path = find_tokenizer(cfg)
    if cfg.show_examples:       # what the loss sees, then exit without training (data/show.py)
        return show(cfg, records, Tokenizer.from_file(tok_path), cfg.show_examples, cfg.json)
    out = Path(cfg.out)
    checkpoint.check_out(out, inputs(cfg, records.path, tok_path))   # before anything is written
    rank, world, device = setup_distributed()
    try:
        run_id = checkpoint.claim(out, run_identity(cfg, records.path, world), cfg.resume, cfg.force, rank)
        try:
            return train(cfg, records, tok_path, run_id, rank, world, device)
        finally:
            checkpoint.release(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start(cfg: TrainConfig, rank):
    """Seed every generator; print the resolved flags and keep them as OUT/config.json."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=2))
        (Path(cfg.out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))


def prepare_model(cfg: TrainConfig, device, world):
    """The model as the flags say: built, frozen but for the stage's parts, checkpointing, sharded
    over several processes; its AdamW; and the compute dtype (bf16 on CUDA unless --dtype)."""
    model = build_model(cfg, device)
    dtype = torch.bfloat16 if (cfg.dtype == "auto" and device.type == "cuda") or cfg.dtype == "bfloat16" else torch.float32
    release = cfg.recipe == "release"
    (release_recipe.freeze if release else freeze)(model, cfg.trainable)
    for block in [*model.vision.blocks, *model.llm.layers]:
        block.grad_checkpoint = cfg.grad_checkpoint
    if world > 1:
        model = shard(model, dtype)
    model.train()
    groups = (release_recipe.param_groups if release else param_groups)(model, cfg.weight_decay)
    optim = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    return model, optim, dtype


def prepare_data(cfg: TrainConfig, records: RecordFile, tok, mcfg, rank, world):
    """The dataset, this process's sampler, the micro-batches per global step and the steps in all."""
    if cfg.recipe == "release":   # text and math batches are added per step: release_streams
        dataset = release_data.ReleaseDataset(records, cfg.images or str(records.path.parent), mcfg.crops, cfg.seed,
                                              cfg.images_anywhere)
    else:
        dataset = VLDataset(records, cfg.images or str(records.path.parent), tok, mcfg.crops, M.image_positions(mcfg),
                            max_seq=cfg.max_seq, loss_on=cfg.loss_on, text_path=cfg.text_data or None,
                            text_prob=cfg.text_prob, seed=cfg.seed, images_anywhere=cfg.images_anywhere)
    per_step = cfg.micro_batch * world
    if cfg.batch_size % per_step:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not a multiple of micro batch x processes = {per_step}")
    accum = cfg.batch_size // per_step
    sampler = ShardedSampler(len(dataset), rank, world, cfg.seed)
    steps_per_epoch = len(sampler) // (cfg.micro_batch * accum)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    return dataset, sampler, accum, total


def release_streams(cfg: TrainConfig, tok, mcfg, rank, world) -> dict:
    """--recipe release: the text and math batches it adds every 10th and 50th iteration, each an
    endless stream of --micro-batch rows (the release cycles its streaming datasets, T:303-307)."""
    streams = {}
    for kind, path in (("text", cfg.text_data), ("math", cfg.math_data)):
        if path:
            data = release_data.ReleaseDataset(RecordFile(path), None, mcfg.crops, cfg.seed, load_images=False)
            sampler = ShardedSampler(len(data), rank, world, cfg.seed)
            loader = torch.utils.data.DataLoader(data, batch_size=cfg.micro_batch, sampler=sampler,
                                                 collate_fn=partial(release_data.collate, tok=tok, max_length=cfg.max_seq))
            batches = (b["text"] or b["image"] for b in micro_batches(loader, sampler, {"n": 0}) if b["text"] or b["image"])
            streams[kind] = partial(next, batches)
    return streams


def micro_batches(loader, sampler, consumed: dict, stop=None):
    """The loader's batches epoch after epoch. Workers prefetch ahead of the loop, so
    consumed["n"] counts what the loop took (the data position a checkpoint saves). Only the wait
    for a batch can be cut short by a signal (`stop`): while the loader forks its workers or
    turns an epoch, a signal is a request the loop reads after the step."""
    waiting = stop.waiting_for_data if stop else nullcontext
    epoch = iter(loader)
    while True:
        with waiting():
            batch = next(epoch, None)
        if batch is None:
            sampler.set_epoch(sampler.epoch + 1)
            consumed["n"] = 0
            epoch = iter(loader)    # the same workers (persistent_workers), the new epoch's order
            continue
        parts = [p for p in (batch["image"], batch["text"]) if p]
        consumed["n"] += sum(batch["skipped"].values()) + sum(len(p["index"]) for p in parts)
        yield batch


def forward_backward(model, parts, n_tokens, world, device, autocast):
    """Gradients of one global step, accumulated over its micro-batches: (this process's summed
    loss, the positions it ran)."""
    loss_sum, positions = torch.zeros((), device=device), 0
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
        positions += p["tokens"].numel() + (0 if pixels is None else len(pixels) * M.image_positions(model.cfg))
    return loss_sum, positions


def gradients(cfg, model, step, parts, extras, n_tokens, world, device, autocast):
    """One global step's clipped gradients, by our recipe or the release's (--recipe release):
    (the loss summed over every process's tokens, the positions this process ran, the gradient
    norm before clipping)."""
    if cfg.recipe == "release":    # the release's passes and logged loss; step_record divides by n_tokens
        passes = release_recipe.step_passes(step, parts, extras)
        logged, positions = release_recipe.forward_backward(model, passes, len(parts), device, autocast)
        loss_sum = logged * n_tokens / world
    else:
        loss_sum, positions = forward_backward(model, parts, n_tokens, world, device, autocast)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum, positions, grad_norm


def step_record(cfg, step, loss_sum, n_tokens, n_samples, positions, grad_norm, lr, dt, parts, world, device, dtype,
                mcfg, health) -> dict:
    """One line of OUT/log.jsonl: loss, lr, speed, skipped data; on CUDA also MFU and peak memory."""
    rec = {"step": step, "loss": loss_sum.item() / n_tokens if n_tokens else None, "lr": lr,
           "grad_norm": grad_norm.item(), "samples_per_s": n_samples / dt, "tokens_per_s": positions * world / dt,
           "skipped": dict(health.skipped), "truncated": health.truncated}
    if device.type == "cuda":
        peak = {torch.bfloat16: 989e12, torch.float32: 67e12}[dtype]  # H100 SXM dense
        flops = sum(presets.train_flops_per_sample(mcfg, p["tokens"].shape[1], cfg.trainable, image="pixels" in p)
                    * len(p["tokens"]) for p in parts)
        rec["mfu"] = flops * world / dt / peak
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rec


def stop_everywhere(interrupted, world, device) -> bool:
    """A stop (SIGTERM, Ctrl-C, --stop-after) on any process stops them all at the same step."""
    if world > 1:
        flag = torch.tensor(float(interrupted), device=device)
        dist.all_reduce(flag)
        interrupted = bool(flag.item())
    return interrupted


def train(cfg: TrainConfig, records: RecordFile, tok_path: Path, run_id: str, rank, world, device):
    # About 90 lines on purpose: the loop reads top to bottom as one training step (data, the
    # gradients, the finite check, the optimiser, the log, the checkpoint), as nanoGPT's does.
    data, out = records.path, Path(cfg.out)
    start(cfg, rank)
    model, optim, dtype = prepare_model(cfg, device, world)
    mcfg = model.cfg
    tok = Tokenizer.from_file(tok_path)
    dataset, sampler, accum, total = prepare_data(cfg, records, tok, mcfg, rank, world)
    schedule = release_recipe.lr_lambda(total, cfg.warmup) if cfg.recipe == "release" else (lambda s: lr_at(s, total, cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    step, sampler_state = checkpoint.resume(out, model, optim, scheduler, rank, run_id, world) if cfg.resume else (0, None)
    if sampler_state:
        sampler.load_state(sampler_state)
    if rank == 0:
        checkpoint.trim_log(out / "log.jsonl", step)   # the steps after the checkpoint are trained again

    stop = checkpoint.Stop()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=partial(release_data.collate, tok=tok, max_length=cfg.max_seq)
                                         if cfg.recipe == "release" else partial(collate, pad_id=tok.eos_id),
                                         persistent_workers=cfg.workers > 0,
                                         worker_init_fn=checkpoint.ignore_stop_signals if cfg.workers else None)
    extras = release_streams(cfg, tok, mcfg, rank, world) if cfg.recipe == "release" else {}
    consumed = {"n": sampler.position}
    batches = micro_batches(loader, sampler, consumed, stop)
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc=cfg.stage) if rank == 0 else None
    health = SkipCount(len(dataset), cfg.max_skip)
    saved, interrupted = step, False    # saved: the step of the newest checkpoint

    def save():
        if not checkpoint.finite(model):
            raise SystemExit(diverged(step, "a weight is not a finite number", out, saved))
        checkpoint.save(out, step, model, optim, scheduler, sampler_state, rank, run_id, world)
        return step

    # one process has no FSDP to cast for it: autocast gives the same bf16 compute on fp32 weights
    autocast = torch.autocast(device.type, dtype=dtype, enabled=world == 1 and dtype != torch.float32)
    try:
        while step < total and not interrupted:
            t0 = time.time()
            try:
                group = [next(batches) for _ in range(accum)]  # the whole global step, to count its tokens first
            except checkpoint.Interrupted:
                group = None
            # Every process agrees before the step's collectives: a signal while one waited for data
            # (the wait may never end) stops them all here, at the same step, so they save together.
            if stop_everywhere(group is None or stop.requested, world, device):
                interrupted = True
                break
            parts = [p for b in group for p in (b["image"], b["text"]) if p]
            n_tokens, n_samples, skipped, truncated = step_counts(parts, group, world)
            health.add(n_samples, skipped, truncated)
            if health.problem():
                raise SystemExit(f"error: --data {data}: {health.problem()}")
            loss_sum, positions, grad_norm = gradients(cfg, model, step, parts, extras, n_tokens, world, device, autocast)
            if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):   # not applied: the weights stay finite
                raise SystemExit(diverged(step + 1, f"the loss is {loss_sum.item() / max(1, n_tokens):.4g} and the gradient "
                                                    f"norm {grad_norm.item():.4g}", out, saved))
            optim.step()
            optim.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            sampler_state = sampler.state(consumed["n"])
            if rank == 0:
                rec = step_record(cfg, step, loss_sum, n_tokens, n_samples, positions, grad_norm,
                                  scheduler.get_last_lr()[0], time.time() - t0, parts, world, device, dtype, mcfg, health)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rec.items() if v is not None
                                 if k in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gib")})
                bar.update(1)
            interrupted = stop_everywhere(stop.requested or (cfg.stop_after and step == cfg.stop_after), world, device)
            if not interrupted and (step % cfg.save_every == 0 or step == total):
                saved = save()
        if interrupted and step > saved:
            saved = save()      # still under Stop: a second SIGTERM meanwhile is the same stop, not a kill
    finally:
        stop.close()
        if rank == 0:
            bar.close()
            log.close()
    if not interrupted:
        finish(cfg, data, model, tok_path, health, step, saved, rank)
        checkpoint.say(rank, health.summary())
        return model
    checkpoint.say(rank, health.summary())
    checkpoint.say(rank, f"stopped at step {step}; " + (f"continue from step {saved} with --resume" if saved else "nothing to save"))
    if stop.signum:     # a scheduler reads a preempted run's exit status: 128 + the signal (130 Ctrl-C, 143 SIGTERM)
        raise SystemExit(128 + stop.signum)
    return model


def finish(cfg: TrainConfig, data: Path, model, tok_path: Path, health, step, saved, rank):
    """The end of a run that was not stopped: a last check of the data and the weights, then
    OUT/final, and a warning when the loss says the model has hardly learned."""
    out = Path(cfg.out)
    if health.problem(final=True):
        raise SystemExit(f"error: --data {data}: {health.problem(final=True)}")
    if not checkpoint.finite(model):
        raise SystemExit(diverged(step, "a weight is not a finite number", out, saved))
    checkpoint.export(out / "final", model, model.cfg, tok_path, rank, cfg.export_dtype)
    checkpoint.say(rank, f"exported {out / 'final'}")
    checkpoint.say(rank, loss_warning(out / "log.jsonl") if rank == 0 else None)


if __name__ == "__main__":
    first_run.file_size_limit_as_error()  # a save past `ulimit -f`: an OSError, one line, not SIGXFSZ
    try:
        main()
    except (weights.CheckpointError, OSError) as e:  # a wrong --init, --clip or --llama, a failed write: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:             # a second Ctrl-C in the loop (the first saves), or one before it
        print("aborted by Ctrl-C: nothing saved since the newest checkpoint", file=sys.stderr)
        sys.exit(130)

"""
Plan a training run before renting GPUs: memory per GPU and time per stage of the v2 recipe on
H100s, with the same flags as train.py, from the real model built on the meta device (no memory,
a few seconds).

    python -m tools.plan --stage sft                          # v2 stage 2 on 8/16/24 H100s
    python -m tools.plan --stage pretrain --micro-batch 2 --gpus 8 --json

What is measured and what is modelled:
- Parameters, gradients and AdamW state per GPU: FSDP2 as training.shard builds it (every
  parameter cut along dim 0 into `world` padded shards of float32; gradients and the two AdamW
  moments only for what the stage trains).
- Activations: one training forward of the full model on the meta device at the micro-batch,
  counting the bytes autograd saves for the backward (saved_tensors_hooks; each storage once,
  parameters excluded). Attention is counted as the H100's flash kernel runs it (q, k, v, the
  output and the log-sum-exp, not the T x T scores the meta device's math path would save).
  With --grad-checkpoint a block keeps only its input, and the backward recomputes one block
  at a time: the largest block's saved bytes are added once.
- Transients, all at once at the start of the backward (conservative): FSDP2's all-gathered
  parameters in the compute dtype (the root unit, held through the backward, plus the block
  running and the one prefetched), the root's unsharded gradients (held to the end of the
  backward) and one block's unsharded gradients with their float32 copy for the reduce-scatter,
  and the gradient of the loss's log-softmax (two float32 and one compute-dtype copy of the logits).
- Time: presets.train_flops_per_sample (the model's FLOPs; appendix F's accounting as built)
  at an assumed hardware utilisation that the output states; the recomputation of checkpointed
  blocks costs time, not model FLOPs. The sample counts are the papers' (v2 §4, Med §B).
Check: tests/test_plan.py compares these numbers with a measured CPU training step (one process
and two gloo processes) and with presets.py's parameter counts.
"""
import argparse
import json
import math
import sys
from contextlib import nullcontext
from functools import lru_cache
from unittest import mock

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import torch
import torch.nn.functional as F

import model as M
from lib import first_run
from lib import presets
from lib import release_recipe
from lib import training
from lib.train_config import parse_config

GiB = 2 ** 30
H100 = dict(name="H100 SXM 80 GB", memory=81559 * 2 ** 20, bf16=989e12, fp32=67e12)  # nvidia-smi's 81559 MiB; dense peak
RECIPE = {  # samples per epoch, mean text tokens per sample (our assumption), the papers' reported hours on GPUs
    "pretrain":   dict(samples=558_000, text=64, source="LLaVA-Pretrain 558K (v2 §4)", hours=4, gpus=24),
    "sft":        dict(samples=2_400_000, text=300, source="2.4M instruction samples (v2 §4)", hours=32, gpus=24),
    "med-vision": dict(samples=1_160_000, text=64, source="1.16M biomedical + general captions (Med §B)", hours=24, gpus=8),
}


# ---- the model on the meta device --------------------------------------------------------------
def meta_model(mcfg, trainable, dtype=torch.bfloat16):
    """The full-size model without memory, frozen as train.py freezes it, in the compute dtype
    (FSDP2 casts the float32 parameters to it for the forward)."""
    with torch.device("meta"):
        model = M.Dragonfly(mcfg).to(dtype)
    training.freeze(model, trainable)
    return model


def meta_flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What the H100's flash kernel saves for the backward, on meta tensors (whose own SDPA is the
    math path: the full score matrix, in float32)."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def flash_on_meta(enabled=True):
    return mock.patch.object(F, "scaled_dot_product_attention", meta_flash) if enabled else nullcontext()


def blocks(model):
    return [*model.vision.blocks, *model.llm.layers]


def saved_bytes(model, micro_batch, text, grad_checkpoint, flash=True) -> dict:
    """One training forward: the bytes autograd keeps for the backward ("saved"), and the largest
    of any one block's own saves ("largest_block": what its recomputation holds at once)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, per_block, current = {}, {}, [None]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            per_block[current[0]] = per_block.get(current[0], 0) + seen[key]
        return t

    def enter(block, args):
        current[0] = block
        if block.grad_checkpoint and torch.is_grad_enabled():  # the checkpoint keeps the block's input alive
            pack(args[0])

    hooks = [h for b in blocks(model) for h in (b.register_forward_pre_hook(enter),
                                                b.register_forward_hook(lambda *_: current.__setitem__(0, None)))]
    for b in blocks(model):
        b.grad_checkpoint = grad_checkpoint
    n = sum(n for _, n, _ in M.crop_levels(model.cfg))
    size = model.cfg.crops.size
    tokens = torch.zeros(micro_batch, text, dtype=torch.long, device=device)
    pixels = torch.zeros(micro_batch, n, 3, size, size, dtype=dtype, device=device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flash_on_meta(flash and device.type == "meta"):
            worst_case_loss(model, tokens, pixels)
    finally:
        for h in hooks:
            h.remove()
    return dict(saved=sum(seen.values()), largest_block=max((v for k, v in per_block.items() if k is not None), default=0))


def worst_case_loss(model, tokens, pixels):
    """`Dragonfly.forward`'s loss with every text position supervised, the most it keeps: forward
    selects the supervised rows by their labels, which the meta device cannot (no values); here
    every row is taken, copied as selecting copies."""
    h = model.text_hidden(tokens, pixels)[:, :-1].flatten(0, 1).clone()   # (B*(T-1), dim)
    return F.cross_entropy(model.llm.lm_head(h).float(), tokens[:, 1:].flatten(), reduction="sum")


@lru_cache(maxsize=None)
def activations(model, micro_batch, text, grad_checkpoint, flash=True) -> int:
    """Activation bytes at the peak of a step: what the forward saves, and with checkpointing
    the largest block's recomputed saves on top (measured with checkpointing off)."""
    with_ckpt = saved_bytes(model, micro_batch, text, grad_checkpoint, flash)["saved"]
    if not grad_checkpoint:
        return with_ckpt
    return with_ckpt + saved_bytes(model, micro_batch, text, False, flash)["largest_block"]


# ---- FSDP2's shards ----------------------------------------------------------------------------
def units(model):
    """training.shard's FSDP2 units: each ViT block that runs, each Llama block, then the root."""
    ran = model.cfg.vit.blocks_run(model.cfg.vision_layer)
    inner = [*model.vision.blocks[:ran], *model.llm.layers]
    inside = {id(p) for u in inner for p in u.parameters()}
    root = [p for p in model.parameters() if id(p) not in inside]
    return [list(u.parameters()) for u in inner], root


def shard_numel(p, world) -> int:
    """Elements of one rank's shard: dim 0 cut into `world` equal, padded pieces."""
    return math.ceil(p.shape[0] / world) * (p[0].numel() if p.ndim > 1 else 1) if p.ndim else p.numel()


def sharded(model, world, param_dtype=torch.bfloat16, master_dtype=torch.float32, fsdp=None) -> dict:
    """Bytes per rank: float32 shards of every parameter, gradients and AdamW moments of the
    trained ones; and the unsharded working set FSDP2 all-gathers in `param_dtype`."""
    m, c = torch.tensor([], dtype=master_dtype).element_size(), torch.tensor([], dtype=param_dtype).element_size()
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    per_rank = (lambda ps: sum(shard_numel(p, world) for p in ps)) if world > 1 else (lambda ps: sum(p.numel() for p in ps))
    out = dict(params=m * per_rank(params), grads=m * per_rank(trained), adam=2 * m * per_rank(trained), gathered=0, grad_buffers=0)
    if world > 1 if fsdp is None else fsdp:  # train.py shards only when there are several processes
        inner, root = units(model)
        largest = max(inner, key=lambda ps: sum(p.numel() for p in ps))
        numel = lambda ps, train_only=False: sum(p.numel() for p in ps if p.requires_grad or not train_only)
        out["gathered"] = c * (numel(root) + 2 * numel(largest))                   # root + running + prefetched block
        out["grad_buffers"] = c * numel(root, True) + (c + 4) * numel(largest, True)  # root's, one block's + fp32 copy
    return out


# ---- the plan ----------------------------------------------------------------------------------
def memory(model, world, micro_batch, grad_checkpoint, text, flash=True, fsdp=None) -> dict:
    """Bytes per GPU by kind, and their sum: the predicted peak."""
    vocab, c = model.cfg.llm.vocab_size, next(model.parameters()).element_size()
    s = sharded(model, world, next(model.parameters()).dtype, fsdp=fsdp)
    rows = dict(params=s["params"], grads=s["grads"], adam=s["adam"],
                activations=activations(model, micro_batch, text, grad_checkpoint, flash),
                transient=s["gathered"] + s["grad_buffers"] + micro_batch * (text - 1) * vocab * (4 + 4 + c))
    rows["total"] = sum(rows.values())
    return rows


def largest_micro_batch(model, world, grad_checkpoint, text, budget, flash=True, limit=64) -> int:
    """The largest micro-batch whose predicted peak fits `budget` (activations grow linearly)."""
    one = memory(model, world, 1, grad_checkpoint, text, flash)["total"]
    two = memory(model, world, 2, grad_checkpoint, text, flash)["total"]
    per_sample = two - one
    return max(0, min(limit, int((budget - (one - per_sample)) // per_sample))) if per_sample > 0 else limit


def recompute_flops(mcfg, text, trainable) -> float:
    """Forward FLOPs that checkpointing runs again: the blocks the backward goes through."""
    parts = presets.flops_parts(mcfg, text, paper=False)
    llm_blocks = parts["llm"] - 2 * text * mcfg.llm.dim * mcfg.llm.vocab_size
    return parts["vision"] * ("vision" in trainable) + llm_blocks * bool(trainable)


def timing(mcfg, stage, trainable, grad_checkpoint, utilisation, text=None, samples=None, extra_text=0.0) -> dict:
    """Time per stage; extra_text: text-only samples trained per image sample (--recipe release:
    a text batch every 10th and a math batch every 50th iteration, lib/release_recipe.py)."""
    r = RECIPE[stage]
    text, samples = text or r["text"], samples or r["samples"]
    model_flops = presets.train_flops_per_sample(mcfg, text, trainable)
    model_flops += extra_text * presets.train_flops_per_sample(mcfg, text, trainable, image=False)
    work = model_flops + (recompute_flops(mcfg, text, trainable) if grad_checkpoint else 0)
    per_gpu = utilisation * H100["bf16"] / work  # samples/s per GPU
    reported = r["samples"] / (r["hours"] * 3600 * r["gpus"])  # the paper's samples/s per GPU
    return dict(samples=samples, text=text, tflops_per_sample=model_flops / 1e12, samples_per_s_per_gpu=per_gpu,
                mfu=per_gpu * model_flops / H100["bf16"], gpu_hours=samples / per_gpu / 3600,
                reported_per_gpu=reported, reported_mfu=reported * presets.train_flops_per_sample(mcfg, r["text"], trainable) / H100["bf16"])


def plan(cfg, gpus=(8, 16, 24), utilisation=0.4, headroom=0.1, text_time=None, samples=None) -> dict:
    """Memory and time of train.py's run `cfg` (a TrainConfig) on H100s, with and without checkpointing."""
    mcfg = presets.PRESETS[cfg.preset or "dragonfly-v2"]
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    model = meta_model(mcfg, cfg.trainable, dtype)
    text = cfg.max_seq - M.image_positions(mcfg)  # the longest sample train.py accepts
    if text < 2:
        raise ValueError(f"--max-seq {cfg.max_seq}: the image block alone takes {M.image_positions(mcfg)} positions")
    budget = (1 - headroom) * H100["memory"]
    out = dict(stage=cfg.stage, preset=cfg.preset or "dragonfly-v2", trainable=list(cfg.trainable), micro_batch=cfg.micro_batch,
               batch_size=cfg.batch_size, dtype=str(dtype).split(".")[1], positions=cfg.max_seq, gpu=H100["name"],
               gpu_bytes=H100["memory"], budget_bytes=budget, headroom=headroom, assumed_utilisation=utilisation,
               reported_hours=RECIPE[cfg.stage]["hours"], reported_gpus=RECIPE[cfg.stage]["gpus"],
               source=RECIPE[cfg.stage]["source"], runs=[])
    if cfg.recipe == "release":  # the release scripts' iterations and batches, and their text/math passes
        script = release_recipe.SCRIPTS[cfg.stage]
        extra = (1 / release_recipe.TEXT_EVERY + 1 / release_recipe.MATH_EVERY) if script["text_and_math"] else 0.0
        samples = samples or cfg.max_steps * cfg.batch_size
        out.update(source=f"the release script's {cfg.max_steps * release_recipe.ITERATIONS_PER_UPDATE:,} iterations "
                          f"of {cfg.batch_size // release_recipe.ITERATIONS_PER_UPDATE} samples"
                          + (f", + {extra:.0%} text-only samples (its text and math batches)" if extra else ""))
    else:
        extra = 0.0
    for ckpt in (False, True):
        t = timing(mcfg, cfg.stage, cfg.trainable, ckpt, utilisation, text_time, samples, extra)
        for world in gpus:
            mem = memory(model, world, cfg.micro_batch, ckpt, text)
            out["runs"].append(dict(grad_checkpoint=ckpt, world=world, memory=mem, fits=mem["total"] <= budget,
                                    max_micro_batch=largest_micro_batch(model, world, ckpt, text, budget),
                                    batch_ok=cfg.batch_size % (cfg.micro_batch * world) == 0,
                                    hours=t["gpu_hours"] / world, **t))
    return out


def render(p) -> str:
    g = lambda b: f"{b / GiB:.1f}"
    head = (f"plan: stage {p['stage']} ({', '.join(p['trainable'])} trained), {p['preset']}, {p['positions']} positions per "
            f"sample (the longest --max-seq allows), micro-batch {p['micro_batch']}, global batch {p['batch_size']}, "
            f"{p['dtype']} compute, on {p['gpu']} ({g(p['gpu_bytes'])} GiB; fits = under {g(p['budget_bytes'])} GiB, "
            f"{p['headroom']:.0%} kept for the CUDA context, NCCL and fragmentation). PREDICTED, not measured.")
    cols = ["ckpt", "GPUs", "params", "grads", "AdamW", "activ.", "transient", "total GiB", "fits", "max mb",
            "batch ok", "samples/s/GPU", "MFU", "hours", "GPU-hours"]
    rows = [[("on" if r["grad_checkpoint"] else "off"), r["world"], *(g(r["memory"][k]) for k in
             ("params", "grads", "adam", "activations", "transient", "total")), "yes" if r["fits"] else "NO",
             r["max_micro_batch"], "yes" if r["batch_ok"] else "NO", f"{r['samples_per_s_per_gpu']:.2f}",
             f"{r['mfu']:.0%}", f"{r['hours']:.1f}", f"{r['hours'] * r['world']:.0f}"] for r in p["runs"]]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda xs: "  ".join(str(x).rjust(w) for x, w in zip(xs, widths))
    r0 = p["runs"][0]
    foot = (f"time: {r0['samples']:,} samples ({p['source']}), {r0['text']} text tokens each on average (assumed), "
            f"{r0['tflops_per_sample']:.0f} model TFLOPs per sample (presets.train_flops_per_sample), at an ASSUMED "
            f"{p['assumed_utilisation']:.0%} of the H100's {H100['bf16'] / 1e12:.0f} bf16 TFLOP/s on the FLOPs executed "
            f"(checkpointing's recomputation included, so its MFU is lower).\nReported by the paper: ~{p['reported_hours']} h on "
            f"{p['reported_gpus']} H100s (DeepSpeed ZeRO), {r0['reported_per_gpu']:.2f} samples/s per GPU: "
            f"{r0['reported_mfu']:.0%} MFU by this accounting.\n"
            "batch ok: --batch-size is a multiple of micro-batch x GPUs, which train.py requires.")
    return "\n".join([head, line(cols), *map(line, rows), foot])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any train.py flag is accepted (python train.py --help); those that matter here: "
                                       "--stage, --micro-batch, --batch-size, --dtype, --max-seq, --preset, --trainable.")
    p.add_argument("--gpus", default="8,16,24", help="world sizes to plan for (default 8,16,24)")
    p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of the bf16 peak sustained (default 0.4)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--text-tokens", type=int, help="mean text tokens per sample, for time (default: per stage)")
    p.add_argument("--samples", type=int, help="samples in the stage (default: the paper's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, rest = p.parse_known_args(argv)
    cfg = parse_config(rest, prog="python -m tools.plan")
    try:
        gpus = tuple(int(n) for n in args.gpus.split(","))
        assert gpus and min(gpus) >= 1 and max(gpus) <= 100_000
    except (ValueError, AssertionError):
        sys.exit(f"error: --gpus {args.gpus}: give world sizes from 1 to 100000, like 8,16,24")
    for flag, ok, rule in (("utilisation", 0 < args.utilisation <= 1, "a fraction above 0 and at most 1 (0.4 is 40%)"),
                           ("headroom", 0 <= args.headroom < 1, "a fraction from 0 up to, not including, 1"),
                           ("samples", args.samples is None or args.samples >= 1, "1 or more"),
                           ("text_tokens", args.text_tokens is None or args.text_tokens >= 0, "0 or more")):
        if not ok:
            sys.exit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)}: give {rule}")
    if cfg.model or cfg.init:
        sys.exit(f"error: {'--model ' + cfg.model if cfg.model else '--init'}: plan.py plans the paper's models from their "
                "presets (--preset, --clip/--llama shapes), not this one; drop the flag")
    try:
        result = plan(cfg, gpus, args.utilisation, args.headroom, args.text_tokens, args.samples)
    except ValueError as e:
        sys.exit(f"error: {e}")
    first_run.write_stdout(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    first_run.run(main)

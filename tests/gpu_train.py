"""A few FSDP2 training steps on one device, as train.py takes them (freeze, grad_checkpoint,
training.shard, AdamW over training.param_groups), with and without checkpointing: samples/s, MFU and
peak memory measured, plan.py's prediction beside each. Run by tests/gpu.sh.

    python tests/gpu_train.py --device cuda       # full widths (CLIP L/14, Llama-3-8B), 2 + 2 blocks
    python tests/gpu_train.py --dry               # CPU, toy widths: that the script runs"""
import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
from tools import plan  # noqa: E402
from lib import presets  # noqa: E402
from lib import release_recipe  # noqa: E402
from lib import training  # noqa: E402
from lib import train_config  # noqa: E402


def reduced_config(dry):
    """The released widths at 2 ViT blocks (read at the first) and 2 Llama blocks; --dry: toy widths."""
    v2 = presets.PRESETS["dragonfly-v2"]
    if dry:
        return presets.tiny(v2, vit_width=64, llm_dim=64, layers=2)
    return replace(v2, vit=replace(v2.vit, layers=2), llm=replace(v2.llm, n_layers=2))


def run(cfg, device, dtype, grad_checkpoint, steps, text, micro_batch, recipe="ours"):
    torch.manual_seed(0)
    model = training.init_weights(M.Dragonfly(cfg)).to(device)
    trainable = train_config.STAGES["sft"]["trainable"]
    release = recipe == "release"  # lib/release_recipe.py: its freezing, decay groups, clipping, text batches
    (release_recipe.freeze if release else training.freeze)(model, trainable)
    for b in plan.blocks(model):
        b.grad_checkpoint = grad_checkpoint
    training.shard(model, dtype)
    groups = (release_recipe.param_groups if release else training.param_groups)(model, 0.1)
    optim = torch.optim.AdamW(groups, lr=1e-6, fused=device.type == "cuda")
    n = sum(k for _, k, _ in M.crop_levels(cfg))
    tokens = torch.randint(0, 1000, (micro_batch, text), device=device)
    pixels = torch.randn(micro_batch, n, 3, cfg.crops.size, cfg.crops.size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        _, loss = model(tokens, pixels, tokens, reduction="sum")
        loss.backward()
        for _ in release_recipe.extra_batches(step) if release else ():  # a text-only pass adds its gradients
            model(tokens, None, tokens, reduction="sum")[1].backward()
        if release:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    per_s = micro_batch / (sum(times[1:]) / len(times[1:]))  # the first step warms up
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    flops = presets.train_flops_per_sample(cfg, text, trainable)
    meta = plan.meta_model(cfg, trainable, dtype)
    predicted = plan.memory(meta, 1, micro_batch, grad_checkpoint, text, fsdp=True)["total"]
    work = flops + (plan.recompute_flops(cfg, text, trainable) if grad_checkpoint else 0)
    return dict(per_s=per_s, mfu=per_s * flops / plan.H100["bf16"], peak=peak, predicted_peak=predicted,
                predicted_per_s=0.4 * plan.H100["bf16"] / work)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry", action="store_true", help="CPU, toy widths, float32")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--text", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--recipe", choices=["ours", "release"], default="ours",
                   help="release: the release's freezing, decay groups, clipping and text batches (lib/release_recipe.py; "
                        "its first text pass is at step 9: give --steps 10 or more to time one)")
    a = p.parse_args()
    device = torch.device("cpu" if a.dry else a.device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float32 if a.dry else torch.bfloat16
    text = 40 if a.dry else a.text
    cfg = reduced_config(a.dry)
    print(f"FSDP2 on 1 {device.type} process, {'toy' if a.dry else 'full'} widths, "
          f"{cfg.vit.layers} ViT + {cfg.llm.n_layers} Llama blocks, {M.image_positions(cfg)} + {text} positions, "
          f"micro-batch {a.micro_batch}; predictions: plan.py, its assumed 40% of the H100 bf16 peak")
    for ckpt in (False, True):
        r = run(cfg, device, dtype, ckpt, 2 if a.dry else a.steps, text, a.micro_batch, a.recipe)
        print(f"checkpointing {'on ' if ckpt else 'off'}: {r['per_s']:.2f} samples/s (plan {r['predicted_per_s']:.2f}), "
              f"MFU {r['mfu']:.1%} (plan assumes 40% of executed FLOPs), peak {r['peak'] / 2**30:.2f} GiB "
              f"(plan {r['predicted_peak'] / 2**30:.2f} GiB)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

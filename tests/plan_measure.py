"""The measured side of tests/test_plan.py: one training step of a small Dragonfly on CPU, as
train.py runs it (freeze, FSDP2 via training.shard when world > 1, AdamW over training.param_groups),
and the peak resident memory it adds.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan_measure.py --world 2 --grad-checkpoint

Why RSS: PyTorch's CPU allocator keeps no statistics, and glibc with a fixed mmap threshold
gives every tensor over 64 KiB its own mapping, returned to the OS when freed, so resident
memory follows the live tensor bytes; the kernel's high-water mark (VmHWM, reset by writing 5 to
/proc/self/clear_refs) is then the exact peak of a step, with no sampling. Step 1 allocates the
AdamW moments; step 2 is measured. Prints one JSON line per rank."""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
from lib import presets  # noqa: E402
from lib import training  # noqa: E402
from lib import train_config  # noqa: E402

TEXT = 40


def small_config():
    """The released v2 geometry (41 crops, 2098 image positions) at toy widths."""
    return presets.tiny(presets.PRESETS["dragonfly-v2"], vit_width=64, llm_dim=64, layers=2)


def status_kib(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def step(model, optim, batch):
    tokens, pixels = batch
    _, loss = model(tokens, pixels, tokens, reduction="sum")
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)


def run(rank, world, stage, grad_checkpoint, store):
    torch.set_num_threads(1)
    if world > 1:  # a file rendezvous: no TCP port that another test's run could hold, no store server to outlive
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = small_config()
    model = M.Dragonfly(cfg)
    training.freeze(model, train_config.STAGES[stage]["trainable"])
    for b in [*model.vision.blocks, *model.llm.layers]:
        b.grad_checkpoint = grad_checkpoint
    if world > 1:
        training.shard(model, torch.float32)
    optim = torch.optim.AdamW(training.param_groups(model, 0.1), lr=1e-4)
    n = sum(k for _, k, _ in M.crop_levels(cfg))
    batch = (torch.randint(0, 1000, (1, TEXT)), torch.randn(1, n, 3, cfg.crops.size, cfg.crops.size))
    # SDPA's math path, as plan.py counts it on the meta device (the CPU's fused kernel saves less)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        step(model, optim, batch)
        Path("/proc/self/clear_refs").write_text("5")
        before = status_kib("VmRSS")
        step(model, optim, batch)
        peak = status_kib("VmHWM")
    local = lambda ps: sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in ps)
    trained = [p for p in model.parameters() if p.requires_grad]
    moments = local(t for s in optim.state.values() for k, t in s.items() if k != "step")
    mine = dict(rank=rank, step_peak=peak - before, params=local(model.parameters()), trained=local(trained), adam=moments)
    every = [mine]
    if world > 1:  # rank 0 prints them all: lines from two processes would interleave
        every = [None] * world
        dist.all_gather_object(every, mine)
        dist.destroy_process_group()
    if rank == 0:
        print("\n".join(json.dumps(r) for r in every), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--stage", default="sft")
    p.add_argument("--grad-checkpoint", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        if a.world == 1:
            run(0, 1, a.stage, a.grad_checkpoint, store)
        else:
            mp.spawn(run, args=(a.world, a.stage, a.grad_checkpoint, store), nprocs=a.world)

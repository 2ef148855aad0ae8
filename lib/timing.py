"""Timing on a shared machine, so that speed is measured, not guessed (bench.py and
tests/make_golden_bench.py): a timer that drains the GPU on both sides, runs repeated when other
processes took the CPU meanwhile, and this machine's own ceilings (matmul FLOP/s and memory read
bandwidth) to hold each measured number against, and which kernels a run called.
"""
import collections
import os
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, *args, device="cpu"):
    """(seconds, fn(*args)), the device drained on both sides of the timer."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def others_cpu() -> float:
    """CPU seconds that every other process has used since boot (Linux; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except OSError:
        return 0.0
    mine = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - mine.user - mine.system


def quiet(fn, *args, limit=0.1, tries=5, patience=60):
    """(fn(*args), tries used, share of a core other processes took meanwhile). Each try starts
    after a quiet second (waiting up to `patience` s for one); a run during which others took more
    than `limit` of a core is done again: with 2 threads on 2 shared cores, a descheduled torch
    thread stalls every parallel op (we saw prefill 25x slower), so such a run says nothing."""
    for attempt in range(1, tries + 1):
        for _ in range(patience):
            before = others_cpu()
            time.sleep(1.0)
            if others_cpu() - before <= limit:
                break
        before, t0 = others_cpu(), time.perf_counter()
        out = fn(*args)
        share = (others_cpu() - before) / (time.perf_counter() - t0)
        if share <= limit:
            break
    return out, attempt, share


def machine_limits(n=4096) -> dict:
    """This machine's ceilings, measured in the same run: float32 and bf16 matmul FLOP/s (best of
    4 products of two n x n matrices; what a compute-bound prefill can reach in that dtype) and
    memory read bandwidth (best of 5 sums over a 1 GiB array, far beyond any cache; what bounds
    decoding, which reads every weight once per token). Without bf16 instructions a bf16 product
    runs at 1-10 GFLOP/s: one 1024^3 product tells, and a slow one is not repeated at 4096."""
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        timed(torch.mm, a, b)  # first call: kernel set-up (oneDNN's JIT)
        small = 2 * 1024 ** 3 / timed(torch.mm, a, b)[0]
        if small > 4e10:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            small = max(2 * n ** 3 / timed(torch.mm, a, b)[0] for _ in range(4))
        peak[dtype] = small
    big = torch.ones(2 ** 28)
    bandwidth = max(big.numel() * 4 / timed(torch.sum, big)[0] for _ in range(5))
    return {"matmul_flops": peak[torch.float32], "bf16_matmul_flops": peak[torch.bfloat16],
            "read_bytes_per_s": bandwidth}


def count_calls(module, names) -> collections.Counter:
    """Wrap the functions `names` of `module` to count their calls by (name, x has one row)."""
    counts = collections.Counter()

    def wrap(name, fn):
        def counted(x, *args, **kwargs):
            counts[name, x.numel() == x.shape[-1]] += 1
            return fn(x, *args, **kwargs)
        return counted
    for name in names:
        setattr(module, name, wrap(name, getattr(module, name)))
    return counts

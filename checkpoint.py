"""Training checkpoints that survive a kill: save, recognise a torn one, resume, stop on SIGTERM.

A checkpoint is a folder OUT/step_N: model + optimizer through torch.distributed.checkpoint
(DCP: `.metadata` and one `__R_0.distcp` shard per process), one `extra_rankR.pt` per process
(step, data position, scheduler, RNG) and, written last, `complete.json`, which lists every
file with its size. It is written as step_N.tmp and renamed, and OUT/latest names the newest.
A kill, a full disk or a lost file can still leave a folder without its marker, or with a file
missing or cut short: `resume` says which checkpoint is damaged and takes the newest intact one.

Resuming also drops the lines of log.jsonl after the checkpoint's step: the interrupted run
logged them, the resumed one trains those steps again, and a plot of the log stays a function
of the step. `Stop` makes SIGTERM (a scheduler's preemption, `kill`) end a run within seconds.
`export` writes the end of a run as a directory that Dragonfly.from_pretrained loads.
"""
import json
import os
import random
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import pretrained
from tokenizer import Tokenizer

MARKER = "complete.json"


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save(out: Path, step, model, optim, scheduler, sampler_state, rank):
    """model + optimizer sharded through DCP, the rest per rank, then the marker; written to
    step_N.tmp and renamed, and `latest` is replaced atomically afterwards."""
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
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "marker.tmp").write_text(json.dumps({"step": step, "files": files}))
        os.replace(tmp / "marker.tmp", tmp / MARKER)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
    barrier()


def damage(path: Path):
    """Why the checkpoint folder `path` cannot be resumed from, or None if it is intact."""
    try:
        files = json.loads((path / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its save never finished"
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def checkpoints(out: Path) -> list:
    """The step_N folders in out, newest first (step_N.tmp ones are saves that never finished)."""
    found = [p for p in out.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def load(path: Path, model, optim, scheduler, rank):
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


def resume(out: Path, model, optim, scheduler, rank):
    """Load the newest intact checkpoint in out: (step, sampler state), or (0, None) if out has
    none. Damaged ones are named and passed over; none intact stops the run."""
    found = checkpoints(out)
    for path in found:
        why = damage(path)
        if why is None:
            break
        say(rank, f"checkpoint {path} is damaged ({why}); trying an older one")
    else:
        if found:
            raise SystemExit(f"error: no intact checkpoint in {out} (all {len(found)} damaged, see above); "
                             "delete them to start over, or train without --resume")
        say(rank, f"no checkpoint in {out}: starting at step 0")
        return 0, None
    step, sampler_state = load(path, model, optim, scheduler, rank)
    say(rank, f"resumed from step {step}" + (f" ({path.name}, the newest intact checkpoint)" if path != found[0] else ""))
    return step, sampler_state


def trim_log(log: Path, step: int):
    """Keep only the records of log.jsonl up to `step` (and drop a line cut short by a kill)."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    log.with_suffix(".tmp").write_text("".join(kept))
    os.replace(log.with_suffix(".tmp"), log)


def export(final: Path, model, mcfg, tokenizer_path, rank, dtype):
    """The end of training: gather the full weights on rank 0 and write a directory that
    from_pretrained, sample.py and eval.py load (weights, config.json, the tokenizer)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        full = pretrained.build(mcfg, torch.float32, "cpu")
        full.load_state_dict(state)
        full.save_pretrained(final, dtype=getattr(torch, dtype))
        tok = Tokenizer.find_file(tokenizer_path)
        shutil.copy(tok, final / tok.name)


def say(rank, message):
    if rank == 0 and message:
        print(message, file=sys.stderr)


class Interrupted(BaseException):
    """SIGTERM while the loop waits for data. A BaseException, like KeyboardInterrupt, so that
    the dataset's `except Exception` around image decoding cannot swallow it."""


class Stop:
    """SIGTERM handling. During a step the signal only sets `requested`, which the loop reads
    after the step, so the step is finished and saved; while the loop waits for data (a stalled
    worker, a slow disk) it raises Interrupted at once, since the wait may never end."""

    def __init__(self):
        self.requested, self.waiting, self.pid = False, False, os.getpid()
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:     # a forked DataLoader worker: end as SIGTERM normally does
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        if self.waiting:
            raise Interrupted()

    @contextmanager
    def waiting_for_data(self):
        self.waiting = True
        try:
            if self.requested:
                raise Interrupted()
            yield
        finally:
            self.waiting = False

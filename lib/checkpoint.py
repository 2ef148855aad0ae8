"""Training checkpoints that survive a kill: save, recognise a damaged one, resume, stop on
SIGTERM or Ctrl-C; and the run that owns an output folder.

A checkpoint is a folder OUT/step_N: model + optimizer through torch.distributed.checkpoint
(DCP: `.metadata` and one `__R_0.distcp` shard per process), one `extra_rankR.pt` per process
(step, data position, scheduler, RNG: tensors and plain values, read back with
`torch.load(weights_only=True)`) and, written last, `complete.json`, which lists every file
with its size and sha256 (each process hashes the files it wrote) and the id of the run that
wrote it. It is written as step_N.tmp and renamed, and OUT/latest names the newest. A kill, a
full disk, a lost file or flipped bytes can still leave a folder without its marker, or with a
file missing, cut short or changed: `resume` says which checkpoint is damaged and takes the
newest intact one.

One output folder holds one run (`claim`): OUT/run.json records the run's id and the settings
that decide what it learns, and OUT/lock (locks.py) the process writing it now. --resume continues only
that run with those settings; a fresh run refuses a folder holding another (unless --force),
and a second train.py on the same folder refuses while the first is alive.

Resuming also drops the lines of log.jsonl after the checkpoint's step: the interrupted run
logged them, the resumed one trains those steps again, and a plot of the log stays a function
of the step. `Stop` makes SIGTERM (a scheduler's preemption, `kill`) end a run within seconds.
`export` writes the end of a run as a directory that pretrained.load reads.
"""
import hashlib
import json
import os
import random
import uuid
import warnings
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from lib import locks
from lib import pretrained
from lib import weights
from lib.tokenizer import Tokenizer

MARKER = "complete.json"
RUN = "run.json"
OUTPUTS = ("run.json", "config.json", "log.jsonl", "latest", "final")   # what a run writes in OUT, with step_N


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(value, world):
    """value from every process, in rank order."""
    if world == 1:
        return [value]
    every = [None] * world
    dist.all_gather_object(every, value)
    return every


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def writer(name: str, world: int) -> int:
    """The process that wrote (and hashes) file `name`: DCP's `__R_k.distcp` and our
    `extra_rankR.pt` are rank R's; the rest (DCP's .metadata) rank 0's."""
    for prefix, end in (("__", "_"), ("extra_rank", ".")):
        head = name[len(prefix):].split(end)[0] if name.startswith(prefix) else ""
        if head.isdigit() and int(head) < world:
            return int(head)
    return 0


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, which torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(out: Path, step, model, optim, scheduler, sampler_state, rank, run_id="", world=1):
    """model + optimizer sharded through DCP, the rest per rank, then the marker with every
    file's size and sha256; written to step_N.tmp and renamed, and `latest` is replaced
    atomically afterwards."""
    final, tmp = out / f"step_{step:07d}", out / f"step_{step:07d}.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, optim)
    try:
        with one_process_is_meant():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        extra = {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save(extra, tmp / f"extra_rank{rank}.pt")
    except (OSError, RuntimeError, CheckpointException) as e:  # a full disk, a file past `ulimit -f` (torch's
        shutil.rmtree(tmp, ignore_errors=True)  # zip writer says only "unexpected pos"): one line, no half-written step
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # DCP's: each rank's traceback
        why = e.strerror if isinstance(e, OSError) and e.strerror else (lines or [type(e).__name__])[-1][:200]
        raise RunError(f"cannot write the checkpoint of step {step} in {out} ({why}): is the disk full, "
                       f"or a file size limit (ulimit -f) reached? Free space, then --resume continues from "
                       f"the newest checkpoint") from None
    barrier()
    mine = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(tmp.iterdir()) if p.is_file() and writer(p.name, world) == rank}
    files = {name: entry for part in gather(mine, world) for name, entry in part.items()}
    if rank == 0:
        (tmp / "marker.tmp").write_text(json.dumps({"step": step, "run_id": run_id, "files": files}))
        os.replace(tmp / "marker.tmp", tmp / MARKER)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
    barrier()


def damage(path: Path, run_id=None, rank=0, world=1):
    """Why the checkpoint folder `path` cannot be resumed from, or None if it is intact. Every
    file's size is checked; its sha256 by the process that wrote it. run_id: the folder's run
    (a checkpoint of another run is not this run's to continue)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its save never finished"
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    if run_id is not None and marker.get("run_id") != run_id:
        return f"written by another run (run id {marker.get('run_id') or 'none'}, this folder's run is {run_id})"
    for name, entry in files.items():
        f = path / name
        size = entry["size"] if isinstance(entry, dict) else entry
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name, entry in files.items():
        if writer(name, world) == rank and (not isinstance(entry, dict) or sha256(path / name) != entry.get("sha256")):
            return f"{name} does not match the sha256 written with it: its bytes changed"
    return None


def checkpoints(out: Path) -> list:
    """The step_N folders in out, newest first (step_N.tmp ones are saves that never finished)."""
    found = [p for p in out.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


@contextmanager
def one_process_is_meant():
    """DCP warns at every save and load of a run without torch.distributed that it assumes one
    process: a run of one process is one of train.py's two ways, not a mistake to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load(path: Path, model, optim, scheduler, rank):
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    with one_process_is_meant():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    try:   # the project's own file holds no code: a pickle that asks to run some is refused, not run
        extra = torch.load(path / f"extra_rank{rank}.pt", weights_only=True)
    except Exception as e:
        raise RunError(f"{path / f'extra_rank{rank}.pt'}: not a checkpoint this train.py wrote "
                       f"({str(e).splitlines()[0][:200]}); delete {path.name} to resume from an older one") from None
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return extra["step"], extra["sampler"]


def resume(out: Path, model, optim, scheduler, rank, run_id=None, world=1):
    """Load the newest intact checkpoint of run `run_id` in out: (step, sampler state), or
    (0, None) if out has none. Damaged ones are named and passed over; none intact stops the run."""
    found = checkpoints(out)
    for path in found:
        why = next((w for w in gather(damage(path, run_id, rank, world), world) if w), None)
        if why is None:
            break
        say(rank, f"checkpoint {path} is damaged ({why}); trying an older one")
    else:
        if found:
            raise RunError(f"no intact checkpoint in {out} (all {len(found)} damaged, see above); "
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
    pretrained.load, sample.py and eval.py load (weights, config.json, the tokenizer)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        full = pretrained.build(mcfg, torch.float32, "cpu")
        full.load_state_dict(state)
        pretrained.save(full, final, dtype=getattr(torch, dtype))
        tok = Tokenizer.find_file(tokenizer_path)
        shutil.copy(tok, final / tok.name)


def say(rank, message):
    if rank == 0 and message:
        print(message, file=sys.stderr)


class RunError(Exception):
    """A run that cannot go on, said in one line: train.py prints it as `error: ...` and exits 1.
    Not a ValueError, so that no `except ValueError` on its way up can take it for bad input."""


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C while the loop waits for data. A BaseException, like KeyboardInterrupt,
    so that the dataset's `except Exception` around image decoding cannot swallow it."""


class Stop:
    """SIGTERM and Ctrl-C (SIGINT) handling. During a step the signal only sets `requested`,
    which the loop reads after the step, so the step is finished and saved; while the loop waits
    for data (a stalled worker, a slow disk) it raises Interrupted at once, since the wait may
    never end. A second Ctrl-C is Python's KeyboardInterrupt again: it aborts without saving.
    `close` puts the previous handlers back.

    Python runs a handler wherever the main thread is, and where it cannot pass an exception on
    (a __del__ the garbage collector runs during the wait, a fork's callback) it prints it and
    drops it: `_dropped` sees that and sends the signal again, so the wait still ends. train.py
    keeps the loader's own starts and stops outside the wait (micro_batches)."""

    def __init__(self):
        self.requested, self.waiting, self.pid, self.signum = False, False, os.getpid(), None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._dropped

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:     # a forked DataLoader worker before ignore_stop_signals ran
            return
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("Ctrl-C: stopping after this step and saving it; Ctrl-C again aborts without saving",
                  file=sys.stderr, flush=True)
        self.requested, self.signum = True, self.signum or signum
        if self.waiting:
            raise Interrupted()

    def _dropped(self, info):
        if not isinstance(info.exc_value, Interrupted):
            return self.previous_hook(info)
        again = threading.Timer(0.1, self._again)    # after the callback has returned
        again.daemon = True
        again.start()

    def _again(self):
        if self.waiting:    # SIGTERM, whatever came first: a second SIGINT would abort without saving
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = self.previous_hook

    @contextmanager
    def waiting_for_data(self):
        self.waiting = True
        try:
            if self.requested:
                raise Interrupted()
            yield
        finally:
            self.waiting = False


def ignore_stop_signals(worker_id=None):
    """A DataLoader worker's start (worker_init_fn): a scheduler, torchrun and a terminal signal
    the whole process group, and a worker that died of it would take the trainer down before it
    saves. A worker ignores Ctrl-C and its first SIGTERM, so the trainer decides; a second
    SIGTERM (the loader's own shutdown of a worker that is stuck) ends it as usual. A trainer
    stopped while it received a batch hangs up on the worker's handoff of the batch's shared
    memory (multiprocessing's resource sharer prints errors through sys.excepthook): that broken
    connection is the stop, not a fault, and is not printed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _next_sigterm_ends)
    sys.excepthook = _quiet_hangup


def _quiet_hangup(kind, value, tb):
    if not issubclass(kind, ConnectionError):
        sys.__excepthook__(kind, value, tb)


def _next_sigterm_ends(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- the run that owns an output folder ------------------------------------------------------
def check_out(out: Path, inputs: dict):
    """Refuse, before anything is written, an --out that cannot hold a run or would write over
    an input. inputs: flag -> (path, whether an --out inside it is refused too: a model folder)."""
    try:
        weights.refuse_input_overlap(out, inputs, "training")
    except ValueError as e:
        raise RunError(str(e)) from None
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder (new or empty) for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create it ({e.strerror}); choose another folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunError(f"--out {out} is not writable; choose another folder")


def claim(out: Path, identity: dict, resume: bool, force: bool, rank: int) -> str:
    """Lock out for this process and return the id of the run it continues (--resume) or starts.
    identity: the settings that decide what the run learns; a resume must repeat them."""
    if rank == 0:
        try:
            locks.lock(out, "train.py", "train into another --out")
        except locks.InUse as e:
            raise RunError(str(e)) from None
        try:
            own(out, identity, resume, force)
        except BaseException:
            release(out, rank)
            raise
    barrier()
    return json.loads((out / RUN).read_text())["run_id"]


def difference(key: str, recorded: dict, identity: dict) -> str:
    """One setting a --resume changes, as the user knows it: a flag, or the content of a file."""
    name = key[:-len("_sha256")] if key.endswith("_sha256") else key
    flag = ("" if key == "processes" else "--") + name.replace("_", "-")
    if key not in recorded:     # run.json of a train.py that did not record it yet
        return f"{'the content of ' if key.endswith('_sha256') else ''}{flag}: not recorded by the train.py that started it"
    if key.endswith("_sha256"):
        return f"the content of {flag} (sha256 {recorded[key]}, now {identity.get(key)})"
    return f"{flag} {recorded[key]}, now {identity.get(key)}"


def own(out: Path, identity: dict, resume: bool, force: bool):
    """Check that this run may write out, and record it in OUT/run.json (a fresh run: a new id)."""
    held = [name for name in OUTPUTS if (out / name).exists()] + [p.name for p in checkpoints(out)]
    try:
        record = json.loads((out / RUN).read_text()) if (out / RUN).exists() else None
        if isinstance(record, dict) and "run_id" not in record and ("task" in record or (out / "predictions.jsonl").exists()):
            raise RunError(f"--out {out} holds an eval run (tools/eval.py's run.json and answers), not a "
                           "training run; train into a new --out")
        recorded = record and record["identity"]
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{out / RUN} is unreadable, so whose run {out} holds is unknown; "
                       "train into a new --out") from None
    if resume and record and (out / "final").exists():
        raise RunError(f"--resume: the run in {out} has finished ({out / 'final'} is its export): nothing to "
                       "continue; train into a new --out, or pass --force instead to start it over")
    if resume and record:
        changed = [k for k in sorted(identity.keys() | recorded.keys()) if identity.get(k) != recorded.get(k)]
        if changed:
            said = "; ".join(difference(k, recorded, identity) for k in changed[:3])
            raise RunError(f"--resume: the run in {out} was started with other settings ({said}): "
                           "resume with its flags, or train into a new --out")
        return
    if resume and held:
        raise RunError(f"--resume: {out} holds {', '.join(held[:3])} but no {RUN}, so which run they "
                       "belong to is unknown (an older train.py's, or no run's); train into a new --out")
    a_run = bool({RUN, "log.jsonl"} & set(held) or checkpoints(out))
    if held and not a_run:
        raise RunError(f"--out {out} holds {', '.join(held)}, not a training run's; choose a new --out")
    if held and not force:
        raise RunError(f"--out {out} already holds a run: continue it with --resume, train into a new --out, "
                       "or pass --force to delete that run and start over")
    for name in held + [p.name for p in out.glob("step_*.tmp")]:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (out / "run.tmp").write_text(json.dumps({"run_id": uuid.uuid4().hex, "identity": identity}, indent=2))
    os.replace(out / "run.tmp", out / RUN)


def release(out: Path, rank: int):
    """Remove OUT/lock if this process holds it (rank 0 takes it)."""
    if rank == 0:
        locks.release(out)


def finite(model) -> bool:
    """Whether every trained weight is a finite number, on every process (a diverged run's are
    not: such weights are neither saved nor exported)."""
    trained = [p.detach() for p in model.parameters() if p.requires_grad]
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in trained)
    if dist.is_initialized():
        flag = torch.tensor(float(bad), device=trained[0].device if trained else "cpu")
        dist.all_reduce(flag)
        bad = int(flag.item())
    return bad == 0

"""
Reading and writing checkpoint files in the formats the models were released in.

A checkpoint directory holds either one file (`model.safetensors`, `pytorch_model.bin`) or
shards listed by an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`,
whose `weight_map` maps every tensor name to its shard). The released Dragonfly weights are
pickled `.bin` shards; pickles are only ever opened with `torch.load(weights_only=True)`.

Loading copies one tensor at a time into an already-allocated model (built on the meta device,
then materialised in the target dtype), so peak memory is the model plus one tensor, never a
full float32 copy: `.bin` shards are memory-mapped and each tensor's file pages are given back
to the kernel once it has been copied (see `drop_pages`). Every error names the tensor and the
file it came from.

`python -m tools.convert_weights SRC DST` converts a `.bin` directory to safetensors, shard by shard, into a new
folder DST (`--force` replaces a non-empty one).
"""
import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors import SafetensorError
from safetensors.torch import save_file as _save_file

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    pass


def checkpoint_files(path) -> list:
    """The weight files of a checkpoint directory (or the file itself), in shard order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    for name in INDEX_FILES:
        if (path / name).exists():
            try:
                weight_map = json.loads(regular(path / name).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path / name}: not a valid index file ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{path / name} lists {missing[0]}, which is not in {path}")
            return [regular(path / f) for f in files]
    for name in SINGLE_FILES:
        if (path / name).exists():
            return [regular(path / name)]
    raise CheckpointError(f"{path}: no weights found (expected one of {INDEX_FILES + SINGLE_FILES})")


def regular(file: Path) -> Path:
    """`file`, unless it is a FIFO, folder or device: reading a FIFO blocks until someone writes."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not a regular file (a folder, FIFO or device); restore the checkpoint's file")
    return file


def iter_file(file: Path):
    """Yield (name, tensor) for one weight file, one tensor at a time: safetensors are read
    tensor by tensor and `.bin` pickles are memory-mapped, so a shard is never held whole."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
            return
        try:
            state, mapped = torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state, mapped = torch.load(file, map_location="cpu", weights_only=True), False
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read weights ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    for k, t in state.items():
        yield k, t
        if mapped:  # the caller is done with t: without this the whole shard stays resident
            drop_pages(t)


def one_line(error) -> str:
    """A torch.load error in one line. weights_only's refusal of a pickle that would run code is
    paragraphs: its warning is kept through "arbitrary code execution", then the object refused
    ("Trying to load unsupported GLOBAL posix.system ..."); the pointer to the docs is dropped."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation of torch.load")]
    mark = "arbitrary code execution"
    if lines and mark in lines[0]:
        lines[0] = lines[0][:lines[0].index(mark) + len(mark)] + "."
    return " ".join(lines)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
MADV_DONTNEED = 4


def drop_pages(t: torch.Tensor):
    """Unmap the resident pages of a tensor that lives in a private read-only file mapping
    (`torch.load(mmap=True)`). The data stays correct: touching it again reads the file anew.
    Only whole pages inside the tensor are dropped. Linux only; elsewhere a no-op."""
    if _LIBC is None or not t.is_contiguous() or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def read_shapes(path) -> dict:
    """{tensor name: shape} over all shards, reading headers only where the format allows."""
    shapes = {}
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read weights ({type(e).__name__}: {e})") from None
        else:
            shapes.update({k: tuple(t.shape) for k, t in iter_file(file)})
    return shapes


@torch.no_grad()
def load_into(module: torch.nn.Module, path, names: dict, ignore=lambda key: False, convert=None):
    """Copy checkpoint tensors into `module`, one shard at a time.
    names: {our parameter name: checkpoint key}. A checkpoint key that is neither mapped nor
    ignored, a shape mismatch, and a parameter the checkpoint lacks each raise CheckpointError.
    convert(key, tensor) -> [(key, tensor), ...] rewrites each tensor on its way in (quantize.py's
    load-time int8). A bar counts the tensors when loading takes more than two seconds."""
    from tqdm import tqdm
    params = dict(module.named_parameters())
    by_key = {key: ours for ours, key in names.items()}
    loaded = set()
    bar = tqdm(total=len(by_key), desc=f"loading {Path(path).name}", unit=" tensors", delay=2, leave=False)
    for file in checkpoint_files(path):
        for key, tensor in iter_file(file):
            if tensor.is_floating_point() and not all_finite(tensor):  # before int8 quantizing would hide it
                raise CheckpointError(f"{file}: {key} holds NaN or infinite values; the file is damaged or its "
                                      "training diverged: use an earlier checkpoint")
            for key, tensor in (convert(key, tensor) if convert else [(key, tensor)]):
                if key not in by_key:
                    if ignore(key):
                        continue
                    raise CheckpointError(f"{file}: unexpected weight {key!r} (not part of this model)")
                p = params[by_key[key]]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise CheckpointError(f"{file}: {key} has shape {tuple(tensor.shape)}, "
                                          f"the model expects {tuple(p.shape)}")
                if tensor.is_floating_point() != p.is_floating_point() or not (p.is_floating_point() or tensor.dtype == p.dtype):
                    # copy_ would cast silently: an int8 matrix without its scales answers wrongly
                    raise CheckpointError(f"{file}: {key} is stored as {str(tensor.dtype).removeprefix('torch.')}, the "
                                          f"model expects {'a floating-point' if p.is_floating_point() else str(p.dtype).removeprefix('torch.')} weight")
                p.copy_(tensor)
                loaded.add(key)
                bar.update()
    bar.close()
    missing = sorted(set(by_key) - loaded)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} weight(s), first {missing[0]!r}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. A sum is finite only then, and runs ~20x faster than isfinite on
    bf16 (3 GB/s here); only a sum that overflowed needs the exact look."""
    return bool(t.sum().isfinite()) or bool(torch.isfinite(t).all())


def materialize(model, device):
    """A model built on the meta device -> its memory on `device`, uninitialised (load_into fills
    it), after checking on a CPU that it fits (`ensure_memory`). Parameters the model shares (a
    tied embedding and output matrix, and an int8 table's scales) stay shared: `to_empty` alone
    would give each name its own tensor."""
    if torch.device(device).type == "cpu":
        ensure_memory(sum(p.numel() * p.element_size() for p in model.parameters()))
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model = model.to_empty(device=device)
    for first, *others in (names for names in shared.values() if len(names) > 1):
        owner = model.get_parameter(first)
        for name in others:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, owner)
    return model


def memory_limit():
    """(bytes, what) of the least memory this process may use, or None when nothing says: Linux's
    MemAvailable, the cgroup's memory.max less what the cgroup uses (a container's limit; 'max'
    is none), and RLIMIT_AS less this process's address space (`ulimit -v`)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits.append((next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")),
                           "available"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        cap = Path(CGROUP, "memory.max").read_text().strip()
        if cap != "max":
            try:
                used = int(Path(CGROUP, "memory.current").read_text())
            except (OSError, ValueError):
                used = 0
            limits.append((max(0, int(cap) - used), "free under the cgroup's memory.max"))
    except (OSError, ValueError):
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            try:
                with open("/proc/self/statm") as f:
                    mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                mapped = 0
            limits.append((max(0, soft - mapped), "free under the address-space limit (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


CGROUP = "/sys/fs/cgroup"  # cgroup v2, as a container sees its own


def ensure_memory(nbytes: int, headroom: float = 1.1):
    """Raise CheckpointError, one line, when `nbytes` of weights (+10% for activations and the KV
    cache) exceed the memory this process may use (memory_limit: MemAvailable, the cgroup's
    limit, RLIMIT_AS): better than swapping, the OOM killer or a MemoryError midway."""
    limit = memory_limit()
    if limit is None:
        return
    available, what = limit
    if nbytes * headroom > available:
        raise CheckpointError(f"the model needs {nbytes / 2**30:.1f} GiB of memory (+10%), {available / 2**30:.1f} GiB "
                              f"are {what}: try --dtype bfloat16 or --quantize int8")


def save_file(state: dict, file, metadata=None):
    """safetensors' save_file, with a write that fails (a full disk, a file past `ulimit -f`) as
    an OSError naming the file: safetensors raises its own error type for them."""
    try:
        _save_file(state, file, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{file}: cannot write ({str(e).removeprefix('Error while serializing: ')})") from None


def save(state: dict, path, max_shard_bytes: int = 5 * 2**30):
    """Write {name: tensor} as safetensors shards + index (a single file when it fits)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_config(file) -> dict:
    """A checkpoint's config.json as a dict; an unreadable one raises CheckpointError naming it."""
    try:
        cfg = json.loads(Path(file).read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise CheckpointError(f"{file}: not valid JSON ({e}); restore it from where the checkpoint came from") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def refuse_input_overlap(out: Path, inputs: dict, tool: str) -> Path:
    """--out resolved, after refusing (ValueError) one that is, holds or, for a model folder, sits
    inside an input. inputs: flag -> (path, whether an --out inside it is refused too); tool: who
    would write ("training", "eval"). Shared by train.py's and eval's output checks."""
    try:
        where = out.resolve()
    except RuntimeError:  # a symbolic link loop (Python < 3.13)
        raise ValueError(f"--out {out}: a loop of symbolic links (a link that leads back to itself); "
                         "give a real path") from None
    for flag, (path, inside) in inputs.items():
        p = Path(path).resolve()
        how = "is" if where == p else "holds" if where in p.parents else "is inside" if inside and p in where.parents else ""
        if how:
            raise ValueError(f"--out {out} {how} {flag} {path}: {tool} would write over its input; choose another --out")
    return where


def require_checkpoint(path) -> Path:
    """`path` if it holds a config.json and weights, else CheckpointError saying what is missing,
    so a wrong directory is reported as such and not as the first file some loader looks for."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    has_config = (path / "config.json").is_file()
    try:
        checkpoint_files(path)
    except CheckpointError:
        if not has_config:
            raise CheckpointError(f"{path}: no checkpoint here (no config.json, no weights); pass a directory "
                                  "written by train.py or a released one (see README)") from None
        raise
    if not has_config:
        raise CheckpointError(f"{path}: no config.json (is this a Dragonfly checkpoint directory?)")
    return path


def fingerprint(path) -> str:
    """An identity of checkpoint directory `path` (eval.py keys its saved answers by it): the
    content of config.json and of its weight, index and tokenizer files, by name. A file rewritten
    in place (even with its size and times put back) changes it; a copy (`cp -r`) keeps it. Each
    file's sha256 is cached (`content_hash`), so a 16 GB checkpoint is read once, not per run."""
    path, h = Path(path), hashlib.sha256()
    try:
        files = checkpoint_files(path)
    except CheckpointError:
        files = []
    names = ("config.json", "tokenizer.model", "tokenizer.json", "original/tokenizer.model", *INDEX_FILES)
    found = sorted({*files, *(path / n for n in names if (path / n).is_file())})
    cache = _read_hash_cache()
    for f in found:
        h.update(f"{f.relative_to(path)}\0{content_hash(f, cache)}\0".encode())
    _write_hash_cache(cache)
    return h.hexdigest()[:16]


def file_sha256(f) -> str:
    """f's sha256, through the same cache (train.py's run settings record their data's)."""
    cache = _read_hash_cache()
    digest = content_hash(Path(f), cache)
    _write_hash_cache(cache)
    return digest


def hash_cache_file() -> Path:
    """Where file hashes are kept between runs ($DRAGONFLY_CACHE, else the XDG cache folder)."""
    root = os.environ.get("DRAGONFLY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dragonfly-nano"
    return Path(root) / "file-hashes.json"


def content_hash(f: Path, cache: dict) -> str:
    """f's sha256, from `cache` when f's size, modification time, inode and status-change time
    are those it was hashed with. The status-change time (ctime) cannot be set back by `touch -r`,
    so a file rewritten in place is hashed again; a copy is a new inode, hashed once."""
    st = f.stat()
    key, stamp = str(f.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    if cache.get(key, [None])[:-1] != stamp:
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        cache[key] = [*stamp, digest.hexdigest()]
    return cache[key][-1]


def _read_hash_cache() -> dict:
    try:
        cache = json.loads(hash_cache_file().read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):   # none yet, unreadable or torn: hash again
        return {}


def _write_hash_cache(cache: dict):
    """Best effort: a cache that cannot be written (a read-only home) only costs hashing again."""
    path = hash_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass


def resolved(path, flag: str) -> Path:
    """Path(path).resolve(), with a loop of symbolic links (which some Pythons' resolve raises
    RuntimeError for, others OSError ELOOP) as a CheckpointError naming `flag` and the path."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise CheckpointError(f"{flag} {path}: a loop of symbolic links (a link that leads back to itself); "
                              "give a real path") from None


def refuse_overwrite(out, inputs, flag: str):
    """Raise CheckpointError when output path `out` (named by `flag`) is one of `inputs`, lies inside
    one, or holds one: writing there would destroy what is being read. Links are followed."""
    o = resolved(out, flag)
    for i in inputs:
        i = resolved(i, "the input")
        same = o == i or (o.exists() and i.exists() and os.path.samefile(o, i))  # also a hard link
        if same or i in o.parents or o in i.parents:
            how = "is" if same else "is inside" if i in o.parents else "holds"
            raise CheckpointError(f"{flag} {out} {how} the input {i}; write to a new path")


def require_writable(out, flag: str, parents: bool = True):
    """CheckpointError, before any slow work, when nothing can be created at `out` (named by
    `flag`): its nearest existing folder (with parents=False, its own folder, which must exist)
    must take a new entry (tried, not guessed: a read-only filesystem refuses even root)."""
    folder = resolved(out, flag).parent
    if not parents and not folder.is_dir():
        raise CheckpointError(f"{flag} {out}: the folder {folder} does not exist; create it or choose another path")
    while not folder.exists():
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".write-test-"))
    except OSError as e:
        raise CheckpointError(f"{flag} {out}: cannot write in {folder} ({e.strerror}); choose another place") from None


def convert_to_safetensors(src, dst, force=False):
    """A released `.bin` checkpoint directory -> the same checkpoint as safetensors. Shards map
    one to one, so memory stays at one shard; config and tokenizer files are copied alongside.
    Written into a temporary sibling folder renamed to `dst` at the end, so `dst` is never a mix
    of old and new files nor half-written; a non-empty `dst` is replaced only with `force`."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory (give the folder that holds the weights)")
    files = checkpoint_files(src)
    refuse_overwrite(dst, [src], "DST")
    if dst.exists() and not force and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new folder or pass --force to replace it")
    require_writable(dst, "DST")
    with staged(dst) as tmp:
        weight_map, total = {}, 0
        for i, file in enumerate(files):
            state = {k: t.contiguous() for k, t in iter_file(file)}
            name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            save_file(state, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in state})
            total += sum(t.numel() * t.element_size() for t in state.values())
            print(f"{file.name} -> {name} ({len(state)} tensors)", file=sys.stderr)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        copy_side_files(src, tmp)


@contextmanager
def staged(dst):
    """A new checkpoint directory written in a temporary sibling folder (yielded) that replaces
    `dst` only once everything is in it: `dst` is never half-written nor a mix of old and new
    files, and an error or a kill leaves at most the temporary folder, removed by the next run."""
    dst = resolved(dst, "the output")
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    tmp.rename(dst)


def copy_side_files(src, dst, skip=()):
    """The checkpoint's other files (config, tokenizer, generation settings) from `src` to `dst`;
    never its weight index, which belongs to the weights written."""
    for other in os.listdir(src):
        if other.endswith((".json", ".model", ".txt")) and other not in (*INDEX_FILES, *skip):
            shutil.copy2(Path(src) / other, Path(dst) / other)

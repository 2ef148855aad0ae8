"""Where to run and in which dtypes: the `--device` and `--dtype` flags the command lines share,
and whether the CPU computes in a half dtype at full speed (where it does not, stored.py
keeps the weights in that dtype and computes in float32).
"""
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
CPU_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


def pick_device(name: str) -> str:
    """--device checked against this machine: 'auto' is cuda when there is one, else cpu; a
    device that is not here is one line naming those that are (torch would fail much later)."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    if name == "auto":
        return "cuda" if cuda else "cpu"
    try:
        d = torch.device(name)
    except RuntimeError:
        d = None
    if d is None or not (d.type == "cpu" or (d.type == "mps" and mps) or
                         (d.type == "cuda" and cuda and (d.index or 0) < len(cuda))):
        raise ValueError(f"--device {name} is not available here; available: {', '.join(['cpu', *cuda, *mps])}")
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """--dtype: 'auto' is bfloat16 on CUDA (as released), float32 elsewhere."""
    return DTYPES[name] if name != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def cpu_kind() -> str:
    """The CPU flags that decide which kernels run, to name beside a measured number (a brand
    name says less), and ATen's vector capability."""
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{' '.join(flags) or 'flags unreadable'} (ATen {torch.backends.cpu.get_cpu_capability()}"
            + (f", ONEDNN_MAX_CPU_ISA={isa})" if isa else ")"))


def native_dtype(dtype, device) -> bool:
    """Whether `device` computes in `dtype` at full speed: always on GPUs; on CPUs only with
    native bf16/fp16 matrix instructions (/proc/cpuinfo flags)."""
    if dtype not in HALF or torch.device(device).type != "cpu":
        return True
    return bool(CPU_FLAGS[dtype] & cpu_flags())


def compute_dtype(dtype, device):
    """The dtype the layers compute in for a model of `dtype` on `device`: float32 where a half
    dtype is slow (its weights then stay in `dtype`: see pretrained.load's `compute`)."""
    return dtype if native_dtype(dtype, device) else torch.float32

"""
Weight-only storage: the model's matrices kept compact (bf16, or int8 with one scale per output
channel) while each product runs in the compute dtype, in the spirit of gpt-fast's quantize.py
(a handler swaps every nn.Linear for a module that stores its weight compactly).

Why: an 8B model is ~34 GB in float32. bf16 halves that, but a CPU without bf16 matrix
instructions (an AVX2-only CPU: `avx2 fma`, no `avx512f`) runs bf16 GEMMs at 1-10 GFLOP/s against ~140 in
float32. So on such a CPU `--dtype bfloat16` keeps the weights in bf16 and converts them to
float32 one block of rows at a time, right before the product: activations, attention and the
KV cache stay float32, and prefill runs at float32 speed with half the memory. One row (a
decoded token) is the exception: PyTorch's bf16 matrix-vector kernel converts in registers and
accumulates in float32, memory-bound without bf16 instructions, five times faster on that CPU
than converting first; it rounds the token's activations and the product to bf16 (as the int8
kernel below does). Which CPUs count as fast is read from /proc/cpuinfo (devices.py's `native_dtype`):
avx512_bf16 or amx_bf16 (avx512_fp16 or amx_fp16 for float16); other CPUs, and CPUs whose
flags we cannot read, compute in float32.
The RoPE frequencies keep the rounding of the model's dtype (`Llama.rope_dtype`): the released
checkpoint was trained and is served with bf16-rounded frequencies.

int8 (`--quantize int8`): per-output-channel symmetric, w ~ q * s with q = round(w / s) and
s = max|w_row| / 127 rounded to bf16 (8 significant bits: off by at most 2^-8, which keeps
max|w_row| / s within [126.50, 127.50]: the row's largest |q| is exactly 127, no clamp is
needed, and |w - q s| <= s / 2 holds for every weight). Every linear layer of the ViT, the
projection and the Llama is quantized, the vocabulary projection included (it is the largest
matrix each decoded token reads); so is the token embedding, per row: its rows are the
vocabulary projection's output channels, so a tied table keeps one int8 matrix and one scale
vector, and the 8B's 1 GB table becomes 0.5 GB. Left in the compute dtype: the ViT's patch
convolution (0.2% of the ViT), position and class embeddings, norms and biases. Products: on CPU a single row (a decoded token) goes through
PyTorch's int8 kernel `torch.ops.aten._weight_int8pack_mm` (bf16 activations and scales,
float32 accumulation, bf16 output); more rows (prefill), and other devices, convert the int8
rows to the compute dtype a block at a time and scale the product's columns.

Which dtype computes fast on a given CPU is devices.py's question (`compute_dtype`); writing an
int8 checkpoint and measuring what storage costs is quantize.py's command line.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import weights

# Weights converted per block: for a few rows (a batch of decoded tokens) 4 MiB of float32 that
# stay in cache between the conversion and the product; for many rows (prefill) 64 MiB, so each
# GEMM is large.
BLOCK_SMALL, BLOCK_LARGE, FEW_ROWS = 2**20, 2**24, 16
INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def storage_dtype(dtype, compute, quantize=None):
    """The dtype the matrices are kept in (None: plain nn.Linear in `compute`): int8 when
    quantized, else the model's `dtype` when the layers compute in another dtype."""
    if quantize not in (None, "int8"):
        raise ValueError(f"stored.py: unknown quantization {quantize!r}; only int8 is implemented")
    return torch.int8 if quantize == "int8" else dtype if compute != dtype else None


# ---- int8 per-output-channel -------------------------------------------------------------------
@torch.no_grad()
def quantize_rows(w, rows_per_block=4096):
    """w (N, K) float -> q (N, K) int8, scales (N,) bf16 with w[n] ~ q[n] * scales[n].
    In blocks of rows, so the float32 temporaries of a 1 GB embedding stay small."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.bfloat16, device=w.device)
    for i in range(0, w.shape[0], rows_per_block):
        block = w[i:i + rows_per_block].float()
        s = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        q[i:i + rows_per_block] = (block / s.float()[:, None]).round()  # |q| <= 127.49 -> 127: no clamp
        scales[i:i + rows_per_block] = s
    return q, scales


def dequantize(q, scales, dtype=torch.float32):
    return q.to(dtype) * scales.to(dtype)[:, None]


def blockwise_linear(x, weight, scales=None, bias=None):
    """F.linear(x, weight) in x's dtype with `weight` stored in another dtype (bf16, or int8
    with per-row `scales`): converted a block of rows at a time on CPU, all at once elsewhere.
    Without scales each block's product is F.linear's own, so the result equals
    F.linear(x, weight.to(x.dtype), bias) exactly."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    block = BLOCK_SMALL if x2.shape[0] <= FEW_ROWS else BLOCK_LARGE
    rows = max(1, block // K) if x.device.type == "cpu" else N
    if rows >= N:
        out = F.linear(x2, weight.to(x.dtype), None if scales is not None else bias)
    else:
        out = x2.new_empty(x2.shape[0], N)
        for i in range(0, N, rows):
            b = None if bias is None or scales is not None else bias[i:i + rows]
            out[:, i:i + rows] = F.linear(x2, weight[i:i + rows].to(x.dtype), b)
    if scales is not None:  # x @ (q s)^T = (x @ q^T) s: one scale per output column
        out = out.mul_(scales.to(x.dtype))
        if bias is not None:
            out = out.add_(bias)
    return out.view(*x.shape[:-1], N)


def half_gemv(x, weight, bias=None):
    """One row times a bf16/fp16 matrix with PyTorch's matrix-vector kernel, which converts the
    weights in registers and accumulates in float32: 14 GB/s of bf16 on a 14336 x 4096 matrix
    on the AVX2-only CPU, against 2.8 GB/s when each block is first converted to float32 (21 GB/s
    read bandwidth there); 12 GB/s on a CPU with avx512f avx512_bf16 amx_bf16 (13 GB/s read). x and the output are rounded to the weight's dtype, as in the int8
    kernel below."""
    out = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return out if bias is None else out.add_(bias)


def int8pack_linear(x, q, scales, bias=None):
    """One row through PyTorch's CPU int8 kernel (bf16 in, float32 accumulation, bf16 out).
    The kernel reads x with aligned vector loads and no tail loop: x must be a fresh allocation
    (a view at an offset crashes it) and K a multiple of 16."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16, copy=True)
    out = torch.ops.aten._weight_int8pack_mm(x2, q, scales).to(x.dtype)
    if bias is not None:
        out = out.add_(bias)
    return out.view(*x.shape[:-1], q.shape[0])


# ---- modules -----------------------------------------------------------------------------------
class StoredLinear(nn.Module):
    """nn.Linear whose weight is stored in `storage` (bf16/fp16: as is; int8: with one bf16
    scale per output channel) and computed in `dtype`, the dtype of the bias and activations."""

    def __init__(self, in_features, out_features, bias: bool, storage, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        frozen = lambda *shape, dt: nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)
        self.weight = frozen(out_features, in_features, dt=storage)
        self.scales = frozen(out_features, dt=torch.bfloat16) if storage == torch.int8 else None
        self.bias = frozen(out_features, dt=dtype) if bias else None

    def forward(self, x):
        # Speed only, not part of the model: every branch computes x @ W^T + b with W dequantized;
        # they differ in the kernel, picked for this hardware, and in its rounding (one row: bf16
        # activations and output; see the module docstring).
        # Tests: tests/test_quantize.py's *_matches_dequantized_float32_matmul,
        # *_equals_float32_linear_of_the_bf16_weight_exactly and
        # *_single_row_is_float32_accumulation_of_bf16_rounded_inputs.
        one_row = x.device.type == "cpu" and x.numel() == x.shape[-1]  # a decoded token
        if self.scales is None:
            if one_row:
                return half_gemv(x, self.weight, self.bias)
            return blockwise_linear(x, self.weight, None, self.bias)
        if one_row and INT8PACK and self.in_features % 16 == 0:
            return int8pack_linear(x, self.weight, self.scales, self.bias)
        return blockwise_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, storage={self.weight.dtype}, bias={self.bias is not None}"


class StoredEmbedding(nn.Module):
    """nn.Embedding with its table stored in `storage` (int8: one bf16 scale per row), looked
    up rows returned in `dtype`."""

    def __init__(self, num_embeddings, dim, storage, dtype, device=None):
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=storage, device=device), requires_grad=False)
        self.scales = (nn.Parameter(torch.empty(num_embeddings, dtype=torch.bfloat16, device=device), requires_grad=False)
                       if storage == torch.int8 else None)

    def forward(self, ids):
        x = F.embedding(ids, self.weight).to(self.dtype)
        return x if self.scales is None else x * self.scales[ids].to(self.dtype)[..., None]

    def extra_repr(self):
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, storage={self.weight.dtype}"


def allocate(model, device, weights_dtype, compute_dtype, quantize=None):
    """A model built on the meta device, computing in `compute_dtype` -> its memory on `device`:
    the matrices kept as `storage_dtype` says (`store_weights`), then allocated once, uninitialised
    (weights.load_into fills them), after checking that they fit (weights.materialize)."""
    return weights.materialize(store_weights(model, weights_dtype, compute_dtype, quantize), device)


@torch.no_grad()
def store_weights(model: nn.Module, weights_dtype, compute_dtype, quantize=None) -> nn.Module:
    """The handler: when the matrices are kept in another dtype than the layers compute in
    (`storage_dtype`: bf16 weights computed in float32, or int8), swap every nn.Linear and
    nn.Embedding of `model` for a Stored one keeping its weight so; otherwise `model` as it is.
    On the meta device only the shapes move (pretrained.load then fills them); real weights are
    converted."""
    storage, dtype = storage_dtype(weights_dtype, compute_dtype, quantize), compute_dtype
    if storage is None:
        return model
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is nn.Linear:
                new = StoredLinear(m.in_features, m.out_features, m.bias is not None, storage, dtype, m.weight.device)
            elif type(m) is nn.Embedding:
                new = StoredEmbedding(m.num_embeddings, m.embedding_dim, storage, dtype, m.weight.device)
            else:
                continue
            if m.weight.device.type != "meta":
                if storage == torch.int8:
                    new.weight.data, new.scales.data = quantize_rows(m.weight)
                else:
                    new.weight.copy_(m.weight)
                if getattr(m, "bias", None) is not None:
                    new.bias.copy_(m.bias)
            setattr(parent, name, new)
    for m in model.modules():
        if hasattr(m, "tie_weights"):  # a tied vocabulary projection shares the embedding's table
            m.tie_weights()
    return model


def int8_converter(model, names: dict):
    """For weights.load_into: a float matrix bound for an int8 weight is quantized on its way
    in (load-time quantization, one tensor at a time), yielding the weight and its scales."""
    int8_keys = {names[n] for n, p in model.named_parameters() if p.dtype == torch.int8}

    def convert(key, tensor):
        if key in int8_keys and tensor.is_floating_point():
            q, scales = quantize_rows(tensor)
            return [(key, q), (key.removesuffix("weight") + "scales", scales)]
        return [(key, tensor)]
    return convert


# ---- Speed only: the output matrix's memory order for decoding on a CPU -------------------------
def faster_layout(w):
    """w, or its column-major copy, whichever a one-row product reads faster (best of 2 each)."""
    x, column = torch.randn(1, w.shape[1], dtype=w.dtype), w.t().contiguous().t()
    best = {}
    for name, m in [("row", w), ("column", column)] * 2:
        t0 = time.perf_counter()
        F.linear(x, m)
        best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
    return column if best["column"] < best["row"] else w


def lay_out_for_decoding(llm):
    """Speed only, not part of Llama-3: each decoded token is one product with the (vocab, dim)
    output matrix, the largest read of the step, and which memory order the CPU's BLAS reads
    fastest depends on the CPU: column-major ran the float32 product ~1.4x faster on an AVX2-only
    CPU, and 1.4x (float32) to 1.5x (bf16) slower on one with avx512f avx512_bf16 amx_bf16. So
    pretrained.load times one product in each order and keeps the faster: same values, same
    shape. No test needs it; the tests that compare cached generation with recomputation check
    that it changes nothing."""
    p = llm.lm_head.weight
    if p.device.type == "cpu" and p.is_contiguous() and not llm.cfg.tie_embeddings and type(llm.lm_head) is nn.Linear:
        p.data = faster_layout(p.data)

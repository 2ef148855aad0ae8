"""
How fast Dragonfly runs here: cropping, prefill of one image + prompt, and decoding, in the
spirit of nanoGPT's bench.py (speed is measured, not guessed). Weights are random: speed does
not depend on their values. Times are medians over --repeats runs after --warmup runs.

    python -m tools.bench                                                  # small model, CPU
    python -m tools.bench --config full --device cuda --dtype bfloat16     # the released 8B shape
    python -m tools.bench --json out/bench.json
    python -m tools.bench --config full --write-checkpoint /tmp/df8b && python -m tools.bench --load-memory /tmp/df8b
    python -m tools.bench --config full --checkpoint /tmp/df8b --dtype bfloat16 [--quantize int8]   # the 8B on a CPU

What each timer holds (one 800x600 numpy-RNG image, the 22-token prompt below):
  crops    crops.make_crops on the PIL image: best-fit grids, bicubic resizes, 41 tiles, CLIP
           normalisation.
  prefill  Dragonfly.generate from its call to the first token it yields: crops to a tensor,
           the image block (ViT, projection, pooling, separators), the KV cache allocation,
           the LLM over 2098 + 22 positions, the greedy first token and its log-probability.
  decode   the next --new-tokens yields of that same call, per token: one token through the
           LLM against the KV cache, greedy choice, log-probability.
  context  decode ms/token after text-only prompts of growing length; flat = the cache works.
  turn 1   a conversation.Conversation from its creation (the image block) to the first token of
           its first answer (the same question as prefill, so the same work plus the ids' encoding).
  turn 2   the same conversation's next question, from `ask` to its first token: the LLM runs
           over 17 new positions (turn 1's one answer token and <|eot_id|>, the question's 15
           turn ids) after the 2120 in the cache.
  limits   (CPU) the float32 and bf16 matmul peaks and the memory read bandwidth, measured in the
           same run: prefill is reported as FLOP/s against the peak of the dtype it computes in,
           decode as the bytes one token reads (every LLM weight, the KV cache) per second against the second.
tests/make_golden_bench.py times the same work with Hugging Face's CLIP and Llama.
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import crops as crops_lib
from lib import devices
import llama
from lib import presets
from lib import pretrained
from lib import stored
import vit
from lib import weights
from lib.conversation import Conversation
from lib.devices import DTYPES
from model import Dragonfly, image_positions, v2_config
from lib.pretrained import allocate
from lib.release_format import checkpoint_names, release_config
from lib.timing import count_calls, machine_limits, quiet, sync, timed
from lib.tokenizer import Tokenizer

CONFIGS = {  # "small" fits a laptop CPU; "full" is the release: CLIP ViT-L/14-336 + Llama-3.1-8B
    "small": lambda: v2_config(vit.ViTConfig(336, 14, 384, 6, 6, 1536),
                               llama.LlamaConfig(dim=512, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=1536,
                                                 vocab_size=128256)),
    "full": lambda: v2_config(),
}
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat shape is in the top left corner
# of this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n  (Llama-3 token ids)
PROMPT = [128000, 128006, 882, 128007, 271, 3923, 6211, 374, 304, 279, 1948, 2163, 9309, 315, 420, 2217,
          30, 128009, 128006, 78191, 128007, 271]
TURNS = ["What shape is in the top left corner of this image?", "And what colour is it?"]
TOKENIZER = Path(__file__).resolve().parents[1] / "checkpoints" / "zoom-tiny"  # Meta's Llama-3 tokenizer.model


def random_model(cfg, device="cpu", dtype=torch.float32, seed=0, compute=None, quantize=None) -> Dragonfly:
    """Allocated once (pretrained.allocate; `compute`, `quantize`: as in pretrained.load), then
    filled: norms weight 1 / bias 0, every matrix N(0, 1/fan_in) (int8: uniform in [-127, 127]
    times a scale of the same standard deviation), so activations keep unit scale and logits
    are O(1); vectors N(0, 0.02)."""
    torch.manual_seed(seed)
    model = allocate(cfg, dtype, device, compute, quantize)
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.LayerNorm, llama.RMSNorm)):
                    p.fill_(float(name == "weight"))
                elif p.dtype == torch.int8:
                    p.random_(-127, 128)
                elif name == "scales":  # uniform integers in [-127, 127] have std sqrt((255^2 - 1) / 12)
                    p.fill_(m.weight.shape[1] ** -0.5 / ((255 ** 2 - 1) / 12) ** 0.5)
                else:
                    p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    return model.eval()


def synthetic_image(width=800, height=600, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def context_prompt(n: int, seed=0) -> list:
    """A text-only prompt of n positions: <|begin_of_text|> and random ordinary tokens."""
    return [128000] + np.random.default_rng(seed).integers(0, 128000, n - 1).tolist()


def time_generate(model, prompt, crops=None, new_tokens=64, progress=None):
    """One Dragonfly.generate call, greedy: (seconds to the first token, seconds per token for
    the next `new_tokens`, all generated ids)."""
    device = model.llm.lm_head.weight.device
    sync(device)
    t0 = time.perf_counter()
    steps = model.generate([prompt], None if crops is None else [crops], max_new_tokens=new_tokens + 1,
                           progress=progress)
    ids = [int(next(steps)[0][0])]  # int() waits for the device
    t1 = time.perf_counter()
    ids += [int(token[0]) for token, _ in steps]
    t2 = time.perf_counter()
    if len(ids) != new_tokens + 1:
        raise RuntimeError(f"generate stopped after {len(ids)} tokens, asked for {new_tokens + 1}")
    return t1 - t0, (t2 - t1) / new_tokens, ids


def time_conversation(model, tok, crops, turns=TURNS):
    """Seconds to the first token of each turn of one conversation (greedy); each answer is
    stopped there, and stays in the history as one token and <|eot_id|>."""
    device, seconds = model.llm.lm_head.weight.device, []
    for i, question in enumerate(turns):
        sync(device)
        t0 = time.perf_counter()
        if i == 0:
            conv = Conversation(model, tok, crops)  # the image block is computed here
        steps = conv.ask(question, max_new_tokens=1)
        next(steps, None)  # the first token, or the end if it was a stop token: the same work
        seconds.append(time.perf_counter() - t0)
        steps.close()
    return seconds


def write_random_checkpoint(path, cfg) -> int:
    """A checkpoint in the release's layout (config.json, two pickled .bin shards + index) with
    `cfg`'s shapes and constant values, written shard by shard; returns its size in bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        names = checkpoint_names(Dragonfly(cfg))
        shapes = {names[n]: p.shape for n, p in Dragonfly(cfg).named_parameters()}
    keys, weight_map = list(shapes), {}
    total = sum(shapes[k].numel() * 2 for k in keys)
    half = next(i for i, done in enumerate(itertools.accumulate(shapes[k].numel() * 2 for k in keys))
                if done > total / 2)  # two shards of equal bytes
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: torch.full(shapes[k], 0.01, dtype=torch.bfloat16) for k in part}, path / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(release_config(cfg.llm)))
    return total


def load_memory(path, dtype=torch.bfloat16, **kwargs):
    """Load a checkpoint with pretrained.load (`kwargs`: compute, quantize, device)
    while sampling this process's memory (Linux /proc): peak resident anonymous memory (what
    loading needs) and peak resident total, which also counts pages of the memory-mapped weight
    files (page cache, reclaimable). Returns (the numbers, the model)."""
    import threading
    peak, done = {"RssAnon": 0, "VmRSS": 0}, threading.Event()

    def watch():
        while not done.is_set():
            for line in open("/proc/self/status"):
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            time.sleep(0.02)
    thread = threading.Thread(target=watch)
    thread.start()
    t0 = time.perf_counter()
    try:
        model = pretrained.load(path, dtype=dtype, **kwargs)
    finally:
        done.set()
        thread.join()
    seconds = time.perf_counter() - t0
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": round(seconds, 1), "model_gib": round(size / 2**30, 2),
            "peak_anon_gib": round(peak["RssAnon"] / 2**30, 2), "peak_rss_gib": round(peak["VmRSS"] / 2**30, 2),
            "anon_over_model": round(peak["RssAnon"] / size, 2), "rss_over_model": round(peak["VmRSS"] / size, 2)}, model


def check_args(args):
    """Every flag that would fail only after minutes of measuring, said at once in one line."""
    for name, least in (("threads", 1), ("repeats", 1), ("warmup", 0), ("new_tokens", 1), ("context_tokens", 1)):
        if getattr(args, name) < least:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: give a number >= {least}")
    if not all(n.strip().isdigit() for n in args.contexts.split(",") if n):
        raise SystemExit(f"error: --contexts {args.contexts!r}: give prompt lengths separated by commas, e.g. 2100,4000")
    try:
        if args.json:
            weights.require_writable(args.json, "--json", parents=False)
        if args.write_checkpoint:  # before the model is built and its shards filled
            out = Path(args.write_checkpoint)
            if out.exists() and not out.is_dir():
                raise ValueError(f"--write-checkpoint {out} is a file; give a folder")
            weights.require_writable(out / "config.json" if out.is_dir() else out, "--write-checkpoint")
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def parse_args(argv=None):
    """The flags, with the defaults of --config (the full 8B on a CPU: one prefill takes minutes),
    checked at once."""
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=list(CONFIGS))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="bfloat16 on a CPU without bf16 "
                   "instructions: bf16 weights computed in float32 (stored.py), as sample.py runs it")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only (stored.py)")
    p.add_argument("--compute", choices=list(DTYPES), help="the dtype the layers compute in (default: "
                   "devices.compute_dtype's choice for this machine); e.g. float32 to time bf16 weights computed "
                   "in float32 on a CPU with bf16 instructions")
    p.add_argument("--checkpoint", metavar="DIR", help="load DIR (timed, peak memory sampled) instead of "
                   "random weights, e.g. one written by --write-checkpoint")
    p.add_argument("--repeats", type=int, help="default 5; full config 1")
    p.add_argument("--warmup", type=int, help="default 1; full config 0")
    p.add_argument("--new-tokens", type=int, help="decode steps timed after the first token (default 64; full 16)")
    p.add_argument("--contexts", help="text-only prompt lengths ('' skips; default 2100,4000,6000,8000; full '')")
    p.add_argument("--context-tokens", type=int, default=16, help="decode steps timed at each context length")
    p.add_argument("--turns", action=argparse.BooleanOptionalAction,
                   help="time a two-question conversation (default on; off for the full config: its turn 1 is a second prefill)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--write-checkpoint", metavar="DIR", help="write a random checkpoint of --config's shape "
                   "in the release's .bin layout (full: ~16 GB) and exit")
    p.add_argument("--load-memory", metavar="DIR", help="measure the memory of loading DIR in bfloat16 and exit")
    args = p.parse_args(argv)
    full = args.config == "full"
    for name, small, big in [("repeats", 5, 1), ("warmup", 1, 0), ("new_tokens", 64, 16),
                             ("contexts", "2100,4000,6000,8000", ""), ("turns", True, False)]:
        if getattr(args, name) is None:
            setattr(args, name, big if full else small)
    check_args(args)
    limit = CONFIGS[args.config]().llm.max_seq_len
    if context_lengths(args) and max(context_lengths(args)) + args.context_tokens + 1 > limit:
        p.error(f"--contexts: {max(context_lengths(args))} + {args.context_tokens + 1} positions exceed the context of {limit}")
    return args


def context_lengths(args) -> list:
    return [int(n) for n in args.contexts.split(",") if n]


def setup(args, cfg, compute):
    """The model to time (random weights, or --checkpoint loaded while its memory is sampled) and,
    on a CPU, this machine's limits, measured first while the model's memory is still free.
    Returns (model, limits or None, loading numbers or None)."""
    cuda, dtype = torch.device(args.device).type == "cuda", DTYPES[args.dtype]
    try:
        if not cuda:  # shapes only: a model too large for this machine stops here, before the limits
            meta = allocate(cfg, dtype, "meta", compute, args.quantize)
            weights.ensure_memory(sum(p.numel() * p.element_size() for p in meta.parameters()))
        limits = None if cuda else quiet(machine_limits)[0]
        if args.checkpoint:
            loading, model = load_memory(args.checkpoint, dtype, device=args.device, compute=compute,
                                         quantize=args.quantize)
            return model, limits, loading
        return random_model(cfg, args.device, dtype, compute=compute, quantize=args.quantize), limits, None
    except ValueError as e:  # too large for this machine (weights.ensure_memory), or a bad checkpoint
        raise SystemExit(f"bench.py: {e}")


def measure(args, model, image) -> dict:
    """Every measurement, each repeat visiting all of them in turn, the warmup repeats dropped:
    seconds per run ("runs"), stored.py's products in the first measured generate call
    ("kernels"), and (tries, share of a core other processes took) per kept run ("busy")."""
    full = args.config == "full"
    progress = (lambda what: print(f"prefill: {what}...", file=sys.stderr, flush=True)) if full else None
    calls = count_calls(stored, ["int8pack_linear", "blockwise_linear"])  # which products ran
    tok = Tokenizer.from_file(TOKENIZER)
    contexts = context_lengths(args)
    runs = {"crops": [], "prefill": [], "decode": [], **{f"context {n}": [] for n in contexts},
            "turn 1": [], "turn 2": []}  # seconds
    kernels, busy = {}, []
    tries = 2 if full else 5  # a full-size retry costs minutes
    for i in range(args.warmup + args.repeats):
        (crop_s, crops), *b = quiet(timed, crops_lib.make_crops, image, model.cfg.crops)
        calls.clear()
        (prefill, decode, _), *b2 = quiet(time_generate, model, PROMPT, crops, args.new_tokens, progress, tries=tries)
        context = [quiet(time_generate, model, context_prompt(n), None, args.context_tokens) for n in contexts]
        turns, *b3 = quiet(time_conversation, model, tok, crops) if args.turns else ([], 0, 0.0)
        if i >= args.warmup:
            busy += [b, b2, *[c[1:] for c in context], *([b3] if args.turns else [])]
            for key, seconds in zip(runs, [crop_s, prefill, decode, *[c[0][1] for c in context], *turns]):
                runs[key].append(seconds)
            if i == args.warmup:
                kernels = {f"{name} ({'1 row' if one else 'more rows'})": n for (name, one), n in calls.items()}
    return {"runs": runs, "kernels": kernels, "busy": busy, "crops": crops}


def peak_memory(args, model, crops) -> float:
    """GiB: on CUDA the peak of one image + prompt + decode (not of the long text-only prompts);
    on a CPU the process's peak resident set over the whole run."""
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
        time_generate(model, PROMPT, crops, args.new_tokens)
        return torch.cuda.max_memory_allocated(args.device) / 2 ** 30
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 30  # ru_maxrss is in KiB on Linux


def report(args, r: dict):
    """The numbers of one run as a table of lines, each against this machine's limit where known."""
    median, limits, compute, cfg = r["median_ms"], r["limits"], r["compute"], r["cfg"]
    print(f"dragonfly-nano bench: {args.config} config, {args.device}, {args.dtype}"
          f"{' int8' if args.quantize else ''} (compute {str(compute).removeprefix('torch.')}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warmup")
    if r["cpu"]:
        print(f"{'CPU':<14}{r['cpu']}")
    print(f"{r['n_crops']} crops of an {r['image_size'][0]}x{r['image_size'][1]} image; {r['positions']} "
          f"positions = image block {image_positions(cfg)} + prompt {len(PROMPT)}")
    print(f"{'weights':<14}{r['weights_bytes'] / 2**30:10.2f} GiB        {', '.join(r['stored'])}")
    if limits:
        print(f"{'limits':<14}{limits['matmul_flops'] / 1e9:10.1f} GFLOP/s    float32 matmul 4096^3, best of 4; "
              f"bf16 {limits['bf16_matmul_flops'] / 1e9:.1f} GFLOP/s; "
              f"{limits['read_bytes_per_s'] / 1e9:.1f} GB/s memory read (sum over 1 GiB, best of 5)")
    if r["loading"]:
        print(f"{'load':<14}{r['loading']['seconds']:10.1f} s          {args.checkpoint}: peak resident "
              f"{r['loading']['peak_rss_gib']:.2f} GiB ({r['loading']['peak_anon_gib']:.2f} GiB anonymous)")
    print(f"{'crops':<14}{median['crops']:10.1f} ms")
    line = f"{'prefill':<14}{median['prefill']:10.1f} ms         image block + LLM to the first token"
    if limits:  # against the peak of the dtype the products run in
        flops, bf16 = r["prefill_flops"], compute == torch.bfloat16
        achieved = flops / (median["prefill"] / 1e3)
        line += (f"; {flops / 1e12:.2f} TFLOP: {achieved / 1e9:.1f} GFLOP/s = "
                 f"{achieved / limits['bf16_matmul_flops' if bf16 else 'matmul_flops']:.0%} of the {'bf16' if bf16 else 'float32'} matmul peak")
    print(line)
    line = f"{'decode':<14}{median['decode']:10.2f} ms/token   {1e3 / median['decode']:.2f} tokens/s, {args.new_tokens} tokens"
    if limits:
        read = r["decode_bytes_per_token"]
        achieved = read / (median["decode"] / 1e3)
        line += f"; reads {read / 2**30:.2f} GiB/token: {achieved / 1e9:.1f} GB/s = {achieved / limits['read_bytes_per_s']:.0%} of the bandwidth"
    print(line)
    for n in context_lengths(args):
        print(f"{f'context {n}':<14}{median[f'context {n}']:10.2f} ms/token   text-only prompt, {args.context_tokens} tokens")
    if args.turns:
        print(f"{'turn 1':<14}{median['turn 1']:10.1f} ms         conversation: image block + first question to its first token")
        print(f"{'turn 2':<14}{median['turn 2']:10.1f} ms         the next question to its first token "
              f"({100 * median['turn 2'] / median['turn 1']:.2f}% of turn 1)")
    if r["int8_products"]:
        print(f"{'products':<14}" + ", ".join(f"{n} x {k}" for k, n in r["int8_products"].items()) + " (stored.py, prefill + decode)")
    where = "torch.cuda.max_memory_allocated, image + prompt + decode" if r["cpu"] is None else "process peak RSS, whole run"
    print(f"{'peak memory':<14}{r['peak_memory_gib']:10.2f} GiB        {where}")
    busy = r["busy"]
    print(f"{'shared CPU':<14}{sum(t > 1 for t, _ in busy):10d} runs redone; {sum(x > 0.1 for _, x in busy)} of "
          f"{len(busy)} kept while other processes took > 10% of a core")


def main(argv=None):
    """Set up, measure, report; --write-checkpoint and --load-memory do only that."""
    args = parse_args(argv)
    if args.write_checkpoint:
        print(f"{write_random_checkpoint(args.write_checkpoint, CONFIGS[args.config]()) / 2**30:.2f} GiB written")
        return
    if args.load_memory:
        print(json.dumps(load_memory(args.load_memory)[0]))
        return
    torch.set_num_threads(args.threads)
    dtype, cuda = DTYPES[args.dtype], torch.device(args.device).type == "cuda"
    compute = DTYPES[args.compute] if args.compute else devices.compute_dtype(dtype, args.device)
    model, limits, loading = setup(args, CONFIGS[args.config](), compute)
    cfg, image = model.cfg, synthetic_image()
    measured = measure(args, model, image)
    positions = image_positions(cfg) + len(PROMPT)
    r = {"args": vars(args), "cpu": None if cuda else devices.cpu_kind(), "compute": compute, "cfg": cfg,
         "median_ms": {k: 1e3 * statistics.median(v) for k, v in measured["runs"].items() if v},
         "peak_memory_gib": peak_memory(args, model, measured["crops"]), "busy": measured["busy"],
         "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
         "stored": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
         "limits": limits, "loading": loading, "prefill_flops": presets.prefill_flops(cfg, len(PROMPT)),
         "decode_bytes_per_token": presets.decode_bytes(model, positions + args.new_tokens // 2),  # the cache at mid-decode
         "int8_products": measured["kernels"], "positions": positions, "n_crops": len(measured["crops"].pixels),
         "image_size": image.size, "runs_ms": {k: [1e3 * x for x in v] for k, v in measured["runs"].items()}}
    report(args, r)
    if args.json:
        kept = ("args", "cpu", "median_ms", "peak_memory_gib", "busy", "weights_bytes", "limits", "loading",
                "prefill_flops", "decode_bytes_per_token", "int8_products", "runs_ms")
        with open(args.json, "w") as f:
            json.dump({**{k: r[k] for k in kept}, "compute": str(compute)}, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

"""
Writing an int8 checkpoint, and measuring what compact storage costs in quality: the command
line around stored.py (which holds the int8 and bf16 layers themselves and explains them).

    python -m tools.quantize SRC DST         # write an int8 checkpoint that pretrained.load reads
    python -m tools.quantize --compare SRC   # int8 and bf16 against float32: greedy ids, log-probabilities

int8 is per-output-channel symmetric (stored.py): every linear layer of the ViT, the projection
and the Llama, the vocabulary projection included, and the token embedding per row. DST holds
the int8 tensors, their bf16 scales and every other tensor in SRC's own dtype, with
`"quantization": "int8"` in its config.json, so loading it quantizes nothing.
"""
import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import torch

from lib import pretrained, release_format
from lib import weights
from lib.images import crop_image, load_image


@torch.no_grad()
def compare(path, image, prompt, n=32) -> dict:
    """What storage costs in quality: the float32 model answers greedily (n tokens after an
    image + `prompt`); every way of running it reads that same sequence (teacher forcing). For
    each pair we count the positions where both pick the same greedy id, and the largest
    difference of the log-probabilities they give the float32 tokens. int8 of the bf16 model is
    also compared with bf16 itself: both round RoPE's frequencies to bf16, float32 does not.
    Both CPU branches run whatever this CPU is: compute is forced (float32 over bf16 weights, as
    without bf16 instructions; bf16 throughout, as with them), only the kernels are this CPU's."""
    try:
        stored_as = json.loads((Path(path) / "config.json").read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        stored_as = None      # pretrained.load says what is wrong with it
    if stored_as == "int8":
        raise ValueError(f"--compare {path}: an int8 checkpoint; its float32 reference would be the int8 model itself "
                         "(32/32, diff 0.0): compare the float checkpoint it was quantized from")
    ref = pretrained.load(path)
    crops = crop_image(image, ref.cfg.crops)
    ids = [int(t[0]) for t, _ in ref.generate([prompt], [crops], max_new_tokens=n)]
    tokens, pixels = torch.tensor([prompt + ids]), torch.as_tensor(crops.pixels)[None]
    ways = {"float32": {}, "bf16 weights, float32 compute": dict(dtype=torch.bfloat16, compute=torch.float32),
            "bf16 weights and compute": dict(dtype=torch.bfloat16), "int8, float32 compute": dict(quantize="int8"),
            "int8 of bf16, float32 compute": dict(dtype=torch.bfloat16, compute=torch.float32, quantize="int8"),
            "int8 of bf16, bf16 compute": dict(dtype=torch.bfloat16, quantize="int8")}
    logprobs = {}  # (n, vocab): the predictions of the n generated tokens
    for name, kwargs in ways.items():
        logits = (ref if name == "float32" else pretrained.load(path, **kwargs))(tokens, pixels)[0]
        logprobs[name] = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)
    target = torch.tensor(ids)[:, None]
    pairs = [(name, "float32") for name in list(ways)[1:]] + [("int8 of bf16, float32 compute", "bf16 weights, float32 compute"),
                                                              ("int8 of bf16, bf16 compute", "bf16 weights and compute")]
    return {f"{a} vs {b}": {"greedy_ids_equal": f"{int((logprobs[a].argmax(1) == logprobs[b].argmax(1)).sum())} of {n}",
                            "max_logprob_diff": round(float((logprobs[a] - logprobs[b]).gather(1, target).abs().max()), 4)}
            for a, b in pairs}


# ---- python -m tools.quantize SRC DST ----------------------------------------------------------------
def write_int8(src, dst):
    """Quantize checkpoint `src` into a new directory `dst`: int8 weights and bf16 scales, every
    other tensor in the checkpoint's own dtype, src's config.json + "quantization": "int8", its
    tokenizer files. Written to a temporary directory beside dst, then renamed (weights.staged)."""
    src, dst = weights.require_checkpoint(src), Path(dst)
    weights.refuse_overwrite(dst, [src], "DST")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"quantize.py: {dst} exists and is not an empty directory; choose a new DST")
    weights.require_writable(dst, "DST")  # before the minutes of quantizing
    hf = weights.read_config(src / "config.json")
    stored = hf.get("torch_dtype") or "bfloat16"
    if stored not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{src / 'config.json'}: torch_dtype: expected float32, bfloat16 or float16, found {stored!r}")
    dtype = getattr(torch, stored)
    model = pretrained.load(src, dtype=torch.float32, quantize="int8")
    names = release_format.checkpoint_names(model)
    state = {names[n]: p if p.dtype == torch.int8 or n.endswith(".scales") else p.to(dtype)
             for n, p in model.named_parameters()}
    with weights.staged(dst) as tmp:
        weights.save(state, tmp)
        (tmp / "config.json").write_text(json.dumps({**hf, "quantization": "int8"}, indent=2))
        weights.copy_side_files(src, tmp, skip=("config.json",))
    return sum(t.numel() * t.element_size() for t in state.values())


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tools.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory to quantize (or, with --compare, to measure)")
    p.add_argument("dst", nargs="?", help="new directory for the int8 checkpoint")
    p.add_argument("--compare", action="store_true", help="print int8's and bf16's agreement with float32 on src")
    p.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "data" / "zoom" / "example.png"))
    args = p.parse_args()
    first_run.file_size_limit_as_error()  # past `ulimit -f`: an OSError, one line
    try:
        if args.compare:
            prompt = [128000, 128006, 882, 128007, 271, 3923, 374, 420, 30, 128009, 128006, 78191, 128007, 271]
            print(json.dumps(compare(args.src, load_image(args.image), prompt), indent=2))
        elif args.dst:
            print(f"{write_int8(args.src, args.dst) / 2**30:.2f} GiB written to {args.dst}")
        else:
            p.error("give SRC DST (or --compare SRC)")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # weights.staged has removed its temporary folder: DST is as it was
        sys.exit(130)

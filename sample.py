"""
Ask Dragonfly about an image (or just chat, without --image), streaming the answer.

    python sample.py --checkpoint path/to/Llama-3.1-8B-Dragonfly-v2 --image photo.jpg \
        --prompt "What is unusual about this image?"

Greedy with --temperature 0 (the default), so the answer is the released model's own.
--json prints one object {"text", "token_ids", "logprobs"} instead of streaming.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "zoom-tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="Dragonfly checkpoint directory")
    p.add_argument("--image", help="image file; omit for a text-only prompt")
    p.add_argument("--prompt", default=None, help="the question (default: 'Describe the image.')")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the release generates up to 1024")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--show", metavar="PNG", help="after answering, draw where the answer looked (looked.py)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.prompt is None:
        if not args.image:
            raise ValueError("give --prompt (and optionally --image)")
        args.prompt = "Describe the image."
    if args.show and not args.image:
        raise ValueError("--show draws the answer's attention over the image's crops: give --image too")
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.max_new_tokens < 1:
        raise ValueError("need 0 < --top-p <= 1, --temperature >= 0 and --max-new-tokens >= 1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint directory {ckpt} not found (download one, see README)")

    from model import Dragonfly
    from tokenizer import Tokenizer
    tok = Tokenizer.from_file(ckpt)
    crops = None
    if args.image:
        from crops import load_image
        image = load_image(args.image)  # fail on a bad image before the (slow) model load
    t0 = time.time()
    model = Dragonfly.from_pretrained(ckpt, dtype=dtype, device=device)
    print(f"loaded {ckpt} in {time.time() - t0:.1f}s on {device} ({dtype})", file=sys.stderr)
    if args.image:
        crops = model.crop_image(image)
    prompt = tok.encode_prompt(args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    ids, logprobs, printed = [], [], ""
    for token, logprob in model.generate([prompt], [crops], max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p,
                                         stop_ids=tok.stop_ids, generator=generator):
        t = int(token[0])
        if t in tok.stop_ids:
            break
        ids.append(t)
        logprobs.append(float(logprob[0]))
        if not args.json:
            text = tok.decode(ids)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    text = tok.decode(ids)
    if args.json:
        print(json.dumps({"text": text, "token_ids": ids, "logprobs": logprobs}))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
    if args.show:
        import looked
        result = looked.show(model, tok, prompt, ids, crops, args.show, args.prompt)
        print(f"wrote {args.show}: {looked.summary(result)} of the answer's attention", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)

"""
Ask Dragonfly about an image (or just chat, without --image), streaming the answer.

    python sample.py --checkpoint path/to/Llama-3.1-8B-Dragonfly-v2 --image photo.jpg \
        --prompt "What is unusual about this image?"
    python sample.py --image photo.jpg --prompt "Q1" --prompt "Q2"   # turns of one conversation
    python sample.py --image photo.jpg                               # on a terminal: interactive chat

Greedy with --temperature 0 (the default), so the answer is the released model's own.
--json prints one object {"text", "token_ids", "logprobs"} per turn instead of streaming.
The image is encoded once per conversation (lib/conversation.py).
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import torch

from lib import looked
from lib import pretrained
from lib import weights
from lib.conversation import ContextFull, Conversation, answer, chat
from lib.devices import DTYPES, compute_dtype, pick_device, pick_dtype
from lib.images import crop_image, load_image
from lib.tokenizer import Tokenizer

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "zoom-tiny"
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="Dragonfly checkpoint directory")
    p.add_argument("--image", help="image file; omit for a text-only prompt")
    p.add_argument("--prompt", action="append", help="a question; repeat for the turns of one conversation "
                   "(default: an interactive chat on a terminal, else 'Describe the image.')")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit per turn (default: 1024, as the release generates; cut where the context ends)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on cuda, float32 on cpu; bfloat16 on a CPU without bf16 instructions keeps "
                        "the weights in bf16 and computes in float32 (lib/stored.py)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only, quantized while loading (lib/stored.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per turn instead of streaming text")
    p.add_argument("--special-tokens-in-text", action="store_true",
                   help="read special-token strings typed in a question (<|eot_id|>, ...) as control tokens, as the "
                        "release's tokenizer does; by default they are plain text (lib/tokenizer.py)")
    p.add_argument("--show", metavar="PNG", help="after the first answer about the image, draw where it looked "
                   "(lib/looked.py; in the chat, after the first answer about each /image)")
    return p.parse_args(argv)


def check_args(args):
    """The flags a user can get wrong, refused in one line before anything slow: whether this is a
    terminal chat, and whether --max-new-tokens was given."""
    interactive = args.prompt is None and sys.stdin.isatty()
    if args.prompt is None and not interactive:
        if not args.image:
            raise ValueError("give --prompt (and optionally --image), or run on a terminal to chat")
        args.prompt = ["Describe the image."]
    asked_length = args.max_new_tokens is not None  # only a limit the user set is worth a note when cut
    if not asked_length:
        args.max_new_tokens = 1024
    if args.show and not args.image:
        raise ValueError("--show draws the answer's attention over the image's crops: give --image")
    if not 0 < args.top_p <= 1 or not 0 <= args.temperature < float("inf") or args.max_new_tokens < 1:
        raise ValueError("need 0 < --top-p <= 1, --temperature >= 0 (a finite number) and --max-new-tokens >= 1")
    if not -2**63 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed {args.seed} is out of range: give an integer from -2**63 to 2**64 - 1")
    return interactive, asked_length


def check_paths(args):
    """The checkpoint folder exists, and --show may write its picture."""
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint directory {args.checkpoint} not found (download one, see README)")
    if args.show:  # before the answer, not after it: the picture must not replace what is read
        if Path(args.show).is_dir():
            raise ValueError(f"--show {args.show} is a folder; give the path of the PNG to write")
        weights.refuse_overwrite(args.show, [args.image, args.checkpoint], "--show")
        weights.require_writable(args.show, "--show", parents=False)


def load(args, device, dtype):
    """The tokenizer, the image (a bad one fails before the slow model load) and the model."""
    ckpt = weights.require_checkpoint(args.checkpoint)  # an empty or wrong folder, before the tokenizer looks for its file
    tok = Tokenizer.from_file(ckpt)
    tok.specials_in_text = args.special_tokens_in_text
    image = load_image(args.image) if args.image else None
    t0 = time.time()
    compute = compute_dtype(dtype, device)
    model = pretrained.load(ckpt, dtype=dtype, device=device, compute=compute, quantize=args.quantize)
    stored = "int8" if any(p.dtype == torch.int8 for p in model.parameters()) else str(dtype).removeprefix("torch.")
    print(f"loaded {ckpt} in {time.time() - t0:.1f}s on {device} (weights {stored}, compute "
          f"{str(compute).removeprefix('torch.')})", file=sys.stderr)
    return tok, image, model


def not_the_show_file(show):
    """The chat's check of an /image FILE: with --show, the drawing of the first answer would
    replace FILE when FILE is the --show path (or a link to it): refused, the chat goes on."""
    if not show:
        return None

    def check(path):
        p, drawn = weights.resolved(path, "/image"), weights.resolved(show, "--show")
        if p == drawn or (p.exists() and drawn.exists() and os.path.samefile(p, drawn)):
            raise ValueError(f"/image {path} is the --show file {show}, which the drawing of the answer "
                             "would replace; copy the picture elsewhere or restart with another --show")
    return check


def ask(conv, args, asked_length, show, sampling):
    """Each --prompt as a turn of one conversation; --show draws the first answer's attention."""
    for i, question in enumerate(args.prompt):
        if len(args.prompt) > 1 and not args.json:
            print(f"> {question}", flush=True)
        room = conv.positions_left - len(conv.turn_ids(question))
        if asked_length and args.max_new_tokens > room > 0:  # cut there; no room at all is ContextFull's line
            print(f"note: --max-new-tokens {args.max_new_tokens} capped to {room}: the conversation takes "
                  f"{conv.context - conv.positions_left + len(conv.turn_ids(question))} of the context's "
                  f"{conv.context} positions", file=sys.stderr)
        try:
            result = answer(conv, question, args.json, **sampling)
        except ContextFull as e:
            raise ValueError(f"--prompt number {i + 1}: {e}; shorten it, ask fewer, or use a checkpoint "
                             "with a longer context") from None
        if args.show and i == 0:
            show(question, result)


def main(argv=None):
    args = parse_args(argv)
    interactive, asked_length = check_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    check_paths(args)
    tok, image, model = load(args, device, dtype)
    conv = Conversation(model, tok, crop_image(image, model.cfg.crops) if args.image else None)

    def show(question, result):  # --show: where the first answer about the image looked
        shown = looked.show(model, tok, tok.encode_prompt(question), result["token_ids"], conv.crops, args.show, question)
        print(f"wrote {args.show}: {looked.summary(shown)} of the answer's attention", file=sys.stderr)

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    generator=torch.Generator(device=device).manual_seed(args.seed))
    if interactive:
        return chat(conv, args.json, on_first_answer=show if args.show else None,
                    check_image=not_the_show_file(args.show), **sampling)
    ask(conv, args, asked_length, show, sampling)


if __name__ == "__main__":
    first_run.run(main)

"""The zoom model's attention over held-out pages: do the high crops get more of the answer's
attention per position than the low crop? (lib/looked.py computes the shares.)

    python -m tools.looked --pages 50
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import numpy as np

import model as M
from data.zoom import prepare
from lib import looked, pretrained
from lib.images import crop_image
from lib.tokenizer import Tokenizer


# ---- the zoom demo's claim, over held-out pages --------------------------------------------
def high_over_low(model, tok, records, image_root) -> list:
    """Per page: (answer, high crops' attention per position / low crop's attention per position)."""
    out = []
    for r in records:
        crops = crop_image(image_root / r["image"], model.cfg.crops)
        prompt = tok.encode_prompt(r["question"])
        answer = M.greedy_ids(model, [prompt], [crops], 4, tok.stop_ids)[0]
        levels = looked.look(model, prompt, answer, crops).levels
        (high, n_high), (low, n_low) = levels["high"], levels["low"]
        out.append((tok.decode(answer), (high / n_high) / (low / n_low)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.looked", description="The zoom model's attention: high crops vs the low crop, per position.")
    p.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "zoom-tiny"))
    p.add_argument("--pages", type=int, default=50, help="held-out pages of data/zoom/prepare.py (seed 0)")
    args = p.parse_args(argv)
    if args.pages < 1:
        raise ValueError(f"--pages {args.pages}: give 1 or more held-out pages")
    model, tok = pretrained.load(args.checkpoint), Tokenizer.from_file(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        prepare.make_split(Path(tmp), "test", args.pages, seed=0)
        records = [json.loads(line) for line in (Path(tmp) / "test.jsonl").read_text().splitlines()]
        ratios = high_over_low(model, tok, records, Path(tmp))
    right = sum(a == r["answers"][0] for (a, _), r in zip(ratios, records))
    more = sum(x > 1 for _, x in ratios)
    print(f"{args.pages} held-out pages: answered right {right}; high crops get more attention per position than "
          f"the low crop on {more}; ratio median {np.median([x for _, x in ratios]):.2f}, "
          f"min {min(x for _, x in ratios):.2f}, max {max(x for _, x in ratios):.2f}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

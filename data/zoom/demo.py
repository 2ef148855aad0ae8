"""The zoom-in demo: does Dragonfly's high-resolution crop matter? A laptop-scale answer.

    python -m data.zoom.demo                      # 6.8 min on 2 CPU cores in the run of results.json
    python -m data.zoom.demo --steps 20 --train 320 --test 50    # a smoke test: too short to learn

1. generates the synthetic Zoom dataset (prepare.py: a 336 px page printed in one 5x6 px digit);
2. trains the `tiny` model twice with the same budget (same data, steps, batch, lr, seed):
   low resolution only (the paper's "L": one 56 px view of the whole page), and
   low + medium + high (the paper's "L+M+H": + 4 crops of 112 px and 36 crops of 336 px);
3. scores both on the held-out split with `tools/eval.py --task zoom`;
4. writes results.json and results.png (accuracy bars + loss curves).

Everything goes under --out (default out/zoom): data/, the runs low/ and zoom/ (a rerun replaces them), the results.
Only `--ship`, for the full run, touches tracked files: it writes data/zoom/results.json and
results.png (the README's) and copies the L+M+H model to checkpoints/zoom-tiny, sample.py's
default checkpoint.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from PIL import Image, ImageDraw

from data.zoom.recipe import ROOT, TRAIN, run

HERE = Path(__file__).resolve().parent
FULL = {"train": 4000, "test": 500}   # the recorded run's pages
VARIANTS = {"low only (L)": ["--low-only"], "low + medium + high (L+M+H)": []}


def plot(results, path, n_test):
    """Bars of held-out accuracy (chance = 10%) and the training loss curves, drawn with PIL."""
    W, H, pad = 900, 380, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colours = [(120, 120, 120), (220, 90, 40)]
    # left: accuracy bars
    x0, y0, h = pad, H - pad, H - 2 * pad
    d.text((x0, 12), f"held-out accuracy (%), {n_test} images", fill="black")
    d.line((x0, y0, x0 + 330, y0), fill="black")
    chance = y0 - h * 0.10
    d.line((x0, chance, x0 + 330, chance), fill=(150, 150, 220))
    d.text((x0 + 280, chance - 14), "chance", fill=(150, 150, 220))
    for i, (name, r) in enumerate(results.items()):
        acc = r["accuracy"] / 100
        left = x0 + 30 + i * 150
        d.rectangle((left, y0 - h * acc, left + 100, y0), fill=colours[i])
        d.text((left, y0 - h * acc - 14), f"{r['accuracy']:.1f}", fill="black")
        d.text((left - 10, y0 + 8), name.split(" (")[1].rstrip(")"), fill="black")
    # right: loss curves
    x1, w = 470, W - 470 - pad
    d.text((x1, 12), "training loss per step (same budget)", fill="black")
    d.line((x1, y0, x1 + w, y0), fill="black")
    d.line((x1, y0, x1, pad), fill="black")
    top = max(max(r["losses"]) for r in results.values())
    for i, (name, r) in enumerate(results.items()):
        pts = [(x1 + w * j / max(1, len(r["losses"]) - 1), y0 - h * v / top) for j, v in enumerate(r["losses"])]
        d.line(pts, fill=colours[i], width=2)
        d.text((x1 + w - 200, pad + 16 * i), name, fill=colours[i])
    d.text((x1 - 30, pad - 6), f"{top:.1f}", fill="black")
    d.text((x1 - 12, y0 - 6), "0", fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.zoom.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "out" / "zoom"), help="folder for the data, both runs and the results")
    p.add_argument("--steps", type=int, default=0, help="training steps of each run (default: 1.5 epochs, 375 for 4000 pages)")
    p.add_argument("--train", type=int, default=FULL["train"], help="training pages (default: %(default)s)")
    p.add_argument("--test", type=int, default=FULL["test"], help="held-out pages (default: %(default)s)")
    p.add_argument("--ship", action="store_true", help="the full run only: write data/zoom/results.json and results.png "
                   "and copy the L+M+H model to checkpoints/zoom-tiny")
    args = p.parse_args(argv)
    for flag, least in (("steps", 0), ("train", 1), ("test", 1)):
        if getattr(args, flag) < least:
            sys.exit(f"error: --{flag} {getattr(args, flag)}: must be {least} or more")
    if args.ship and (args.steps, args.train, args.test) != (0, FULL["train"], FULL["test"]):
        p.error("--ship writes the tracked results and checkpoint: only for the full run (no --steps, --train, --test)")
    out, t0 = Path(args.out), time.time()
    data, results_dir = out / "data", HERE if args.ship else out
    run(["-m", "data.zoom.prepare", "--out", str(data), "--train", str(args.train), "--test", str(args.test), "--seed", "0"])
    budget = ["--max-steps", str(args.steps)] if args.steps else []
    results = {}
    for name, flags in VARIANTS.items():
        run_dir = out / ("low" if flags else "zoom")
        t = time.time()
        run(["train.py", *TRAIN, *budget, *flags, "--data", str(data / "train.jsonl"), "--out", str(run_dir), "--force"])
        train_s = time.time() - t
        run(["-m", "tools.eval", "--checkpoint", str(run_dir / "final"), "--task", "zoom", "--data", str(data / "test.jsonl"),
             "--out", str(run_dir / "eval"), "--batch-size", "16", "--device", "cpu"])
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
        results[name] = {"accuracy": metrics["accuracy"], "train_seconds": round(train_s), "losses": losses}
    total = time.time() - t0
    summary = {k: {"accuracy": v["accuracy"], "train_seconds": v["train_seconds"], "final_loss": v["losses"][-1]}
               for k, v in results.items()}
    (results_dir / "results.json").write_text(json.dumps({"results": summary, "total_seconds": round(total)}, indent=2))
    plot(results, results_dir / "results.png", args.test)
    print(json.dumps(summary, indent=2), f"\ntotal {total / 60:.1f} min; wrote {results_dir / 'results.json'} and results.png")
    if args.ship:
        ship = ROOT / "checkpoints" / "zoom-tiny"
        shutil.rmtree(ship, ignore_errors=True)
        shutil.copytree(out / "zoom" / "final", ship)
        print(f"shipped {ship}")


if __name__ == "__main__":
    main()

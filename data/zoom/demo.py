"""The zoom-in demo: does Dragonfly's high-resolution crop matter? A laptop-scale answer.

    python data/zoom/demo.py            # ~15 min on 2 CPU cores

1. generates the synthetic Zoom dataset (prepare.py: a 336 px page printed in one 5x6 px digit);
2. trains the `tiny` model twice with the same budget (same data, steps, batch, lr, seed):
   low resolution only (the paper's "L": one 56 px view of the whole page), and
   low + medium + high (the paper's "L+M+H": + 4 crops of 112 px and 36 crops of 336 px);
3. scores both on the held-out split with `eval.py --task zoom`;
4. writes data/zoom/results.json and data/zoom/results.png (accuracy bars + loss curves).

`--ship` copies the L+M+H model to checkpoints/zoom-tiny, sample.py's default checkpoint.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    from PIL import Image, ImageDraw
except ModuleNotFoundError as e:  # a python without the requirements, e.g. a fresh clone's python3
    sys.exit(f"error: {e.name} is not installed: run `bash run.sh {sys.argv[0]} ...` "
             "(installs requirements.txt into .venv once) or pip install -r requirements.txt")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRAIN = ["--model", "tiny", "--stage", "sft", "--batch-size", "16", "--micro-batch", "16", "--lr", "2e-3",
         "--epochs", "1.5", "--no-grad-checkpoint", "--workers", "1", "--save-every", "100000",
         "--export-dtype", "bfloat16", "--seed", "0"]
VARIANTS = {"low only (L)": ["--low-only"], "low + medium + high (L+M+H)": []}


def run(args):
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def plot(results, path):
    """Bars of held-out accuracy (chance = 10%) and the training loss curves, drawn with PIL."""
    W, H, pad = 900, 380, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colours = [(120, 120, 120), (220, 90, 40)]
    # left: accuracy bars
    x0, y0, h = pad, H - pad, H - 2 * pad
    d.text((x0, 12), "held-out accuracy (%), 500 images", fill="black")
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "out" / "zoom"))
    p.add_argument("--ship", action="store_true", help="copy the L+M+H model to checkpoints/zoom-tiny")
    args = p.parse_args(argv)
    out, t0 = Path(args.out), time.time()
    # always regenerated (~10 s, byte-identical): stale files from an older prepare.py would be reused otherwise
    run(["data/zoom/prepare.py", "--out", str(HERE), "--train", "4000", "--test", "500", "--seed", "0"])
    results = {}
    for name, flags in VARIANTS.items():
        run_dir = out / ("low" if flags else "zoom")
        t = time.time()
        run(["train.py", *TRAIN, *flags, "--data", str(HERE / "train.jsonl"), "--out", str(run_dir)])
        train_s = time.time() - t
        run(["eval.py", "--checkpoint", str(run_dir / "final"), "--task", "zoom", "--data", str(HERE / "test.jsonl"),
             "--out", str(run_dir / "eval"), "--batch-size", "16", "--device", "cpu"])
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
        results[name] = {"accuracy": metrics["accuracy"], "train_seconds": round(train_s), "losses": losses}
    total = time.time() - t0
    summary = {k: {"accuracy": v["accuracy"], "train_seconds": v["train_seconds"], "final_loss": v["losses"][-1]}
               for k, v in results.items()}
    (HERE / "results.json").write_text(json.dumps({"results": summary, "total_seconds": round(total)}, indent=2))
    plot(results, HERE / "results.png")
    print(json.dumps(summary, indent=2), f"\ntotal {total / 60:.1f} min")
    if args.ship:
        ship = ROOT / "checkpoints" / "zoom-tiny"
        shutil.rmtree(ship, ignore_errors=True)
        shutil.copytree(out / "zoom" / "final", ship)
        print(f"shipped {ship}")


if __name__ == "__main__":
    main()

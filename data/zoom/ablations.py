"""The v2 paper's ablations at laptop scale: which resolutions (Table 2) and how much pooling of
the high crops (Table 8), trained and scored on the zoom demo's data with the demo's recipe.

    python -m data.zoom.ablations --steps 150 --test 200        # the committed study (see README)
    python -m data.zoom.ablations --steps 2 --train 32 --test 4 --seeds 0 --runs L "L+H 3x3" \\
        --results /tmp/abl                                      # a smoke run (what the test runs)

Every run is `train.py --model tiny`, in its own process, with the demo's flags (recipe.py: batch 16,
lr 2e-3, ...) plus the preset whose resolution levels it takes (lib/presets.py: v2-L ... dragonfly-v2) and, for Table 8,
`--high-pool N`; then `tools/eval.py --task zoom` on the held-out pages. Two seeds each (model
initialisation and data order). The tiny model's crops are 56 px with 7 px patches, an 8x8
grid: the paper's 3x3 and 6x6 do not divide it, so those pool adaptively (pool.mean_pool:
overlapping windows of 2-4 patches), and 8x8 is no pooling at all, where the paper's 8x8 still
averages 3x3 patches of its 24x24 grid. Table 2's rows keep the demo's 2x2 (kernel 4, the
release's 24 -> 6).

One JSON line per finished run goes to OUT/runs.jsonl, with the settings it was trained and
scored on (a re-run with the same --train, --test and --steps skips what is there), and
after each run the table (RESULTS/ablations.md), the numbers (ablations.json) and the plot
(ablations.png) are written again from all runs so far: an interruption loses nothing.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
from lib import devices
import model as M
from lib import presets
from data.zoom import prepare
from data.zoom.recipe import ROOT, RUNS, TRAIN, run, run_dir

# The paper's own numbers (v2 paper, Table 2 columns L ... L + M + H; Table 8 columns 9, 16, 36,
# 64 tokens): (TextVQA, ChartQA). Table 8's "36 tokens" is the Table 2 "L + H" run, though it
# prints ChartQA 56.4 there and 56.2 in Table 2.
PAPER = {"L": (40.0, 21.6), "M": (55.0, 48.4), "H": (56.4, 54.1), "L+M": (60.9, 52.9), "L+H": (65.2, 56.2),
         "L+M+H": (66.5, 56.2), "L+H 3x3": (59.1, 45.4), "L+H 4x4": (64.6, 55.2), "L+H 6x6": (65.2, 56.4),
         "L+H 8x8": (66.8, 56.9)}


def positions(flags) -> int:
    """The image block's length for a run (model.image_positions of its tiny config)."""
    preset = flags[flags.index("--preset") + 1]
    high_pool = int(flags[flags.index("--high-pool") + 1]) if "--high-pool" in flags else 0
    return M.image_positions(presets.tiny_config(preset=preset, high_pool=high_pool))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader worker): unlike wall
    time, it barely changes when other work shares the machine."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def step_seconds(run: Path) -> float:
    """The median training step's wall time (train.py's log): unlike the run's total it does not
    count a pause (a process stopped while another job had the machine) or the export."""
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return round(statistics.median(16 / r["samples_per_s"] for r in log), 3)


def run_one(name, seed, args, data, out) -> dict:
    table, flags = RUNS[name]
    folder = run_dir(out, name, seed)
    shutil.rmtree(folder, ignore_errors=True)  # a run cut short: train.py refuses a folder holding a run
    load = os.getloadavg()[0]  # recorded: on a shared machine other work slows the runs
    t, cpu = time.time(), cpu_seconds()  # each script in its own process: its imports (~5 s) are counted
    run(["train.py", *TRAIN, *flags, "--seed", str(seed), "--max-steps", str(args.steps),
         "--data", str(data / "train.jsonl"), "--out", str(folder)])
    train_s, train_cpu_s = time.time() - t, cpu_seconds() - cpu
    t = time.time()
    run(["-m", "tools.eval", "--checkpoint", str(folder / "final"), "--task", "zoom", "--data", str(data / "test.jsonl"),
         "--out", str(folder / "eval"), "--batch-size", "16", "--device", "cpu"])
    eval_s = time.time() - t
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    return {"name": name, "table": table, "seed": seed, "accuracy": metrics["accuracy"], "n_test": metrics["n"],
            "positions": positions(flags), "steps": len(log), "train_s": round(train_s, 1), "step_s": step_seconds(folder),
            "train_cpu_s": round(train_cpu_s, 1), "eval_s": round(eval_s, 1),
            "final_loss": log[-1]["loss"], "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)],
            "losses": [round(r["loss"], 4) for r in log]}


def summarise(runs) -> dict:
    """name -> mean accuracy, per-seed accuracies, positions, mean training seconds."""
    out = {}
    for name in RUNS:
        rs = [r for r in runs if r["name"] == name]
        if rs:
            out[name] = {"accuracy": statistics.mean(r["accuracy"] for r in rs), "seeds": [r["accuracy"] for r in rs],
                         "positions": rs[0]["positions"], "train_s": statistics.mean(r["train_s"] for r in rs),
                         "step_s": statistics.mean(r["step_s"] for r in rs), "steps": rs[0]["steps"],
                         "train_cpu_s": statistics.mean(r["train_cpu_s"] for r in rs),
                         "late_loss": statistics.mean(statistics.mean(r["losses"][-10:]) for r in rs)}
    return out


def table(summary, meta, command="", study_s=0) -> str:
    head = ["| run | paper row (presets.py) | image positions | held-out accuracy, mean (per seed) "
            "| loss, last 10 steps | training s (steps x median step) | training CPU s | paper TextVQA | paper ChartQA |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    rows = []
    for name, s in summary.items():
        preset = RUNS[name][1][1]
        tv, cq = PAPER[name]
        seeds = ", ".join(f"{a:.1f}" for a in s["seeds"])
        rows.append(f"| {name} | v2 Table {RUNS[name][0]}: `{preset}`{' + high ' + name.split()[-1] if ' ' in name else ''} "
                    f"| {s['positions']} | {s['accuracy']:.1f} ({seeds}) | {s['late_loss']:.3f} | {s['steps'] * s['step_s']:.0f} | {s['train_cpu_s']:.0f} | {tv} | {cq} |")
    made = [f"Made by `{command}`: {study_s / 60:.0f} min of training and scoring on a {os.cpu_count()}-core CPU "
            f"with {devices.cpu_kind()}.", ""] if command else []
    return "\n".join([f"Zoom demo ablations: {meta}", "", *made, *head, *rows, ""])


def with_notes(table_md: str, old_md: str) -> str:
    """The new table, then the sections ("## ...") of the old file: notes written by hand or by
    other scripts (onset.py's evidence on L+M) survive a re-run of the study."""
    at = old_md.find("\n## ")
    return table_md if at < 0 else table_md + old_md[at:]


def plot(summary, path, meta):
    """Per run: the toy's held-out accuracy (bar, seeds as dots) beside the paper's TextVQA and
    ChartQA (thin bars); Table 2 on the left, Table 8 on the right; image positions below."""
    W, H, top, base = 1000, 430, 50, 340
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    colours = {"toy": (220, 90, 40), "TextVQA": (70, 110, 200), "ChartQA": (90, 170, 90)}
    y = lambda v: base - (base - top) * v / 100
    d.text((10, 8), f"held-out accuracy on the zoom demo (toy) vs the v2 paper's TextVQA / ChartQA, in %   [{meta}]",
           fill="black", font=font)
    for k, (label, c) in enumerate(colours.items()):
        d.rectangle((10 + 260 * k, 28, 22 + 260 * k, 40), fill=c)
        d.text((28 + 260 * k, 27), {"toy": "toy: mean of the seeds (dots: each seed)"}.get(label, f"paper {label}"),
               fill="black", font=small)
    for v in (0, 10, 50, 100):
        d.line((40, y(v), W - 10, y(v)), fill={0: "black", 10: (120, 120, 120)}.get(v, (225, 225, 225)))
        d.text((12, y(v) - 7), str(v), fill="black", font=small)
    d.line((790, 34, 810, 34), fill=(120, 120, 120))
    d.text((816, 27), "chance (toy): 10", fill="black", font=small)
    x = 60
    for table_no in ("2", "8"):
        names = [n for n in summary if RUNS[n][0] == table_no]
        if not names:
            continue
        d.text((x, base + 48), f"v2 Table {table_no}" + (" (L+H, high crops pooled to)" if table_no == "8" else
                                                          " (resolutions)"), fill="black", font=font)
        for name in names:
            s = summary[name]
            d.rectangle((x, y(s["accuracy"]), x + 36, base), fill=colours["toy"])
            for a in s["seeds"]:
                d.ellipse((x + 15, y(a) - 3, x + 21, y(a) + 3), outline="black", fill="white")
            d.text((x, y(s["accuracy"]) - 15), f"{s['accuracy']:.0f}", fill="black", font=small)
            for j, v in enumerate(PAPER[name]):
                d.rectangle((x + 40 + 12 * j, y(v), x + 50 + 12 * j, base), fill=list(colours.values())[1 + j])
            d.text((x, base + 5), name.replace("L+H ", ""), fill="black", font=font)
            d.text((x, base + 24), f"{s['positions']} pos", fill=(90, 90, 90), font=small)
            x += 92
        x += 40
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.zoom.ablations", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps of 16 per run (the demo: 375)")
    p.add_argument("--train", type=int, default=4000, help="training pages (the demo's 4000)")
    p.add_argument("--test", type=int, default=200, help="held-out pages scored per run (the demo: 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="a subset of: " + ", ".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "out" / "zoom-ablations"), help="data, runs and runs.jsonl")
    p.add_argument("--results", default=str(HERE), help="where ablations.md/.json/.png go")
    args = p.parse_args(argv)
    unknown = set(args.runs) - set(RUNS)
    if unknown:
        p.error(f"unknown runs {sorted(unknown)}; choose from {list(RUNS)}")
    for flag, least in (("steps", 1), ("train", 1), ("test", 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} {getattr(args, flag)}: must be {least} or more")
    full = (args.steps, args.train, args.test, args.seeds, args.runs) == (150, 4000, 200, [0, 1], list(RUNS))
    if Path(args.results).resolve() == HERE and not full:
        p.error(f"without --results this writes the committed {HERE.relative_to(ROOT)}/ablations.md, .json and .png: "
                "only for the full study (no --steps, --train, --test, --seeds, --runs); give --results DIR")
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = out / "data"
    prepare.main(["--out", str(data), "--train", str(args.train), "--test", str(args.test), "--seed", "0"])
    log = out / "runs.jsonl"
    settings = {"train": args.train, "test": args.test, "steps": args.steps}   # what a reused run must share
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    runs = [r for r in runs if r.get("settings") == settings]  # runs scored on other pages or budgets are not this study's
    meta = (f"{args.train} training pages, {args.steps} steps of 16, {args.test} held-out pages, "
            f"seeds {' '.join(map(str, args.seeds))}")
    for r in runs:  # runs.jsonl lines written before step_s was recorded
        r.setdefault("step_s", step_seconds(run_dir(out, r["name"], r["seed"])))
    command = " ".join(["python -m data.zoom.ablations", *(sys.argv[1:] if argv is None else argv)])

    def write_results():
        done = runs
        summary = summarise(done)
        study_s = sum(r["train_s"] + r["eval_s"] for r in done)
        md = results / "ablations.md"
        md.write_text(with_notes(table(summary, meta, command, study_s), md.read_text() if md.exists() else ""))
        (results / "ablations.json").write_text(json.dumps({"meta": meta, "command": command, "study_s": round(study_s),
                                                            "summary": summary, "runs": done}, indent=1))
        plot(summary, results / "ablations.png", meta)

    for seed in args.seeds:  # every run once before any second seed: an interruption costs seeds, not rows
        for name in args.runs:
            if any(r["name"] == name and r["seed"] == seed for r in runs):
                continue
            runs.append({**run_one(name, seed, args, data, out), "settings": settings})
            with open(log, "a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
            write_results()
    write_results()  # also after a re-run that found everything done
    print(f"this invocation {(time.time() - t0) / 60:.1f} min; table in {results / 'ablations.md'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # outside a child run (recipe.run says which one was interrupted)
        print("error: the study was interrupted (Ctrl-C); rerun the same command to continue (finished runs are kept)",
              file=sys.stderr)
        sys.exit(130)

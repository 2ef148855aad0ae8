"""When does a run start to read its crops? The evidence for why L+M sits at chance in the
150-step ablation (README, "The paper's ablations at laptop scale"; issue 20).

    python -m data.zoom.onset --run L+M --seed 0 --steps 150 --every 30    # one run, ~1 min here
    python -m data.zoom.onset --run L+M --seed 1 --steps 150 --blank-low   # the control (see blank_low_crops)
    python -m data.zoom.onset --table          # every run so far: the tables of data/zoom/ablations.md

Trains one row of ablations.py exactly as the study does (`train.py --model tiny`, the demo's
flags, the row's preset, same data) but keeps a checkpoint every --every steps, and follows each
checkpoint on the study's held-out pages:
  accuracy    greedy answers scored as `tools/eval.py --task zoom` scores them (fp32 weights; the
              study scores the bf16 export);
  answer      the most common answer and its share: a model that reads nothing answers one
              digit, and scores that digit's share of the test pages;
  attention   the share of the digit's attention (the query that predicts it: the prompt's
              last position, mean over layers and heads, lib/looked.py) that goes to each level;
  gradient    the loss's gradient at each image position of the block (a fixed batch of 32
              training pages, norm per position, mean over pages and the level's positions):
              how much each level's tokens are pushed to change.
One JSON line per run goes to OUT/onset.jsonl and its table is printed. The runs behind
ablations.md's section "Why L+M stays at chance" (26 min of CPU on a 2-core CPU with avx512_bf16 amx_bf16, checkpoints followed included).
"""
import argparse
import collections
import json
import shutil
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

import torch
import torch.distributed.checkpoint as dcp
from lib import looked
from lib import metrics
import model as M
from lib import presets
from data.dataset import VLDataset, collate
from data.zoom import prepare
from data.zoom.recipe import ROOT, RUNS, TRAIN, blank_low_crops, run, run_dir
from lib.tokenizer import Tokenizer
from lib.images import crop_image

# train.py run as a script (scripts never import scripts), with the control's low crops blanked
# first when asked: the DataLoader's workers fork from it and inherit the patch.
TRAIN_SCRIPT = """import runpy, sys
if {blank}:
    from data.zoom.recipe import blank_low_crops
    blank_low_crops()
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def train_with_checkpoints(name, seed, steps, lr, every, data, folder, blank_low=False):
    # --force: train.py replaces an earlier run in folder itself, once every flag has passed its checks
    flags = [*TRAIN, *RUNS[name][1], "--seed", str(seed), "--max-steps", str(steps), "--lr", lr, "--force",
             "--save-every", str(every), "--data", str(data / "train.jsonl"), "--out", str(folder)]
    code = TRAIN_SCRIPT.format(blank=blank_low, train=str(ROOT / "train.py"))
    run(["-c", code, *flags], name="train.py", quiet=True)


def load_step(model, folder):
    """The model weights of one train.py checkpoint (DCP, saved with the optimizer's)."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it loads without a process group
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))
    model.load_state_dict(state["model"])


def gradient_per_level(model, batch) -> dict:
    """level -> mean norm of d loss / d (image block position), over the batch and the level."""
    kept, build = {}, model.image_block

    def keeping(*args):
        kept["block"] = build(*args)
        kept["block"].retain_grad()
        return kept["block"]

    model.image_block = keeping  # forward() builds the block itself; this keeps a handle on it
    try:
        model.zero_grad()
        model(batch["tokens"], batch["pixels"], batch["labels"])[1].backward()
    finally:
        del model.image_block
    per_position = kept["block"].grad.norm(dim=-1).mean(dim=0)  # (P,)
    spans = collections.defaultdict(list)
    for level, _, start, end, _ in looked.crop_spans(model.cfg):
        spans[level] += range(start, end)
    return {level: float(per_position[idx].mean()) for level, idx in spans.items()}


def follow(model, tok, records, data, batch) -> dict:
    """One checkpoint on the held-out pages: accuracy, commonest answer, attention and gradient per level."""
    predictions = {}
    for i in range(0, len(records), 16):  # tools/eval.py --task zoom's way: the question as asked, 4 tokens
        batch_records = records[i:i + 16]
        ids = M.greedy_ids(model, [tok.encode_prompt(r["question"]) for r in batch_records],
                           [crop_image(data / r["image"], model.cfg.crops) for r in batch_records], 4, tok.stop_ids)
        predictions.update({r["id"]: tok.decode(x).strip() for r, x in zip(batch_records, ids)})
    right = [metrics.normalize_vqa_answer(predictions[r["id"]]) in {metrics.normalize_vqa_answer(a) for a in r["answers"]}
             for r in records]
    accuracy = 100 * sum(right) / len(records)
    top, count = collections.Counter(predictions.values()).most_common(1)[0]
    attention = collections.Counter()
    for r in records:
        digit = tok.encode(r["answers"][0])
        look = looked.look(model, tok.encode_prompt(r["question"]), digit[:1], crop_image(data / r["image"], model.cfg.crops))
        attention.update({level: share / len(records) for level, (share, _) in look.levels.items()})
    return {"accuracy": accuracy, "top_answer": top, "top_share": 100 * count / len(records),
            "attention": {k: round(100 * v, 1) for k, v in attention.items()},
            "gradient": {k: float(f"{v:.3g}") for k, v in gradient_per_level(model, batch).items()}}


def level_pair(values, fmt) -> str:
    return " / ".join(fmt(values[level]) if level in values else "-" for level in ("low", "medium"))


def checkpoint_table(runs) -> str:
    """Every checkpoint of every run: how a run starts (or fails) to read its crops."""
    rows = ["| run | seed | lr | steps | step | held-out accuracy | commonest answer (share) | answer's attention, "
            "low / medium (%) | gradient per position, low / medium (1e-5) | loss, last 10 steps |",
            "|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for run in runs:
        for c in run["checkpoints"]:
            rows.append(f"| {run['name']} | {run['seed']} | {run['lr']} | {run['steps']} | {c['step']} | {c['accuracy']:.1f} "
                        f"| {c['top_answer'] or '(empty)'} ({c['top_share']:.1f}%) | {level_pair(c['attention'], str)} "
                        f"| {level_pair(c['gradient'], lambda g: f'{1e5 * g:.1f}')} | {c['loss']:.3f} |")
    return "\n".join(rows)


def summary_table(runs, answers) -> str:
    """One row per run: its last checkpoint, and the share of the test pages whose digit is the
    run's commonest answer (a run that answers one digit scores exactly that share)."""
    rows = ["| run | lr | steps | held-out accuracy per seed | commonest answer per seed (share of answers; "
            "that digit's share of the test pages) |", "|---|---:|---:|---|---|"]
    groups = collections.defaultdict(list)
    for run in runs:
        groups[run["name"], run["lr"], run["steps"]].append(run)
    for (name, lr, steps), group in groups.items():
        group.sort(key=lambda r: r["seed"])
        last = [(r["seed"], r["checkpoints"][-1]) for r in group]
        accuracy = ", ".join(f"{c['accuracy']:.1f} (seed {seed})" for seed, c in last)
        top = ", ".join(f"{c['top_answer'] or '(empty)'} ({c['top_share']:.0f}%; "
                        f"{100 * answers.count(c['top_answer']) / len(answers):.1f}%)" for _, c in last)
        rows.append(f"| {name} | {lr} | {steps} | {accuracy} | {top} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.zoom.onset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="L+M", choices=["L", "M", "L+M", "L+M+H"], help="an ablations.py row (Table 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=30, help="a checkpoint every N steps")
    p.add_argument("--lr", default="2e-3", help="peak learning rate (the study's: 2e-3)")
    p.add_argument("--train", type=int, default=4000, help="training pages, if --data must be made (the study's 4000)")
    p.add_argument("--test", type=int, default=200, help="held-out pages (the study's 200)")
    p.add_argument("--data", default=str(ROOT / "out" / "zoom-ablations" / "data"),
                   help="the pages (default: the study's, made by prepare.py if missing)")
    p.add_argument("--blank-low", action="store_true", help="the control: a flat grey low crop (see blank_low_crops)")
    p.add_argument("--table", action="store_true", help="no training: the tables of every run in OUT/onset.jsonl")
    p.add_argument("--out", default=str(ROOT / "out" / "zoom-onset"))
    args = p.parse_args(argv)
    out, data = Path(args.out), Path(args.data)
    for flag, least in (("steps", 1), ("every", 1), ("train", 1), ("test", 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} {getattr(args, flag)}: must be {least} or more")
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; give a folder for the runs")
    if args.blank_low and not args.run.startswith("L+"):
        p.error(f"--blank-low flattens the low crop next to the medium crops; run {args.run!r} lacks one of them: use L+M or L+M+H")
    if args.table and not (out / "onset.jsonl").exists():
        p.error(f"--table: no runs yet in {out / 'onset.jsonl'}; train some first (see --help), or give their --out")
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "test.jsonl").exists():
        prepare.main(["--out", str(data), "--train", str(args.train), "--test", str(args.test), "--seed", "0"])
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    if len(records) < args.test:
        p.error(f"--test {args.test}: {data / 'test.jsonl'} holds {len(records)} held-out pages; give --test "
                f"{len(records)} or less, or another --data")
    records = records[:args.test]
    if args.table:
        runs = [json.loads(line) for line in (out / "onset.jsonl").read_text().splitlines()]
        rows = ["L", "M", "L+M", "L+M+H"]  # the study's lr first, by length, then the other lrs, the control last
        runs.sort(key=lambda r: ("blank" in r["name"], r["lr"] != "2e-3", r["lr"], r["steps"],
                                 rows.index(r["name"].split()[0]), r["seed"]))
        print(summary_table(runs, [r["answers"][0] for r in records]), "", checkpoint_table(runs), sep="\n")
        return
    if args.blank_low:
        blank_low_crops()  # this process's held-out pages are scored as the control trained
    name = args.run + " blank low" * args.blank_low
    folder = out / f"{run_dir(out, name, args.seed).name}_steps{args.steps}_lr{args.lr}"
    train_with_checkpoints(args.run, args.seed, args.steps, args.lr, args.every, data, folder, args.blank_low)
    tok = Tokenizer.from_file(folder / "final")
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    model = M.Dragonfly(presets.tiny_config(preset=RUNS[args.run][1][1])).eval()
    pages = VLDataset(data / "train.jsonl", data, tok, model.cfg.crops, M.image_positions(model.cfg))
    batch = collate([pages[i] for i in range(32)], tok.eos_id)["image"]
    checkpoints = []
    for step in sorted({*range(args.every, args.steps + 1, args.every), args.steps}):
        load_step(model, folder / f"step_{step:07d}")
        late = losses[max(0, step - 10):step]
        checkpoints.append({"step": step, "loss": sum(late) / len(late), **follow(model, tok, records, data, batch)})
    run = {"name": name, "seed": args.seed, "steps": args.steps, "lr": args.lr, "test": len(records),
           "checkpoints": checkpoints}
    same = lambda r: [r.get(k) for k in ("name", "seed", "steps", "lr")] == [run[k] for k in ("name", "seed", "steps", "lr")]
    log = out / "onset.jsonl"
    earlier = [line for line in log.read_text().splitlines() if not same(json.loads(line))] if log.exists() else []
    log.with_suffix(".tmp").write_text("".join(line + "\n" for line in [*earlier, json.dumps(run)]))
    log.with_suffix(".tmp").replace(log)    # a rerun replaces its earlier line: each run is listed once
    for step_dir in folder.glob("step_*"):  # 1 MB each; the export in final/ stays
        shutil.rmtree(step_dir)
    print(checkpoint_table([run]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # while following the checkpoints (recipe.run reports an interrupted training)
        print("error: onset.py was interrupted (Ctrl-C); rerun the same command to train and follow the run again",
              file=sys.stderr)
        sys.exit(130)

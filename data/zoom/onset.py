"""When does a run start to read its crops? The evidence for why L+M sits at chance in the
150-step ablation (README, "The paper's ablations at laptop scale"; issue 20).

    python data/zoom/onset.py --run L+M --seed 0 --steps 150 --every 30
    python data/zoom/onset.py --run M --seed 0 --steps 300 --every 60 --lr 2e-3

Trains one row of ablations.py exactly as the study does (`train.py --model tiny`, the demo's
flags, the row's preset, same data) but keeps a checkpoint every --every steps, and follows each
checkpoint on the study's held-out pages:
  accuracy    greedy answers scored as `eval.py --task zoom` scores them (fp32 weights; the
              study scores the bf16 export);
  answer      the most common answer and its share: a model that reads nothing answers one
              digit, and scores that digit's share of the test pages;
  attention   the share of the digit's attention (the query that predicts it: the prompt's
              last position, mean over layers and heads, looked.py) that goes to each level;
  gradient    the loss's gradient at each image position of the block (a fixed batch of 32
              training pages, norm per position, mean over pages and the level's positions):
              how much each level's tokens are pushed to change.
One JSON line per run goes to OUT/onset.jsonl and its table is printed.
"""
import argparse
import collections
import contextlib
import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import ablations  # noqa: E402  (the study's rows and data)
import demo  # noqa: E402
import eval as evaluate  # noqa: E402
import looked  # noqa: E402
import model as M  # noqa: E402
import prepare  # noqa: E402
import presets  # noqa: E402
import train  # noqa: E402
from data.dataset import VLDataset, collate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def train_with_checkpoints(name, seed, steps, lr, every, data, folder):
    shutil.rmtree(folder, ignore_errors=True)
    flags = [*demo.TRAIN, *ablations.RUNS[name][1], "--seed", str(seed), "--max-steps", str(steps), "--lr", lr,
             "--save-every", str(every), "--data", str(data / "train.jsonl"), "--out", str(folder)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tqdm, the config
        train.main(flags)


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
    answers = []
    for i in range(0, len(records), 16):
        answers += evaluate.answer_batch(model, tok, evaluate.TASKS["zoom"], records[i:i + 16], data, 4)
    predictions = {a["id"]: a["prediction"] for a in answers}
    accuracy = evaluate.score("zoom", records, predictions)["accuracy"]
    top, count = collections.Counter(predictions.values()).most_common(1)[0]
    attention = collections.Counter()
    for r in records:
        digit = tok.encode(r["answers"][0])
        look = looked.look(model, tok.encode_prompt(r["question"]), digit[:1], model.crop_image(data / r["image"]))
        attention.update({level: share / len(records) for level, (share, _) in look.levels.items()})
    return {"accuracy": accuracy, "top_answer": top, "top_share": 100 * count / len(records),
            "attention": {k: round(100 * v, 1) for k, v in attention.items()},
            "gradient": {k: float(f"{v:.3g}") for k, v in gradient_per_level(model, batch).items()}}


def table(runs) -> str:
    rows = ["| run | seed | lr | steps | step | held-out accuracy | commonest answer (share) | attention low / medium (%) "
            "| gradient per position low / medium (1e-5) | loss, last 10 steps |", "|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for run in runs:
        for c in run["checkpoints"]:
            att, grad = c["attention"], c["gradient"]
            low = lambda d, f: f(d["low"]) if "low" in d else "-"
            rows.append(f"| {run['name']} | {run['seed']} | {run['lr']} | {run['steps']} | {c['step']} | {c['accuracy']:.1f} "
                        f"| {c['top_answer'] or '(empty)'} ({c['top_share']:.1f}%) | {low(att, str)} / {att['medium']} "
                        f"| {low(grad, lambda g: f'{1e5 * g:.1f}')} / {1e5 * grad['medium']:.1f} | {c['loss']:.3f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="L+M", choices=[n for n in ablations.RUNS if "M" in n.split()[0]],
                   help="an ablations.py row with medium crops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=30, help="a checkpoint every N steps")
    p.add_argument("--lr", default="2e-3", help="peak learning rate (the study's: 2e-3)")
    p.add_argument("--test", type=int, default=200, help="held-out pages, the study's first N")
    p.add_argument("--out", default=str(demo.ROOT / "out" / "zoom-onset"))
    args = p.parse_args(argv)
    out, data = Path(args.out), Path(args.out).parent / "zoom-ablations" / "data"
    if not (data / "test.jsonl").exists():
        prepare.main(["--out", str(data), "--train", "4000", "--test", "200", "--seed", "0"])
    folder = out / f"{ablations.run_dir(out, args.run, args.seed).name}_steps{args.steps}_lr{args.lr}"
    train_with_checkpoints(args.run, args.seed, args.steps, args.lr, args.every, data, folder)
    tok = Tokenizer.from_file(folder / "final")
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:args.test]
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    model = M.Dragonfly(presets.tiny_config(preset=ablations.RUNS[args.run][1][1])).eval()
    pages = VLDataset(data / "train.jsonl", data, tok, model.cfg.crops, M.image_positions(model.cfg))
    batch = collate([pages[i] for i in range(32)], tok.eos_id)["image"]
    checkpoints = []
    for step in sorted({*range(args.every, args.steps + 1, args.every), args.steps}):
        load_step(model, folder / f"step_{step:07d}")
        late = losses[max(0, step - 10):step]
        checkpoints.append({"step": step, "loss": sum(late) / len(late), **follow(model, tok, records, data, batch)})
    run = {"name": args.run, "seed": args.seed, "steps": args.steps, "lr": args.lr, "checkpoints": checkpoints}
    with open(out / "onset.jsonl", "a") as f:
        f.write(json.dumps(run) + "\n")
    for step_dir in folder.glob("step_*"):  # 1 MB each; the export in final/ stays
        shutil.rmtree(step_dir)
    print(table([run]))


if __name__ == "__main__":
    main()

"""
Evaluate a Dragonfly checkpoint on a benchmark: batched greedy answers, then the paper's metric.

    python -m tools.eval --checkpoint path/to/Llama-3.1-8B-Dragonfly-v2 --task textvqa \
        --data textvqa_val.jsonl --images path/to/textvqa --out results/textvqa

--data is JSONL, one question a line: {"id", "image", "question", "answers": [...]} plus
"choices" (multiple choice) and "type" ("closed"/"open", biomedical). `data/benchmarks/convert.py`
writes it from the public releases. Images resolve against --images, else the JSONL's folder.

Answers are appended to OUT/predictions.jsonl one line per write, so an interrupted run resumes
where it stopped: ids already answered are skipped (ids that failed, e.g. on an unreadable image,
are tried again, and so is a last line torn by a kill, which is dropped on start). OUT/run.json
records what produced those answers (the checkpoint's fingerprint, task, prompt, data, dtype,
quantization, token limit, device type); they are reused only by a run where all of it is the
same, and any other run in that OUT is refused, naming what differs (`--restart` discards them).
OUT/lock keeps a second eval.py off the folder while one runs (locks.py), and --out may not be,
hold or sit inside the checkpoint, nor be the data or image folder, nor hold a training run.
Image paths must stay inside the image root (`--images-anywhere` allows others).
OUT/metrics.json holds the scores, in percent, over the answered questions, and the count of
failed ones. Prompts follow common practice (LLaVA-1.5's evaluation suffixes); metrics are those
of docs/release-facts.md#metrics, implemented in lib/metrics.py.
"""
import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from tqdm import tqdm

from lib import locks
from lib import looked
from lib import metrics
from lib import results
from lib import pretrained
from lib import weights
from lib.devices import DTYPES, compute_dtype, pick_device, pick_dtype
from model import greedy_ids, image_positions
from lib.tokenizer import Tokenizer
from lib.images import crop_image

SHORT = "{question}\nAnswer the question using a single word or phrase."
CHOICE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    prompt: str          # filled with {question} and, for multiple choice, {options}
    metric: str          # a key of SCORERS below
    max_new_tokens: int


TASKS = {
    "textvqa": Task(SHORT, "vqa", 16),
    "vqav2": Task(SHORT, "vqa", 16),
    "vizwiz": Task("{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
                   "Answer the question using a single word or phrase.", "vqa", 16),
    "chartqa": Task(SHORT, "relaxed", 16),
    "docvqa": Task(SHORT, "anls", 32),
    "scienceqa": Task(CHOICE, "choice", 8),
    "ai2d": Task(CHOICE, "choice", 8),
    "mmbench": Task(CHOICE, "choice", 8),
    "pope": Task("{question} Answer yes or no.", "pope", 8),
    "vqa-rad": Task(SHORT, "biomedical", 32),
    "slake": Task(SHORT, "biomedical", 32),
    "pathvqa": Task(SHORT, "biomedical", 32),
    "coco": Task("Provide a one-sentence caption for the provided image.", "caption", 48),
    "flickr30k": Task("Provide a one-sentence caption for the provided image.", "caption", 48),
    "zoom": Task("{question}", "exact", 4),  # the zoom demo (data/zoom): asked exactly as in its training data
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_prompt(task: Task, record: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(record.get("choices") or []))
    return task.prompt.format(question=record.get("question", ""), options=options)


# ---- scoring: records + {id: prediction text} -> metrics, no model needed --------------------
def _mean(xs) -> float | None:
    return 100 * sum(xs) / len(xs) if xs else None  # None, not NaN: NaN is not JSON


def _exact(prediction: str, answers) -> bool:
    """The zoom demo: right when the VQA-normalised answer equals a normalised reference."""
    return metrics.normalize_vqa_answer(prediction) in {metrics.normalize_vqa_answer(a) for a in answers}


def _choice(rs, ps):
    picked = [metrics.extract_choice(p, len(r["choices"]), r["choices"]) for r, p in zip(rs, ps)]  # letter or None
    return {"accuracy": _mean([c == r["answers"][0] for r, c in zip(rs, picked)]),
            "unparsed": sum(c is None for c in picked)}


def _biomedical(rs, ps):
    closed = [(r, p) for r, p in zip(rs, ps) if r.get("type") == "closed"]
    open_ = [(r, p) for r, p in zip(rs, ps) if r.get("type") != "closed"]
    return {"closed_accuracy": _mean([metrics.closed_accuracy(p, r["answers"][0]) for r, p in closed]),
            "open_token_f1": _mean([max(metrics.token_f1(p, a) for a in r["answers"]) for r, p in open_]),
            "n_closed": len(closed), "n_open": len(open_)}


def _caption(rs, ps):
    cands, refs = {r["id"]: [p] for r, p in zip(rs, ps)}, {r["id"]: r["answers"] for r in rs}
    out = {f"bleu_{n}": 100 * b for n, b in enumerate(metrics.bleu(cands, refs), 1)}
    out.update(cider_d=100 * metrics.cider_d(cands, refs), rouge_l=100 * metrics.rouge_l(cands, refs))
    try:
        out["meteor"] = 100 * metrics.meteor(cands, refs)
    except RuntimeError as e:  # METEOR runs a Java jar
        print(f"warning: METEOR skipped: {e}", file=sys.stderr)
        out["meteor"] = None
    return out


SCORERS = {
    "vqa": lambda rs, ps: {"accuracy": _mean([metrics.vqa_accuracy(p, r["answers"]) for r, p in zip(rs, ps)])},
    "relaxed": lambda rs, ps: {"relaxed_accuracy": _mean([metrics.relaxed_accuracy(p, r["answers"][0]) for r, p in zip(rs, ps)])},
    "anls": lambda rs, ps: {"anls": _mean([metrics.anls(p, r["answers"]) for r, p in zip(rs, ps)])},
    "exact": lambda rs, ps: {"accuracy": _mean([_exact(p, r["answers"]) for r, p in zip(rs, ps)])},
    "pope": lambda rs, ps: {k: 100 * v if isinstance(v, float) else v
                            for k, v in metrics.pope_metrics(ps, [r["answers"][0] for r in rs]).items()},
    "choice": _choice,
    "biomedical": _biomedical,
    "caption": _caption,
}


def score(task: str, records: list, predictions: dict) -> dict:
    """Metrics of `task` over the records that have a prediction ({id: text}), in percent, and the
    count of empty answers (a model that stops at once, e.g. one trained too briefly)."""
    answered = [r for r in records if r["id"] in predictions]
    scores = SCORERS[TASKS[task].metric](answered, [predictions[r["id"]] for r in answered]) if answered else {}
    return {"task": task, "n": len(answered), **scores, "empty": sum(not predictions[r["id"]].strip() for r in answered)}


# ---- running the model --------------------------------------------------------------------
def image_path(root: Path, image: str, anywhere: bool) -> Path:
    """`root / image`, refused when `image` leaves root (`../..`, an absolute path) unless
    `anywhere`: a benchmark file from elsewhere must not make eval read any file on the machine.
    Judged on the path as written, so a root of symlinks to the real images still works."""
    path = root / image
    if not anywhere and not os.path.normpath(path).startswith(os.path.join(os.path.normpath(root), "")):
        raise ValueError(f"image {image!r} is outside the image root {root}; pass --images-anywhere to read it")
    return path


def load_records(path: Path) -> list:
    """The records of a benchmark file, each checked: a string where text belongs (a list of
    strings for answers and choices, never one string split into letters), ids unique (answers
    are kept by id: a repeated id would score one question with another's answer)."""
    records, seen = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r.get("id"), (str, int)) or isinstance(r["id"], bool):
                raise ValueError("'id' must be a string or a number")
            r["id"] = str(r["id"])
            r.setdefault("answers", [])
            for key, kind in (("image", str), ("question", str), ("answers", list), ("choices", list)):
                if r.get(key) is not None and not isinstance(r[key], kind):
                    raise ValueError(f"{key!r} must be {'a string' if kind is str else 'a list of strings'}")
            if not all(isinstance(a, str) for a in [*r["answers"], *(r.get("choices") or [])]):
                raise ValueError("'answers' and 'choices' must hold strings")
        except (ValueError, AttributeError) as e:  # AttributeError: a line that is not an object
            raise ValueError(f"{path}:{n}: not a benchmark record ({e}); see data/benchmarks/convert.py") from None
        if r["id"] in seen:
            raise ValueError(f"{path}:{n}: id {r['id']!r} again (first on line {seen[r['id']]}); ids must be unique")
        seen[r["id"]] = n
        records.append(r)
    return records


def greedy(model, tok, prompts, crops, max_new_tokens) -> list:
    """Batched greedy answers as text; each row ends at its first stop id, the batch when all have."""
    return [tok.decode(x).strip() for x in greedy_ids(model, prompts, crops, max_new_tokens, tok.stop_ids)]


def answer_batch(model, tok, task, batch, image_root, max_new_tokens) -> list:
    """Entries for predictions.jsonl; a record whose image or prompt fails gets an "error"."""
    entries, ready = [], []
    for r in batch:
        try:
            crops = crop_image(image_root / r["image"], model.cfg.crops) if r.get("image") else None
            ready.append((r, tok.encode_prompt(build_prompt(task, r)), crops))
        except ValueError as e:
            entries.append({"id": r["id"], "error": str(e)})
    try:
        texts = greedy(model, tok, [p for _, p, _ in ready], [c for _, _, c in ready], max_new_tokens) if ready else []
    except ValueError:  # one prompt too long for the context: answer the others alone
        texts = []
        for r, p, c in ready:
            try:
                texts += greedy(model, tok, [p], [c], max_new_tokens)
            except ValueError as e:
                texts.append(e)
    for (r, _, _), text in zip(ready, texts):
        if isinstance(text, Exception):
            entries.append({"id": r["id"], "error": str(text)})
        else:
            entries.append({"id": r["id"], "question": r.get("question"), "prediction": text, "answers": r["answers"]})
    return entries


def show_records(model, tok, task, records, image_root, max_new_tokens, out: Path):
    """--show-dir: one picture per record of where its answer looked (looked.py), answered
    greedily again one by one."""
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        crops, question = crop_image(image_root / r["image"], model.cfg.crops), build_prompt(task, r)
        prompt = tok.encode_prompt(question)
        answer = greedy_ids(model, [prompt], [crops], max_new_tokens, tok.stop_ids)[0]
        path = out / (re.sub(r"[^\w.-]", "_", r["id"]) + ".png")
        if answer:
            shown = looked.show(model, tok, prompt, answer, crops, path, question)
            print(f"{path}: {looked.summary(shown)}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Dragonfly checkpoint directory")
    p.add_argument("--task", required=True, help="one of: " + ", ".join(TASKS))
    p.add_argument("--data", required=True, help="benchmark JSONL")
    p.add_argument("--images", help="image root (default: the JSONL's folder)")
    p.add_argument("--images-anywhere", action="store_true", help="let image paths leave the image root")
    p.add_argument("--out", help="results folder (default: results/TASK)")
    p.add_argument("--restart", action="store_true", help="discard the answers already in OUT, whatever made them")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default: the task's")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on cuda, float32 on cpu "
                   "(bfloat16 on a CPU without bf16 instructions: bf16 weights computed in float32, as sample.py)")
    p.add_argument("--quantize", choices=["int8"], help="int8 weight-only, quantized while loading (quantize.py)")
    p.add_argument("--special-tokens-in-text", action="store_true",
                   help="read special-token strings in questions as control tokens, as the release does (tokenizer.py)")
    p.add_argument("--show-dir", help="also draw where the answer looked (looked.py) for --show-n records with an image")
    p.add_argument("--show-n", type=int, default=5)
    args = p.parse_args(argv)
    for flag, least in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 1), ("show_n", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a number >= {least}")
    return args


def run_identity(args, device: str) -> dict:
    """Everything that decides the answers in OUT/predictions.jsonl (module docstring)."""
    task, data = TASKS[args.task], Path(args.data)
    return {"checkpoint": weights.fingerprint(args.checkpoint), "task": args.task, "prompt": task.prompt,
            "data": hashlib.sha256(data.read_bytes()).hexdigest()[:16],
            "images": os.path.abspath(args.images or data.parent), "images_anywhere": args.images_anywhere,
            "dtype": str(pick_dtype(args.dtype, device)).removeprefix("torch."), "quantize": args.quantize,
            "max_new_tokens": args.max_new_tokens or task.max_new_tokens, "decoding": "greedy",
            "special_tokens_in_text": args.special_tokens_in_text, "device": device.split(":")[0]}


def checked_records(args, data: Path, image_root: Path) -> list:
    """The questions to ask, after the checks a user's flags can fail: every image path in the image
    root (unless --images-anywhere), at least one question."""
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"checkpoint directory {args.checkpoint} not found")
    if not data.is_file():
        raise ValueError(f"benchmark file {data} not found (convert one with python -m data.benchmarks.convert)")
    records = load_records(data)[:args.limit]
    if not records:
        raise ValueError(f"{data} holds no questions")
    for r in records:
        if r.get("image"):
            try:
                image_path(image_root, r["image"], args.images_anywhere)
            except ValueError as e:
                raise ValueError(f"{data}: question {r['id']}: {e}") from None
    return records


def load_model(args, device: str):
    """The tokenizer and the model, in --dtype (and --quantize) as sample.py loads them."""
    dtype = pick_dtype(args.dtype, device)
    weights.require_checkpoint(args.checkpoint)  # an empty or wrong folder, before the tokenizer looks for its file
    tok = Tokenizer.from_file(args.checkpoint)
    tok.specials_in_text = args.special_tokens_in_text
    model = pretrained.load(args.checkpoint, dtype=dtype, device=device, compute=compute_dtype(dtype, device),
                            quantize=args.quantize)
    return tok, model


def answer_all(model, tok, args, todo, image_root, max_new: int, pred_file: Path, done: dict):
    """Answer `todo` in batches, each answer appended to `pred_file` (and `done`) as it comes."""
    ctx, block = model.cfg.llm.max_seq_len, image_positions(model.cfg)
    if max_new >= ctx - block:
        print(f"note: --max-new-tokens {max_new} capped: the context holds {ctx} positions and an image block "
              f"takes {block}; answers stop where the context ends", file=sys.stderr)
    with open(pred_file, "ab", buffering=0) as f, tqdm(total=len(todo), desc=args.task, unit="q") as bar:
        for i in range(0, len(todo), args.batch_size):
            for entry in answer_batch(model, tok, TASKS[args.task], todo[i:i + args.batch_size], image_root, max_new):
                results.append_line(f, entry)
                done[entry["id"]] = entry
            bar.update(len(todo[i:i + args.batch_size]))


def report(args, records, done: dict, data: Path, out: Path, pred_file: Path) -> dict:
    """Score the answers in OUT, write OUT/metrics.json and print it; no answer at all is an error."""
    predictions = {i: e["prediction"] for i, e in done.items() if "prediction" in e}
    failed = [r["id"] for r in records if r["id"] not in predictions]
    result = {**score(args.task, records, predictions), "failed": len(failed),
              "checkpoint": str(args.checkpoint), "data": str(data)}
    if not predictions:  # a score over nothing is no score
        raise ValueError(f"none of the {len(records)} questions was answered (first: {failed[0]}: "
                         f"{done.get(failed[0], {}).get('error', 'not answered')}); see {pred_file}")
    for i in failed[:5]:
        print(f"failed {i}: {done.get(i, {}).get('error', 'not answered')}", file=sys.stderr)
    if result["empty"]:
        print(f"warning: {result['empty']} of the {result['n']} answers are empty: the model stops at once "
              "(trained too briefly? see train.py's loss warning)", file=sys.stderr)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(json.dumps(result, indent=2, allow_nan=False))
    return result


def main(argv=None) -> dict:
    """Check the flags and data, claim OUT, answer what OUT lacks, draw --show-dir, score."""
    args = parse_args(argv)
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    data = Path(args.data)
    device = pick_device(args.device)  # before any work, so a wrong --device is the first thing said
    image_root = Path(args.images) if args.images else data.parent
    records = checked_records(args, data, image_root)
    out = Path(args.out or Path("results") / args.task)
    if args.show_dir:  # a picture named after a question id must not land on an image or the checkpoint
        weights.refuse_overwrite(args.show_dir, [image_root, args.checkpoint, data], "--show-dir")
        show_dir = Path(args.show_dir)  # and it must take the pictures: said before any question is answered
        if show_dir.exists() and not show_dir.is_dir():
            raise ValueError(f"--show-dir {show_dir} is a file; give a folder for the pictures")
        weights.require_writable(show_dir / "picture.png" if show_dir.is_dir() else show_dir, "--show-dir")
    results.check_out(out, {"--checkpoint": (args.checkpoint, True), "--data": (data, False),
                            "--images": (image_root, False)})
    out.mkdir(parents=True, exist_ok=True)
    locks.lock(out, "eval.py")     # one run per folder: two runs' answers would interleave
    try:
        return answer_and_score(args, records, data, out, image_root, device)
    finally:
        locks.release(out)


def answer_and_score(args, records, data: Path, out: Path, image_root: Path, device: str) -> dict:
    """The run itself, in a claimed and locked OUT."""
    pred_file = results.claim_out(out, run_identity(args, device), args.restart)
    if results.drop_torn_line(pred_file):
        print(f"{pred_file}: dropped a torn last line (a run stopped mid-write); that question is asked again",
              file=sys.stderr)
    done = results.read_predictions(pred_file)
    todo = [r for r in records if "prediction" not in done.get(r["id"], {})]
    print(f"{args.task}: {len(records)} questions, {len(records) - len(todo)} already answered in {pred_file}",
          file=sys.stderr)
    max_new = args.max_new_tokens or TASKS[args.task].max_new_tokens
    if todo or args.show_dir:
        tok, model = load_model(args, device)
    if todo:
        answer_all(model, tok, args, todo, image_root, max_new, pred_file, done)
    if args.show_dir:
        show_records(model, tok, TASKS[args.task], [r for r in records if r.get("image")][:args.show_n], image_root,
                     max_new, Path(args.show_dir))
    return report(args, records, done, data, out, pred_file)


if __name__ == "__main__":
    first_run.run(main)

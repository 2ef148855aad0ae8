"""
The zoom toy (data/zoom/) as the labs use it: the trained checkpoint checkpoints/zoom-tiny, its
answer about a page, its score over held-out pages, and short training runs of the ablation
study's rows (data/zoom/recipe.py) with the student's functions in place.

Everything here calls the project through module attributes (`M.greedy_ids`, `crop_image`,
train.py's `main`), so a function the grader swapped in is the one that runs.
"""
import functools
import json
import math
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import model as M
from data.zoom import prepare
from data.zoom.recipe import TRAIN
from lib import metrics, pretrained
from lib.images import crop_image
from lib.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "zoom-tiny"
EXAMPLE = ROOT / "data" / "zoom" / "example.png"   # one page printed in 7s (prepare.py)
QUESTION = prepare.QUESTIONS[0]


@functools.lru_cache(maxsize=None)
def trained():
    """(model, tokenizer) of the trained toy, loaded once per process."""
    return pretrained.load(CHECKPOINT), Tokenizer.from_file(CHECKPOINT)


def answer(model, tok, image=EXAMPLE, question=QUESTION) -> str:
    """The model's greedy answer about one page, as eval.py's zoom task asks it (4 tokens)."""
    crops = crop_image(image, model.cfg.crops)
    return tok.decode(M.greedy_ids(model, [tok.encode_prompt(question)], [crops], 4, tok.stop_ids)[0]).strip()


def reads_its_page(run):
    """The check several labs end with: the trained toy, running the student's function, still
    answers "7" about data/zoom/example.png (the answer is recorded)."""
    model, tok = trained()
    said = answer(model, tok)
    run.record("toy_answer", said)
    assert said == "7", f"the trained toy answered {said!r} about data/zoom/example.png, not '7'"


def pages(folder: Path, n_test: int, n_train: int = 0) -> list:
    """Held-out pages of the study (prepare.py, seed 0: the same bytes every time) in `folder`,
    made once; the training split too when n_train > 0. Returns the test records."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for split, n in (("test", n_test), ("train", n_train)):
        path = folder / f"{split}.jsonl"
        if n and (not path.exists() or len(path.read_text().splitlines()) != n):
            prepare.make_split(folder, split, n, seed=0)
    return [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]


def answer_ids(model, tok, records, root: Path) -> list:
    """Greedy answers (token ids) to the records' questions, 16 pages a batch, 4 tokens at most."""
    ids = []
    for i in range(0, len(records), 16):
        batch = records[i:i + 16]
        ids += M.greedy_ids(model, [tok.encode_prompt(r["question"]) for r in batch],
                            [crop_image(root / r["image"], model.cfg.crops) for r in batch], 4, tok.stop_ids)
    return ids


def score(model, tok, records, root: Path) -> tuple:
    """(accuracy in %, answers) over the records, scored as `eval.py --task zoom` scores them."""
    answers = [tok.decode(x).strip() for x in answer_ids(model, tok, records, root)]
    right = [metrics.normalize_vqa_answer(a) in {metrics.normalize_vqa_answer(x) for x in r["answers"]}
             for a, r in zip(answers, records)]
    return 100 * sum(right) / len(records), answers


# train.py run by a lab: one process for all of a lab's rows (its imports paid once), the
# student's functions installed first; DataLoader workers fork from it and inherit them.
TRAIN_SCRIPT = """import runpy, sys
sys.path.insert(0, {root!r})
from labs import grader
grader.install({lab!r}, {impl!r})
train = runpy.run_path({train!r}, run_name="lab_train")
for argv in {argvs!r}:
    train["main"](argv)
"""


def train_rows(run, rows: dict, steps: int, n_train: int, n_test: int) -> dict:
    """Train each row (name -> train.py flags of recipe.RUNS) for `steps` steps of 16 on the
    study's pages with the run's implementation, then score each on n_test held-out pages.
    name -> positions, losses (each finite, or an AssertionError), step seconds (median),
    accuracy, answers."""
    data = run.out.parent / f"pages-{n_train}-{n_test}"
    records = pages(data, n_test, n_train)
    argvs = [[*TRAIN, *flags, "--max-steps", str(steps), "--force", "--data",
              str(data / "train.jsonl"), "--out", str(run.out / name.replace(" ", "_").replace("+", ""))]
             for name, flags in rows.items()]
    code = TRAIN_SCRIPT.format(root=str(ROOT), lab=run.lab.number, train=str(ROOT / "train.py"), argvs=argvs,
                               impl=None if run.impl_path is None else str(Path(run.impl_path).resolve()))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise AssertionError(f"train.py stopped with exit code {done.returncode}: {last}")
    out = {}
    for (name, _), argv in zip(rows.items(), argvs):
        folder = Path(argv[-1])
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        losses = [round(r["loss"], 4) for r in log]
        assert all(math.isfinite(x) for x in losses), f"{name}: a loss is not finite: {losses}"
        model, tok = pretrained.load(folder / "final"), Tokenizer.from_file(folder / "final")
        accuracy, answers = score(model, tok, records, data)
        out[name] = dict(positions=M.image_positions(model.cfg), losses=losses,
                         step_s=round(statistics.median(16 / r["samples_per_s"] for r in log), 3),
                         accuracy=accuracy, answers=answers)
    return out

"""
Convert public benchmark releases to the one JSONL format `tools/eval.py` reads:

    {"id": str, "image": path relative to the image root, "question": str,
     "answers": [str, ...], "choices": [str, ...] (multiple choice only),
     "type": "closed" | "open" (biomedical only)}

    python -m data.benchmarks.convert textvqa TextVQA_0.5.1_val.json textvqa_val.jsonl

Then `python -m tools.eval --task textvqa --data textvqa_val.jsonl --images IMAGE_ROOT`, where
IMAGE_ROOT is the folder named below for each source. Multiple-choice answers are letters
("A", "B", ...); every id is a string, unique within one output file.

textvqa   TextVQA 0.5.1, textvqa.org/dataset: TextVQA_0.5.1_val.json (`data`: question_id,
          image_id, question, answers) from dl.fbaipublicfiles.com/textvqa/data/. Images:
          train_val_images.zip; root = the folder holding `train_images/` (val images live there).
chartqa   ChartQA, github.com/vis-nlp/ChartQA (also huggingface.co/datasets/ahmed-masry/ChartQA):
          `ChartQA Dataset/test/test_human.json` or `test_augmented.json` (imgname, query, label).
          Root = `ChartQA Dataset/test/` (images in `png/`). Ids: "human-0", "augmented-0", ...
pope      POPE, github.com/AoiDragon/POPE: `output/coco/coco_pope_{random,popular,adversarial}.json`,
          one JSON object per line (question_id, image, text, label). Root = COCO val2014 images.
          Convert each of the three files apart; they are scored apart in the paper.
scienceqa ScienceQA, github.com/lupantech/ScienceQA: SRC = the folder with `problems.json` and
          `pid_splits.json`; keeps the test problems that have an image. The hint goes before the
          question as "Context: ..." (LLaVA's ScienceQA-IMG prompt). Root = the folder holding
          `test/{pid}/image.png` (the release's `images/`).
ai2d      AI2D, allenai.org/data/diagrams (ai2d-all.zip): SRC = the unzipped `ai2d/` folder with
          `questions/*.json` ({imageName, questions: {text: {answerTexts, correctAnswer,
          questionId}}}). An `ai2d_test_ids.csv` in SRC (one image number per line, the
          test split of the paper) restricts the output to the test images. Root = SRC.
vqa-rad   VQA-RAD, osf.io/89kps: `VQA_RAD Dataset Public.json` (qid, image_name, question, answer,
          answer_type CLOSED/OPEN, phrase_type); keeps the test questions (phrase_type test_*).
          Root = `VQA_RAD Image Folder/`.
slake     SLAKE 1.0, www.med-vqa.com/slake (also huggingface.co/datasets/BoKelvin/SLAKE):
          `Slake1.0/test.json` (qid, img_name, question, answer, answer_type, q_lang); English
          only. Root = `Slake1.0/imgs/`.
pathvqa   PathVQA, github.com/UCSD-AI4H/PathVQA: `pvqa/qas/test/test_qa.pkl`, the original pickled
          list of {image, question, answer}. Closed = yes/no answers (the paper's split).
          Root = `pvqa/images/test/` (image names get ".jpg"). Ids are the list positions.
"""
import argparse
import csv
import json
import pickle
import sys
from pathlib import Path

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def record(id, image, question, answers, choices=None, type=None) -> dict:
    r = {"id": str(id), "image": image, "question": question.strip(), "answers": [str(a).strip() for a in answers]}
    if choices is not None:
        r["choices"] = [str(c).strip() for c in choices]
    if type is not None:
        r["type"] = type
    return r


def textvqa(src) -> list:
    data = json.loads(Path(src).read_text())["data"]
    return [record(q["question_id"], f"train_images/{q['image_id']}.jpg", q["question"], q["answers"]) for q in data]


def chartqa(src) -> list:
    split = Path(src).stem.removeprefix("test_")  # "human" or "augmented": the two halves of the test set
    data = json.loads(Path(src).read_text())
    return [record(f"{split}-{i}", f"png/{q['imgname']}", q["query"], [q["label"]]) for i, q in enumerate(data)]


def pope(src) -> list:
    lines = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    return [record(q["question_id"], q["image"], q["text"], [q["label"]]) for q in lines]


def scienceqa(src, split="test") -> list:
    src = Path(src)
    problems = json.loads((src / "problems.json").read_text())
    pids = json.loads((src / "pid_splits.json").read_text())[split]
    out = []
    for pid in pids:
        p = problems[pid]
        if not p.get("image"):  # ScienceQA-IMG: the text-only half is not a vision benchmark
            continue
        question = f"Context: {p['hint'].strip()}\n{p['question']}" if p.get("hint", "").strip() else p["question"]
        out.append(record(pid, f"{split}/{pid}/{p['image']}", question, [LETTERS[p["answer"]]], p["choices"]))
    return out


def ai2d(src) -> list:
    src = Path(src)
    ids_file = src / "ai2d_test_ids.csv"
    keep = None
    if ids_file.exists():
        keep = {row[0].strip() for row in csv.reader(ids_file.open()) if row and row[0].strip()}
    out = []
    for f in sorted((src / "questions").glob("*.json"), key=lambda f: (len(f.name), f.name)):
        d = json.loads(f.read_text())
        if keep is not None and d["imageName"].split(".")[0] not in keep:
            continue
        for text, q in d["questions"].items():
            out.append(record(q["questionId"], f"images/{d['imageName']}", text,
                              [LETTERS[q["correctAnswer"]]], q["answerTexts"]))
    return out


def vqa_rad(src) -> list:
    data = json.loads(Path(src).read_text())
    return [record(q["qid"], q["image_name"], q["question"], [q["answer"]], type=q["answer_type"].strip().lower())
            for q in data if q.get("phrase_type", "").startswith("test")]


def slake(src) -> list:
    data = json.loads(Path(src).read_text())
    return [record(q["qid"], q["img_name"], q["question"], [q["answer"]], type=q["answer_type"].strip().lower())
            for q in data if q["q_lang"] == "en"]


class _PlainUnpickler(pickle.Unpickler):
    """Reads lists, dicts and strings only: a downloaded pickle may not run code."""
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a PathVQA pickle")


def pathvqa(src) -> list:
    """The pickle's records, each field a plain value. A pickle can list one object many times for
    two bytes each (10 KB of shared references grew to 20 GB as text), so the text converted is
    bounded by the file's size: the real file holds each record once, well under the bound."""
    with open(src, "rb") as f:
        try:
            data = _PlainUnpickler(f).load()
        except ValueError as e:  # e.g. a protocol-0 int past Python's limit on digits read from text
            raise ValueError(f"{src}: not a readable PathVQA pickle ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{src}: expected a list of records, found {type(data).__name__}")
    budget = 16 * Path(src).stat().st_size + 2**20  # characters
    out = []
    for i, q in enumerate(data):
        if not isinstance(q, dict) or not all(isinstance(q.get(k), (str, int, float)) for k in ("image", "question", "answer")):
            raise ValueError(f"{src}: record {i} is not {{image, question, answer}} of plain text")
        text = {}
        for k in ("image", "question", "answer"):
            try:  # an int past Python's limit on digits converted to text (4300) is a ValueError
                text[k] = str(q[k])
            except ValueError:
                raise ValueError(f"{src}: record {i}'s {k} is a number too long to write as text "
                                 f"(over {sys.get_int_max_str_digits()} digits)") from None
        budget -= sum(len(t) for t in text.values())
        if budget < 0:
            raise ValueError(f"{src}: its records expand to more than 16 times the file's size by record {i}: "
                             "objects listed many times over, not the PathVQA release")
        answer = text["answer"].strip()
        out.append(record(i, f"{text['image']}.jpg", text["question"], [answer],
                          type="closed" if answer.lower() in ("yes", "no") else "open"))
    return out


CONVERTERS = {"textvqa": textvqa, "chartqa": chartqa, "pope": pope, "scienceqa": scienceqa, "ai2d": ai2d,
              "vqa-rad": vqa_rad, "slake": slake, "pathvqa": pathvqa}


def write_jsonl(records, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.benchmarks.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=sorted(CONVERTERS))
    p.add_argument("src", help="the release's file or folder (see above)")
    p.add_argument("out", help="output .jsonl")
    args = p.parse_args(argv)
    records = CONVERTERS[args.source](args.src)
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        sys.exit(f"error: {e}")

"""Build tests/golden/metrics.json, the reference that tests/test_metrics.py checks metrics.py
against. Run by hand (downloads from PyPI):

    pip install pycocoevalcap && python tests/make_golden_metrics.py

Captioning: pycocoevalcap 1.2 (the Python 3 coco-caption) Bleu(4), Cider (CIDEr-D) and Rouge
(ROUGE-L) on the hand-written CAPTIONS below. They are written already tokenised (lowercase,
no punctuation), so they go straight to the scorers, skipping the Java PTBTokenizer, and
metrics.caption_tokens leaves them unchanged: both sides see the same tokens.

VQA: the official VQA evaluation code (vqaEval.py by A. Agrawal) as vendored in the PyPI
wheel salesforce-lavis 1.0.2 (lavis/common/vqa_tools/vqa_eval.py, needs only `re`): the
wheel is fetched with `pip download --no-deps` into a temporary folder and that one file
is imported, nothing installed. Normalisation: its processPunctuation + processDigitArticle
on VQA_STRINGS plus every key of its contraction table; accuracy: its `evaluate` loop on
VQA_CASES (10 answers each, written as the annotations are, already normalised).
Nothing here imports metrics.py.
"""
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

OUT = Path(__file__).resolve().parent / "golden" / "metrics.json"

# image id -> (candidate, references): varied lengths, repeated n-grams, a one-word
# candidate, one sharing no word with its references, an empty one, unicode words
CAPTIONS = {
    "dog": ("a dog runs across the grass", [
        "a brown dog is running across the grass", "a dog running on a green lawn",
        "the dog runs through the grass in a park", "a small dog sprinting across grass"]),
    "repeat": ("a dog a dog a dog a dog", [
        "a dog sits next to a dog", "two dogs sitting together on a porch",
        "a pair of dogs resting outside"]),
    "cat": ("cat", [
        "a cat sleeping on a couch", "a grey cat curled up asleep on the sofa",
        "cat on a couch"]),
    "nomatch": ("purple elephants juggling umbrellas", [
        "a man riding a bicycle down the street", "a cyclist on a city road",
        "a person rides a bike past parked cars", "a man on a bike in traffic",
        "someone cycling along a busy street"]),
    "cafe": ("a café in münchen with people sitting outside", [
        "people sitting outside a café in münchen", "a small café with tables on the street",
        "customers at an outdoor café 在 城市", "a busy café terrace on a sunny day"]),
    "long": ("a group of people standing around a table with plates of food and glasses of "
             "wine in a large room", [
        "a group of people standing around a table full of food",
        "several people gathered at a buffet table with wine",
        "people at a party standing near a table of food and drinks in a big hall"]),
    "train": ("a red train on the tracks", [
        "a red train travelling on the railway tracks", "a train on the tracks near a station",
        "a red and white train pulling into a station"]),
    "pizza": ("a pizza with cheese and tomato on a plate", [
        "a pizza with cheese and tomatoes sitting on a plate", "a cheese pizza on a white plate",
        "a pizza on a plate", "a plate holding a freshly baked pizza with tomato slices",
        "pizza"]),
    "empty": ("", ["a blurry photo of something", "an out of focus picture", "a dark image"]),
}

VQA_STRINGS = [
    "", "  Yes\n", "two", "Two dogs.", "a dog", "The Dog", "an apple", "isnt", "dont know",
    "1,000", "1000", "10,000 feet", "3.5", "3.", "Mr. Smith", "t-shirt", "left - right",
    "yes, it is!", "(red)", "red/white", "red / white", "none", "zero", "ten", "eleven",
    "50%", "$5", "12:30", "it's", "can't", "o'clock", "yes.", "no!", "a.b.c",
    "café", "Ñandú", "東京タワー", "1,2", "1, 2", "one, two, three", "hello\tworld",
]

VQA_CASES = [  # (prediction, 10 human answers as in the annotations)
    ("2", ["2"] * 10),
    ("Two", ["2"] * 10),
    ("two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]),
    ("3", ["2", "2", "3", "3", "3", "3", "4", "4", "4", "4"]),
    ("a dog", ["dog", "dog", "puppy", "puppy", "puppy", "puppy", "puppy", "puppy", "puppy", "puppy"]),
    ("puppy", ["dog", "dog", "puppy", "dog", "dog", "dog", "dog", "dog", "dog", "dog"]),
    ("cat", ["dog"] * 10),
    ("", ["yes", "yes", "no", "no", "no", "no", "no", "no", "no", "no"]),
    ("1,000", ["1000", "1000", "1000", "1000", "1000", "100", "100", "100", "100", "100"]),
    ("Isnt it", ["isn't it"] * 3 + ["no"] * 7),
    ("T-shirt!", ["t shirt"] * 4 + ["shirt"] * 6),
    ("Café", ["café", "café", "coffee shop", "coffee shop", "coffee shop", "coffee shop",
              "coffee shop", "coffee shop", "coffee shop", "coffee shop"]),
    ("yes", ["yes", "yes", "yes", "yes", "yes", "no", "no", "no", "no", "no"]),
]


def official_vqa_eval():
    """Import VQAEval from the salesforce-lavis wheel's vendored copy of vqaEval.py."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "salesforce-lavis==1.0.2", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("salesforce_lavis-*.whl"))
        src = Path(tmp) / "vqa_eval.py"
        src.write_bytes(zipfile.ZipFile(wheel).read("lavis/common/vqa_tools/vqa_eval.py"))
        spec = importlib.util.spec_from_file_location("vqa_eval", src)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.VQAEval


def main():
    gts = {i: refs for i, (_, refs) in CAPTIONS.items()}
    res = {i: [cand] for i, (cand, _) in CAPTIONS.items()}
    quiet = contextlib.redirect_stdout(io.StringIO())  # Bleu prints its counts
    with quiet:
        bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)

    VQAEval = official_vqa_eval()
    ev = VQAEval(n=15)
    strings = VQA_STRINGS + sorted(ev.contractions)

    def normalize(s):  # the prediction path of VQAEval.evaluate
        s = s.replace("\n", " ").replace("\t", " ").strip()
        return ev.processDigitArticle(ev.processPunctuation(s))

    normalized = {s: normalize(s) for s in strings}
    qa = {q: {"answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)],
              "question_type": "what", "answer_type": "other"}
          for q, (_, answers) in enumerate(VQA_CASES)}
    ev = VQAEval(SimpleNamespace(qa=qa, getQuesIds=lambda: list(qa)),
                 SimpleNamespace(qa={q: {"answer": p} for q, (p, _) in enumerate(VQA_CASES)}),
                 n=15)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    vqa = [{"prediction": p, "answers": a, "accuracy": ev.evalQA[q] / 100}
           for q, (p, a) in enumerate(VQA_CASES)]

    golden = {
        "source": "pycocoevalcap 1.2 Bleu/Cider/Rouge; official vqaEval.py from the "
                  "salesforce-lavis 1.0.2 wheel; by tests/make_golden_metrics.py",
        "captions": {i: {"candidate": c, "references": r} for i, (c, r) in CAPTIONS.items()},
        "bleu": list(bleu), "cider_d": float(cider), "rouge_l": float(rouge),
        "vqa_normalized": normalized, "vqa_accuracy": vqa,
    }
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: BLEU {bleu}, CIDEr-D {cider:.6f}, ROUGE-L {rouge:.6f}")


if __name__ == "__main__":
    main()

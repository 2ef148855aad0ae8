"""Evaluation metrics of the Dragonfly papers (docs/release-facts.md#metrics), one small pure function each.

VQA accuracy (VQAv2 / VizWiz / TextVQA), ChartQA relaxed accuracy, POPE, multiple-choice
accuracy (ScienceQA / AI2D / MMBench), the biomedical closed accuracy and token F1
(VQA-RAD / SLAKE / Path-VQA) and the COCO captioning metrics BLEU-1..4, CIDEr-D, ROUGE-L
(and METEOR through pycocoevalcap's Java jar, when present). Standard library + numpy only.

Captions are tokenised by `caption_tokens` (lowercase, punctuation dropped) instead of the
Java PTBTokenizer that pycocoevalcap runs first; on text that is already tokenised both give
the same tokens, which is how tests/make_golden_metrics.py checks BLEU / CIDEr-D / ROUGE-L
against pycocoevalcap itself.
"""
import importlib.util
import math
import re
import shutil
import unicodedata
from collections import Counter

import numpy as np

# ----------------------------------------------------------------------------------------
# VQA accuracy: the official VQA evaluation script (vqaEval.py, Agrawal et al., VQA 2015)

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
# The table is the official one, quirks kept ("somebody'd" -> "somebodyd"; the capitalised
# keys can never match, since words are lowercased first).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # not '.', ':' or "'"
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is a typo (a look-ahead for
# the text "<=digit"), so only "a period not followed by a digit" acts, and `re.UNICODE` is
# passed where `sub` takes its count, so at most 32 periods go.
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(s):
    """The official VQA answer normalisation (vqaEval.py: processPunctuation then
    processDigitArticle). Newlines / tabs -> spaces; each punctuation mark is deleted when it
    touches a space somewhere in the text or the text has a digit-comma-digit anywhere
    ("1,000" -> "1000"), else replaced by a space ("t-shirt" -> "t shirt"); periods are
    removed unless a digit follows ("3.5" stays); lowercase; number words zero..ten and
    "none" -> digits; articles a / an / the dropped; contractions mended ("isnt" -> "isn't")."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    strip_all = _DIGIT_COMMA_DIGIT.search(s) is not None
    for p in _VQA_PUNCT:
        if strip_all or p + " " in s or " " + p in s:  # tested on the input, as officially
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction, answers):
    """VQA accuracy (Antol et al. 2015; VQAv2 / VizWiz / TextVQA): min(#humans that gave the
    answer / 3, 1), averaged over the 10 leave-one-out subsets of the 10 human answers.

    Prediction and every human answer go through `normalize_vqa_answer` (the official script
    only punctuation-processes the annotations, which are already normalised; normalising
    both, as the TextVQA/M4C evaluator does, is the same on them and robust on raw answers).
    With n != 10 answers the leave-one-out average runs over n subsets; for n <= 3 it could
    not reach 1 even when all annotators agree, so there the score is the fraction of
    answers matched (n == 1: exact match)."""
    if not answers:
        raise ValueError("vqa_accuracy: needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    n, k = len(hits), sum(hits)
    if n <= 3:
        return k / n
    # leaving out a matching answer leaves k-1 matches among the others, else k
    return sum(min(1.0, (k - h) / 3) for h in hits) / n


# ----------------------------------------------------------------------------------------
# ChartQA relaxed accuracy (Masry et al., ChartQA, 2022; the rule of Pix2Struct's
# `relaxed_correctness`, used by the LLaVA / lmms-eval ChartQA evaluation)

def _to_float(text):
    text = text.strip().replace(",", "")  # thousands separators: "1,000" -> 1000
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0  # "12%" -> 0.12, as Pix2Struct does
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, target, tolerance=0.05):
    """ChartQA relaxed accuracy: 1.0 when both parse as numbers and
    |prediction - target| / |target| <= tolerance (5%), else a case-insensitive exact match
    of the stripped strings. A target of 0 (no relative error) needs the exact string."""
    prediction, target = str(prediction), str(target)
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.strip().lower() == target.strip().lower())


# ----------------------------------------------------------------------------------------
# POPE (Li et al., "Evaluating Object Hallucination in LVLMs", 2023; its evaluate.py)

def pope_yes_no(text):
    """POPE's yes/no reading of a free-text answer: keep the text before the first period,
    delete commas, split on spaces; "no" if any word is "No", "no" or "not", else "yes" (so
    an empty or unrelated answer counts as yes, as in the official script)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(predictions, labels):
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1 and
    the ratio of "yes" answers. Labels are "yes"/"no" strings (or booleans); a zero
    denominator gives 0."""
    pred = np.array([pope_yes_no(p) == "yes" for p in predictions])
    gold = np.array([l if isinstance(l, bool) else l.strip().lower() == "yes" for l in labels])
    if len(pred) != len(gold) or len(pred) == 0:
        raise ValueError("pope_metrics: predictions and labels must be non-empty, same length")
    tp, fp = int(np.sum(pred & gold)), int(np.sum(pred & ~gold))
    fn = int(np.sum(~pred & gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=float(np.mean(pred == gold)), precision=precision, recall=recall,
                f1=f1, yes_ratio=float(np.mean(pred)))


# ----------------------------------------------------------------------------------------
# Multiple choice (ScienceQA / AI2D / MMBench: accuracy of the chosen option letter)

def extract_choice(text, n_choices, options=None):
    """The option letter ("A", "B", ...) a free-text answer picks, or None. Tried in order:
    the whole answer is a letter ("B", "(b)", "B."); an answer phrase ("The answer is B",
    "Answer: b"; a lowercase letter only when bracketed or closing the phrase, so "the answer
    is a dog" is not A); a leading "B." / "B)" / "(B)"; a bracketed "(C)" anywhere; then, if
    the option texts are given, the longest option text found in the answer (as whole
    words, case-insensitive). Letters past `n_choices` are ignored."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]
    t = text.strip()
    patterns = [
        (r"^[(\[]?([A-Za-z])[)\]]?[.:,)]?$", re.I),
        (r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*(?:[(\[]([A-Za-z])[)\]]|([A-Z])\b|([a-z])(?=[.,;!)]|$))", 0),
        (r"^(?:[(\[]([A-Z])[)\]]|([A-Z])[.:)])", 0),
        (r"[(\[]([A-Z])[)\]]", 0),
    ]
    for pattern, flags in patterns:
        for m in re.finditer(pattern, t, flags):
            letter = next(g for g in m.groups() if g).upper()
            if letter in letters:
                return letter
    if options:
        words = lambda s: " ".join(re.findall(r"\w+", str(s).lower()))  # noqa: E731
        said, texts = words(t), [words(o) for o in options[:n_choices]]
        found = [(len(o), i) for i, o in enumerate(texts)
                 if o and re.search(r"\b" + re.escape(o) + r"\b", said)]
        found.sort(reverse=True)
        if found and (len(found) == 1 or found[0][0] > found[1][0]):  # a tie is ambiguous
            return letters[found[0][1]]
    return None


def choice_accuracy(predictions, answers, options):
    """Multiple-choice accuracy: the fraction of predictions whose `extract_choice` letter
    equals the answer letter. `options[i]` is question i's list of option texts (its length
    is the number of choices); an answer no letter can be read from counts as wrong."""
    hits = [extract_choice(p, len(o), o) == a.strip().upper()
            for p, a, o in zip(predictions, answers, options, strict=True)]
    return sum(hits) / len(hits)


# ----------------------------------------------------------------------------------------
# Biomedical VQA (LLaVA-Med, Li et al. 2023: VQA-RAD / SLAKE / Path-VQA)

def _squad_tokens(s):
    # SQuAD v1.1 evaluate-v1.1.py normalize_answer: lowercase, drop punctuation and
    # articles, collapse whitespace (Unicode punctuation counts too)
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s.lower())
    return [w for w in s.split() if w not in _ARTICLES]


def closed_accuracy(pred, answer):
    """Closed-question accuracy (LLaVA-Med's run_eval.py scores a closed question right when
    the answer occurs in the prediction). Here on normalised whole words: for a yes/no answer
    the first "yes" or "no" word of the prediction must equal it (so "not" or "know" is not
    "no"); any other closed answer must occur as a contiguous run of words."""
    p, a = _squad_tokens(pred), _squad_tokens(answer)
    if a in (["yes"], ["no"]):
        said = next((w for w in p if w in ("yes", "no")), None)
        return float([said] == a)
    return float(bool(a) and any(p[i:i + len(a)] == a for i in range(len(p) - len(a) + 1)))


def token_f1(pred, answer):
    """Token-level F1 (SQuAD v1.1 evaluate script, Rajpurkar et al. 2016), LLaVA-Med's
    open-question metric: 2PR / (P + R) over the multiset of common words after the SQuAD
    normalisation. Two empty answers score 1, one empty answer 0."""
    p, a = _squad_tokens(pred), _squad_tokens(answer)
    if not p or not a:
        return float(p == a)
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------
# Captioning: BLEU, CIDEr-D, ROUGE-L, METEOR as in the COCO caption evaluation code
# (Chen et al. 2015, coco-caption; its Python 3 release pycocoevalcap 1.2)

def caption_tokens(text):
    """The tokenisation here (in place of pycocoevalcap's Java PTBTokenizer plus its
    punctuation filter): lowercase, apostrophes deleted ("don't" -> "dont", where PTB gives
    "do n't"), every other Unicode punctuation mark -> a space, split on whitespace.
    Text that is already lowercase, space-separated words without punctuation is unchanged."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return "".join(" " if unicodedata.category(c).startswith("P") else c for c in text).split()


def _pairs(candidates, references):
    if candidates.keys() != references.keys():
        raise ValueError("captions: candidates and references must have the same ids")
    out = []
    for i in candidates:
        cand, refs = candidates[i], references[i]
        if len(cand) != 1 or not refs:
            raise ValueError(f"captions: id {i!r} needs one candidate and >= 1 reference")
        out.append((caption_tokens(cand[0]), [caption_tokens(r) for r in refs]))
    return out


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates, references, n=4):
    """Corpus BLEU-1..n (Papineni et al. 2002) as pycocoevalcap's Bleu computes it: clipped
    n-gram matches and candidate n-gram counts summed over the corpus, brevity penalty on the
    summed lengths with each image's reference length the one closest to its candidate
    (ties -> the shorter). Returns [B1, ..., Bn]."""
    correct, guess, c_len, r_len = np.zeros(n), np.zeros(n), 0, 0
    for cand, refs in _pairs(candidates, references):
        c_len += len(cand)
        r_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            most = Counter()
            for r in refs:
                most |= _ngrams(r, k)  # max count of each n-gram over the references
            correct[k - 1] += sum(min(c, most[g]) for g, c in _ngrams(cand, k).items())
            guess[k - 1] += max(0, len(cand) - k + 1)
    # the reference code's tiny / small guards against 0 / 0, kept so the numbers agree
    precisions = (correct + 1e-15) / (guess + 1e-9)
    ratio = (c_len + 1e-15) / (r_len + 1e-9)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [float(np.prod(precisions[:k]) ** (1 / k) * bp) for k in range(1, n + 1)]


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider computes it: TF-IDF n-gram
    vectors (raw counts x (log #images - log document frequency over the references)),
    for n = 1..4 the candidate's cosine with each reference with the candidate clipped to
    the reference, times the length penalty exp(-delta^2 / (2 sigma^2)); averaged over the
    references and over n, x10, then averaged over images."""
    pairs = _pairs(candidates, references)
    df = Counter()
    for _, refs in pairs:
        df.update({g for r in refs for k in range(1, n + 1) for g in _ngrams(r, k)})
    log_images = np.log(float(len(pairs)))

    def tfidf(tokens):
        vecs = [{g: c * (log_images - np.log(max(1.0, df[g]))) for g, c in _ngrams(tokens, k).items()}
                for k in range(1, n + 1)]
        return vecs, [np.sqrt(sum(v * v for v in vec.values())) for vec in vecs]

    scores = []
    for cand, refs in pairs:
        c_vecs, c_norms = tfidf(cand)
        total = np.zeros(n)
        for r in refs:
            r_vecs, r_norms = tfidf(r)
            delta = len(cand) - len(r)
            for k in range(n):
                dot = sum(min(v, r_vecs[k].get(g, 0.0)) * r_vecs[k].get(g, 0.0)
                          for g, v in c_vecs[k].items())
                if c_norms[k] and r_norms[k]:
                    dot /= c_norms[k] * r_norms[k]
                total[k] += dot * np.exp(-delta ** 2 / (2 * sigma ** 2))
        scores.append(10.0 * np.mean(total) / len(refs))
    return float(np.mean(scores))


def _lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidates, references, beta=1.2):
    """ROUGE-L (Lin 2004) as pycocoevalcap's Rouge computes it: per image, the longest
    common subsequence gives precision and recall against each reference; the best precision
    and the best recall (taken separately) make F = (1 + b^2) P R / (R + b^2 P), b = 1.2;
    averaged over images."""
    scores = []
    for cand, refs in _pairs(candidates, references):
        lcs = [_lcs(cand, r) for r in refs]
        p = max(l / len(cand) for l in lcs) if cand else 0.0
        r = max(l / len(ref) for l, ref in zip(lcs, refs) if ref) if any(refs) else 0.0
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def meteor(candidates, references):
    """METEOR 1.5 (Denkowski & Lavie 2014) through pycocoevalcap's Meteor (its Java jar, run
    with `-l en -norm`) on `caption_tokens` text. Needs `java` on PATH and pycocoevalcap
    installed; raises RuntimeError otherwise, so callers can skip it with that message."""
    if shutil.which("java") is None or importlib.util.find_spec("pycocoevalcap") is None:
        raise RuntimeError("metrics.meteor: needs `java` on PATH and `pip install pycocoevalcap` "
                           "(its METEOR 1.5 jar); skip METEOR or install both")
    from pycocoevalcap.meteor.meteor import Meteor
    pairs = _pairs(candidates, references)
    res = {i: [" ".join(c)] for i, (c, _) in enumerate(pairs)}
    gts = {i: [" ".join(r) for r in refs] for i, (_, refs) in enumerate(pairs)}
    score, _ = Meteor().compute_score(gts, res)
    return float(score)


def anls(prediction: str, answers, threshold=0.5) -> float:
    """DocVQA's average normalized Levenshtein similarity, for one question: the best answer's
    1 - edit distance / longer length, zeroed unless above 0.5 (Biten et al. 2019)."""
    best, p = 0.0, " ".join(prediction.lower().split())
    for a in answers:
        a = " ".join(a.lower().split())
        row = list(range(len(a) + 1))
        for i, cp in enumerate(p, 1):
            prev, row[0] = row[0], i
            for j, ca in enumerate(a, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (cp != ca))
        sim = 1 - row[-1] / max(len(p), len(a), 1)
        best = max(best, sim if sim > threshold else 0.0)
    return best

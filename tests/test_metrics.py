"""Specification of metrics.py: the benchmark metrics of the Dragonfly papers (docs/release-facts.md#metrics).

Golden values (tests/golden/metrics.json) come from tests/make_golden_metrics.py:
pycocoevalcap 1.2's Bleu / Cider / Rouge on pre-tokenised captions, and the official VQA
evaluation code (vqaEval.py, as vendored by the salesforce-lavis wheel). The other cases
are worked out by hand in the comments.
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import metrics  # noqa: E402
from lib.metrics import (bleu, caption_tokens, choice_accuracy, cider_d, closed_accuracy,  # noqa: E402
                     extract_choice, meteor, normalize_vqa_answer, pope_metrics,
                     relaxed_accuracy, rouge_l, token_f1, vqa_accuracy)

GOLDEN = json.loads((ROOT / "tests" / "golden" / "metrics.json").read_text())
CANDIDATES = {i: [c["candidate"]] for i, c in GOLDEN["captions"].items()}
REFERENCES = {i: c["references"] for i, c in GOLDEN["captions"].items()}


# --- golden: pycocoevalcap and the official VQA script ----------------------------------

def test_golden_captions_are_already_tokenised():
    for i, refs in REFERENCES.items():
        for s in CANDIDATES[i] + refs:
            assert caption_tokens(s) == s.split()


def test_bleu_matches_pycocoevalcap():
    assert bleu(CANDIDATES, REFERENCES) == pytest.approx(GOLDEN["bleu"], abs=1e-6)


def test_cider_d_matches_pycocoevalcap():
    assert cider_d(CANDIDATES, REFERENCES) == pytest.approx(GOLDEN["cider_d"], abs=1e-6)


def test_rouge_l_matches_pycocoevalcap():
    assert rouge_l(CANDIDATES, REFERENCES) == pytest.approx(GOLDEN["rouge_l"], abs=1e-6)


def test_vqa_normalisation_matches_official_script():
    got = {s: normalize_vqa_answer(s) for s in GOLDEN["vqa_normalized"]}
    assert got == GOLDEN["vqa_normalized"]


def test_vqa_accuracy_matches_official_script():
    for case in GOLDEN["vqa_accuracy"]:
        got = vqa_accuracy(case["prediction"], case["answers"])
        assert got == pytest.approx(case["accuracy"], abs=1e-6), case["prediction"]


# --- VQA accuracy ------------------------------------------------------------------------

def test_empty_prediction_scores_zero():
    assert vqa_accuracy("", ["yes"] * 10) == 0.0


def test_two_matching_numeric_answers_score_0_6():
    # k = 2 of 10: leaving out one of the 2 leaves 1/3, leaving out one of the 8 leaves 2/3
    assert vqa_accuracy("4", ["4", "4"] + ["5"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)


def test_three_matching_answers_score_0_9():
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


def test_number_word_equals_digit():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


def test_article_is_ignored():
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0


def test_isnt_is_mended_to_isnt_with_apostrophe():
    assert normalize_vqa_answer("isnt") == "isn't"
    assert vqa_accuracy("isnt", ["isn't"] * 10) == 1.0


def test_comma_between_digits_is_removed():
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0


def test_period_is_kept_before_a_digit_only():
    assert normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("yes.") == "yes"


def test_unicode_answer_is_lowercased():
    assert vqa_accuracy("CAFÉ", ["café"] * 10) == 1.0


def test_human_answers_are_normalised_too():
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0


def test_fewer_than_four_answers_score_the_fraction_matched():
    assert vqa_accuracy("dog", ["dog"]) == 1.0
    assert vqa_accuracy("dog", ["dog", "cat", "dog"]) == pytest.approx(2 / 3)


def test_no_human_answers_is_an_error():
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


# --- ChartQA relaxed accuracy -------------------------------------------------------------

def test_relaxed_accuracy_accepts_exactly_5_percent():
    assert relaxed_accuracy("105", "100") == 1.0
    assert relaxed_accuracy("95", "100") == 1.0


def test_relaxed_accuracy_rejects_just_beyond_5_percent():
    assert relaxed_accuracy("105.01", "100") == 0.0


def test_relaxed_accuracy_reads_thousands_separators_and_percent():
    assert relaxed_accuracy("1,020", "1000") == 1.0
    assert relaxed_accuracy("12%", "0.12") == 1.0  # "12%" is 0.12, as in Pix2Struct


def test_relaxed_accuracy_zero_target_needs_the_exact_string():
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.001", "0") == 0.0


def test_relaxed_accuracy_text_is_case_insensitive_exact():
    assert relaxed_accuracy("Brazil ", "brazil") == 1.0
    assert relaxed_accuracy("Brazil.", "brazil") == 0.0


# --- POPE ---------------------------------------------------------------------------------

def test_pope_all_yes_predictions():
    got = pope_metrics(["Yes, there is."] * 4, ["yes", "no", "yes", "no"])
    assert got == pytest.approx(dict(accuracy=0.5, precision=0.5, recall=1.0, f1=2 / 3,
                                     yes_ratio=1.0))


def test_pope_reads_no_from_the_first_sentence_only():
    got = pope_metrics(["No, there is not.", "Yes. There is no cat.", "There is not a cat", ""],
                       ["no", "yes", "no", "yes"])
    assert got["accuracy"] == 1.0 and got["yes_ratio"] == 0.5


# --- multiple choice ----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["B", "b", "(B)", "B.", "The answer is B", "Answer: b",
                                  "answer is (b).", "B) a dog", "I pick (B) here"])
def test_extract_choice_reads_the_letter(text):
    assert extract_choice(text, 4) == "B"


def test_extract_choice_does_not_read_the_article_a_as_a_letter():
    assert extract_choice("The answer is a dog", 4) is None


def test_extract_choice_matches_the_longest_option_text():
    assert extract_choice("I think it is the red dog.", 3, ["cat", "dog", "red dog"]) == "C"


def test_extract_choice_ignores_letters_past_the_choices():
    assert extract_choice("E", 4) is None


def test_choice_accuracy_counts_unreadable_answers_wrong():
    options = [["cat", "dog"]] * 3
    assert choice_accuracy(["A", "(b)", "no idea"], ["A", "A", "B"], options) == pytest.approx(1 / 3)


# --- biomedical ---------------------------------------------------------------------------

def test_closed_accuracy_reads_the_first_yes_or_no():
    assert closed_accuracy("No, there is no fracture.", "no") == 1.0
    assert closed_accuracy("I do not know", "no") == 0.0
    assert closed_accuracy("Yes, but no effusion", "no") == 0.0


def test_closed_accuracy_other_answers_must_appear_as_words():
    assert closed_accuracy("It is in the left lung.", "Left lung") == 1.0
    assert closed_accuracy("the leftmost lung", "left lung") == 0.0


def test_token_f1_partial_overlap():
    # pred {left, lower, lobe}; answer {lower, lobe, of, left, lung} ("the" dropped)
    # common 3: P = 1, R = 3/5, F1 = 2 * 3/5 / (8/5) = 0.75
    assert token_f1("Left lower lobe", "lower lobe of the left lung") == pytest.approx(0.75)


def test_token_f1_of_empty_answers():
    assert token_f1("", "") == 1.0 and token_f1("", "lung") == 0.0


# --- captioning ---------------------------------------------------------------------------

def test_caption_tokens_drop_punctuation_and_case():
    assert caption_tokens("A dog's ball, on the Grass!") == ["a", "dogs", "ball", "on", "the", "grass"]


def test_bleu_of_a_caption_equal_to_its_reference_is_one():
    assert bleu({0: ["a cat on a mat"]}, {0: ["a cat on a mat"]}) == pytest.approx([1.0] * 4)


def test_cider_d_is_zero_when_every_n_gram_is_in_every_image():
    # with one image every reference n-gram has document frequency 1 = #images: idf 0
    assert cider_d({0: ["a cat"]}, {0: ["a cat"]}) == 0.0


def test_rouge_l_by_hand():
    # LCS(a b c d, a c d e f) = 3: P = 3/4, R = 3/5, F = 2.44 P R / (R + 1.44 P)
    p, r = 3 / 4, 3 / 5
    assert rouge_l({0: ["a b c d"]}, {0: ["a c d e f"]}) == pytest.approx(2.44 * p * r / (r + 1.44 * p))


def test_captions_need_matching_ids():
    with pytest.raises(ValueError):
        bleu({0: ["a cat"]}, {1: ["a cat"]})


def test_meteor_without_java_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java"):
        meteor({0: ["a cat"]}, {0: ["a cat"]})


@pytest.mark.skipif(not os.environ.get("METRICS_METEOR"),
                    reason="METEOR needs java and pycocoevalcap (not in tests/requirements.txt): set METRICS_METEOR=1 to run it")
def test_meteor_of_identical_captions_is_high():
    try:
        score = meteor({0: ["a cat sits on a mat"]}, {0: ["a cat sits on a mat"]})
    except RuntimeError as e:
        pytest.skip(str(e))
    assert 0.9 < score <= 1.0


def test_anls_gives_partial_credit_for_near_misses():
    assert metrics.anls("invoice", ["Invoice"]) == 1.0
    assert metrics.anls("invoce", ["invoice"]) == pytest.approx(6 / 7)
    assert metrics.anls("bill", ["invoice"]) == 0.0

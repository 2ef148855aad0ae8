"""data/benchmarks/convert.py: each release format, a few hand-written records in
tests/fixtures/benchmarks/<name>/, becomes the records eval.py reads."""
import json
import pickle
import subprocess
import sys

import pytest

from conftest import ROOT
from data.benchmarks import convert

FIXTURES = ROOT / "tests" / "fixtures" / "benchmarks"


def test_textvqa_keeps_all_ten_answers_and_points_into_train_images():
    out = convert.textvqa(FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json")
    assert len(out) == 2
    assert out[0] == {"id": "34602", "image": "train_images/003a8ae2ef43b901.jpg",
                      "question": "what is the brand of this camera?",
                      "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
                                  "dakota digital", "dakota digital", "dakota", "dakota"]}
    assert out[1]["answers"].count("copenhagen") == 9


def test_chartqa_ids_name_the_half_of_the_test_set():
    assert convert.chartqa(FIXTURES / "chartqa" / "test_human.json") == [
        {"id": "human-0", "image": "png/41699051005347.png",
         "question": "How many food item is shown in the bar graph?", "answers": ["14"]},
        {"id": "human-1", "image": "png/multi_col_60693.png",
         "question": "What is the difference in value between Lamb and Corn?", "answers": ["0.57"]}]


def test_pope_reads_json_lines():
    assert convert.pope(FIXTURES / "pope" / "coco_pope_adversarial.json") == [
        {"id": "1", "image": "COCO_val2014_000000310196.jpg", "question": "Is there a snowboard in the image?",
         "answers": ["yes"]},
        {"id": "2", "image": "COCO_val2014_000000310196.jpg", "question": "Is there a person in the image?",
         "answers": ["no"]}]


def test_scienceqa_keeps_test_problems_with_an_image_and_puts_the_hint_first():
    assert convert.scienceqa(FIXTURES / "scienceqa") == [
        {"id": "6", "image": "test/6/image.png", "question": "Which of these states is farthest north?",
         "answers": ["A"], "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"]},
        {"id": "10", "image": "test/10/image.png",
         "question": "Context: Tree frogs live in rain forests.\nFigure: Borneo eared frog.\n"
                     "Which animal's feet are also adapted for sticking to smooth surfaces?",
         "answers": ["B"], "choices": ["tiger", "Madagascar day gecko"]}]


def test_ai2d_keeps_the_test_images_in_numeric_order():
    assert convert.ai2d(FIXTURES / "ai2d") == [
        {"id": "4.png-0", "image": "images/4.png", "question": "Which stage follows the egg?",
         "answers": ["B"], "choices": ["adult", "larva", "pupa", "none"]},
        {"id": "4.png-1", "image": "images/4.png", "question": "How many stages are shown?",
         "answers": ["C"], "choices": ["2", "3", "4", "5"]},
        {"id": "17.png-0", "image": "images/17.png", "question": "What does label A show?",
         "answers": ["A"], "choices": ["sun", "moon", "earth", "mars"]}]


def test_vqa_rad_keeps_the_test_phrasings_and_lowercases_the_answer_type():
    assert convert.vqa_rad(FIXTURES / "vqa-rad" / "VQA_RAD Dataset Public.json") == [
        {"id": "2", "image": "synpic29265.jpg", "question": "Where is the pneumonia located?",
         "answers": ["Right lower lobe"], "type": "open"},
        {"id": "3", "image": "synpic29265.jpg", "question": "Are there 2 lesions?", "answers": ["2"], "type": "closed"}]


def test_slake_keeps_english_questions():
    assert convert.slake(FIXTURES / "slake" / "test.json") == [
        {"id": "11934", "image": "xmlab1/source.jpg", "question": "Which part of the body does this image belong to?",
         "answers": ["Abdomen"], "type": "open"},
        {"id": "11936", "image": "xmlab1/source.jpg", "question": "Does the picture contain liver?",
         "answers": ["Yes"], "type": "closed"}]


def test_pathvqa_marks_yes_no_answers_closed():
    assert convert.pathvqa(FIXTURES / "pathvqa" / "test_qa.pkl") == [
        {"id": "0", "image": "test_0262.jpg", "question": "Does this image show mild dysplasia?",
         "answers": ["yes"], "type": "closed"},
        {"id": "1", "image": "test_0262.jpg", "question": "What is present?", "answers": ["hyperplasia"], "type": "open"},
        {"id": "2", "image": "test_0001.jpg", "question": "Is the lesion benign?", "answers": ["No"], "type": "closed"}]


def test_pathvqa_refuses_a_pickle_that_would_run_code(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"image": print}]))
    with pytest.raises(pickle.UnpicklingError, match="unexpected object"):
        convert.pathvqa(tmp_path / "evil.pkl")


def test_cli_writes_one_record_per_line(tmp_path):
    out = tmp_path / "pope.jsonl"
    r = subprocess.run([sys.executable, "-m", "data.benchmarks.convert", "pope",
                        str(FIXTURES / "pope" / "coco_pope_adversarial.json"), str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]


def test_pathvqa_refuses_records_listed_over_and_over(tmp_path):
    one = {"image": "test_0001", "question": "What is shown? " * 600, "answer": "x"}  # 9 KB of text
    (tmp_path / "shared.pkl").write_bytes(pickle.dumps([one] * 3000))  # each repeat costs 2 bytes
    assert (tmp_path / "shared.pkl").stat().st_size < 20_000
    with pytest.raises(ValueError, match=r"shared\.pkl: its records expand to more than 16 times the file's size"):
        convert.pathvqa(tmp_path / "shared.pkl")


def test_pathvqa_refuses_an_answer_that_is_not_plain_text(tmp_path):
    nested = ["yes"]
    for _ in range(18):  # str() of it doubles at each level: 2**18 copies from a few hundred bytes
        nested = [nested, nested]
    (tmp_path / "nested.pkl").write_bytes(pickle.dumps([{"image": "test_0001", "question": "?", "answer": nested}]))
    with pytest.raises(ValueError, match=r"record 0 is not \{image, question, answer\} of plain text"):
        convert.pathvqa(tmp_path / "nested.pkl")


def test_cli_refuses_a_bad_pickle_in_one_line(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"image": print}]))
    r = subprocess.run([sys.executable, "-m", "data.benchmarks.convert", "pathvqa", str(tmp_path / "evil.pkl"),
                        str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: unexpected object builtins.print in a PathVQA pickle"]


@pytest.mark.parametrize("field", ["image", "question", "answer"])
def test_pathvqa_names_a_field_holding_a_number_too_long_for_text(tmp_path, field):
    # str() of a 100000-digit int raises Python's int/str conversion ValueError deep inside
    q = {"image": "test_0001", "question": "What is shown?", "answer": "yes", field: 10 ** 100000}
    (tmp_path / "big.pkl").write_bytes(pickle.dumps([q]))
    with pytest.raises(ValueError, match=rf"big\.pkl: record 0's {field} is a number too long to write as text"):
        convert.pathvqa(tmp_path / "big.pkl")

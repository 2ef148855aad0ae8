"""eval.py: prompts, scoring per task family on hand-made predictions, and a resumable run of a
tiny random Dragonfly."""
import json

import numpy as np
import pytest
from PIL import Image

from tools import eval as ev
from lib import pretrained
from lib.images import crop_image


def recs(*rows):
    return [{"id": str(i), **row} for i, row in enumerate(rows)]


def test_every_task_scores_with_a_known_metric():
    assert all(t.metric in ev.SCORERS for t in ev.TASKS.values())


def test_multiple_choice_prompt_letters_the_options():
    prompt = ev.build_prompt(ev.TASKS["scienceqa"], {"question": "Which is north?", "choices": ["Utah", "Texas"]})
    assert prompt == "Which is north?\nA. Utah\nB. Texas\nAnswer with the option's letter from the given choices directly."


def test_short_answer_prompt_asks_for_a_phrase():
    assert ev.build_prompt(ev.TASKS["textvqa"], {"question": "What brand?"}) == \
        "What brand?\nAnswer the question using a single word or phrase."


def test_vqa_accuracy_needs_three_humans_for_full_credit():
    rs = recs({"answers": ["dakota"] * 10}, {"answers": ["red"] * 2 + ["blue"] * 8})
    out = ev.score("textvqa", rs, {"0": "Dakota", "1": "red"})
    assert out["n"] == 2 and out["accuracy"] == pytest.approx(100 * (1 + 0.6) / 2)


def test_chartqa_accepts_numbers_within_five_percent():
    rs = recs({"answers": ["100"]}, {"answers": ["100"]}, {"answers": ["Yes"]})
    assert ev.score("chartqa", rs, {"0": "104", "1": "106", "2": "yes"})["relaxed_accuracy"] == pytest.approx(200 / 3)


def test_docvqa_task_scores_with_anls():
    assert ev.score("docvqa", recs({"answers": ["a", "invoice"]}), {"0": "invoice"})["anls"] == 100


def test_pope_reports_f1_with_yes_as_positive():
    rs = recs({"answers": ["yes"]}, {"answers": ["yes"]}, {"answers": ["no"]}, {"answers": ["no"]})
    out = ev.score("pope", rs, {"0": "Yes, there is.", "1": "No.", "2": "No", "3": "yes"})
    assert out["accuracy"] == 50 and out["precision"] == 50 and out["recall"] == 50 and out["f1"] == 50


def test_choice_accuracy_reads_letters_and_counts_unparsed_answers():
    rs = recs({"choices": ["cat", "dog"], "answers": ["B"]}, {"choices": ["cat", "dog"], "answers": ["A"]},
              {"choices": ["cat", "dog"], "answers": ["A"]})
    out = ev.score("ai2d", rs, {"0": "B", "1": "The answer is (A).", "2": "I am not sure"})
    assert out["accuracy"] == pytest.approx(200 / 3) and out["unparsed"] == 1


def test_biomedical_splits_closed_accuracy_from_open_token_f1():
    rs = recs({"answers": ["Yes"], "type": "closed"}, {"answers": ["No"], "type": "closed"},
              {"answers": ["right lower lobe"], "type": "open"})
    out = ev.score("vqa-rad", rs, {"0": "yes", "1": "yes", "2": "lower lobe"})
    assert out["closed_accuracy"] == 50 and out["n_closed"] == 2 and out["n_open"] == 1
    assert out["open_token_f1"] == pytest.approx(100 * 0.8)  # P = 1, R = 2/3


def test_captioning_scores_a_perfect_caption_fully_and_skips_meteor_without_java(monkeypatch):
    def no_java(*_):
        raise RuntimeError("metrics.meteor: needs `java` on PATH")
    monkeypatch.setattr(ev.metrics, "meteor", no_java)
    rs = recs({"answers": ["a dog runs on the grass", "a brown dog running"]},
              {"answers": ["two cats sleep on a sofa", "cats sleeping"]})
    out = ev.score("coco", rs, {"0": "a dog runs on the grass", "1": "two cats sleep on a sofa"})
    assert out["bleu_4"] == pytest.approx(100) and out["rouge_l"] == pytest.approx(100)
    assert out["cider_d"] > 0 and out["meteor"] is None


def test_zoom_is_exact_match_after_normalisation():
    rs = recs({"answers": ["red"]}, {"answers": ["7"]}, {"answers": ["red"]})
    assert ev.score("zoom", rs, {"0": "Red.", "1": "seven", "2": "dark red"})["accuracy"] == pytest.approx(200 / 3)


def test_only_answered_records_are_scored():
    out = ev.score("zoom", recs({"answers": ["red"]}, {"answers": ["blue"]}), {"1": "blue"})
    assert out["n"] == 1 and out["accuracy"] == 100


def test_unknown_task_lists_the_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gqa'.*textvqa.*zoom"):
        ev.main(["--checkpoint", str(tmp_path), "--task", "gqa", "--data", str(tmp_path / "x.jsonl")])


# ---- end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    return checkpoint_dir


def test_rerun_skips_answered_ids_and_keeps_going_past_a_bad_image(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (90, 160)), ("b.png", (200, 120))]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    rows = [{"id": "q1", "image": "a.png", "question": "What colour is the big square?", "answers": ["red"]},
            {"id": "q2", "image": "b.png", "question": "How many?", "answers": ["2"]},
            {"id": "q3", "image": "missing.png", "question": "What shape?", "answers": ["round"]}]
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--checkpoint", str(checkpoint), "--task", "zoom", "--data", str(data), "--out", str(tmp_path / "out"),
            "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"]

    first = ev.main(args)
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [e["id"] for e in lines if "prediction" in e] == ["q1", "q2"]
    assert [e["id"] for e in lines if "error" in e] == ["q3"]
    assert first["n"] == 2 and first["failed"] == 1

    second = ev.main(args)
    again = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert again[:len(lines)] == lines and [e["id"] for e in again[len(lines):]] == ["q3"]  # only the failure retried
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == second
    assert second["n"] == 2 and second["accuracy"] == first["accuracy"]


def test_batched_answers_equal_answers_one_at_a_time(checkpoint, tmp_path):
    from lib.tokenizer import Tokenizer
    tok, m = Tokenizer.from_file(checkpoint), pretrained.load(checkpoint)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    crops = crop_image(tmp_path / "c.png", m.cfg.crops)
    prompts = [tok.encode_prompt(q) for q in ["Hi", "What is written on the small red sign in the corner?"]]
    together = ev.greedy(m, tok, prompts, [crops, crops], max_new_tokens=4)  # the short prompt is left-padded
    assert together == [ev.greedy(m, tok, [p], [crops], max_new_tokens=4)[0] for p in prompts]


def test_empty_answers_are_counted_and_warned_about(tmp_path, capsys):
    rows = [{"id": str(i), "question": "Which digit?", "answers": ["7"]} for i in range(3)]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    answered = [{"id": "0", "prediction": ""}, {"id": "1", "prediction": "7"}, {"id": "2", "prediction": " "}]
    (tmp_path / "out" / "predictions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in answered))
    (tmp_path / "model").mkdir()     # no model is loaded: an empty folder will do
    args = ["--checkpoint", str(tmp_path / "model"), "--task", "zoom", "--data", str(tmp_path / "bench.jsonl"),
            "--out", str(tmp_path / "out")]
    (tmp_path / "out" / "run.json").write_text(json.dumps(ev.run_identity(ev.parse_args(args), "cpu")))
    result = ev.main(args)  # every id answered by this same run: no model is loaded
    assert result["empty"] == 2 and result["accuracy"] == pytest.approx(100 / 3)
    assert "warning: 2 of the 3 answers are empty" in capsys.readouterr().err


# ---- answers reused only by the run that made them; bad arguments and data -----------------
def zoom_args(checkpoint, tmp_path, *more):
    return ["--checkpoint", str(checkpoint), "--task", "zoom", "--data", str(tmp_path / "bench.jsonl"),
            "--out", str(tmp_path / "out"), "--max-new-tokens", "2", "--device", "cpu", *more]


@pytest.fixture
def bench(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "a.png")
    rows = [{"id": "q1", "image": "a.png", "question": "Which digit?", "answers": ["7"]}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def plant_answer(out, text="7"):
    """What another run left: an answer that is right whatever the model says."""
    with open(out / "predictions.jsonl", "a") as f:
        f.write(json.dumps({"id": "q1", "prediction": text, "answers": ["7"]}) + "\n")


def test_eval_refuses_answers_from_another_checkpoint(checkpoint, bench, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    ev.main(zoom_args(other, bench))
    plant_answer(bench / "out")  # as if `other` had answered "7"
    (other / "config.json").write_text((other / "config.json").read_text() + " ")  # now another model
    with pytest.raises(ValueError, match=r"predictions\.jsonl holds answers of another run \(they differ in checkpoint\)"):
        ev.main(zoom_args(other, bench))


@pytest.mark.parametrize("change,differs", [(["--task", "pope"], "task, prompt, max_new_tokens"),
                                            (["--max-new-tokens", "3"], "max_new_tokens"),
                                            (["--dtype", "bfloat16"], "dtype"), (["--quantize", "int8"], "quantize"),
                                            (["--special-tokens-in-text"], "special_tokens_in_text")])
def test_eval_refuses_answers_made_with_other_settings(checkpoint, bench, change, differs):
    ev.main(zoom_args(checkpoint, bench))
    args = zoom_args(checkpoint, bench, *change)
    if change[0] == "--task":
        args = [a for a in args if a not in ("--max-new-tokens", "2")]
    with pytest.raises(ValueError, match=rf"holds answers of another run \(they differ in {differs}\)"):
        ev.main(args)


def test_eval_refuses_answers_without_a_record_of_their_run(checkpoint, bench):
    (bench / "out").mkdir()
    plant_answer(bench / "out")
    with pytest.raises(ValueError, match=r"no run\.json says what made them.*--restart"):
        ev.main(zoom_args(checkpoint, bench))


def test_eval_restart_discards_answers_of_another_run(checkpoint, bench):
    (bench / "out").mkdir()
    plant_answer(bench / "out", "a planted answer")
    ev.main(zoom_args(checkpoint, bench, "--restart"))
    lines = (bench / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prediction"] != "a planted answer"


def test_eval_restart_removes_the_old_scores_too(checkpoint, bench):
    ev.main(zoom_args(checkpoint, bench))
    (bench / "out" / "metrics.json").write_text('{"accuracy": 100.0}')   # an older run's score
    (bench / "gone.jsonl").write_text(json.dumps({"id": "q1", "image": "gone.png", "question": "?", "answers": ["7"]}))
    with pytest.raises(ValueError, match="none of the 1 questions was answered"):   # it stops before scoring
        ev.main([*zoom_args(checkpoint, bench, "--restart"), "--data", str(bench / "gone.jsonl")])
    assert not (bench / "out" / "metrics.json").exists()


def test_eval_releases_its_lock_and_a_copy_of_the_checkpoint_is_the_same_run(checkpoint, bench, tmp_path):
    import shutil
    first = ev.main(zoom_args(checkpoint, bench))
    assert not (bench / "out" / "lock").exists()
    shutil.copytree(checkpoint, tmp_path / "copy", copy_function=shutil.copy)   # `cp -r`: new inodes and times
    plant_answer(bench / "out", "7")
    assert ev.main(zoom_args(tmp_path / "copy", bench))["accuracy"] == 100 != first["accuracy"]


def test_eval_same_run_reuses_its_answers(checkpoint, bench):
    first = ev.main(zoom_args(checkpoint, bench))
    plant_answer(bench / "out", "7")  # the last entry for an id wins: reused, not asked again
    assert ev.main(zoom_args(checkpoint, bench))["accuracy"] == 100 != first["accuracy"]


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--limit", "-1"), ("--limit", "0"),
                                        ("--max-new-tokens", "0")])
def test_eval_refuses_counts_below_one(checkpoint, bench, flag, value):
    with pytest.raises(ValueError, match=rf"{flag} {value}: give a number >= 1"):
        ev.main(zoom_args(checkpoint, bench, flag, value))


def test_eval_refuses_a_file_without_questions(checkpoint, bench):
    (bench / "bench.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl holds no questions"):
        ev.main(zoom_args(checkpoint, bench))


def test_eval_fails_when_no_question_could_be_answered(checkpoint, bench):
    (bench / "a.png").unlink()
    with pytest.raises(ValueError, match=r"none of the 1 questions was answered \(first: q1: image file not found"):
        ev.main(zoom_args(checkpoint, bench))


@pytest.mark.parametrize("image", ["../../etc/passwd", "/etc/passwd", "sub/../../a.png"])
def test_eval_refuses_image_paths_outside_the_image_root(checkpoint, bench, image):
    (bench / "bench.jsonl").write_text(json.dumps({"id": "q1", "image": image, "question": "?", "answers": []}) + "\n")
    with pytest.raises(ValueError, match=r"question q1: image .* is outside the image root .*--images-anywhere"):
        ev.main(zoom_args(checkpoint, bench))
    assert not (bench / "out").exists()


def test_eval_images_anywhere_reads_a_path_outside_the_root(checkpoint, bench):
    (bench / "sub").mkdir()
    (bench / "sub" / "bench.jsonl").write_text(
        json.dumps({"id": "q1", "image": "../a.png", "question": "?", "answers": ["7"]}) + "\n")
    args = zoom_args(checkpoint, bench, "--images-anywhere")
    args[args.index("--data") + 1] = str(bench / "sub" / "bench.jsonl")
    assert ev.main(args)["failed"] == 0


def test_eval_metrics_are_valid_json_when_a_family_has_no_questions():
    out = ev.score("vqa-rad", recs({"answers": ["yes"], "type": "closed"}), {"0": "yes"})
    assert out["open_token_f1"] is None and json.loads(json.dumps(out, allow_nan=False)) == out

"""--recipe release against the release's own code: every golden record's and batch's ids and labels,
the weight-decay groups by name, the learning rate at every step, the scripts' numbers, and what
--show-examples prints. The goldens (tests/golden/recipe/) were made by tests/make_golden_recipe.py
running togethercomputer/Dragonfly at 25a9c6a1 with transformers 4.45.2; the tokenizer there was
Llama-3.1's, rebuilt from llama-models' tokenizer.model, which is the file shipped as
checkpoints/zoom-tiny/tokenizer.model (records.json.xz's _meta.tokenizer)."""
import json
import lzma
import random

import pytest

from conftest import ROOT
from data import release_recipe as data_recipe
from lib import pretrained, release_format
from lib import release_recipe
from lib.tokenizer import Tokenizer
from lib.train_config import parse_config
from tiny_checkpoints import make_test_image, write_tiny_dragonfly
import train

GOLDEN = ROOT / "tests" / "golden" / "recipe"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(ROOT / "checkpoints" / "zoom-tiny" / "tokenizer.model")


@pytest.fixture(scope="module")
def records():
    return json.load(lzma.open(GOLDEN / "records.json.xz"))["records"]


def test_every_golden_record_gives_the_release_ids_and_labels(tok, records):
    assert len(records) == 300
    for r in records:
        rng = random.Random(r["random_seed"])           # the generator's random.seed before the collate
        if r["error"]:
            with pytest.raises(ValueError):
                data_recipe.collate_rows(tok, [r["record"]], r["max_length"], rng)
            continue
        got = data_recipe.collate_rows(tok, [r["record"]], r["max_length"], rng)
        assert got["prompts"] == [r["formatted_prompt"]], r["id"]
        assert got["instructions"] == [r["instruction_index"]], r["id"]
        assert got["path"] == r["path"], r["id"]
        assert got["tokens"] == [r["text_ids"]], r["id"]
        assert got["labels"] == [r["labels"]], r["id"]
        assert got["truncated"] == [r["truncated"]], r["id"]


def test_every_golden_batch_gives_the_release_ids_labels_and_padding(tok, records):
    by_id = {r["id"]: r for r in records}
    batches = json.load(lzma.open(GOLDEN / "batches.json.xz"))["batches"]
    assert len(batches) == 30
    for b in batches:
        got = data_recipe.collate_rows(tok, [by_id[i]["record"] for i in b["record_ids"]], b["max_length"],
                                       random.Random(b["random_seed"]))
        assert got["path"] == b["path"], b["id"]
        assert got["instructions"] == b["instruction_indices"], b["id"]
        assert got["tokens"] == b["text_ids"], b["id"]
        assert got["labels"] == b["labels"], b["id"]
        assert [n + b["image_block_len"] for n in got["attention_len"]] == b["attention_len"], b["id"]


def test_caption_instructions_are_the_releases_22(records):
    meta = json.load(lzma.open(GOLDEN / "records.json.xz"))["_meta"]
    assert list(data_recipe.CAPTION_INSTRUCTIONS) == meta["instructions"]


@pytest.fixture(scope="module")
def tiny_release_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_release")
    write_tiny_dragonfly(d, version="v2", fmt="safetensors")
    return pretrained.load(d)


@pytest.mark.parametrize("stage,ours", [("stage1", "pretrain"), ("stage2", "sft")])
def test_weight_decay_groups_match_the_releases_by_name(tiny_release_model, stage, ours):
    golden = json.load(open(GOLDEN / "weight_decay.json"))
    model = tiny_release_model
    release_recipe.freeze(model, release_recipe.SCRIPTS[ours]["trainable"])
    names = release_format.checkpoint_names(model)
    by_param = {id(p): names[n] for n, p in model.named_parameters()}
    groups = release_recipe.param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in golden[stage]["param_groups"]]
    for got, want in zip(groups, golden[stage]["param_groups"]):   # AdamW's update is per parameter: order is free
        assert sorted(by_param[id(p)] for p in got["params"]) == sorted(want["names"])
    assert sorted(by_param[id(p)] for p in model.parameters() if p.requires_grad) == sorted(golden[stage]["trainable"])


def test_decay_rule_on_every_release_name():
    for p in json.load(open(GOLDEN / "weight_decay.json"))["all_parameters"]:
        assert release_recipe.decays(p["name"]) == p["decay_by_rule"], p["name"]


def test_lr_at_every_step_of_the_golden_schedules_within_1e_12():
    golden = json.load(open(GOLDEN / "schedule.json"))
    for s in golden["schedules"]:
        steps = s.get("steps", range(s["total_training_steps"]))
        want = s.get("lr_at_steps", s.get("lr_at_step"))
        assert len(want) == len(steps) > 0
        for k, lr in zip(steps, want):
            got = s["learning_rate"] * release_recipe.lr_at(k, s["total_training_steps"], s["warmup_steps_ratio"])
            assert abs(got - lr) <= 1e-12, (s["name"], k)


def test_scheduler_steps_once_per_update_of_two_iterations_as_accelerate_does():
    ga2 = json.load(open(GOLDEN / "schedule.json"))["accelerate_gradient_accumulation_2"]
    schedule = release_recipe.lr_lambda(ga2["total_training_steps"] // release_recipe.ITERATIONS_PER_UPDATE,
                                         ga2["warmup_steps_ratio"])
    for s in ga2["steps"]:                         # iteration g runs in our update g // 2
        assert abs(ga2["learning_rate"] * schedule(s["global_step"] // 2) - s["lr_in_param_group"]) <= 1e-12


@pytest.mark.parametrize("stage,ours", [("stage1", "pretrain"), ("stage2", "sft")])
def test_stage_settings_are_the_scripts(stage, ours):
    h = json.load(open(GOLDEN / "hyperparameters.json"))[stage]
    eff, script = {k: v["value"] for k, v in h["effective"].items()}, release_recipe.SCRIPTS[ours]
    assert (script["per_gpu_batch"], script["iterations"], script["lr"], script["warmup_ratio"], script["weight_decay"],
            script["max_seq"], script["seed"], script["grad_checkpoint"]) == \
           (eff["batch_size"], eff["total_training_steps"], eff["learning_rate"], eff["warmup_steps_ratio"],
            eff["weight_decay"], eff["max_seq_length"], eff["seed"], eff["gradient_checkpointing"])
    assert (release_recipe.TEXT_EVERY, release_recipe.MATH_EVERY) == (eff["text_alternate_step"], eff["math_alternate_step"])
    assert eff["gradient_accumulation_steps"] == 1 and eff["lr_scheduler"] == "cosine"
    assert release_recipe.ITERATIONS_PER_UPDATE == h["accelerate_config"]["gradient_accumulation_steps"]["value"]
    assert h["accelerate_config"]["gradient_clipping"]["value"] == 1.0
    derived = h["derived"]
    cfg = parse_config(["--recipe", "release", "--stage", ours])
    assert cfg.batch_size == derived["samples per optimizer update (batch_size x num_processes x yaml GA)"]
    assert (cfg.micro_batch, cfg.lr, cfg.warmup, cfg.grad_clip) == (eff["batch_size"], eff["learning_rate"],
                                                                    eff["warmup_steps_ratio"], 1.0)
    assert cfg.max_steps * release_recipe.ITERATIONS_PER_UPDATE == derived["num_training_steps passed"]
    assert (cfg.max_steps * 2 * cfg.warmup) // 1 == derived["num_warmup_steps passed to get_cosine_schedule_with_warmup"]
    assert cfg.trainable == (("projection",) if ours == "pretrain" else ("projection", "vision", "llm"))


def test_release_recipe_refuses_a_stage_the_release_has_not():
    with pytest.raises(SystemExit, match="^error: --recipe release: the release has stages pretrain and sft"):
        parse_config(["--recipe", "release", "--stage", "med-vision"])


def test_text_and_math_batches_join_the_iterations_the_release_adds_them_to():
    passes = release_recipe.step_passes(4, ["a", "b"], {"text": lambda: "t", "math": lambda: "m"})
    assert passes == [(8, "image", "a"), (9, "image", "b"), (9, "text", "t")]    # iteration 9: text
    passes = release_recipe.step_passes(24, ["a", "b", "c", "d"], {"text": lambda: "t", "math": lambda: "m"})
    assert [(g, k) for g, k, _ in passes] == [(48, "image")] * 2 + [(49, "image")] * 2 + [(49, "text")] * 2 + [(49, "math")] * 2
    assert release_recipe.logged_loss(1.0, 3.0, 6.0) == 4.0                     # ((1 + 3) / 2 + 6) / 2, T:380, T:404


# ---- --show-examples --------------------------------------------------------------------------
SHOWN = ["r0000", "r0150", "r0255", "r0262"]      # image, text only, BOS in text, <|end_of_text|> in text


@pytest.fixture()
def fixture_records(tmp_path, records):
    by_id = {r["id"]: r for r in records}
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in SHOWN:
            f.write(json.dumps(by_id[i]["record"]) + "\n")
            if by_id[i]["record"].get("image_url"):
                make_test_image(*by_id[i]["image_size"]).save(tmp_path / by_id[i]["record"]["image_url"])
    return tmp_path / "train.jsonl", [by_id[i] for i in SHOWN]


def test_show_examples_json_is_the_releases_tokens_and_labels(fixture_records, capsys):
    path, golden = fixture_records
    train.main(["--stage", "sft", "--recipe", "release", "--model", "tiny", "--data", str(path),
                "--show-examples", "4", "--json"])
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown == [{"tokens": g["text_ids"], "labels": g["labels"]} for g in golden]


def test_show_examples_marks_the_trained_text_and_the_image_block(fixture_records, capsys):
    path, _ = fixture_records
    train.main(["--stage", "sft", "--recipe", "release", "--model", "tiny", "--data", str(path), "--show-examples", "2"])
    out = capsys.readouterr().out
    assert "example 0: 60 text positions, 59 trained, image img_00.png\n[image block: 258 positions, not trained]\n" \
           "<|begin_of_text|>⟦<|start_header_id|>user" in out
    assert out.count("[image block") == 1 and "example 1: 63 text positions, 62 trained, text only" in out
    assert "<|eot_id|><|end_of_text|>⟧" in out


def test_show_examples_on_llava_records_our_recipe_trains_the_answer_and_the_release_skips(tmp_path, capsys):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]))
    train.main(["--stage", "sft", "--model", "tiny", "--data", str(path), "--show-examples", "1"])
    assert "⟦Hello.<|eot_id|>⟧" in capsys.readouterr().out
    train.main(["--stage", "sft", "--recipe", "release", "--model", "tiny", "--data", str(path), "--show-examples", "1"])
    assert "example 0: skipped (malformed record)" in capsys.readouterr().out

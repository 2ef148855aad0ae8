"""data/: record formats, label masks, skipping, truncation, text mixing, batching, sampling."""
import json
import pickle
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import crops
from data.dataset import ShardedSampler, SkipCount, Skipped, VLDataset, collate
from data.formats import (CAPTION_INSTRUCTIONS, IGNORE, RecordFile, encode_turns, format_chat, parse_chat, read_records,
                          to_turns)
from lib.tokenizer import Tokenizer

llama_models = pytest.importorskip("llama_models")
FIXTURES = Path(__file__).parent / "fixtures" / "data"
IMAGES = FIXTURES / "images"
CROPS = crops.CropConfig(size=28)   # 1 + 4 + 36 = 41 crops of 28 px: tiny pixels, the real layout
P = 50                              # image positions charged per image sample (any number will do)
PAD = 128004                        # <|finetune_right_pad_id|>


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


def dataset(tok, path="release.jsonl", **kw):
    return VLDataset(FIXTURES / path, IMAGES, tok, CROPS, image_positions=P, **kw)


def header(tok, role):
    sp = tok.special_tokens
    return [sp["<|start_header_id|>"]] + tok.encode(role) + [sp["<|end_header_id|>"]] + tok.encode("\n\n")


# ---------------------------------------------------------------------------- tokens and labels

def test_assistant_only_labels_cover_answer_text_and_its_eot(tok):
    turns = [("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Ciao")]
    tokens, labels = encode_turns(tok, turns, loss_on="assistant")
    user1 = header(tok, "user") + tok.encode("Hi") + [tok.eot_id]
    answer1 = tok.encode("Hello there") + [tok.eot_id]
    user2 = header(tok, "user") + tok.encode("Bye") + [tok.eot_id]
    answer2 = tok.encode("Ciao") + [tok.eot_id]
    a = header(tok, "assistant")
    assert tokens == [tok.bos_id] + user1 + a + answer1 + user2 + a + answer2
    hidden = lambda ids: [IGNORE] * len(ids)  # noqa: E731
    assert labels == hidden([tok.bos_id] + user1 + a) + answer1 + hidden(user2 + a) + answer2


def test_loss_on_all_labels_every_token_after_begin_of_text(tok):
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]
    tokens, labels = encode_turns(tok, turns, loss_on="all")
    assert labels == [IGNORE] + tokens[1:]


def test_tokens_are_the_release_chat_string(tok):
    turns = [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4")]
    tokens, _ = encode_turns(tok, turns)
    assert tokens == tok.encode("<|begin_of_text|>" + format_chat(turns))


def test_training_prefix_equals_the_inference_prompt(tok):
    question = "What is in the picture?\nAnswer briefly."
    tokens, labels = encode_turns(tok, [("user", question), ("assistant", "A cat.")])
    prompt = tok.encode_prompt(question)            # what sample.py feeds the model
    assert tokens[:len(prompt)] == prompt
    assert all(label == IGNORE for label in labels[:len(prompt)])
    assert labels[len(prompt):] == tokens[len(prompt):]


def test_special_token_strings_in_data_are_plain_text(tok):
    tokens, _ = encode_turns(tok, [("user", "Say <|eot_id|>"), ("assistant", "<|start_header_id|>")])
    assert tokens.count(tok.eot_id) == 2                                 # only the two turn ends
    assert tokens.count(tok.special_tokens["<|start_header_id|>"]) == 2  # only the two headers


# ---------------------------------------------------------------------------- record formats

def test_read_records_reads_llava_json_and_release_jsonl():
    assert [r["id"] for r in read_records(FIXTURES / "llava.json")][:3] == ["cap", "vqa", "blip"]
    release = list(read_records(FIXTURES / "release.jsonl"))
    assert len(release) == 4 and "_error" in release[2]     # the broken line is kept, marked
    assert len(list(read_records(FIXTURES / "text.jsonl"))) == 3


def test_record_file_survives_pickling_for_spawned_workers():
    records = pickle.loads(pickle.dumps(RecordFile(FIXTURES / "release.jsonl")))
    assert records[1]["image_url"] == "green.jpg"


def test_release_string_round_trip():
    turns = [("system", "Answer in one word."), ("user", "What is it?\nLook closely."), ("assistant", "Grass.")]
    assert parse_chat(format_chat(turns)) == turns
    assert parse_chat("<|begin_of_text|>" + format_chat(turns)) == turns
    image, parsed = to_turns({"image_url": "a.png", "conversations": format_chat(turns)})
    assert (image, parsed) == ("a.png", turns)


def test_llava_record_maps_roles_and_drops_the_image_placeholder():
    record = json.loads((FIXTURES / "llava.json").read_text())[1]
    image, turns = to_turns(record, random.Random(0))
    assert image == "green.jpg"
    assert turns == [("user", "What shape is in the middle?"), ("assistant", "A yellow ellipse."),
                     ("user", "And the background colour?"), ("assistant", "Green.")]


def test_system_turn_is_kept_as_a_system_header():
    image, turns = to_turns(next(iter(read_records(FIXTURES / "text.jsonl"))))
    assert image is None and turns[0] == ("system", "You are a helpful assistant.")


def test_caption_only_samples_get_an_instruction_from_the_fixed_list_deterministically():
    llava = json.loads((FIXTURES / "llava.json").read_text())
    for record, caption in ((llava[0], "A red card with a blue bar."), (llava[2], "a yellow ball on grass")):
        picks = [to_turns(record, random.Random(s))[1] for s in range(40)]
        assert all(t[0][1] in CAPTION_INSTRUCTIONS and t[1] == ("assistant", caption) for t in picks)
        assert len({t[0][1] for t in picks}) > 3                       # varied across samples...
        assert picks == [to_turns(record, random.Random(s))[1] for s in range(40)]   # ...fixed per sample


def test_malformed_records_raise_value_error():
    for bad in ({"image": "a.png"}, {"conversations": [{"from": "narrator", "value": "x"}]},
                {"conversations": "no headers"}, {"conversations": [{"from": "human", "value": "only a question"}]}):
        with pytest.raises(ValueError):
            to_turns(bad)


# ---------------------------------------------------------------------------- the dataset

def test_image_sample_has_crops_grids_and_aligned_labels(tok):
    sample = dataset(tok)[0]
    assert sample["pixels"].shape == (41, 3, 28, 28) and sample["pixels"].dtype == torch.float32
    assert sample["grids"] == ((2, 2), (6, 6)) and not sample["truncated"]
    assert sample["tokens"].shape == sample["labels"].shape and sample["tokens"][0] == tok.bos_id
    answer = tok.decode(sample["labels"][sample["labels"] != IGNORE].tolist())
    assert answer == "Red, with a blue bar on the left.<|eot_id|>"


def test_truncation_cuts_text_from_the_end_and_keeps_the_image_block(tok):
    full = dataset(tok)[0]
    n = len(full["tokens"])
    cut = dataset(tok, max_seq=P + n - 3)[0]
    assert cut["truncated"] and len(cut["tokens"]) == n - 3
    assert torch.equal(cut["tokens"], full["tokens"][:n - 3]) and torch.equal(cut["pixels"], full["pixels"])
    assert (cut["labels"][1:] != IGNORE).sum() >= 1


def test_sample_with_no_supervised_token_left_is_skipped_as_too_long(tok):
    n_prompt = int((dataset(tok)[0]["labels"] == IGNORE).sum())   # everything before the answer
    ds = dataset(tok, max_seq=P + n_prompt)
    item = ds[0]
    assert isinstance(item, Skipped) and item.reason == "too long"
    batch = collate([item, dataset(tok, max_seq=P + n_prompt + 1)[0]], PAD)
    assert batch["skipped"] == Counter({"too long": 1}) and batch["truncated"] == 1


def test_bad_images_and_malformed_records_are_skipped_and_counted(tok):
    ds = dataset(tok, "llava.json")
    batch = collate([ds[i] for i in range(len(ds))], PAD)
    assert batch["skipped"] == Counter({"missing image": 1, "bad image": 1, "malformed record": 2})
    assert batch["image"]["index"] == [0, 1, 2] and batch["text"] is None
    release = dataset(tok)
    assert collate([release[i] for i in range(4)], PAD)["skipped"] == Counter({"malformed record": 2})


def test_text_only_mixing_rate_is_text_prob_and_deterministic(tok):
    ds = dataset(tok, text_path=FIXTURES / "text.jsonl", text_prob=0.1, seed=3)
    draws = [ds.source(i) for i in range(1000)]
    rate = sum(which == "text" for which, _ in draws) / 1000
    assert 0.07 <= rate <= 0.13
    assert draws == [dataset(tok, text_path=FIXTURES / "text.jsonl", text_prob=0.1, seed=3).source(i)
                     for i in range(1000)]
    assert draws != [dataset(tok, text_path=FIXTURES / "text.jsonl", text_prob=0.1, seed=4).source(i)
                     for i in range(1000)]
    assert {j for which, j in draws if which == "text"} == {0, 1, 2}


def test_mixed_in_text_sample_has_no_image(tok):
    item = dataset(tok, text_path=FIXTURES / "text.jsonl", text_prob=1.0)[0]
    assert item["pixels"] is None and item["grids"] is None
    assert tok.decode(item["tokens"][:1].tolist()) == "<|begin_of_text|>"


def test_collate_splits_image_and_text_rows_and_pads_right(tok):
    images = dataset(tok)
    texts = dataset(tok, text_path=FIXTURES / "text.jsonl", text_prob=1.0)
    rows = [images[0], texts[0], images[1], texts[2]]
    batch = collate(rows, PAD)
    img, txt = batch["image"], batch["text"]
    assert img["pixels"].shape == (2, 41, 3, 28, 28) and img["grids"] == ([(2, 2), (2, 2)], [(6, 6), (6, 6)])
    assert txt["index"] == [0, 2] and "pixels" not in txt
    for sub, originals in ((img, (rows[0], rows[2])), (txt, (rows[1], rows[3]))):
        assert sub["tokens"].shape == sub["labels"].shape == (2, max(len(r["tokens"]) for r in originals))
        for b, r in enumerate(originals):
            n = len(r["tokens"])
            assert torch.equal(sub["tokens"][b, :n], r["tokens"]) and (sub["tokens"][b, n:] == PAD).all()
            assert torch.equal(sub["labels"][b, :n], r["labels"]) and (sub["labels"][b, n:] == IGNORE).all()
        assert sub["n_labels"] == sum(int((r["labels"] != IGNORE).sum()) for r in originals)


def test_dataloader_workers_give_the_same_batches(tok):
    loader = lambda workers: torch.utils.data.DataLoader(  # noqa: E731
        dataset(tok, "llava.json"), batch_size=4, num_workers=workers, collate_fn=lambda b: collate(b, PAD))
    serial, parallel = list(loader(0)), list(loader(2))
    assert [b["skipped"] for b in serial] == [b["skipped"] for b in parallel]
    assert [b["image"] is None for b in serial] == [False, True]     # batch 2: the bad records only
    assert torch.equal(serial[0]["image"]["pixels"], parallel[0]["image"]["pixels"])


# ---------------------------------------------------------------------------- the sampler

def test_sampler_ranks_are_disjoint_equal_length_and_cover_everything():
    n, world = 10, 3
    lists = [list(ShardedSampler(n, rank, world, seed=0)) for rank in range(world)]
    assert [len(x) for x in lists] == [4, 4, 4]
    assert set().union(*lists) == set(range(n))
    flat = sum(lists, [])
    assert len(flat) - len(set(flat)) == 2           # only the wrap-around padding repeats


def test_sampler_reshuffles_each_epoch_and_repeats_an_epoch_exactly():
    s = ShardedSampler(100, 0, 1, seed=0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    s.set_epoch(0)
    assert list(s) == first
    assert list(ShardedSampler(10, 1, 2, seed=0, shuffle=False)) == [1, 3, 5, 7, 9]


def test_sampler_resume_gives_the_same_remaining_order():
    s = ShardedSampler(50, 1, 4, seed=7)
    s.set_epoch(2)
    order = list(s)
    state = s.state(consumed=5)                      # the loop had consumed 5 samples
    resumed = ShardedSampler(50, 1, 4, seed=7)
    resumed.load_state(state)
    assert len(resumed) == len(order) - 5 and list(resumed) == order[5:]
    with pytest.raises(ValueError, match="world"):
        ShardedSampler(50, 1, 2, seed=7).load_state(state)


# ---------------------------------------------------------------------------- prepare scripts

def test_zoom_prepare_is_deterministic_and_readable_by_the_dataset(tok, tmp_path):
    from data.zoom import prepare as zoom
    for out in (tmp_path / "a", tmp_path / "b"):
        zoom.main(["--out", str(out), "--train", "3", "--test", "2", "--seed", "5"])
    for name in ("train.jsonl", "test.jsonl", "images/train_00002.png", "images/test_00001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert set(test[0]) == {"id", "image", "question", "answers"} and test[0]["answers"][0] in "0123456789"
    sample = VLDataset(tmp_path / "a" / "train.jsonl", tmp_path / "a", tok, CROPS, P)[0]
    assert tok.decode(sample["labels"][sample["labels"] != IGNORE].tolist())[0] in "0123456789"


def test_zoom_pages_look_the_same_to_the_low_crop_whatever_the_digit():
    from data.zoom import prepare as zoom
    for k in range(5):
        pages = [zoom.draw_sample(random.Random(k), digit=d) for d in range(10)]   # same layout and colours
        assert all(img.size == (336, 336) and digit == d for d, (img, digit, _) in enumerate(pages))
        assert pages[0][2].any() and len({int(ink.sum()) for _, _, ink in pages}) == 1   # equal ink per glyph
        means = [tuple(np.asarray(img).reshape(-1, 3).sum(0)) for img, _, _ in pages]
        assert len(set(means)) == 1


def test_llava_prepare_writes_release_records_and_counts_missing_images(tmp_path):
    from data.llava import prepare as llava
    counts = Counter()
    out = list(llava.convert(read_records(FIXTURES / "llava.json"), IMAGES, "fixture", counts))
    assert counts == Counter({"image": 4, "missing image": 1, "malformed": 2})
    assert all(set(r) == {"image_url", "conversations", "source"} for r in out)
    assert to_turns(out[1])[1][0] == ("user", "What shape is in the middle?")


def test_skip_count_judges_only_after_enough_records_or_at_the_end():
    count = SkipCount(n_records=1000, max_skip=0.5)
    count.add(0, Counter({"missing image": 8}))            # a bad first batch is no verdict yet
    assert count.problem() is None
    count.add(2, Counter({"missing image": 6}))            # 14 of 16 skipped: some usable, fraction judged at 64
    assert count.problem() is None
    count.add(48, Counter())                               # 14 of 64 skipped: below one half
    assert count.problem() is None
    count.add(0, Counter({"bad image": 60}))               # 74 of 124 skipped: above one half
    assert count.problem().startswith("74 of the 124 records read were skipped (bad image: 60, missing image: 14)")
    small = SkipCount(n_records=3, max_skip=0.5)
    small.add(0, Counter({"malformed record": 3}))          # a file smaller than the sample: judged whole
    assert small.problem() == "no usable sample in the 3 records read (skipped: malformed record: 3)"


# ---------------------------------------------------------------------------- what a record may name (issue 17)

def test_a_jsonl_file_whose_first_line_is_not_json_is_an_error_naming_the_line(tmp_path):
    good = (FIXTURES / "release.jsonl").read_text().splitlines()[0]
    (tmp_path / "bad.jsonl").write_text("\n" + '{"image_url": "red.png", "conversations": \n' + good + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"^line 2 is not a JSON record; a JSONL file holds one JSON object per line$"):
        RecordFile(tmp_path / "bad.jsonl")


def test_a_pretty_printed_object_is_still_one_record(tmp_path):
    record = json.loads((FIXTURES / "release.jsonl").read_text().splitlines()[0])
    (tmp_path / "one.json").write_text(json.dumps(record, indent=2))
    assert len(RecordFile(tmp_path / "one.json")) == 1 and RecordFile(tmp_path / "one.json")[0] == record


@pytest.mark.parametrize("image", ["../images/red.png", str(IMAGES / "red.png"), "sub/../../images/red.png"])
def test_an_image_path_leaving_the_images_folder_is_skipped(tok, tmp_path, image):
    record = json.loads((FIXTURES / "release.jsonl").read_text().splitlines()[0])
    (tmp_path / "r.jsonl").write_text(json.dumps({**record, "image_url": image}) + "\n")
    inside = tmp_path / "inside"                     # its sibling ../images holds a real red.png
    shutil.copytree(IMAGES, tmp_path / "images")
    inside.mkdir()
    sample = VLDataset(tmp_path / "r.jsonl", inside, tok, CROPS, P)[0]
    assert isinstance(sample, Skipped) and sample.reason == "image outside the images folder"
    allowed = VLDataset(tmp_path / "r.jsonl", inside, tok, CROPS, P, images_anywhere=True)[0]
    assert not isinstance(allowed, Skipped) and allowed["pixels"] is not None


def test_an_image_path_that_stays_inside_through_dots_is_read(tok, tmp_path):
    record = json.loads((FIXTURES / "release.jsonl").read_text().splitlines()[0])
    (tmp_path / "r.jsonl").write_text(json.dumps({**record, "image_url": "./x/../red.png"}) + "\n")
    assert VLDataset(tmp_path / "r.jsonl", IMAGES, tok, CROPS, P)[0]["pixels"] is not None

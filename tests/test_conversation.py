"""Multi-turn conversations (conversation.py): the cached turns against a from-scratch
recomputation of the whole conversation, the cache's unused slots, growth, Ctrl-C, the context's end."""
import numpy as np
import pytest
import torch
from PIL import Image

import llama
import model
from lib import pretrained
from conftest import ROOT
from lib.conversation import ContextFull, Conversation
from lib.images import crop_image

QUESTIONS = ["What is this?", "And behind it?", "Which colour is the top left corner?"]
EOT, STOPS = 128009, {128001, 128009}


@pytest.fixture(scope="module")
def tok():
    from lib.tokenizer import Tokenizer
    return Tokenizer.from_file(ROOT / "checkpoints" / "zoom-tiny")  # Meta's Llama-3 tokenizer.model


@pytest.fixture(scope="module")
def crops(tiny_v2):
    rng = np.random.default_rng(1)
    return crop_image(Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)), tiny_v2.cfg.crops)


def from_scratch(m, crops, text, max_new):
    """One greedy answer after `text` (ids of the conversation so far), each token from a full
    forward over [image block] + all text with no KV cache. Returns (ids, logprobs, stopped)."""
    with torch.no_grad():
        image = None if crops is None else m.image_block(torch.as_tensor(crops.pixels)[None])
        text, ids, logprobs = list(text), [], []
        for _ in range(max_new):
            x = m.llm.embed(torch.tensor([text]))
            x = x if image is None else torch.cat([image, x], dim=1)
            logp = torch.log_softmax(m.llm(x, logits_from=-1)[0, -1].float(), dim=-1)  # causal, no cache
            token = int(logp.argmax())
            if token in STOPS:
                return ids, logprobs, True
            ids.append(token)
            logprobs.append(float(logp[token]))
            text.append(token)
    return ids, logprobs, False


def chat_turns(conv, questions, max_new):
    return [list(zip(*conv.ask(q, max_new_tokens=max_new))) for q in questions]


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text only"])
def test_cached_turns_equal_recomputing_the_whole_conversation(tiny_v2, tok, crops, with_image):
    image = crops if with_image else None
    conv = Conversation(tiny_v2, tok, image)
    got = chat_turns(conv, QUESTIONS, max_new=3)
    text = []
    for q, (ids, logprobs) in zip(QUESTIONS, got):
        text += tok.encode_prompt(q)[1 if text else 0:]  # the Llama-3 turns, built here by hand
        want_ids, want_lp, _ = from_scratch(tiny_v2, image, text, 3)
        assert list(ids) == want_ids
        np.testing.assert_allclose(logprobs, want_lp, atol=1e-5, rtol=0)
        text += want_ids + [EOT]  # cut at 3 tokens: the turn is closed with <|eot_id|>
    assert conv.tokens == text


def test_answers_that_stop_keep_the_models_eot_on_the_shipped_zoom_model(tok):
    m = pretrained.load(ROOT / "checkpoints" / "zoom-tiny")
    image = crop_image(ROOT / "data" / "zoom" / "example.png", m.cfg.crops)
    conv = Conversation(m, tok, image)
    questions = ["What digit is this page printed in?", "Which digit fills this picture?",
                 "Read the tiny digits in the image. Which digit is it?"]
    text = []
    for q in questions:
        ids, logprobs = zip(*conv.ask(q, max_new_tokens=8))
        text += tok.encode_prompt(q)[1 if text else 0:]
        want_ids, want_lp, stopped = from_scratch(m, image, text, 8)
        assert stopped and conv.finish == "stop"
        assert list(ids) == want_ids
        np.testing.assert_allclose(logprobs, want_lp, atol=1e-5, rtol=0)
        text += want_ids + [EOT]
    assert conv.tokens == text and tok.decode(ids) == "7"  # data/zoom/example.png is printed in 7s


def test_unused_cache_slots_never_reach_attention(tiny_v2, tok, crops):
    clean = chat_turns(Conversation(tiny_v2, tok, crops), QUESTIONS[:2], max_new=4)
    conv = Conversation(tiny_v2, tok, crops)
    conv._reserve(tiny_v2.cfg.llm.max_seq_len)  # the whole context: the cache is never reallocated
    for cache in conv.caches:  # every slot not written yet holds large finite values
        cache.k.fill_(1e4)
        cache.v.fill_(-3e4)
    dirty = chat_turns(conv, QUESTIONS[:2], max_new=4)
    for (ids, lp), (want_ids, want_lp) in zip(dirty, clean):
        assert ids == want_ids
        np.testing.assert_allclose(lp, want_lp, atol=1e-6, rtol=0)


def test_growing_cache_never_recomputes_the_prefix(tiny_v2, tok, crops):
    vision_calls, llm_positions = [], []
    hooks = [tiny_v2.vision.register_forward_hook(lambda *a: vision_calls.append(1)),
             tiny_v2.llm.layers[0].register_forward_pre_hook(lambda mod, args: llm_positions.append(args[0].shape[1]))]
    try:
        conv = Conversation(tiny_v2, tok, crops)
        sizes = []
        for q in QUESTIONS:
            list(conv.ask(q, max_new_tokens=40))
            sizes.append(conv.caches[0].k.shape[2])
    finally:
        for h in hooks:
            h.remove()
    assert sizes[0] < sizes[-1]  # the first turn's allocation was outgrown
    assert len(vision_calls) == 1
    # every position went through the LLM once, but the last answer token and <|eot_id|> (not yet)
    assert sum(llm_positions) == conv.cached == conv.image_len + len(conv.tokens) - 2


def test_kv_cache_grow_keeps_what_was_written():
    cache = llama.KVCache(1, 4, 2, 3, torch.float32)
    k, v = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    cache.update(0, k, v)
    cache.grow(10)
    assert cache.k.shape == (1, 2, 10, 3)
    k2, v2 = cache.update(3, torch.ones(1, 2, 5, 3), torch.ones(1, 2, 5, 3))  # past the old end
    assert torch.equal(k2[:, :, :3], k) and torch.equal(v2[:, :, :3], v) and k2.shape[2] == 8


def test_stopped_answer_stays_in_the_history_closed_with_eot(tiny_v2, tok):
    conv = Conversation(tiny_v2, tok)
    steps = conv.ask(QUESTIONS[0], max_new_tokens=50)
    partial = [next(steps)[0] for _ in range(3)]
    steps.close()  # what Ctrl-C in sample.py's chat does to the answer being printed
    text = tok.encode_prompt(QUESTIONS[0]) + partial + [EOT]
    assert conv.tokens == text and conv.finish == "interrupted"
    ids, logprobs = zip(*conv.ask(QUESTIONS[1], max_new_tokens=4))
    want_ids, want_lp, _ = from_scratch(tiny_v2, None, text + tok.encode_prompt(QUESTIONS[1])[1:], 4)
    assert list(ids) == want_ids
    np.testing.assert_allclose(logprobs, want_lp, atol=1e-5, rtol=0)


def test_ctrl_c_during_a_prefill_drops_only_that_question(tiny_v2, tok):
    conv = Conversation(tiny_v2, tok)
    list(conv.ask(QUESTIONS[0], max_new_tokens=3))
    before, cached = list(conv.tokens), conv.cached

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    tiny_v2.llm.forward = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            list(conv.ask(QUESTIONS[1], max_new_tokens=3))
    finally:
        del tiny_v2.llm.forward
    assert conv.tokens == before and conv.cached == cached
    ids, _ = zip(*conv.ask(QUESTIONS[2], max_new_tokens=3))
    assert list(ids) == from_scratch(tiny_v2, None, before + tok.encode_prompt(QUESTIONS[2])[1:], 3)[0]


def test_turn_past_the_context_says_how_many_positions_are_left(tiny_v2, tok):
    from dataclasses import replace
    small = model.Dragonfly(replace(tiny_v2.cfg, llm=replace(tiny_v2.cfg.llm, max_seq_len=40))).eval()
    small.load_state_dict(tiny_v2.state_dict())
    conv = Conversation(small, tok)
    list(conv.ask("Hi", max_new_tokens=10))
    left = 40 - len(tok.encode_prompt("Hi")) - 10 - 1  # the turn, its answer and <|eot_id|>
    assert conv.positions_left == left
    question = "What is in the top left corner of this image, and why?"
    needed = len(tok.encode_prompt(question)) - 1 + 1  # no second <|begin_of_text|>; one answer token
    assert needed > left
    with pytest.raises(ContextFull, match=f"{left} of the context's 40 positions are left; this turn needs {needed} "):
        conv.ask(question)
    assert conv.positions_left == left  # nothing was added
    list(conv.ask("Hi", max_new_tokens=100))  # fits, and its answer stops at the context's end
    assert conv.finish == "context" and conv.image_len + len(conv.tokens) == 41 and conv.positions_left == 0
    conv.reset()
    assert len(list(conv.ask("Hi", max_new_tokens=3))) == 3


def test_chat_calls_the_first_answer_hook_once_per_image(tiny_v2, tok, crops, monkeypatch, capsys):
    # sample.py --show in the chat: the first answer about each image is drawn, later turns are
    # not (looked.py reads a single-turn prompt), a text-only conversation never is
    from lib.conversation import chat
    lines = iter(["What is this?", "And behind it?", "/reset", "Again?", "/image x.png", "New one?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    monkeypatch.setattr("lib.conversation.crop_image", lambda path, cfg: crops)
    conv = Conversation(tiny_v2, tok, crops)
    chat(conv, on_first_answer=lambda q, r: seen.append((q, len(r["token_ids"]), conv.crops)),
         max_new_tokens=2)
    assert [(q, n) for q, n, _ in seen] == [("What is this?", 2), ("Again?", 2), ("New one?", 2)]
    assert all(c is crops for _, _, c in seen)
    lines = iter(["Hello?", "/quit"])
    seen.clear()
    chat(Conversation(tiny_v2, tok), on_first_answer=lambda q, r: seen.append(q), max_new_tokens=2)
    assert seen == []


def test_non_finite_output_stops_the_turn_and_writes_no_json(tiny_v2, tok):
    # sample.py --json: a NaN log-probability would make the line invalid JSON
    import copy
    import io
    from lib.conversation import NotFinite, answer
    broken = copy.deepcopy(tiny_v2)
    with torch.no_grad():
        broken.llm.norm.weight.fill_(float("nan"))
    conv, out = Conversation(broken, tok), io.StringIO()
    with pytest.raises(NotFinite, match="NaN or infinite"):
        answer(conv, "Hi", as_json=True, out=out, max_new_tokens=3)
    assert out.getvalue() == "" and conv.tokens == []  # no answer, and the question undone


def test_chat_image_that_is_a_fifo_is_refused_without_blocking(tiny_v2, tok, crops, tmp_path, monkeypatch, capsys):
    import os
    import signal
    from lib.conversation import chat
    os.mkfifo(tmp_path / "pipe.png")
    lines = iter([f"/image {tmp_path / 'pipe.png'}", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    def hung(*_):
        raise TimeoutError("chat /image blocked on a FIFO")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        chat(Conversation(tiny_v2, tok, crops), max_new_tokens=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "pipe.png is not a regular file (a folder, FIFO or device)" in capsys.readouterr().err


def test_chat_refuses_an_image_that_is_the_show_file(tiny_v2, tok, crops, tmp_path, monkeypatch, capsys):
    # sample.py --image a.png --show C.png, then `/image C.png`: the first answer's drawing would
    # replace the picture being asked about; one line in the chat, which goes on about the old image
    import sample
    from lib.conversation import chat
    (tmp_path / "C.png").write_bytes(b"png")
    (tmp_path / "link.png").symlink_to(tmp_path / "C.png")
    lines = iter([f"/image {tmp_path / 'C.png'}", f"/image {tmp_path / 'link.png'}", "/image other.png", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    opened = []
    monkeypatch.setattr("lib.conversation.crop_image", lambda path, cfg: opened.append(path) or crops)
    chat(Conversation(tiny_v2, tok, crops), check_image=sample.not_the_show_file(str(tmp_path / "C.png")),
         max_new_tokens=1)
    err = capsys.readouterr().err
    assert err.count("is the --show file") == 2 and "Traceback" not in err
    assert opened == ["other.png"]
    assert sample.not_the_show_file(None) is None

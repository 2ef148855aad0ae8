"""sample.py as a user runs it: streaming, --json, turns of one conversation, Ctrl-C on a terminal,
and one-line errors for bad input."""
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lib import pretrained
from conftest import ROOT
from lib.images import crop_image


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(checkpoint_dir / "image.png")
    return checkpoint_dir


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True, timeout=300)


def test_json_output_matches_model_generate(checkpoint):
    r = run("--checkpoint", str(checkpoint), "--image", str(checkpoint / "image.png"), "--prompt", "What is this?",
            "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "logprobs"} and len(out["logprobs"]) == len(out["token_ids"])
    from lib.tokenizer import Tokenizer
    tok = Tokenizer.from_file(checkpoint)
    m = pretrained.load(checkpoint)
    steps = list(m.generate([tok.encode_prompt("What is this?")], [crop_image(checkpoint / "image.png", m.cfg.crops)],
                            max_new_tokens=4, stop_ids=tok.stop_ids))
    ids = [int(t[0]) for t, _ in steps if int(t[0]) not in tok.stop_ids]
    assert out["token_ids"] == ids and out["text"] == tok.decode(ids)
    assert all(lp <= 0 for lp in out["logprobs"])


def test_text_only_prompt_streams_text(checkpoint):
    r = run("--checkpoint", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


@pytest.mark.parametrize("case", ["missing image", "not an image", "prompt too long", "missing checkpoint"])
def test_bad_input_is_one_line_error_without_traceback(checkpoint, case, tmp_path):
    (tmp_path / "fake.png").write_text("hello")
    args = {"missing image": ["--image", str(tmp_path / "nope.png"), "--prompt", "hi"],
            "not an image": ["--image", str(tmp_path / "fake.png"), "--prompt", "hi"],
            "prompt too long": ["--image", str(checkpoint / "image.png"), "--prompt", "word " * 200],
            "missing checkpoint": ["--prompt", "hi"]}[case]
    ckpt = str(tmp_path / "none") if case == "missing checkpoint" else str(checkpoint)
    r = run("--checkpoint", ckpt, *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 or "loaded" in r.stderr.splitlines()[0], r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_several_prompts_are_turns_of_one_conversation_one_json_object_each(checkpoint):
    from test_conversation import from_scratch
    from lib.tokenizer import Tokenizer
    questions = ["Hello", "And then?", "Why?"]
    r = run("--checkpoint", str(checkpoint), *[a for q in questions for a in ("--prompt", q)],
            "--max-new-tokens", "3", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    tok, m = Tokenizer.from_file(checkpoint), pretrained.load(checkpoint)
    text = []
    for q, turn in zip(questions, turns, strict=True):
        text += tok.encode_prompt(q)[1 if text else 0:]
        ids, logprobs, _ = from_scratch(m, None, text, 3)
        assert turn["token_ids"] == ids and turn["text"] == tok.decode(ids)
        assert np.allclose(turn["logprobs"], logprobs, atol=1e-5, rtol=0)
        text += ids + [tok.eot_id]


class Terminal:
    """sample.py on a pseudo-terminal, as a person runs it: what it printed, and typing."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        # A person's terminal starts sample.py with Ctrl-C at its default. The pytest process may
        # be ignoring SIGINT (seen: /proc SigIgn 0x1001006 after the full suite under
        # ONEDNN_MAX_CPU_ISA=AVX2), and an ignored signal is inherited across exec, where Python
        # then leaves it ignored: so the child gets the default back before sample.py starts.
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args],
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.screen = ""

    def type(self, text):
        os.write(self.master, text.encode())

    def wait_until(self, done, timeout=120):
        """Read until done(screen) holds."""
        deadline = time.time() + timeout
        while not done(self.screen):
            if not select.select([self.master], [], [], max(0.0, deadline - time.time()))[0]:
                raise AssertionError(f"timed out; the screen:\n{self.screen}")
            try:
                self.screen += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the program ended: no more output
                raise AssertionError(f"the program ended; the screen:\n{self.screen}") from None

    def wait_for(self, pattern, after=0):
        """Read until `pattern` is on the screen at or after index `after`; the index after it."""
        self.wait_until(lambda screen: screen.find(pattern, after) >= 0)
        return self.screen.find(pattern, after) + len(pattern)


def test_ctrl_c_stops_the_answer_keeps_the_chat_and_ctrl_c_at_the_prompt_quits(checkpoint):
    term = Terminal("--checkpoint", str(checkpoint), "--max-new-tokens", "2000", "--device", "cpu")
    try:
        at = term.wait_for("> ")
        for question in ("Hello", "And then?"):  # a random model: 2000 tokens are far from done
            term.type(question + "\n")
            at = term.wait_for(question, at)
            term.wait_until(lambda screen: len(re.sub(r"\s", "", screen[at:])) >= 10)  # the answer streams
            term.proc.send_signal(signal.SIGINT)
            at = term.wait_for("(stopped)", at)
            at = term.wait_for("> ", at)
            assert term.proc.poll() is None  # the chat goes on
        # at the prompt. Not within microseconds of it being drawn: a SIGINT that lands before
        # readline's select() starts only sets CPython's flag, which readline checks on EINTR
        # (a person's Ctrl-C is never that fast; under load this test hit that window)
        time.sleep(1.0)
        term.proc.send_signal(signal.SIGINT)
        assert term.proc.wait(timeout=30) == 0
        assert "Traceback" not in term.screen
    finally:
        term.proc.kill()
        os.close(term.master)

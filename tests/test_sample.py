"""sample.py as a user runs it: streaming, --json, and one-line errors for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import model
from conftest import ROOT


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
    from tokenizer import Tokenizer
    tok = Tokenizer.from_file(checkpoint)
    m = model.Dragonfly.from_pretrained(checkpoint)
    steps = list(m.generate([tok.encode_prompt("What is this?")], [m.crop_image(checkpoint / "image.png")],
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

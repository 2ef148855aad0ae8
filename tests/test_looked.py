"""looked.py: the answer's attention over the crops, recomputed from the model's own q and k."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib import looked
import model as M
from lib import pretrained
import tiny_checkpoints as tiny
from conftest import image_token_ids, ROOT
from lib.images import crop_image

ZOOM = ROOT / "checkpoints" / "zoom-tiny"


@pytest.fixture(scope="module")
def zoom():
    from lib.tokenizer import Tokenizer
    return pretrained.load(ZOOM), Tokenizer.from_file(ZOOM)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The zoom demo's first 50 held-out pages (prepare.py: a function of seed, split, index)."""
    from data.zoom import prepare
    out = tmp_path_factory.mktemp("zoom")
    (out / "images").mkdir()
    prepare.make_split(out, "test", 50, seed=0)
    return out, [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    import tiny_checkpoints as tiny
    llama_models = pytest.importorskip("llama_models")
    d = tiny.write_tiny_dragonfly(tmp_path_factory.mktemp("v1"), "v1", "bin")
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", d / "tokenizer.model")
    tiny.make_test_image(900, 600).save(d / "image.png")
    return d


@pytest.mark.parametrize("cfg", [M.v2_config(), M.v1_config()], ids=["v2", "v1"])
def test_crop_spans_end_at_the_separators_of_the_image_block(cfg):
    # the release's input_ids hold a separator after every crop: each span's last position
    ids = image_token_ids(cfg)
    kept = list(range(0, 24, 2)) if cfg.zoom_select else None
    spans = looked.crop_spans(cfg, kept)
    assert [end - 1 for _, _, _, end, _ in spans] == [i for i, t in enumerate(ids) if t == M.SEPARATOR_ID]
    assert len(spans) == (41 if kept is None else 17) and spans[0][2] == 0


def test_recomputed_attention_rows_reproduce_sdpa_output(tiny_v2):
    # weights @ v through o_proj must give what the layer's SDPA returned, row by row; GQA
    # (4 query heads on 2 kv heads), the first position (sees only itself) and the last.
    m = tiny_v2
    x = torch.randn(1, 300, m.cfg.llm.dim)
    rows = torch.tensor([0, 1, 150, 298, 299])
    checked = []

    def hook(attn, args, output):
        x_norm, cos, sin = args[:3]
        w = looked.attention_weights(attn, x_norm, cos, sin, rows)               # (1, h, n, S)
        assert torch.all(w[0, :, 0, 1:] == 0)                                    # causal
        v = attn.v_proj(x_norm).view(1, 300, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        y = attn.o_proj((w @ v).transpose(1, 2).reshape(1, len(rows), -1))
        torch.testing.assert_close(y, output[:, rows], atol=1e-5, rtol=0)
        checked.append(True)

    handles = [layer.attn.register_forward_hook(hook) for layer in m.llm.layers]
    try:
        with torch.no_grad():
            m.llm.hidden(x)
    finally:
        for h in handles:
            h.remove()
    assert len(checked) == m.cfg.llm.n_layers


def test_each_answer_tokens_attention_sums_to_one_over_crops_and_text(zoom):
    m, tok = zoom
    crops = crop_image(ROOT / "data" / "zoom" / "example.png", m.cfg.crops)
    prompt, answer = tok.encode_prompt("What digit is this page printed in?"), tok.encode("7 or 1")
    with torch.no_grad():
        block = m.image_block(torch.as_tensor(crops.pixels)[None])[0]
    per_layer = looked.answer_attention(m, block, prompt, answer)                 # (layers, n, S)
    assert per_layer.shape == (2, len(answer), block.shape[0] + len(prompt) + len(answer) - 1)
    for layer in per_layer:
        for row in layer:
            split = looked.shares(m.cfg, row[None])
            total = sum(c["share"] for c in split.crops) + split.text
            assert total == pytest.approx(1.0, abs=1e-5)
            assert sum(s for s, _ in split.levels.values()) == pytest.approx(float(row[:block.shape[0]].sum()), abs=1e-6)
    # the tiny zoom model: low 1 x (1 + 4x4 + 1), medium 4 x (1 + 2x2 + 1), high 36 x (1 + 2x2 + 1)
    assert {lv: n for lv, (_, n) in split.levels.items()} == {"low": 18, "medium": 24, "high": 216}


def test_zoom_answers_look_more_at_high_crops_than_at_the_low_crop_per_position(zoom, pages):
    # the demo's claim, on 50 held-out pages: the answer draws on the zoomed-in crops
    m, tok = zoom
    root, records = pages
    crops = [crop_image(root / r["image"], m.cfg.crops) for r in records]
    with torch.no_grad():
        blocks = m.image_block(torch.stack([torch.as_tensor(c.pixels) for c in crops]))   # (50, 258, dim)
    more, ratios = 0, []
    for r, block in zip(records, blocks):
        prompt = tok.encode_prompt(r["question"])
        with torch.no_grad():   # the model's own greedy answer: one digit token
            x = torch.cat([block, m.llm.embed(torch.tensor(prompt))])[None]
            answer = [int(m.llm(x, logits_from=-1)[0, -1].argmax())]
        assert tok.decode(answer) == r["answers"][0]
        levels = looked.shares(m.cfg, looked.answer_attention(m, block, prompt, answer).mean(dim=0)).levels
        ratio = (levels["high"][0] / levels["high"][1]) / (levels["low"][0] / levels["low"][1])
        ratios.append(ratio)
        more += ratio > 1
    print(f"high > low per position on {more} of 50 pages; median ratio {np.median(ratios):.2f}")
    assert more > 25 and np.median(ratios) > 1


def test_looking_leaves_no_hooks_behind(zoom):
    m, tok = zoom
    crops = crop_image(ROOT / "data" / "zoom" / "example.png", m.cfg.crops)
    looked.look(m, tok.encode_prompt("Which digit?"), tok.encode("7"), crops)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_v1_kept_high_crops_are_the_ones_in_the_image_block(v1_dir):
    from lib.tokenizer import Tokenizer
    m, tok = pretrained.load(v1_dir), Tokenizer.from_file(v1_dir)
    crops = crop_image(v1_dir / "image.png", m.cfg.crops)
    result = looked.look(m, tok.encode_prompt("What is this?"), tok.encode("a"), crops)
    assert len(result.kept) == 12 and result.kept == sorted(result.kept) and max(result.kept) < 24
    pixels = torch.as_tensor(crops.pixels)[None]
    with torch.no_grad():
        block, high = m.image_block(pixels)[0], m.encode(pixels)[-1][0]                    # (867, D), (24, 50, D)
    spans = [s for s in looked.crop_spans(m.cfg, result.kept) if s[0] == "high"]
    assert [i for _, i, _, _, _ in spans] == result.kept
    for _, i, start, end, _ in spans:   # each span holds that high crop's 50 tokens, then the separator
        torch.testing.assert_close(block[start:end - 1], high[i])


def test_sample_show_writes_the_picture_for_a_v1_checkpoint(v1_dir, tmp_path):
    png = tmp_path / "selected.png"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(v1_dir), "--image",
                        str(v1_dir / "image.png"), "--prompt", "What is this?", "--max-new-tokens", "3",
                        "--show", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "high" in r.stderr.splitlines()[-1]
    assert Image.open(png).size[0] >= 900


def test_sample_show_without_image_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(ZOOM), "--prompt", "hi",
                        "--show", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --show")


def test_eval_show_dir_draws_the_first_records(pages, tmp_path):
    from tools import eval as ev
    root, _ = pages
    ev.main(["--checkpoint", str(ZOOM), "--task", "zoom", "--data", str(root / "test.jsonl"), "--limit", "3",
             "--out", str(tmp_path / "out"), "--device", "cpu", "--show-dir", str(tmp_path / "show"), "--show-n", "2"])
    assert sorted(p.name for p in (tmp_path / "show").iterdir()) == ["test_00000.png", "test_00001.png"]

"""Our loaders and models against the reference implementations.

tests/tiny_checkpoints.py writes tiny random checkpoints in the released formats; the golden
files were produced from the same checkpoints by Hugging Face CLIPVisionModel / LlamaForCausalLM
/ CLIPImageProcessor and the release's processing rules (tests/make_golden.py, run by hand).
Tolerances: 1e-4 absolute on float32 activations and logits (the reference's own float32
rounding differs from ours by ~1e-6)."""
import numpy as np
import pytest
import torch

import model
import pool
from lib import pretrained
from lib import weights
from conftest import DEVICE, GOLDEN, image_token_ids
import tiny_checkpoints as tiny
from lib.images import crop_image

ATOL = 1e-4


def golden(name):
    return np.load(GOLDEN / name)


def close(ours, ref, atol=ATOL):
    np.testing.assert_allclose(ours.detach().float().cpu().numpy(), ref, atol=atol, rtol=0)


def on(array):
    """A golden's numpy array as a tensor on the device the checks run on (conftest.DEVICE)."""
    return torch.from_numpy(array).to(DEVICE)


def check_fingerprint(path, g):
    # the weights are regenerated from a seed: guard against a changed random stream
    assert tiny.fingerprint(path) == pytest.approx(float(g["weights_fingerprint"]), rel=1e-9)


@pytest.mark.parametrize("variant,fmt,file", [("l14-336", "safetensors", "vit_l14.npz"), ("b32-224", "bin", "vit_b32.npz")])
def test_vit_hidden_states_match_hugging_face_clip(tmp_path, variant, fmt, file):
    g = golden(file)
    check_fingerprint(tiny.write_tiny_clip(tmp_path, variant, fmt), g)
    vision = pretrained.load_clip_vision(tmp_path, device=DEVICE)
    pixels = tiny.make_test_pixels(*g["pixel_shape"][[0, 2]], seed=int(g["pixel_seed"]))
    assert pixels.astype(np.float64).sum() == pytest.approx(float(g["pixel_sum"]))
    x = on(pixels)
    with torch.no_grad():
        for layer in range(len(g["hidden_states"])):
            h = vision(x, layer=layer)
            close(h[:, g["token_idx"]], g["hidden_states"][layer])
            close(h.mean(1), g["hidden_states_token_mean"][layer])
        close(vision.pooled(x), g["pooled"])


@pytest.mark.parametrize("rope,file", [(None, "llama.npz"), ("llama3", "llama_rope3.npz")])
def test_llama_logits_and_greedy_ids_match_hugging_face(tmp_path, rope, file):
    g = golden(file)
    check_fingerprint(tiny.write_tiny_llama(tmp_path, rope_scaling=rope), g)
    llm = pretrained.load_llama(tmp_path, device=DEVICE)
    ids = on(g["input_ids"])
    with torch.no_grad():
        close(llm(llm.embed(ids)), g["logits"])
        close(llm(llm.embed(ids), on(g["gap_positions"]).expand_as(ids)), g["logits_gap"])
        seq = ids
        for _ in range(g["greedy_ids"].shape[1]):
            seq = torch.cat([seq, llm(llm.embed(seq), logits_from=-1).argmax(-1)], dim=1)
    assert seq[:, ids.shape[1]:].tolist() == g["greedy_ids"].tolist()


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def v2(request, tmp_path_factory):
    g = golden("dragonfly_v2.npz")
    path = tiny.write_tiny_dragonfly(tmp_path_factory.mktemp("v2"), "v2", request.param, seed=int(g["checkpoint_seed"]))
    check_fingerprint(path, g)
    return pretrained.load(path, device=DEVICE), g


def test_v2_image_token_layout_matches_the_release_processor(v2):
    m, g = v2
    block = image_token_ids(m.cfg)
    assert len(block) == 2098
    assert g["input_ids"].tolist() == block + g["text_ids"].tolist()


def test_v2_crops_match_the_release_preprocessing(v2):
    m, g = v2
    crops = crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops)
    assert list(crops.medium_grid) == g["medium_grid"].tolist()
    close(torch.from_numpy(crops.pixels.mean(axis=(2, 3))), g["crop_pixel_mean"], atol=1e-5)


def test_v2_image_embeddings_match(v2):
    m, g = v2
    pixels = on(crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops).pixels)[None]
    with torch.no_grad():
        close(m.vision(pixels[0, :1], layer=-2)[0, :8], g["vision_features_low_first8"])
        block = m.image_block(pixels)[0]
    close(block[:8], g["low_embeds_first8"])
    close(block[-38:-1], g["last_high_embeds"])  # the last high crop, before its separator


@pytest.mark.parametrize("with_image", [True, False])
def test_v2_logits_and_greedy_ids_match(v2, with_image):
    m, g = v2
    pre = "" if with_image else "text_only_"
    text = on(g["text_ids"] if with_image else g["text_only_input_ids"])[None]
    crops = crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops) if with_image else None
    with torch.no_grad():
        logits, _ = m(text, None if crops is None else on(crops.pixels)[None])
    step = int(g["vocab_step"])
    close(logits[0, -1], g[pre + "logits_last"])
    close(logits[0, :, ::step], g[pre + "logits_text_sub"])
    ids = [int(t[0]) for t, _ in m.generate([text[0].tolist()], [crops], max_new_tokens=len(g[pre + "greedy_ids"]))]
    assert ids == g[pre + "greedy_ids"].tolist()


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    g = golden("dragonfly_v1.npz")
    path = tiny.write_tiny_dragonfly(tmp_path_factory.mktemp("v1"), "v1", "bin", seed=int(g["checkpoint_seed"]))
    check_fingerprint(path, g)
    m = pretrained.load(path, device=DEVICE)
    return m, g, crop_image(GOLDEN / str(g["image_file"]), m.cfg.crops)


def test_v1_checkpoint_is_recognised_from_its_vision_tower(v1):
    m, g, crops = v1
    assert (m.cfg.vit.image_size, m.cfg.vit.patch_size, m.cfg.zoom_select) == (224, 32, "release")
    assert list(crops.medium_grid) == g["medium_grid"].tolist() and list(crops.high_grid) == g["high_grid"].tolist()
    close(torch.from_numpy(crops.pixels.mean(axis=(2, 3))), g["crop_pixel_mean"], atol=1e-5)


@pytest.mark.parametrize("rule", ["release", "spatial"])
def test_v1_zoom_selection_matches_the_release_rule(v1, rule):
    m, g, crops = v1
    with torch.no_grad():
        tokens = m.projection(m.vision(on(crops.pixels), layer=m.cfg.vision_layer))  # (29, 50, D)
    medium, high = tokens[None, 1:5], tokens[None, 5:]
    close(pool.summary(high[0]) @ pool.summary(medium[0]).T, g["summary_scores"].T, atol=1e-5)
    m.cfg.zoom_select = rule
    try:
        idx = m.select_high(medium, high, [crops.medium_grid], [crops.high_grid])
    finally:
        m.cfg.zoom_select = "release"
    assert idx[0].tolist() == g[f"selected_{rule}"].tolist()


def test_v1_spatial_regions_match_the_reference(v1):
    _, g, crops = v1
    regions = pool.spatial_regions(crops.high_grid, crops.medium_grid)
    region_of = {h: i for i, r in enumerate(regions) for h in r}
    assert [region_of[h] for h in range(24)] == g["high_region_spatial"].tolist()
    assert g["high_region_release"].tolist() == [h // 6 for h in range(24)]


def test_v1_logits_and_greedy_ids_match(v1):
    m, g, crops = v1
    assert g["input_ids"].tolist() == image_token_ids(m.cfg) + g["text_ids"].tolist()
    text = on(g["text_ids"])[None]
    with torch.no_grad():
        logits, _ = m(text, on(crops.pixels)[None])
    close(logits[0, -1], g["logits_last"])
    close(logits[0, :, ::int(g["vocab_step"])], g["logits_text_sub"])
    ids = [int(t[0]) for t, _ in m.generate([text[0].tolist()], [crops], max_new_tokens=len(g["greedy_ids"]))]
    assert ids == g["greedy_ids"].tolist()


def test_converted_safetensors_directory_gives_identical_logits(tmp_path):
    g = golden("dragonfly_v2.npz")
    src = tiny.write_tiny_dragonfly(tmp_path / "bin", "v2", "bin", seed=int(g["checkpoint_seed"]))
    weights.convert_to_safetensors(src, tmp_path / "st")
    assert not list((tmp_path / "st").glob("*.bin"))
    text = on(g["text_only_input_ids"])[None]
    with torch.no_grad():
        a = pretrained.load(src, device=DEVICE)(text)[0]
        b = pretrained.load(tmp_path / "st", device=DEVICE)(text)[0]
    assert torch.equal(a, b)


def test_from_backbones_loads_clip_and_llama_checkpoints(tmp_path):
    tiny.write_tiny_clip(tmp_path / "clip", "l14-336", "bin")
    tiny.write_tiny_llama(tmp_path / "llama")
    m = pretrained.from_backbones(tmp_path / "clip", tmp_path / "llama")
    ref = pretrained.load_clip_vision(tmp_path / "clip")
    assert all(torch.equal(a, b) for a, b in zip(m.vision.parameters(), ref.parameters()))
    assert m.cfg.llm.vocab_size == 512 and m.projection.weight.shape == (64, 128)

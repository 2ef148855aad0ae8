"""presets.py: the papers' token counts and FLOPs (v2 Table 11, appendix F), and every preset
building and running at toy widths with the exact image-block length it promises."""
import numpy as np
import pytest
import torch
from PIL import Image

import crops as crops_lib
import model
from lib import pretrained
from lib import presets
from lib.presets import PRESETS
from tools import presets as presets_cli


def test_paper_token_totals():
    counts = {name: presets.image_tokens_paper(PRESETS[name]) for name in
              ("dragonfly-v2", "dragonfly-star", "llava-1.5-hd", "v2-dual-encoder", "v2-resampler", "v2-M144-from-native")}
    assert counts == {"dragonfly-v2": 2016, "dragonfly-star": 784, "llava-1.5-hd": 2880,
                      "v2-dual-encoder": 2536, "v2-resampler": 2016, "v2-M144-from-native": 576}


def test_release_positions_add_cls_and_separators():
    assert model.image_positions(PRESETS["dragonfly-v2"]) == 2098
    assert model.image_positions(PRESETS["dragonfly-v1"]) == 867
    assert model.image_positions(PRESETS["v1-baseline-2"]) == 867  # v1 §4.1: as many crops as Dragonfly


def test_table_11_from_the_appendix_formula():
    tflops = lambda name: round(presets.flops(PRESETS[name]) / 1e12, 2)
    assert tflops("llava-1.5-hd") == 40.33   # the listing's comment says 40.40
    assert tflops("dragonfly-v2") == 41.65
    assert tflops("dragonfly-star") == 25.27  # Table 11 prints 25.10
    assert round(presets.paper_flops(6, 384) / 1e12, 2) == 6.91  # LLaVA-UHD, not built


def test_config_flops_equal_the_listing_with_its_inputs():
    assert presets.flops(PRESETS["dragonfly-v2"]) == presets.paper_flops(41, 2016)
    assert presets.flops(PRESETS["llava-1.5-hd"]) == presets.paper_flops(5, 2880)


def test_as_built_flops_count_the_release_layout_and_text():
    cfg = PRESETS["dragonfly-v2"]
    with_text = presets.flops(cfg, text_tokens=100, paper=False)
    assert with_text > presets.flops(cfg, paper=False) > presets.flops(cfg)


def test_training_flops_follow_the_trainable_parts():
    cfg, T = PRESETS["dragonfly-v2"], 200
    parts = presets.flops_parts(cfg, T, paper=False)
    forward = sum(parts.values())
    assert presets.train_flops_per_sample(cfg, T) == pytest.approx(3 * forward)
    stage1 = parts["vision"] + 3 * parts["projection"] + 2 * parts["llm"]  # frozen ViT needs no backward
    assert presets.train_flops_per_sample(cfg, T, ("projection",)) == pytest.approx(stage1)
    with pytest.raises(ValueError, match="unknown trainable"):
        presets.train_flops_per_sample(cfg, T, ("lm",))


def test_text_only_samples_cost_only_the_llm():
    cfg = PRESETS["dragonfly-v2"]
    parts = presets.flops_parts(cfg, 50, paper=False, image=False)
    assert parts["vision"] == parts["projection"] == 0 and parts["llm"] > 0


def test_tiny_keeps_the_geometry():
    for name, cfg in PRESETS.items():
        assert model.image_positions(presets.tiny(cfg)) == model.image_positions(cfg), name


def random_image(w=60, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_at_toy_width_with_its_promised_positions(name):
    torch.manual_seed(0)
    cfg = presets.tiny(PRESETS[name])
    m = model.Dragonfly(cfg).eval()
    c = crops_lib.make_crops(random_image(), cfg.crops)
    assert len(c.pixels) == sum(n for _, n, _ in model.crop_levels(cfg))
    with torch.no_grad():
        block = m.image_block(torch.from_numpy(c.pixels)[None], [c.medium_grid], [c.high_grid])
    assert block.shape == (1, model.image_positions(cfg), cfg.llm.dim)
    assert torch.isfinite(block).all()


def test_dual_encoder_sends_the_low_crop_through_its_own_vit_and_projection():
    torch.manual_seed(0)
    cfg = presets.tiny(PRESETS["v2-dual-encoder"])
    m = model.Dragonfly(cfg).eval()
    assert m.vision_low.cfg.patches_per_side == 24 and m.vision.cfg.patches_per_side == 7
    pixels = torch.from_numpy(crops_lib.make_crops(random_image(), cfg.crops).pixels)[None]  # (1, 41, 3, 24, 24)
    with torch.no_grad():
        block = m.image_block(pixels)
        low = m.projection_low(m.vision_low(pixels[:, 0], layer=cfg.vision_layer))        # (1, 577, D)
    torch.testing.assert_close(block[:, :577], low)
    assert block.shape[1] == 578 + 40 * (50 + 1)


def test_resampler_replaces_pooling_and_learns():
    torch.manual_seed(0)
    cfg = presets.tiny(PRESETS["v2-resampler"])
    m = model.Dragonfly(cfg)
    assert m.resampler.latents.shape == (36, cfg.vit.width)
    pixels = torch.from_numpy(crops_lib.make_crops(random_image(), cfg.crops).pixels)[None]
    tokens = torch.tensor([[128000, 15339, 1917, 13]])
    _, loss = m(tokens, pixels, labels=tokens)
    loss.backward()
    assert torch.isfinite(loss) and m.resampler.latents.grad.abs().sum() > 0


def test_medium_from_low_cuts_the_low_crop():
    cfg = PRESETS["v2-M144-from-low"].crops
    S, img = 24, random_image(90, 50)
    zoomed = crops_lib.make_crops(img, crops_lib.CropConfig(size=S, medium_grids=((2, 2),), low=False, high=False,
                                                           from_low=True)).pixels
    low_first = crops_lib.make_crops(img.resize((S, S), Image.BICUBIC),
                                     crops_lib.CropConfig(size=S, medium_grids=((2, 2),), low=False, high=False)).pixels
    native = crops_lib.make_crops(img, crops_lib.CropConfig(size=S, medium_grids=((2, 2),), low=False, high=False)).pixels
    assert cfg.from_low and np.array_equal(zoomed, low_first) and not np.array_equal(zoomed, native)


@pytest.mark.parametrize("name", ["v2-dual-encoder", "v2-resampler"])
def test_ablation_models_round_trip_through_save_pretrained(tmp_path, name):
    torch.manual_seed(0)
    m = model.Dragonfly(presets.tiny(PRESETS[name]))
    pretrained.save(m, tmp_path, dtype=torch.float32)
    loaded = pretrained.load(tmp_path)
    assert loaded.cfg == m.cfg
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))


def test_cli_describes_a_preset_and_tabulates_all(capsys):
    assert presets_cli.main(["--describe", "dragonfly-star"]) == 0
    out = capsys.readouterr().out
    assert "784" in out and "866" in out and "25.27" in out
    assert presets_cli.main(["--table"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + len(PRESETS) + 1  # header, rows, UHD
    assert presets_cli.main(["--describe", "llava-uhd"]) == 0 and "not built" in capsys.readouterr().out
    assert presets_cli.main(["--describe", "no-such"]) == 1


def test_describe_says_what_as_built_means_beside_the_paper_figure():
    text = presets.describe("dragonfly-v2")
    explained = [line for line in text.splitlines() if "the paper's figure" in line and "as built:" in line]
    assert len(explained) == 1
    assert "2016 paper tokens" in explained[0] and "2098 positions" in explained[0]

"""Make the golden reference outputs in tests/golden/ (run by hand: python tests/make_golden.py).

The only file of the project that imports transformers. It writes the tiny checkpoints of
tests/tiny_checkpoints.py into a temporary directory, runs them through the Hugging Face
reference models (CLIPVisionModel, LlamaForCausalLM, CLIPImageProcessorPil) in float32, and
saves what they give. The Dragonfly pipelines are rebuilt here from those parts, following
docs/release-facts.md#crop-grids to docs/release-facts.md#zoom-in-selection and
the release code (togethercomputer/Dragonfly):

  v2  src/dragonfly/models/processing_dragonfly.py: process_anyres_image (low = resize to 336,
      medium = best fit of (672,672),(336,1344),(1344,336), high = 3x medium, row-major tiles),
      image block first, 577 + 1 separator, then 40 x (37 + 1); modeling_dragonfly.py:
      hidden_states[-2], vision_embed_tokens on every token, then per medium/high crop CLS +
      avg_pool2d(kernel 4, stride 4) of the 24x24 grid.
  v1  src/dragonfly/models/dragonfly/*: 224px crops, low + 4 medium kept whole (50 tokens),
      24 high crops; summary = mean over all 50 projected tokens (CLS included) of
      hidden_states[-2]; medium crop i scores the high crops by dot product and keeps the top 3
      of the index run [6i, 6i + 6); the 12 picks are sorted ascending.

The CLIP crops use CLIPImageProcessorPil (transformers 5 keeps the PIL path under that name;
CLIPImageProcessor itself wants torchvision), checked here against the plain formula.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (CLIPImageProcessorPil, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          LlamaConfig, LlamaForCausalLM)
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_checkpoints as tc  # noqa: E402
from make_golden_crops import best_fit  # noqa: E402  (LLaVA-NeXT select_best_resolution)

GOLDEN = Path(__file__).resolve().parent / "golden"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
BOS, PLACEHOLDER, SEPARATOR = 128000, 128002, 128003
QUESTION = "What shape is in the top left corner of this image?"
# <|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
# tokenized with the Llama 3 tokenizer (tiktoken, Meta's tokenizer.model); bos comes first
PROMPT_IDS = [128006, 882, 128007, 271, 3923, 6211, 374, 304, 279, 1948, 2163, 9309, 315, 420, 2217,
              30, 128009, 128006, 78191, 128007, 271]
TEXT_IDS = [BOS] + PROMPT_IDS
VOCAB_STEP = 193  # logits at every text position are kept for vocab columns ::193 (size cap)
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit at every greedy step, so argmax is well defined

torch.set_num_threads(2)
torch.manual_seed(0)
hf_logging.set_verbosity_error()


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:6.1f}s] {msg}", flush=True)


def save(name, **arrays):
    path = GOLDEN / name
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    log(f"wrote {path.name}: {path.stat().st_size / 1024:.0f} KiB")
    return path


# ---------------------------------------------------------------------------------------------
# CLIP ViT and Llama against their tiny Hugging Face-format checkpoints

def vit_golden(variant, fmt, name, tmp):
    d = tc.write_tiny_clip(tmp / f"clip-{variant}", variant, fmt)
    model, info = CLIPVisionModel.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                  output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    full, info = CLIPModel.from_pretrained(d, output_loading_info=True)  # names of the text tower too
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    del full
    size = tc.CLIP_VARIANTS[variant]["image_size"]
    pixels = tc.make_test_pixels(2, size, seed=1234)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
        first = model.pre_layrnorm(model.embeddings(torch.from_numpy(pixels)))
    hs = torch.stack(out.hidden_states).numpy()  # (4, 2, T, 128): after pre_layrnorm, blocks 1..3
    assert hs.shape[0] == 4 and np.array_equal(hs[-1], out.last_hidden_state.numpy())
    assert np.allclose(hs[0], first.numpy(), atol=1e-6)
    n_tok = hs.shape[2]
    token_idx = np.arange(0, n_tok, 48 if n_tok > 100 else 7)  # the token mean covers the rest
    save(name,
         pixel_seed=1234, pixel_shape=np.array(pixels.shape),
         pixel_probe=pixels.reshape(-1)[:16], pixel_sum=np.float64(pixels.astype(np.float64).sum()),
         token_idx=token_idx,
         hidden_states=hs[:, :, token_idx],
         hidden_states_token_mean=hs.mean(axis=2),
         pooled=out.pooler_output.numpy(),
         weights_fingerprint=tc.fingerprint(d))


def greedy_ids(step_logits, steps, append):
    """Greedy decoding by full recompute; returns ids and top-1 minus top-2 margins."""
    ids, margins = [], []
    for _ in range(steps):
        logits = step_logits()  # (B, V) at the last position
        top2 = torch.topk(logits, 2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).numpy())
        nxt = logits.argmax(-1)
        ids.append(nxt.numpy())
        append(nxt)
    return np.stack(ids, axis=1), np.stack(margins, axis=1)


def llama_inv_freq(head_dim, rope_scaling, theta=500000.0):
    """RoPE frequencies, with the Llama 3.1 rule when asked: wavelengths above
    8192 / low_freq_factor are divided by 8, those below 8192 / high_freq_factor kept, and the
    band between blended linearly in 8192 / wavelength."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope_scaling is None:
        return inv
    s = tc.LLAMA3_ROPE_SCALING
    old = s["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv / s["factor"] + smooth * inv
    out = torch.where(wavelen > old / s["low_freq_factor"], inv / s["factor"], inv)
    middle = (wavelen <= old / s["low_freq_factor"]) & (wavelen >= old / s["high_freq_factor"])
    return torch.where(middle, blended, out)


# RoPE only sees relative positions, so a plain offset (100..111) gives the logits of 0..11 back;
# a jump in the middle is what makes position handling (and llama3 scaling) show.
GAP_POSITIONS = list(range(100, 106)) + list(range(3100, 3106))


def llama_golden(rope_scaling, name, tmp):
    d = tc.write_tiny_llama(tmp / f"llama-{rope_scaling}", rope_scaling)
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    assert torch.allclose(model.model.rotary_emb.inv_freq, llama_inv_freq(tc.LLM["hidden_size"] // tc.LLM["num_attention_heads"], rope_scaling), rtol=1e-6)
    for seed in range(7, 100):
        ids = torch.from_numpy(np.random.default_rng(seed).integers(0, 512, (2, 12)))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            pos = torch.tensor(GAP_POSITIONS)[None].expand(2, -1)
            logits_gap = model(input_ids=ids, position_ids=pos).logits
            seq = [ids]
            gen, margins = greedy_ids(lambda: model(input_ids=torch.cat(seq, 1)).logits[:, -1], 8,
                                      lambda t: seq.append(t[:, None]))
        if margins.min() > MIN_MARGIN:
            break
    save(name, input_ids=ids.numpy(), ids_seed=seed, logits=logits.numpy(),
         gap_positions=pos[0].numpy(), logits_gap=logits_gap.numpy(),
         greedy_ids=gen, greedy_margins=margins, weights_fingerprint=tc.fingerprint(d))
    return logits_gap


# ---------------------------------------------------------------------------------------------
# Dragonfly, rebuilt from the Hugging Face parts

def load_dragonfly(d):
    """HF CLIPVisionModel + LlamaForCausalLM + projection from a tiny Dragonfly directory,
    built as the release does: the LLM from config.text_config, the ViT from the weights."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    sd = {k: v.float() for k, v in tc.load_tensors(d).items()}
    # transformers 5's CLIPVisionModel has no "vision_model." level (from_pretrained maps it)
    pre = "image_encoder.vision_model."
    vis = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    width, _, patch, _ = vis["embeddings.patch_embedding.weight"].shape
    grid = int(round((vis["embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in vis if k.startswith("encoder.layers."))
    vcfg = CLIPVisionConfig(hidden_size=width, intermediate_size=vis["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch,
                            patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    vision = CLIPVisionModel._from_config(vcfg, attn_implementation="eager")
    vision.load_state_dict(vis, strict=True)
    lcfg = LlamaConfig(**cfg["text_config"])  # CONFIG_MAPPING["llama"](**text_config), as released
    llm = LlamaForCausalLM._from_config(lcfg, attn_implementation="eager")
    llm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")},
                        strict=True)
    head_dim = lcfg.hidden_size // lcfg.num_attention_heads
    want = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert torch.allclose(llm.model.rotary_emb.inv_freq, want), "rope_theta/rope_scaling not as released"
    vision.eval(), llm.eval()
    return vision, llm, sd["vision_embed_tokens.weight"], sd["vision_embed_tokens.bias"]


def tiles(img, se):
    w, h = img.size
    return [img.crop((x, y, x + se, y + se)) for y in range(0, h, se) for x in range(0, w, se)]


def clip_pixels(crops, se):
    proc = CLIPImageProcessorPil(size={"shortest_edge": se}, crop_size={"height": se, "width": se})
    px = torch.stack([proc.preprocess(c, return_tensors="pt")["pixel_values"][0] for c in crops])
    plain = np.stack([((np.asarray(c, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
                      for c in crops])
    err = np.abs(px.numpy() - plain).max()
    assert err < 1e-5, f"CLIPImageProcessorPil differs from the plain formula by {err}"
    return px


def encode(vision, proj_w, proj_b, pixels):
    """(N, 3, S, S) -> (N, T, D): penultimate block output, no post-LN, CLS kept, projected."""
    with torch.no_grad():
        feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return feats, feats @ proj_w.T + proj_b


def llm_logits(llm, embeds, keep):
    with torch.no_grad():
        pos = torch.arange(embeds.shape[0])[None]
        return llm(inputs_embeds=embeds[None], position_ids=pos, logits_to_keep=keep).logits[0]


def run_text(llm, block_ids, block_embeds, steps=6):
    """LLM over [image block] + bos + prompt: last-position logits, text-position logits
    subset, greedy continuation (full recompute each step)."""
    table = llm.model.embed_tokens.weight.detach()
    ids = list(block_ids) + TEXT_IDS
    embeds = torch.cat([block_embeds, table[torch.tensor(TEXT_IDS)]]) if len(block_ids) else table[torch.tensor(ids)]
    logits = llm_logits(llm, embeds, len(TEXT_IDS))
    seq = [embeds]
    gen, margins = greedy_ids(lambda: llm_logits(llm, torch.cat(seq), 1)[-1:],
                              steps, lambda t: seq.append(table[t]))
    return dict(input_ids=np.array(ids, dtype=np.int64), logits_last=logits[-1].numpy(),
                logits_text_sub=logits[:, ::VOCAB_STEP].numpy(), greedy_ids=gen[0], greedy_margins=margins[0])


def image_block(per_crop, table):
    """Each crop's tokens then one separator; placeholders in input_ids where embeddings go."""
    ids, embeds = [], []
    for tok in per_crop:
        ids += [PLACEHOLDER] * tok.shape[0] + [SEPARATOR]
        embeds += [tok, table[SEPARATOR][None]]
    return ids, torch.cat(embeds)


def dragonfly_v2(tmp, image_path, image_size=(500, 300), image_seed=0):
    tc.make_test_image(*image_size, seed=image_seed).save(image_path, optimize=True)
    img = Image.open(image_path).convert("RGB")
    se = 336
    medium_size = best_fit(img.size, [(2 * se, 2 * se), (se, 4 * se), (4 * se, se)])
    high_size = (3 * medium_size[0], 3 * medium_size[1])
    crops = [img.resize((se, se))] + tiles(img.resize(medium_size), se) + tiles(img.resize(high_size), se)
    assert len(crops) == 41
    pixels = clip_pixels(crops, se)
    for seed in range(20):
        d = tc.write_tiny_dragonfly(tmp / f"dragonfly-v2-{seed}", "v2", "bin", seed=seed)
        vision, llm, pw, pb = load_dragonfly(d)
        feats, proj = encode(vision, pw, pb, pixels)  # (41, 577, 128), (41, 577, 64)
        low = proj[0]  # (577, 64)
        g = proj[1:, 1:].reshape(40, 24, 24, -1).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(g, kernel_size=4, stride=4).permute(0, 2, 3, 1).reshape(40, 36, -1)
        pooled = torch.cat([proj[1:, :1], pooled], dim=1)  # (40, 37, 64): CLS first
        table = llm.model.embed_tokens.weight.detach()
        block_ids, block = image_block([low] + list(pooled), table)
        assert len(block_ids) == 2098
        with_image = run_text(llm, block_ids, block)
        text_only = run_text(llm, [], None)
        worst = min(with_image["greedy_margins"].min(), text_only["greedy_margins"].min())
        log(f"dragonfly v2 checkpoint seed {seed}: smallest greedy margin {worst:.2e}")
        if worst > MIN_MARGIN:
            break
    save("dragonfly_v2.npz",
         checkpoint_seed=seed, weights_fingerprint=tc.fingerprint(d),
         image_file=image_path.name, image_size=np.array(image_size), image_seed=image_seed,
         question=QUESTION, text_ids=np.array(TEXT_IDS),
         medium_size=np.array(medium_size), medium_grid=np.array([medium_size[0] // se, medium_size[1] // se]),
         high_size=np.array(high_size),
         crop_pixel_mean=pixels.mean(dim=(2, 3)).numpy(),
         vision_features_low_first8=feats[0, :8].numpy(),
         low_embeds_first8=low[:8].numpy(), last_high_embeds=pooled[-1].numpy(),
         **with_image, vocab_step=VOCAB_STEP,
         **{f"text_only_{k}": v for k, v in text_only.items()})


def spatial_regions(medium_grid, high_grid):
    """Paper reading: high crop (r, c) belongs to the medium crop that holds its centre."""
    (mw, mh), (hw, hh) = medium_grid, high_grid
    return np.array([((r + 0.5) * mh // hh) * mw + ((c + 0.5) * mw // hw) for r in range(hh) for c in range(hw)],
                    dtype=np.int64)


def zoom_select(scores, region, k=3):
    """For medium crop i keep the top-k high crops of region i; all picks sorted ascending."""
    picks, gaps = [], []
    for i in range(scores.shape[0]):
        s = scores[i].clone()
        s[torch.from_numpy(region != i)] = float("-inf")
        top = torch.topk(s, k + 1 if (region == i).sum() > k else k)
        picks += top.indices[:k].tolist()
        if len(top.values) > k:
            gaps.append((top.values[k - 1] - top.values[k]).item())
    return np.sort(np.array(picks)), min(gaps)


def dragonfly_v1(tmp, image_path, image_size=(700, 1050), image_seed=1):
    tc.make_test_image(*image_size, seed=image_seed).save(image_path, optimize=True)
    img = Image.open(image_path).convert("RGB")
    se = 224
    medium_size = best_fit(img.size, [(2 * se, 2 * se), (se, 4 * se), (4 * se, se)])
    high_size = best_fit(img.size, [(6 * se, 4 * se), (4 * se, 6 * se), (3 * se, 8 * se), (8 * se, 3 * se),
                                    (2 * se, 12 * se), (12 * se, 2 * se)])
    medium_grid = (medium_size[0] // se, medium_size[1] // se)
    high_grid = (high_size[0] // se, high_size[1] // se)
    crops = [img.resize((se, se))] + tiles(img.resize(medium_size), se) + tiles(img.resize(high_size), se)
    assert len(crops) == 29
    pixels = clip_pixels(crops, se)
    region_release = np.arange(24) // 6  # the release: index runs [6i, 6i + 6)
    region_spatial = spatial_regions(medium_grid, high_grid)
    for seed in range(20):
        d = tc.write_tiny_dragonfly(tmp / f"dragonfly-v1-{seed}", "v1", "bin", seed=seed)
        vision, llm, pw, pb = load_dragonfly(d)
        feats, proj = encode(vision, pw, pb, pixels)  # (29, 50, 128), (29, 50, 64)
        summary = proj.mean(dim=1)  # (29, 64), CLS included
        scores = summary[1:5] @ summary[5:].T  # (4 medium, 24 high)
        sel_release, gap_r = zoom_select(scores, region_release)
        sel_spatial, gap_s = zoom_select(scores, region_spatial)
        rel_gap = min(gap_r, gap_s) / scores.abs().max().item()
        table = llm.model.embed_tokens.weight.detach()
        block_ids, block = image_block([proj[i] for i in range(5)] + [proj[5 + j] for j in sel_release], table)
        assert len(block_ids) == 867
        out = run_text(llm, block_ids, block)
        log(f"dragonfly v1 checkpoint seed {seed}: top-3/4 gap {rel_gap:.2e}, "
            f"smallest greedy margin {out['greedy_margins'].min():.2e}")
        if rel_gap > 1e-3 and out["greedy_margins"].min() > MIN_MARGIN:
            break
    save("dragonfly_v1.npz",
         checkpoint_seed=seed, weights_fingerprint=tc.fingerprint(d),
         image_file=image_path.name, image_size=np.array(image_size), image_seed=image_seed,
         question=QUESTION, text_ids=np.array(TEXT_IDS),
         medium_size=np.array(medium_size), medium_grid=np.array(medium_grid),
         high_size=np.array(high_size), high_grid=np.array(high_grid),
         crop_pixel_mean=pixels.mean(dim=(2, 3)).numpy(),
         summary_scores=scores.numpy(),
         high_region_release=region_release, high_region_spatial=region_spatial,
         selected_release=sel_release, selected_spatial=sel_spatial,
         **out, vocab_step=VOCAB_STEP)


# ---------------------------------------------------------------------------------------------

DESCRIPTIONS = {
    "vit_l14.npz": "HF CLIPVisionModel (eager, fp32) on write_tiny_clip('l14-336', 'safetensors'); input "
                   "make_test_pixels(2, 336, seed=1234); hidden_states[0] is after pre_layrnorm, [1..3] the "
                   "block outputs, at token_idx (every 48th token) plus the mean over all tokens; pooled is "
                   "post_layernorm(CLS).",
    "vit_b32.npz": "same for write_tiny_clip('b32-224', 'bin') and make_test_pixels(2, 224, seed=1234); every 7th token.",
    "llama.npz": "HF LlamaForCausalLM (eager, fp32) on write_tiny_llama(rope_scaling=None): logits for input_ids "
                 "at positions 0..11 and at gap_positions 100..105, 3100..3105 (a pure offset would change "
                 "nothing under RoPE); greedy 8 tokens from positions 0..11, full recompute.",
    "llama_rope3.npz": "same weights with rope_scaling='llama3' (Llama-3.1 config); the gap logits differ from "
                       "llama.npz, the plain ones barely.",
    "dragonfly_v2.npz": "v2 pipeline (docs/release-facts.md#image-block, release processing/modeling) rebuilt from HF parts on "
                        "write_tiny_dragonfly(seed=checkpoint_seed, 'v2', 'bin') and dragonfly_image.png: 41 crops "
                        "-> 2098-position image block -> bos + prompt; text_only_* is bos + prompt alone. "
                        "logits_text_sub is logits[:, ::193] over the text positions; greedy 6 tokens.",
    "dragonfly_v1.npz": "v1 pipeline (docs/release-facts.md#v1-pipeline, release dragonfly/ code) on write_tiny_dragonfly(seed=checkpoint_seed, "
                        "'v1', 'bin') and dragonfly_v1_image.png: 29 crops, zoom selection by index runs "
                        "(selected_release, used for the logits) and by spatial regions (selected_spatial); "
                        "867-position image block -> bos + prompt.",
    "dragonfly_image.png": "make_test_image(500, 300, seed=0), the v2 input.",
    "dragonfly_v1_image.png": "make_test_image(700, 1050, seed=1), the v1 input (medium 2x2, high 4x6).",
}


def write_readme(files):
    lines = ["<!-- make_golden:begin (generated by tests/make_golden.py; edit there) -->",
             "Made by `python tests/make_golden.py` (transformers " + __import__("transformers").__version__ +
             ", torch " + torch.__version__ + ", numpy " + np.__version__ + "). Arrays are float32 unless noted; "
             "weights_fingerprint is tiny_checkpoints.fingerprint() of the checkpoint used.", ""]
    for f in files:
        lines.append(f"### {f.name} ({f.stat().st_size / 1024:.0f} KiB)")
        lines.append(DESCRIPTIONS[f.name])
        if f.suffix == ".npz":
            with np.load(f) as z:
                lines.append("")
                for k in z.files:
                    a = z[k]
                    lines.append(f"- `{k}` {a.dtype} {list(a.shape)}" + (f" = {a.tolist()!r}" if a.size <= 12 else ""))
        lines.append("")
    lines.append("<!-- make_golden:end -->")
    block = "\n".join(lines)
    readme = GOLDEN / "README.md"
    old = readme.read_text() if readme.exists() else "# Golden reference data\n\n"
    if "<!-- make_golden:begin" in old:
        head, rest = old.split("<!-- make_golden:begin", 1)
        tail = rest.split("<!-- make_golden:end -->", 1)[1]
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(new)


def main():
    start = time.time()
    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vit_golden("l14-336", "safetensors", "vit_l14.npz", tmp)
        vit_golden("b32-224", "bin", "vit_b32.npz", tmp)
        plain = llama_golden(None, "llama.npz", tmp)
        scaled = llama_golden("llama3", "llama_rope3.npz", tmp)
        diff = (plain - scaled).abs().max().item()
        log(f"llama3 rope scaling changes the gap-position logits by up to {diff:.3e}")
        assert diff > 1e-2, "rope scaling does not show in the goldens"
        dragonfly_v2(tmp, GOLDEN / "dragonfly_image.png")
        dragonfly_v1(tmp, GOLDEN / "dragonfly_v1_image.png")
    files = [GOLDEN / n for n in DESCRIPTIONS]
    write_readme(files)
    sizes = {f.name: f.stat().st_size for f in files}
    model = sum(v for k, v in sizes.items() if k.endswith(".npz"))
    log(f"model goldens {model / 2**20:.2f} MiB, with images {sum(sizes.values()) / 2**20:.2f} MiB; "
        f"tests/golden total {sum(f.stat().st_size for f in GOLDEN.iterdir()) / 2**20:.2f} MiB; "
        f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

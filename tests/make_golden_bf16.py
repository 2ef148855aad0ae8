"""Make the bfloat16 golden references (run by hand, with the release's own stack):

    python -m venv /tmp/gv && /tmp/gv/bin/pip install torch==2.13.0 transformers==4.45.2 pillow safetensors
    /tmp/gv/bin/python tests/make_golden_bf16.py

The release runs (test_dragonfly.py) and was trained (DeepSpeed bf16) with the whole module cast
to bfloat16 under transformers 4.45: `model.to(torch.bfloat16)` also rounds Llama's RoPE
`inv_freq` buffer, cos/sin are cast to bf16 and the rotation runs in bf16
(docs/release-facts.md#bf16-numerics). This script rebuilds the release's forward pass from
transformers 4.45.2's own modules (CLIPVisionModel, LlamaForCausalLM, SDPA attention as
`from_pretrained` picks it), casts it the release's way and decodes greedily with its KV cache:

  v2  modeling_dragonfly.py (main): all 41 crops through the ViT, hidden_states[-2],
      vision_embed_tokens on every token, CLS + avg_pool2d(4, 4) per medium/high crop, the
      embeddings written over the placeholders of the processor's input_ids (2098 positions).
  v1  models/dragonfly/modeling_dragonfly.py (dragonfly-v1): high crops and low+medium crops
      in two ViT calls; summaries are bf16 means; medium crop i scores all 24 high crops,
      adds a float32 -inf mask outside [6i, 6i + 6), top-3; picks sorted (867 positions).

The LLM has head width 128 (tiny_checkpoints.LLM_HEAD128), so the 64 RoPE frequencies are
Llama-3-8B's and their bf16 rounding moves the logits at positions 2098+ and 867+. The script
also runs the pre-fix numerics (float32 frequencies, rotation in float32, the rest in bf16)
and keeps only a checkpoint seed where they fail the golden: the greedy ids part and the
first-token logits move by more than twice the tests' tolerance.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_checkpoints as tc  # noqa: E402
from make_golden_crops import best_fit  # noqa: E402

assert transformers.__version__ == "4.45.2", "the release's stack: transformers 4.45.2"
GOLDEN = Path(__file__).resolve().parent / "golden"
BOS, PLACEHOLDER, SEPARATOR = 128000, 128002, 128003
QUESTION = "What shape is in the top left corner of this image?"
# bos + user turn + assistant header, Llama-3 tokenizer ids (as tests/make_golden.py)
TEXT_IDS = [BOS, 128006, 882, 128007, 271, 3923, 6211, 374, 304, 279, 1948, 2163, 9309, 315, 420, 2217,
            30, 128009, 128006, 78191, 128007, 271]
STEPS = 12
VOCAB_STEP = 97          # first-token logits kept at vocab columns ::97, plus the top 16
MARGIN_ULPS = 1          # each greedy step has a strict winner (top-1 > top-2 in bf16); other CPU kernels
                         # may flip a near tie, which test_release_bf16.py's teacher-forced check allows
TOLERANCE_ULPS = 16      # test_release_bf16.KERNEL_ULPS: the tests' bound on |ours - golden| first-token
                         # logits in ulps of max |logit| (the spread between CPU kernels, measured by
                         # tests/measure_kernel_spread.py); the float32-RoPE numerics must miss it twice over

torch.set_num_threads(2)
hf_logging.set_verbosity_error()


def log(msg, t0=[time.time()]):
    print(f"[{time.time() - t0[0]:6.1f}s] {msg}", flush=True)


def release_model(d):
    """The released DragonflyForCausalLM's parts, loaded in float32 from the bf16 files and cast
    with one `.to(torch.bfloat16)`, as test_dragonfly.py does."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    sd = {k: v.float() for k, v in tc.load_tensors(d).items()}
    vis = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    width, _, patch, _ = vis["vision_model.embeddings.patch_embedding.weight"].shape
    grid = int(round((vis["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[3]) for k in vis if ".encoder.layers." in k)
    vcfg = CLIPVisionConfig(hidden_size=width, intermediate_size=vis["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=grid * patch,
                            patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    m = torch.nn.Module()
    m.image_encoder = CLIPVisionModel._from_config(vcfg, attn_implementation="sdpa")
    m.image_encoder.load_state_dict(vis, strict=True)
    m.language_model = LlamaForCausalLM._from_config(LlamaConfig(**cfg["text_config"]), attn_implementation="sdpa")
    m.language_model.load_state_dict({k[len("language_model."):]: v for k, v in sd.items()
                                      if k.startswith("language_model.")}, strict=True)
    m.vision_embed_tokens = torch.nn.Linear(width, m.language_model.config.hidden_size)
    m.vision_embed_tokens.load_state_dict({"weight": sd["vision_embed_tokens.weight"], "bias": sd["vision_embed_tokens.bias"]})
    m = m.eval().to(torch.bfloat16)
    assert m.language_model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # the release's rounding
    return m


class Float32Rope:
    """The pre-fix numerics, for the negative check: float32 frequencies and rotation."""

    def __init__(self, m):
        self.m, self.rotary = m, m.language_model.model.rotary_emb

    def __enter__(self):
        head_dim = self.m.language_model.config.hidden_size // self.m.language_model.config.num_attention_heads
        self.saved = (self.rotary.inv_freq, modeling_llama.apply_rotary_pos_emb, type(self.rotary).forward)
        self.rotary.inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        plain = self.saved[2]
        type(self.rotary).forward = lambda s, x, pos: plain(s, x.float(), pos)  # float32 cos/sin

        def rotate(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            turn = lambda x: ((x.float() * cos + modeling_llama.rotate_half(x).float() * sin).to(x.dtype))
            return turn(q), turn(k)
        modeling_llama.apply_rotary_pos_emb = rotate

    def __exit__(self, *exc):
        self.rotary.inv_freq, modeling_llama.apply_rotary_pos_emb, type(self.rotary).forward = self.saved


def crops(image, se, medium_size, high_size):
    """The release's any-res cut (low, medium tiles, high tiles, row-major) and CLIP pixels."""
    cut = lambda im: [im.crop((x, y, x + se, y + se)) for y in range(0, im.size[1], se) for x in range(0, im.size[0], se)]
    parts = [image.resize((se, se))] + cut(image.resize(medium_size)) + cut(image.resize(high_size))
    proc = CLIPImageProcessor(size={"shortest_edge": se}, crop_size={"height": se, "width": se})
    return torch.from_numpy(np.stack([proc(p, return_tensors="np")["pixel_values"][0] for p in parts]))


def features(m, pixels):
    """(N, 3, S, S) -> projected penultimate-layer tokens (N, T, D), all in bf16."""
    h = m.image_encoder(pixels.to(torch.bfloat16), output_hidden_states=True).hidden_states[-2]
    return m.vision_embed_tokens(h)


def ulp(x):
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(torch.as_tensor(x).abs()))


def decode(m, block_ids, patch_embeddings):
    """input_ids = image block + text; placeholders get the patch embeddings; greedy with the
    KV cache. Returns ids, bf16 margins (in ulps of top-1) and the first-token logits."""
    llm = m.language_model
    ids = torch.tensor(block_ids + TEXT_IDS)[None]
    embeds = llm.get_input_embeddings()(ids)
    embeds[0, ids[0] == PLACEHOLDER] = patch_embeddings
    out = llm(inputs_embeds=embeds, position_ids=torch.arange(ids.shape[1])[None], use_cache=True)
    first = out.logits[0, -1].float()
    gen, margins = [], []
    for step in range(STEPS):
        logits = out.logits[0, -1].float()
        top = torch.topk(logits, 2).values
        margins.append(((top[0] - top[1]) / ulp(top[0])).item())
        gen.append(int(logits.argmax()))
        pos = torch.tensor([[ids.shape[1] + step]])
        out = llm(input_ids=torch.tensor([[gen[-1]]]), position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
    return np.array(gen), np.array(margins), first


def v2_forward(m, pixels):
    proj = features(m, pixels)                                           # (41, 577, D)
    low, high = proj[:1], proj[1:]
    g = high[:, 1:].view(high.size(0), 24, 24, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(g, kernel_size=4, stride=4).permute(0, 2, 3, 1).reshape(high.size(0), -1, high.size(2))
    high = torch.cat([high[:, :1], pooled], dim=1)                      # (40, 37, D)
    block = [PLACEHOLDER] * 577 + [SEPARATOR] + 40 * ([PLACEHOLDER] * 37 + [SEPARATOR])
    return block, torch.cat([low.reshape(-1, low.size(2)), high.reshape(-1, high.size(2))]), None


def v1_forward(m, pixels):
    high = features(m, pixels[5:])                                      # (24, 50, D): the query crops
    rest = features(m, pixels[:5])                                      # (5, 50, D): low + medium
    query = high.mean(1)                                                # (24, D) bf16
    picks, gaps = [], []
    for i in range(4):
        scores = torch.matmul(query, rest[1 + i].mean(0).unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros(24)
        mask[[j for j in range(24) if not 6 * i <= j < 6 * i + 6]] = float("-inf")
        top = torch.topk(scores + mask, 4)
        picks.append(top.indices[:3])
        gaps.append(((top.values[2] - top.values[3]) / top.values[2].abs()).item())
    picks = torch.sort(torch.cat(picks)).values
    block = 17 * ([PLACEHOLDER] * 50 + [SEPARATOR])
    return block, torch.cat([rest.reshape(-1, rest.size(2)), high[picks].reshape(-1, high.size(2))]), (picks, min(gaps))


def make(version, tmp, image_path, forward):
    image = Image.open(image_path).convert("RGB")  # tests/make_golden.py's test images
    se = 336 if version == "v2" else 224
    medium = best_fit(image.size, [(2 * se, 2 * se), (se, 4 * se), (4 * se, se)])
    high = (3 * medium[0], 3 * medium[1]) if version == "v2" else best_fit(
        image.size, [(6 * se, 4 * se), (4 * se, 6 * se), (3 * se, 8 * se), (8 * se, 3 * se), (2 * se, 12 * se), (12 * se, 2 * se)])
    pixels = crops(image, se, medium, high)
    for seed in range(30):
        d = tc.write_tiny_dragonfly(tmp / f"{version}-{seed}", version, "bin", seed=seed, llm=tc.LLM_HEAD128)
        m = release_model(d)
        with torch.no_grad():
            block, patches, selection = forward(m, pixels)
            ids, margins, first = decode(m, block, patches)
            with Float32Rope(m):
                old_ids, _, old_first = decode(m, block, patches)
        moved = ((old_first - first).abs().max() / ulp(first.abs().max())).item()
        gap = selection[1] if selection else 1.0
        log(f"{version} seed {seed}: smallest margin {margins.min():.1f} ulps, selection gap {gap:.1e}; float32 RoPE: "
            f"ids {'equal' if (old_ids == ids).all() else 'part at step %d' % int(np.argmax(old_ids != ids))}, "
            f"first-token logits moved by {moved:.0f} ulps of max |logit|")
        if margins.min() >= MARGIN_ULPS and gap > 1e-2 and (old_ids != ids).any() and moved > 2 * TOLERANCE_ULPS:
            break
    else:
        raise SystemExit(f"{version}: no seed gave clear margins and a failing float32-RoPE check")
    top = torch.topk(first, 16)
    extra = {} if selection is None else {"selected": selection[0].numpy()}
    path = GOLDEN / f"dragonfly_{version}_bf16.npz"
    np.savez_compressed(path, checkpoint_seed=seed, weights_fingerprint=tc.fingerprint(d),
                        image_file=image_path.name, text_ids=np.array(TEXT_IDS), image_positions=len(block),
                        crop_pixel_mean=pixels.mean(dim=(2, 3)).numpy(),
                        greedy_ids=ids, greedy_margin_ulps=margins, first_logits_sub=first[::VOCAB_STEP].numpy(),
                        vocab_step=VOCAB_STEP, first_top_ids=top.indices.numpy(), first_top_logits=top.values.numpy(),
                        tolerance_ulps=TOLERANCE_ULPS, float32_rope_greedy_ids=old_ids, float32_rope_moved_ulps=moved,
                        attn_implementation="sdpa", transformers_version=transformers.__version__,
                        torch_version=torch.__version__, **extra)
    log(f"wrote {path.name}: {path.stat().st_size / 1024:.0f} KiB")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        make("v2", Path(tmp), GOLDEN / "dragonfly_image.png", v2_forward)
        make("v1", Path(tmp), GOLDEN / "dragonfly_v1_image.png", v1_forward)


if __name__ == "__main__":
    main()

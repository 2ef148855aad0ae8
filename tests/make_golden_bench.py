"""Time dragonfly-nano next to Hugging Face transformers on the same weights (run by hand:
python tests/make_golden_bench.py). Prints a markdown table for the README; writes no file.

The random small model of bench.py is copied name by name into CLIPVisionModel and
LlamaForCausalLM (float32, attn_implementation="sdpa"). Dragonfly's own glue -- projection,
mean pooling, separators (model.Dragonfly.image_block) -- is reused on top of the Hugging Face
vision tower, so the comparison is between the ViT and LLM implementations. First the first-token
logits are checked against ours, then ours and each Hugging Face variant run in turn (the order
rotates every repeat) and medians are reported. The work inside every timer is bench.py's:
  prefill  crops (already cut) -> tensor, image block, LLM over 2120 positions, greedy first token
           and its log-probability;
  decode   per token: one token through the LLM with the cache, greedy choice, log-probability.
Hugging Face variants:
  HF loop        tower cut after the penultimate block (the blocks we run), LlamaForCausalLM
                 prefill with logits_to_keep=1, then a greedy loop over past_key_values;
  HF loop, full  the tower as the release runs it: all blocks, output_hidden_states, [-2];
  HF generate    the cut tower, then LlamaForCausalLM.generate(inputs_embeds=..., greedy).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import bench  # noqa: E402
import llama  # noqa: E402
from lib import pretrained, release_format  # noqa: E402
import vit  # noqa: E402
from model import Dragonfly  # noqa: E402
from lib.images import crop_image

hf_logging.set_verbosity_error()


def copy_weights(ours: nn.Module, theirs: nn.Module, key):
    """Copy every parameter of `ours` into `theirs` under the name key(name); every parameter of
    `theirs` must be written, every shape must match."""
    target, written = theirs.state_dict(), set()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            k = key(name)
            assert target[k].shape == p.shape, f"{name} -> {k}: {tuple(p.shape)} vs {tuple(target[k].shape)}"
            target[k].copy_(p)
            written.add(k)
    missing = {n for n, _ in theirs.named_parameters()} - written
    assert not missing, f"not written: {sorted(missing)}"


def hugging_face_models(model: Dragonfly):
    v, c = model.cfg.vit, model.cfg.llm
    clip = CLIPVisionModel._from_config(CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu", layer_norm_eps=v.eps),
        attn_implementation="sdpa", dtype=torch.float32).eval()
    # transformers 5's CLIPVisionModel has no "vision_model." level; older ones do
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip.state_dict()) else ""
    copy_weights(model.vision, clip, lambda n: prefix + release_format.checkpoint_key(release_format.VIT_NAMES, n))
    lm = LlamaForCausalLM._from_config(LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
        attn_implementation="sdpa", dtype=torch.float32).eval()
    copy_weights(model.llm, lm, lambda n: release_format.checkpoint_key(release_format.LLAMA_NAMES, n))
    assert torch.allclose(lm.model.rotary_emb.inv_freq, llama.rope_frequencies(c)), "RoPE frequencies differ"
    return clip, lm


class HFVision(nn.Module):
    """Hugging Face's CLIP behind our ViT's call, vision(pixels, layer) -> (N, 577, width)."""

    def __init__(self, clip, cut: bool):
        super().__init__()
        self.clip, self.cut = clip, cut

    def forward(self, pixels, layer):
        if self.cut:  # run only the blocks up to `layer`, as vit.py does, sharing the weights
            blocks = self.clip.encoder.layers
            self.clip.encoder.layers = blocks[:len(blocks) + 1 + layer]
            try:
                return self.clip(pixel_values=pixels).last_hidden_state
            finally:
                self.clip.encoder.layers = blocks
        return self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]


def hugging_face_glue(model: Dragonfly, clip, lm, cut: bool) -> Dragonfly:
    """Our Dragonfly with Hugging Face's vision tower in place of vit.py (every other weight shared),
    so `image_block` runs our glue -- projection, pooling, separators -- over their ViT; `lm` is
    their Llama for the text."""
    glue = copy.copy(model)
    glue._modules = dict(model._modules)  # a module list of its own, so `model` keeps its ViT
    glue.vision, glue.lm = HFVision(clip, cut), lm
    return glue


def embeds(hf, prompt, crops=None):
    x = hf.lm.get_input_embeddings()(torch.tensor([prompt]))
    if crops is None:
        return x
    return torch.cat([hf.image_block(torch.as_tensor(crops.pixels)[None]), x], dim=1)  # (1, 2120, dim)


def greedy(logits):
    token = logits.argmax(dim=-1)
    return token, torch.log_softmax(logits.float(), dim=-1).gather(1, token[:, None])[:, 0]


@torch.no_grad()
def hf_loop(hf, prompt, crops=None, new_tokens=64):
    """bench.time_generate's work by hand: (prefill s, decode s/token, ids)."""
    t0 = time.perf_counter()
    out = hf.lm(inputs_embeds=embeds(hf, prompt, crops), use_cache=True, logits_to_keep=1)
    token, _ = greedy(out.logits[:, -1])
    ids = [int(token[0])]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = hf.lm(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
        token, _ = greedy(out.logits[:, -1])
        ids.append(int(token[0]))
    return t1 - t0, (time.perf_counter() - t1) / new_tokens, ids


class Stamps:
    """A generate() streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times = []

    def put(self, ids):
        if ids.numel():  # the first put is the (empty) prompt of an inputs_embeds call
            self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def hf_generate(hf, prompt, crops=None, new_tokens=64):
    stamps = Stamps()
    t0 = time.perf_counter()
    ids = hf.lm.generate(inputs_embeds=embeds(hf, prompt, crops), max_new_tokens=new_tokens + 1,
                         min_new_tokens=new_tokens + 1, do_sample=False, streamer=stamps, pad_token_id=128001)
    t = stamps.times
    return t[0] - t0, (t[-1] - t[0]) / new_tokens, ids[0].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--contexts", default="2100,8000", help="text-only prompt lengths, decode only ('' skips)")
    p.add_argument("--context-tokens", type=int, default=16)
    p.add_argument("--patience", type=int, default=600, help="seconds to wait for a quiet CPU before each run")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = bench.random_model(bench.CONFIGS["small"]())
    clip, lm = hugging_face_models(model)
    cut, full = hugging_face_glue(model, clip, lm, cut=True), hugging_face_glue(model, clip, lm, cut=False)
    crops = crop_image(bench.synthetic_image(), model.cfg.crops)

    with torch.no_grad():  # the same function before timing it: first-token logits over image + prompt
        ours, _ = model(torch.tensor([bench.PROMPT]), torch.as_tensor(crops.pixels)[None])
        for name, hf in [("HF, tower cut", cut), ("HF, hidden_states[-2]", full)]:
            theirs = hf.lm(inputs_embeds=embeds(hf, bench.PROMPT, crops), logits_to_keep=1).logits
            diff = (ours[0, -1] - theirs[0, -1]).abs().max().item()
            print(f"first-token logits, ours vs {name}: max abs diff {diff:.2e} (logits up to {ours[0, -1].abs().max():.2f})")
            assert diff < 1e-3, "the Hugging Face pipeline does not compute our function"

    base = "ours (Dragonfly.generate)"
    variants = {base: lambda pr, c, n: bench.time_generate(model, pr, c, n),
                "HF loop": lambda pr, c, n: hf_loop(cut, pr, c, n),
                "HF loop, full tower": lambda pr, c, n: hf_loop(full, pr, c, n),
                "HF generate()": lambda pr, c, n: hf_generate(cut, pr, c, n)}
    contexts = [int(n) for n in args.contexts.split(",") if n]
    cols = ["prefill", "decode", *contexts]
    runs = {(v, w): [] for v in variants for w in cols}  # seconds
    ids, busy = {}, []
    for r in range(args.warmup + args.repeats):
        names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]  # rotate the order
        for name in names:  # bench.quiet: a run that shared the cores with another process is redone
            (prefill, decode, ids[name]), *b = bench.quiet(variants[name], bench.PROMPT, crops, args.new_tokens,
                                                           patience=args.patience)
            # long contexts exercise only the LLM: ours against the Hugging Face loop
            context = [bench.quiet(variants[name], bench.context_prompt(n), None, args.context_tokens,
                                   patience=args.patience) for n in contexts if name in (base, "HF loop")]
            if r >= args.warmup:
                busy += [b] + [c[1:] for c in context]
                for w, x in zip(cols, [prefill, decode, *[c[0][1] for c in context]]):
                    runs[name, w].append(x)
        print(f"repeat {r + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    print(f"shared CPU: {sum(t > 1 for t, _ in busy)} runs redone, {sum(x > 0.1 for _, x in busy)} of {len(busy)} "
          f"kept while other processes took > 10% of a core")
    same = sum(a == b for a, b in zip(ids[base], ids["HF loop"]))
    print(f"greedy ids after image + prompt, ours vs HF loop: {same} of {len(ids[base])} equal")

    med = {k: 1e3 * statistics.median(v) for k, v in runs.items() if v}  # ms
    print(f"\nCPU ({torch.get_num_threads()} threads), float32, median of {args.repeats} runs; "
          f"(ratio) = HF time / our time, > 1 means we are faster\n")
    print("| | prefill: image + 22-token prompt (ms) | decode (ms/token, 64 tokens) |"
          + "".join(f" decode after {n} text tokens (ms/token) |" for n in contexts))
    print("|---" * (len(cols) + 1) + "|")
    for name in variants:
        cells = ["-" if (name, w) not in med else f"{med[name, w]:.{1 if w == 'prefill' else 2}f}"
                 + ("" if name == base else f" ({med[name, w] / med[base, w]:.2f}x)") for w in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Make tests/golden/recipe/*: what the RELEASED Dragonfly training pipeline feeds its loss.

Run by hand, in a separate environment with the release's pinned transformers (nothing from
this repository is imported, and no release code is copied into it):

    python3 -m venv /tmp/relenv
    /tmp/relenv/bin/pip install torch==2.13.0 transformers==4.45.2 datasets==3.0.1 \\
        accelerate==1.0.1 psutil numpy pillow tiktoken sentencepiece safetensors pyyaml llama-models
    /tmp/relenv/bin/python tests/make_golden_recipe.py [--release-git DIR]

DIR is a bare git copy of github.com/togethercomputer/Dragonfly (default: the mirror that the
search tool's `fetch github:togethercomputer/Dragonfly` makes). At run time the script writes
the release files it needs, at RELEASE_COMMIT, into a temporary folder with `git show` and
imports them from there: `pipeline/data_utils/data.py` (prepare_dragonfly_sample,
format_llama3_prompt, IMAGE_CAP_INSTRUCT), `src/dragonfly/models/processing_dragonfly.py`
(DragonflyProcessor: __call__ in training mode, get_labels, find_and_remove_tokens) and
`src/dragonfly/models/modeling_dragonfly.py`. From `pipeline/train/training.py`, which imports
wandb/accelerate at module level, it compiles only the pieces it needs from the release's own
source with `ast` (parse_args, get_grouped_params, and single statements of main(): the
tokenizer settings, the stage freezing, the optimizer, the warmup and scheduler lines).
Nothing is stubbed: everything the data path imports (datasets, yaml, PIL, transformers'
Fuyu/processor classes) imports for real.

What cannot come from the release's machines is made locally, and said so below:
  * the tokenizer: meta-llama/Meta-Llama-3.1-8B-Instruct's HF fast tokenizer (a
    PreTrainedTokenizerFast, tokenizer_class in its tokenizer_config.json) is rebuilt from
    Meta's tiktoken file shipped in the `llama-models` package with transformers'
    TikTokenConverter, the 256 special tokens under their Llama-3.1 names, and the
    `<|begin_of_text|>` template post-processor (as tests/make_golden_tokenizer.py does); it is
    checked against llama-models' own tokenizer on every prompt used here.
  * the CLIP image processor: a CLIPImageProcessor with the values of
    openai/clip-vit-large-patch14-336's preprocessor_config.json. Images are small synthetic
    PNGs; their pixels never reach the text goldens.
  * the model for the parameter names: the release's DragonflyForCausalLM built at a tiny size
    (LLM hidden 64, 2 layers; CLIP ViT-L/14-336 geometry at width 128, 3 layers) with a tiny
    CLIPVisionModel saved to a temporary folder (no hub).

Outputs (tests/golden/recipe/, JSON, each with a "_meta" block describing its fields):
  records.json.xz   per record, batch of one: the text ids after the image block and their labels
  batches.json.xz   batches of several records: padding, mixed image/text-only batches
  schedule.json     learning rate per step, release scheduler code, full float precision
  weight_decay.json the release's decay grouping on the release model's parameter names
  hyperparameters.json  stage 1 / stage 2 settings with file:line provenance
"""

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import json
import lzma
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

RELEASE_REPO = "togethercomputer/Dragonfly"
RELEASE_COMMIT = "25a9c6a13489fd851fff2574e0f0f18acceda66c"
DEFAULT_GIT = "/work/.mirror/togethercomputer+Dragonfly/repo"
OUT = Path(__file__).parent / "golden" / "recipe"
SEED = 20240615

RELEASE_FILES = [
    "src/dragonfly/__init__.py",
    "src/dragonfly/models/__init__.py",
    "src/dragonfly/models/processing_dragonfly.py",
    "src/dragonfly/models/modeling_dragonfly.py",
    "pipeline/data_utils/data.py",
    "pipeline/train/__init__.py",
    "pipeline/train/train_utils.py",
    "pipeline/train/distributed.py",
    "pipeline/train/training.py",
    "pipeline/accelerate_configs/accelerate_config_zero1.yaml",
    "train_dragonfly_stage1.sh",
    "train_dragonfly_stage2.sh",
    "requirements.txt",
]

BOS, EOT_TEXT, PLACEHOLDER, NEWLINE, EOT = 128000, 128001, 128002, 128003, 128009


# --------------------------------------------------------------------------- release source


class Release:
    """The release files at RELEASE_COMMIT, written to a temporary folder and importable."""

    def __init__(self, git_dir):
        self.git_dir = git_dir
        self.tmp = tempfile.TemporaryDirectory(prefix="dragonfly_release_")
        self.root = Path(self.tmp.name)
        for f in RELEASE_FILES:
            data = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{RELEASE_COMMIT}:{f}"],
                                  check=True, capture_output=True).stdout
            (self.root / f).parent.mkdir(parents=True, exist_ok=True)
            (self.root / f).write_bytes(data)
        sys.path.insert(0, str(self.root))  # `src.dragonfly...` and `pipeline...` as training.py imports them

    def text(self, path):
        return (self.root / path).read_text()

    def line(self, path, needle, start=1):
        """1-based number of the first line at or after `start` containing `needle` (must exist)."""
        for no, line in enumerate(self.text(path).splitlines(), 1):
            if no >= start and needle in line:
                return no
        raise AssertionError(f"release {path} no longer contains {needle!r}")

    def cite(self, path, needle, start=1):
        return f"{path}:{self.line(path, needle, start)}"

    # training.py pieces, compiled from the release's own source (module import needs wandb)
    def training_function(self, name, namespace):
        tree = ast.parse(self.text("pipeline/train/training.py"))
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        exec(compile(ast.Module([node], []), "release:pipeline/train/training.py", "exec"), namespace)
        return namespace[name]

    def main_statements(self, first_line, last_line=None):
        """Compiled statements of training.py main() (at any depth) starting on [first_line..last_line]."""
        tree = ast.parse(self.text("pipeline/train/training.py"))
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        last_line = last_line or first_line
        found = []
        for node in ast.walk(main):
            for field in ("body", "orelse"):
                stmts = getattr(node, field, None)
                for stmt in stmts if isinstance(stmts, list) else []:
                    if isinstance(stmt, ast.stmt) and first_line <= stmt.lineno <= last_line:
                        found.append(stmt)
        found.sort(key=lambda s: s.lineno)
        assert found, (first_line, last_line)
        return compile(ast.Module(found, []), "release:pipeline/train/training.py", "exec")


# --------------------------------------------------------------------------- tokenizer, processor

NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
         "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIALS = NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]


_TOKENIZER_JSON = []


def _tokenizer_json():
    """tokenizer.json of Llama-3.1, rebuilt once from llama-models' tiktoken file."""
    if _TOKENIZER_JSON:
        return _TOKENIZER_JSON[0]
    import llama_models.llama3.tokenizer as meta
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model = Path(meta.__file__).parent / "tokenizer.model"
    try:  # transformers 4.45 names the argument additional_special_tokens, 5.x extra_special_tokens
        conv = TikTokenConverter(vocab_file=str(model), pattern=meta.Tokenizer.pat_str,
                                 additional_special_tokens=SPECIALS)
    except TypeError:
        conv = TikTokenConverter(vocab_file=str(model), pattern=meta.Tokenizer.pat_str,
                                 extra_special_tokens=SPECIALS)
    tok = conv.converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    _TOKENIZER_JSON.append(tok.to_str())
    return _TOKENIZER_JSON[0]


def base_tokenizer():
    """Meta-Llama-3.1-8B-Instruct's tokenizer as AutoTokenizer.from_pretrained returns it
    (PreTrainedTokenizerFast, bos <|begin_of_text|>, eos <|eot_id|>, model_max_length 131072),
    rebuilt from llama-models' tokenizer.model (no hub); also llama-models' own tokenizer."""
    import llama_models.llama3.tokenizer as meta
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos = "<|begin_of_text|>"
    tok = Tokenizer.from_str(_tokenizer_json())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=True,
                                   model_input_names=["input_ids", "attention_mask"])
    assert len(fast) == 128256 and fast.convert_tokens_to_ids(SPECIALS[9]) == EOT
    return fast, meta.Tokenizer(Path(meta.__file__).parent / "tokenizer.model")


def release_tokenizer(rel, stage):
    """Apply training.py's own tokenizer settings (stage 1 = from-scratch branch, stage 2 =
    --pretrained_model_name_or_path branch) to the rebuilt Llama-3.1 tokenizer."""
    tok, _ = base_tokenizer()
    path = "pipeline/train/training.py"
    arg = "text_pretrained_model_name_or_path" if stage == 1 else "pretrained_model_name_or_path"
    first = rel.line(path, f"tokenizer = AutoTokenizer.from_pretrained(args.{arg})") + 1
    last = rel.line(path, "tokenizer.pad_token = tokenizer.eos_token", first)
    exec(rel.main_statements(first, last), {"tokenizer": tok})
    return tok, f"{path}:{first}-{last}"


def clip_l14_336_image_processor():
    # openai/clip-vit-large-patch14-336 preprocessor_config.json (the release's
    # --image_encoder_name_or_path; training.py takes AutoProcessor(...).image_processor)
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": 336}, resample=3,
                              do_center_crop=True, crop_size={"height": 336, "width": 336},
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)


# --------------------------------------------------------------------------- synthetic records

WORDS = ("the a an of to in on with for and but or image photo picture scene person dog cat "
         "tree car street building window sky cloud river mountain table chair book screen "
         "chart graph bar line value percent year total left right top bottom center small "
         "large red green blue yellow black white bright dark old new open closed two three "
         "several many few people standing sitting walking holding looking near behind above "
         "below between describe explain answer question detail region text sign label number").split()
UNICODE = ["日本語の説明文です", "这是一张图片。", "мост через реку", "مرحبا بالعالم", "नमस्ते दुनिया",
           "emoji 👍🏽 👨‍👩‍👧 🇫🇷", "e\u0301 n\u0303 a\u030a", "Ελληνικά γράμματα", "한국어 문장",
           "∑ᵢ xᵢ² ≤ ∞", "café naïve façade", "tabs\tand\r\nwindows newlines", "  double  spaces  ",
           "\u200bzero\u200bwidth", "ÅÄÖ åäö ß", "😀😃😄😁"]
MATH = ["Solve for $x$: $2x + 3 = 11$.", "What is $\\int_0^1 x^2\\,dx$?", "Compute 17 * 23.",
        "If $a^2 + b^2 = c^2$ and $a=3$, $b=4$, find $c$.", "Simplify $\\frac{12}{18}$.",
        "What is the derivative of $\\sin(x)\\cos(x)$?", "Find the sum 1 + 2 + ... + 100.",
        "Is 221 prime?", "Convert 0.375 to a fraction.", "Evaluate $\\log_2 1024$."]
MATH_ANS = ["$x = 4$.", "$\\frac{1}{3}$.", "391.", "$c = 5$.", "$\\frac{2}{3}$.",
            "$\\cos^2 x - \\sin^2 x = \\cos 2x$.", "5050.", "No: $221 = 13 \\times 17$.",
            "$\\frac{3}{8}$.", "10."]
SYSTEM = "You are a helpful assistant that describes images precisely."


def header(role):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def turn(role, text):
    return f"{header(role)}{text}<|eot_id|>"


def sentence(rng, n_min=4, n_max=18, unicode_p=0.15):
    words = [rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max))]
    if rng.random() < unicode_p:
        words.insert(rng.randrange(len(words) + 1), rng.choice(UNICODE))
    s = " ".join(words)
    return s[0].upper() + s[1:] + rng.choice([".", "?", "!", ".", "."])


def paragraph(rng, n_sent):
    return " ".join(sentence(rng) for _ in range(n_sent))


def conversation(rng, n_turns, system=False, n_sent=(1, 4)):
    parts = [turn("system", SYSTEM)] if system else []
    for t in range(n_turns):
        q = sentence(rng)
        if t == 0 and rng.random() < 0.3:
            q = rng.choice(["<image>\n", ""]) + q  # literal '<image>' text some LLaVA data carries
        parts.append(turn("user", q))
        parts.append(turn("assistant", paragraph(rng, rng.randint(*n_sent))))
    return "".join(parts)


def long_conversation(rng, tok, min_tokens):
    parts = [turn("user", sentence(rng))]
    body = []
    while len(tok(header("assistant") + " ".join(body), add_special_tokens=False).input_ids) < min_tokens:
        body.append(paragraph(rng, 5))
    parts.append(turn("assistant", " ".join(body)))
    return "".join(parts)


def make_records(tok, image_names):
    """~300 records in the release's parquet row format (README 'Dataset': image_url,
    conversations, source), plus caption rows ('text', data.py format_llama3_prompt) and
    text-only rows (no image_url), and the hazards the release's code lets through."""
    rng = random.Random(SEED)
    recs = []

    def add(kind, record, max_length=4096):
        recs.append({"id": f"r{len(recs):04d}", "kind": kind, "record": record, "max_length": max_length})

    def img():
        return rng.choice(image_names)

    for _ in range(60):
        add("conv_single_image", {"image_url": img(), "conversations": conversation(rng, 1), "source": "synthetic"})
    for _ in range(40):
        add("conv_multi_image", {"image_url": img(), "conversations": conversation(rng, rng.randint(2, 4),
                                 system=rng.random() < 0.3), "source": "synthetic"})
    for _ in range(50):
        add("caption_image", {"image_url": img(), "text": sentence(rng, 3, 30, unicode_p=0.3), "source": "synthetic"})
    for i in range(40):
        rec = {"conversations": conversation(rng, rng.randint(1, 3)), "source": "synthetic_text"}
        variant = i % 4  # how a text-only row can look: no column, "", None, whitespace
        if variant == 1:
            rec["image_url"] = ""
        elif variant == 2:
            rec["image_url"] = None
        elif variant == 3:
            rec["image_url"] = "   "
        add("conv_text_only", rec)
    for i in range(30):
        k = rng.randrange(len(MATH))
        conv = turn("user", MATH[k]) + turn("assistant", "Let us work it out. " + MATH_ANS[k])
        if i % 3 == 0:
            conv += turn("user", "And the check?") + turn("assistant", "Substituting back confirms " + MATH_ANS[k])
        add("math_text_only", {"conversations": conv, "source": "synthetic_math"})
    for _ in range(10):  # longer than the image path's text budget int(4096/2) - 1 = 2047 ids
        add("long_image", {"image_url": img(), "conversations": long_conversation(rng, tok, rng.randint(2100, 3200)),
                           "source": "synthetic"})
    for _ in range(4):  # longer than the text-only path's budget (4096 ids)
        add("long_text_only", {"conversations": long_conversation(rng, tok, rng.randint(4150, 4600)),
                               "source": "synthetic_text"})
    for ml in (4, 5, 6, 7, 16, 33, 64, 101, 128, 255, 256, 1000, 8192):  # truncation arithmetic, image path
        add("max_length_image", {"image_url": img(), "conversations": conversation(rng, 2, n_sent=(3, 6)),
                                 "source": "synthetic"}, max_length=ml)
    for ml in (8, 16, 33, 64, 100, 4097):  # text-only path: plain tokenizer truncation at max_length
        add("max_length_text_only", {"conversations": conversation(rng, 2, n_sent=(3, 6)),
                                     "source": "synthetic_text"}, max_length=ml)
    for ml in (2, 3):  # image path: text budget int(ml/2) - 1 = 0 drops the BOS, get_labels fails
        add("max_length_error", {"image_url": img(), "conversations": conversation(rng, 1), "source": "synthetic"},
            max_length=ml)

    # special tokens inside the text (the fast tokenizer parses special-token names in text)
    conv = conversation(rng, 1)
    add("bos_in_text_image", {"image_url": img(), "conversations": "<|begin_of_text|>" + conv, "source": "synthetic"})
    add("bos_in_text_image", {"image_url": img(), "conversations": conv + "<|begin_of_text|>" + conversation(rng, 1),
                              "source": "synthetic"})
    add("bos_in_text_image", {"image_url": img(), "conversations": "<|begin_of_text|>" + conv + "<|begin_of_text|>"
                              + conversation(rng, 1) + "<|begin_of_text|>", "source": "synthetic"})
    add("bos_in_text_text_only", {"conversations": "<|begin_of_text|>" + conversation(rng, 1), "source": "synthetic_text"})
    add("bos_in_text_text_only", {"conversations": conversation(rng, 1) + "<|begin_of_text|>" + conversation(rng, 1),
                                  "source": "synthetic_text"})
    add("special_in_text_image", {"image_url": img(), "conversations": turn("user", "Tokens <|reserved_special_token_0|>"
                                  " and <|reserved_special_token_1|> in text") + turn("assistant", "Seen."), "source": "synthetic"})
    add("special_in_text_image", {"image_url": img(), "conversations": turn("user", sentence(rng)) +
                                  turn("assistant", "Done.<|end_of_text|>"), "source": "synthetic"})
    add("special_in_text_text_only", {"conversations": turn("user", sentence(rng)) + turn("assistant", "Done.<|end_of_text|>"),
                                      "source": "synthetic_text"})
    add("empty_conversation_image", {"image_url": img(), "conversations": "", "source": "synthetic"})
    add("empty_conversation_text_only", {"conversations": "", "source": "synthetic_text"})
    add("empty_answer_image", {"image_url": img(), "conversations": turn("user", sentence(rng)) + header("assistant"),
                               "source": "synthetic"})
    add("empty_caption_image", {"image_url": img(), "text": "", "source": "synthetic"})
    for u in UNICODE:
        add("unicode_image", {"image_url": img(), "conversations": turn("user", u) + turn("assistant", u + " " + sentence(rng)),
                              "source": "synthetic"})
    add("whitespace_image", {"image_url": img(), "conversations": turn("user", "\n\n\n   \t ") + turn("assistant", " \n "),
                             "source": "synthetic"})
    add("no_eot_image", {"image_url": img(), "conversations": header("user") + sentence(rng), "source": "synthetic"})

    # hazards: rows the release accepts but trains on something unintended, or rejects
    add("hazard_text_none_with_conversations", {"image_url": img(), "text": None,
                                                "conversations": conversation(rng, 1), "source": "synthetic"})
    add("hazard_text_and_conversations", {"image_url": img(), "text": sentence(rng),
                                          "conversations": conversation(rng, 1), "source": "synthetic"})
    add("hazard_text_only_caption_row", {"text": paragraph(rng, 2), "source": "synthetic_text"})
    add("rejected_llava_list_image", {"image_url": img(), "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A scene."}], "source": "llava"})
    add("rejected_llava_list_text_only", {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "source": "llava"})

    while len(recs) < 300:  # fill with more single/multi-turn image conversations
        add("conv_single_image" if len(recs) % 2 else "conv_multi_image",
            {"image_url": img(), "conversations": conversation(rng, 1 + len(recs) % 3), "source": "synthetic"})
    return recs


# --------------------------------------------------------------------------- running the release


def image_block_reference(proc_mod):
    """The image block the processor puts before the text (processing_dragonfly.py constants)."""
    low, lp = proc_mod.LOW_IMG_EMB_LENGTH, proc_mod.LOW_IMG_PATCH_SIZE
    high, hp = proc_mod.HIGH_IMG_EMB_LENGTH, proc_mod.HIGH_IMG_PATCH_SIZE
    ids = ([PLACEHOLDER] * lp + [NEWLINE]) * low + ([PLACEHOLDER] * hp + [NEWLINE]) * high
    idx, k = [], 0
    for t in ids:
        idx.append(k if t == PLACEHOLDER else -1)
        k += t == PLACEHOLDER
    return ids, idx


def error_text(e):
    return f"{type(e).__name__}: {e}"


def run_collate(data, batch, image_dir, max_length, seed, processor):
    """prepare_dragonfly_sample (data.py), the DataLoader collate_fn, on deep copies of rows.
    The global `random` is seeded first: format_llama3_prompt draws the caption instruction
    with random.choice."""
    items = copy.deepcopy(batch)
    random.seed(seed)
    out = data.prepare_dragonfly_sample(items, processor=processor, image_dir=image_dir, max_length=max_length)
    return out, [it["text"] for it in items]


def check_image_rows(out, block_ids, block_idx):
    ids, labels, am = out["input_ids"], out["labels"], out["attention_mask"]
    n = len(block_ids)
    assert ids.shape == labels.shape == am.shape
    assert out["image_patches_indices"].shape[1] == ids.shape[1] + 10  # max_tokens_to_generate padding
    for b in range(ids.shape[0]):
        assert ids[b, :n].tolist() == block_ids
        assert labels[b, :n].tolist() == [-100] * n
        assert out["image_patches_indices"][b, :n].tolist() == block_idx
        assert (out["image_patches_indices"][b, n:] == -1).all()
        assert tuple(out["image_patches"][b].shape) == (41, 3, 336, 336)


def mask_len(row):
    row = row.tolist()
    n = sum(row)
    assert row == [1] * n + [0] * (len(row) - n), "right padding"
    return n


def instruction_index(data, prompt, record):
    if "text" not in record:
        return None
    m = re.match(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", prompt, re.S)
    return data.IMAGE_CAP_INSTRUCT.index(m.group(1))


RECORD_FIELDS = ["error", "formatted_prompt", "instruction_index", "path", "image_block_len", "seq_len",
                 "prompt_token_count", "truncated", "begin_of_text_replaced_at", "text_ids", "labels", "n_loss_tokens",
                 "image_patches_shape", "image_patches_indices_len"]


def golden_records(data, proc_mod, processor, tok, meta_tok, recs, image_dir, image_sizes):
    block_ids, block_idx = image_block_reference(proc_mod)
    nb = len(block_ids)
    out_recs = []
    for i, r in enumerate(recs):
        rec = r["record"]
        g = dict(r)
        g["image_size"] = image_sizes.get(rec.get("image_url")) if isinstance(rec.get("image_url"), str) else None
        g["random_seed"] = SEED + i
        try:
            out, prompts = run_collate(data, [rec], image_dir, r["max_length"], SEED + i, processor)
        except Exception as e:  # recorded: the release rejects this row
            g.update({k: None for k in RECORD_FIELDS})
            g.update(error=error_text(e))
            out_recs.append(g)
            continue
        prompt = prompts[0]
        image = "image_patches" in out
        ids, labels = out["input_ids"][0], out["labels"][0]
        start = nb if image else 0
        if image:
            check_image_rows(out, block_ids, block_idx)
        assert mask_len(out["attention_mask"][0]) == ids.shape[0]
        prompt_ids = tok(prompt, add_special_tokens=True).input_ids
        assert prompt_ids == [BOS] + meta_tok.encode(prompt, bos=False, eos=False, allowed_special="all"), r["id"]
        text_ids, text_labels = ids[start:].tolist(), labels[start:].tolist()
        if image:  # truncation: tokenizer output (BOS included) cut to int(max_length / 2) - 1, then <|end_of_text|>
            keep = prompt_ids[: int(r["max_length"] / 2) - 1] + [EOT_TEXT]
        else:  # text + "<|end_of_text|>" through the tokenizer with truncation at max_length
            keep = (prompt_ids + [EOT_TEXT])[: r["max_length"]]
        n_bos = keep.count(BOS)
        replaced = None
        if n_bos > 1:  # find_and_remove_tokens: the LAST BOS becomes <|end_of_text|> (input and label)
            replaced = max(j for j, t in enumerate(keep) if t == BOS)
            keep[replaced] = EOT_TEXT
        assert text_ids == keep, r["id"]
        first = text_ids.index(BOS)  # get_labels: unmasked after the first BOS
        expect_labels = [-100] * (first + 1) + text_ids[first + 1:]
        if replaced is not None:
            expect_labels[replaced] = EOT_TEXT
        assert text_labels == expect_labels, r["id"]
        g.update(
            error=None,
            formatted_prompt=prompt,
            instruction_index=instruction_index(data, prompt, rec),
            path="image" if image else "text_only",
            image_block_len=start,
            seq_len=int(ids.shape[0]),
            prompt_token_count=len(prompt_ids),
            truncated=len(text_ids) < len(prompt_ids) + 1,
            begin_of_text_replaced_at=replaced,
            text_ids=text_ids,
            labels=text_labels,
            n_loss_tokens=int((labels[1:] != -100).sum()),
            image_patches_shape=list(out["image_patches"][0].shape) if image else None,
            image_patches_indices_len=int(out["image_patches_indices"].shape[1]) if image else None,
        )
        assert list(g)[-len(RECORD_FIELDS):] == RECORD_FIELDS
        out_recs.append(g)
    return out_recs


def make_batches(recs):
    rng = random.Random(SEED + 1)
    ok = [r for r in recs if r.get("error") is None and not r["kind"].startswith(("rejected", "max_length"))]
    img = [r for r in ok if "image_url" in r["record"] and isinstance(r["record"]["image_url"], str)
           and r["record"]["image_url"].strip() and not r["kind"].startswith("long")]
    txt = [r for r in ok if r["kind"] in ("conv_text_only", "math_text_only", "bos_in_text_text_only",
                                         "special_in_text_text_only", "empty_conversation_text_only",
                                         "hazard_text_only_caption_row")]
    longs = [r for r in ok if r["kind"].startswith("long")]
    plans = []
    for _ in range(12):
        plans.append(("image", rng.sample(img, 4)))
    plans.append(("image_with_long", rng.sample(img, 3) + [rng.choice([r for r in longs if r["kind"] == "long_image"])]))
    plans.append(("image_captions", rng.sample([r for r in img if r["kind"] == "caption_image"], 4)))
    plans.append(("image_bos_in_text", [r for r in img if r["kind"] == "bos_in_text_image"] + rng.sample(img, 1)))
    for n in (2, 3, 4, 4, 4, 4, 1, 4):
        plans.append(("text_only", rng.sample(txt, n)))
    plans.append(("text_only_with_long", rng.sample(txt, 2) + [r for r in longs if r["kind"] == "long_text_only"][:1]))
    for _ in range(5):  # one row without an image turns the whole batch into text-only (data.py:89-91)
        plans.append(("mixed", rng.sample(img, 3) + rng.sample(txt, 1)))
    plans.append(("mixed_caption", rng.sample([r for r in img if r["kind"] == "caption_image"], 2) + rng.sample(txt, 1)))
    return plans


def golden_batches(data, proc_mod, processor, recs, image_dir):
    block_ids, block_idx = image_block_reference(proc_mod)
    out_batches = []
    for k, (kind, rows) in enumerate(make_batches(recs)):
        seed = SEED + 10_000 + k
        out, prompts = run_collate(data, [r["record"] for r in rows], image_dir, 4096, seed, processor)
        image = "image_patches" in out
        start = len(block_ids) if image else 0
        if image:
            check_image_rows(out, block_ids, block_idx)
        ids, labels = out["input_ids"], out["labels"]
        lens = [mask_len(row) for row in out["attention_mask"]]
        out_batches.append(dict(
            id=f"b{k:03d}", kind=kind, record_ids=[r["id"] for r in rows], max_length=4096, random_seed=seed,
            formatted_prompts=prompts,
            instruction_indices=[instruction_index(data, p, r["record"]) for p, r in zip(prompts, rows)],
            path="image" if image else "text_only", image_block_len=start, shape=list(ids.shape),
            attention_len=lens, text_ids=ids[:, start:].tolist(), labels=labels[:, start:].tolist(),
            n_loss_tokens=int((labels[:, 1:] != -100).sum()),
            image_patches_indices_shape=list(out["image_patches_indices"].shape) if image else None,
        ))
    return out_batches


# --------------------------------------------------------------------------- model, grouping, loss


def tiny_release_model(rel, clip_dir):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from src.dragonfly.models.modeling_dragonfly import DragonflyConfig, DragonflyForCausalLM

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                     num_attention_heads=2, image_size=336, patch_size=14,
                                     projection_dim=64)).save_pretrained(clip_dir)
    # training.py stage-1 branch: DragonflyConfig(text_pretrained_model_name_or_path=..., image_encoder=...),
    # DragonflyForCausalLM(config), model.initialize_model(); the LLM path is None here (no hub), so
    # initialize_model only reloads the CLIP tower and re-creates vision_embed_tokens.
    cfg = DragonflyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, text_pretrained_model_name_or_path=None, image_encoder=str(clip_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        model = DragonflyForCausalLM(cfg)
        model.initialize_model()
    return model


def golden_weight_decay(rel, data, processor, recs, image_dir, clip_dir, stage_args):
    import torch
    path = "pipeline/train/training.py"
    ns = {}
    get_grouped_params = rel.training_function("get_grouped_params", ns)
    freeze_first = rel.line(path, "if args.mm_tune_vision_encoder:")
    freeze = rel.main_statements(freeze_first)  # the whole if-block, nested lines included
    opt_line = rel.line(path, "optimizer = torch.optim.AdamW(get_grouped_params(")
    make_opt = rel.main_statements(opt_line)

    result = {"rule_source": f"{path}:{rel.line(path, 'def get_grouped_params(model, wd):')}-"
                             f"{rel.line(path, 'return [', rel.line(path, 'def get_grouped_params(model, wd):')) + 3}",
              "rule": "decay iff 'weight' in name and 'layernorm' not in name and 'lm_head' not in name and "
                      "'embed_tokens' not in name; only parameters with requires_grad are put in either group",
              "freeze_source": f"{path}:{freeze_first}-{freeze_first + 8}",
              "optimizer_source": f"{path}:{opt_line}"}
    model = tiny_release_model(rel, clip_dir)
    names = [(n, list(p.shape)) for n, p in model.named_parameters()]
    apply_decay = (lambda x: "weight" in x and "layernorm" not in x and "lm_head" not in x and "embed_tokens" not in x)
    # the lambda above is only a cross-check of the release function's result below
    result["all_parameters"] = [{"name": n, "shape": s, "decay_by_rule": apply_decay(n)} for n, s in names]

    for stage, args in stage_args.items():
        model = tiny_release_model(rel, clip_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(freeze, {"args": args, "model": model})
        env = {"torch": torch, "get_grouped_params": get_grouped_params, "model": model, "args": args}
        exec(make_opt, env)
        opt = env["optimizer"]
        by_id = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for g in opt.param_groups:
            groups.append({"weight_decay": g["weight_decay"], "names": [by_id[id(p)] for p in g["params"]]})
        decay = set(groups[0]["names"])
        for n, _ in names:
            if n in decay:
                assert apply_decay(n)
        defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.defaults.items()
                    if isinstance(v, (int, float, bool, tuple, type(None)))}
        entry = {"trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                 "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
                 "param_groups": groups, "adamw_defaults": defaults,
                 "args": {k: getattr(args, k) for k in ("mm_tune_vision_encoder", "tune_vision_embed_tokens_only",
                                                       "weight_decay", "learning_rate")}}
        # One training forward/backward with what the collate returns, to list the parameters the
        # loss never reaches (the LLM is frozen in stage 1; the ViT's last layer and post_layernorm
        # are after hidden_states[-2]).
        rows = [r for r in recs if r["kind"] == "conv_single_image"][:1]
        out, _ = run_collate(data, [r["record"] for r in rows], image_dir, 4096, SEED, processor)
        model.train()
        res = model(**dict(out))
        logits = res["logits"].float()
        manual = torch.nn.functional.cross_entropy(logits[0, :-1], out["labels"][0, 1:], ignore_index=-100)
        assert torch.allclose(res["loss"], manual, rtol=1e-5, atol=1e-6)
        res["loss"].backward()
        entry["no_grad_after_backward"] = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        entry["loss_check"] = {"record_id": rows[0]["id"], "n_loss_tokens": int((out["labels"][0, 1:] != -100).sum()),
                               "matches_cross_entropy_mean_over_labels": True}
        result[stage] = entry
        del model, res, logits
    return result


# --------------------------------------------------------------------------- hyperparameters


def release_parser(rel):
    parser = rel.training_function("parse_args", {"argparse": argparse})()
    parser.prog = "training.py"
    return parser


def parse_script(rel, path):
    launch, train, argv = [], [], []
    target = launch
    for no, line in enumerate(rel.text(path).splitlines(), 1):
        s = re.sub(r'<"[^"]*">', "PLACEHOLDER", line.strip().rstrip("\\"))
        toks = shlex.split(s) if s.strip() else []
        i = 0
        while i < len(toks):
            t = toks[i]
            if t == "pipeline/train/training.py":
                target = train
            elif t.startswith("--"):
                if "=" in t:
                    flag, value = t.split("=", 1)
                elif i + 1 < len(toks) and not toks[i + 1].startswith("--"):
                    flag, value = t, toks[i + 1]
                    i += 1
                else:
                    flag, value = t, None
                target.append({"flag": flag, "value": value, "line": no})
                if target is train:
                    argv += [flag] + ([value] if value is not None else [])
            i += 1
    return launch, train, argv


def golden_hyperparameters(rel):
    import yaml
    path = "pipeline/train/training.py"
    parser = release_parser(rel)
    keys = ["learning_rate", "lr_scheduler", "warmup_steps_ratio", "warmup_steps", "weight_decay", "batch_size",
            "gradient_accumulation_steps", "total_training_steps", "max_seq_length", "text_alternate_step",
            "math_alternate_step", "mask_lm_head", "mm_tune_vision_encoder", "tune_vision_embed_tokens_only",
            "gradient_checkpointing", "seed", "workers", "logging_steps", "checkpointing_steps", "hq_dataset_prob",
            "loss_multiplier_ce", "loss_multiplier_ic", "together_hq_datasets", "together_text_datasets",
            "together_math_datasets", "image_encoder_name_or_path", "text_pretrained_model_name_or_path",
            "pretrained_model_name_or_path", "resume_from_checkpoint", "save_hf_model"]
    out = {}
    for stage, script in (("stage1", "train_dragonfly_stage1.sh"), ("stage2", "train_dragonfly_stage2.sh")):
        launch, flags, argv = parse_script(rel, script)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = parser.parse_args(argv)
            parse = {"ok": True}
        except SystemExit as e:
            args, unknown = parser.parse_known_args(argv)
            parse = {"ok": False, "exit_code": e.code, "argparse_error": err.getvalue().strip().splitlines()[-1],
                     "unknown_arguments": unknown, "note": "values below are parse_known_args without the unknown ones"}
        set_by = {f["flag"]: f["line"] for f in flags}
        eff = {}
        for k in keys:
            v = getattr(args, k)
            if f"--{k}" in set_by:
                src = f"{script}:{set_by['--' + k]}"
            else:
                src = f"{path}:{rel.line(path, chr(34) + '--' + k + chr(34))} (argparse default)"
            eff[k] = {"value": v, "source": src}
        cfg_flag = next(f for f in launch if f["flag"] == "--config_file")
        cfg_path = cfg_flag["value"].lstrip("./")
        cfg = yaml.safe_load(rel.text(cfg_path))
        acc = {}
        for k, v in list(cfg["deepspeed_config"].items()) + [(k, cfg[k]) for k in ("distributed_type", "mixed_precision",
                                                                                     "num_processes")]:
            acc[k] = {"value": v, "source": rel.cite(cfg_path, f"{k}:")}
        warm = args.total_training_steps * args.warmup_steps_ratio if args.warmup_steps_ratio is not None else args.warmup_steps
        derived = {
            "warmup_steps (float, line 635)": warm,
            "num_warmup_steps passed to get_cosine_schedule_with_warmup": warm // args.gradient_accumulation_steps,
            "num_training_steps passed": args.total_training_steps // args.gradient_accumulation_steps,
            "accelerate gradient_accumulation_steps (env from the yaml, overrides the script's 1)":
                cfg["deepspeed_config"]["gradient_accumulation_steps"],
            "samples per optimizer update (batch_size x num_processes x yaml GA)":
                args.batch_size * int(cfg["num_processes"]) * cfg["deepspeed_config"]["gradient_accumulation_steps"],
            "trainable": ("vision_embed_tokens only (language_model and image_encoder frozen)"
                          if args.mm_tune_vision_encoder and args.tune_vision_embed_tokens_only else
                          "language_model frozen" if args.mm_tune_vision_encoder else
                          "everything: language_model, image_encoder (CLIP), vision_embed_tokens"),
            "text/math batches drawn": ("never (no --together_text/math_datasets)" if not args.together_text_datasets
                                        and not args.together_math_datasets else
                                        f"text at global_step+1 % {args.text_alternate_step} == 0, "
                                        f"math at global_step+1 % {args.math_alternate_step} == 0"),
        }
        out[stage] = {"script": script, "launch_flags": launch, "training_flags": flags, "parse": parse,
                      "effective": eff, "accelerate_config": acc, "derived": derived}
    return out


# --------------------------------------------------------------------------- schedules


def golden_schedule(rel):
    import torch
    import transformers
    path = "pipeline/train/training.py"
    warm_line = rel.line(path, "args.warmup_steps = total_training_steps * args.warmup_steps_ratio")
    sched_first = rel.line(path, 'if args.lr_scheduler == "linear":')
    sched_code = rel.main_statements(warm_line, sched_first)  # line 635 and the whole if/elif/else
    schedules = []
    specs = [("scripts_ratio_50", 50, 0.01, 2e-5), ("ratio_0.1_50", 50, 0.1, 2e-6), ("scripts_ratio_300", 300, 0.01, 2e-5),
             ("ratio_0.05_37", 37, 0.05, 1e-4), ("stage1_script", 17400, 0.01, 2e-5), ("stage2_script", 507798, 0.01, 2e-6)]
    for name, total, ratio, lr in specs:
        # the two script-sized schedules are kept at some steps only: the warmup and its end, then sparse
        keep = (set(range(min(total, 400))) | set(range(0, total, max(1, total // 200))) | set(range(total - 5, total))
                | {k for k in range(total) if abs(k - total * ratio) <= 3})
        keep = sorted(keep)
        args = argparse.Namespace(warmup_steps_ratio=ratio, warmup_steps=1000, gradient_accumulation_steps=1,
                                  lr_scheduler="cosine")
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}], lr=lr)
        env = {"args": args, "total_training_steps": total, "optimizer": opt,
               "get_linear_schedule_with_warmup": transformers.get_linear_schedule_with_warmup,
               "get_cosine_schedule_with_warmup": transformers.get_cosine_schedule_with_warmup,
               "get_constant_schedule_with_warmup": transformers.get_constant_schedule_with_warmup}
        exec(sched_code, env)
        sch = env["lr_scheduler"]
        lrs = []
        for _ in range(total):  # the training loop runs global_step 0 .. total - 1
            lrs.append(opt.param_groups[0]["lr"])
            assert opt.param_groups[1]["lr"] == lrs[-1]
            with warnings.catch_warnings():  # no optimizer.step(): the lr does not depend on it
                warnings.simplefilter("ignore", UserWarning)
                sch.step()
        entry = {"name": name, "total_training_steps": total, "warmup_steps_ratio": ratio, "learning_rate": lr,
                 "gradient_accumulation_steps": 1, "warmup_steps": args.warmup_steps,
                 "num_warmup_steps": args.warmup_steps // 1}
        if len(keep) == total:
            entry.update(lr_at_step=lrs, lr_at_step_hex=[float(x).hex() for x in lrs])
        else:
            entry.update(steps=keep, lr_at_steps=[lrs[k] for k in keep], lr_at_steps_hex=[float(lrs[k]).hex() for k in keep])
        schedules.append(entry)

    # accelerate 1.0.1 with gradient_accumulation_steps=2 (what the zero1 yaml sets through the
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS env var): the prepared scheduler only steps when
    # sync_gradients is True. Run for real on CPU (no DeepSpeed here: under DeepSpeed the optimizer
    # update happens inside accelerator.backward -> engine.step at DeepSpeed's own boundaries).
    ga = None
    try:
        from accelerate import Accelerator
        acc = Accelerator(gradient_accumulation_steps=2, cpu=True)
        total, ratio, lr = 50, 0.01, 2e-5
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        sch = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=total * ratio // 1, num_training_steps=total)
        model, opt, sch = acc.prepare(model, opt, sch)
        sch.split_batches = True  # training.py sets this when num_processes > 1
        rows = []
        for step in range(total):
            with acc.accumulate(model):
                loss = model(torch.ones(1, 2)).sum()
                acc.backward(loss)
                rows.append({"global_step": step, "sync_gradients": bool(acc.sync_gradients),
                             "lr_in_param_group": opt.param_groups[0]["lr"]})
                opt.step()
                sch.step()
                opt.zero_grad()
        ga = {"name": "accelerate_ga2_scripts_ratio_50", "accelerate": __import__("accelerate").__version__,
              "total_training_steps": total, "warmup_steps_ratio": ratio, "learning_rate": lr, "steps": rows}
    except Exception as e:  # pragma: no cover - accelerate missing
        ga = {"error": error_text(e)}
    return {"source": f"{path}:{warm_line} and {path}:{sched_first}-{sched_first + 13}", "schedules": schedules,
            "accelerate_gradient_accumulation_2": ga}


# --------------------------------------------------------------------------- main


def write_json(path, obj, compress=False, indent=None):
    data = json.dumps(obj, ensure_ascii=False, indent=indent, separators=(",", ":") if indent is None else None,
                      sort_keys=False).encode()
    if compress:
        path = path.with_name(path.name + ".xz")
        path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    else:
        path.write_bytes(data + b"\n")
    return path, len(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--release-git", default=os.environ.get("DRAGONFLY_RELEASE_GIT", DEFAULT_GIT))
    ap.add_argument("--out", default=str(OUT))
    opts = ap.parse_args()
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import PIL
    import torch
    import transformers
    from PIL import Image
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    rel = Release(opts.release_git)
    import pipeline.data_utils.data as data  # release code, imported as training.py imports it
    import src.dragonfly.models.processing_dragonfly as proc_mod

    tok, tok_src = release_tokenizer(rel, 1)
    tok2, tok2_src = release_tokenizer(rel, 2)
    _, meta_tok = base_tokenizer()
    processor = proc_mod.DragonflyProcessor(image_processor=clip_l14_336_image_processor(), tokenizer=tok,
                                            image_encoding_style="llava-hd")  # training.py:590
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "numpy": np.__version__, "pillow": PIL.__version__}
    common_meta = {"release": RELEASE_REPO, "release_commit": RELEASE_COMMIT, "generator": "tests/make_golden_recipe.py",
                   "versions": versions}

    with tempfile.TemporaryDirectory(prefix="recipe_images_") as image_dir:
        rng = np.random.default_rng(SEED)
        image_sizes = {}
        for k in range(24):
            w, h = int(rng.integers(12, 160)), int(rng.integers(12, 160))
            name = f"img_{k:02d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(Path(image_dir) / name)
            image_sizes[name] = [w, h]
        recs = make_records(tok, sorted(image_sizes))
        g_recs = golden_records(data, proc_mod, processor, tok, meta_tok, recs, image_dir, image_sizes)
        # stage 2's tokenizer settings give the same ids: check on every prompt
        for g in g_recs:
            if g.get("formatted_prompt") is not None:
                assert tok(g["formatted_prompt"]).input_ids == tok2(g["formatted_prompt"]).input_ids
        g_batches = golden_batches(data, proc_mod, processor, g_recs, image_dir)

        stage_args = {}
        parser = release_parser(rel)
        for stage, script in (("stage1", "train_dragonfly_stage1.sh"), ("stage2", "train_dragonfly_stage2.sh")):
            stage_args[stage] = parser.parse_known_args(parse_script(rel, script)[2])[0]
        with tempfile.TemporaryDirectory(prefix="tiny_clip_") as clip_dir:
            g_wd = golden_weight_decay(rel, data, processor, g_recs, image_dir, clip_dir, stage_args)

    block_ids, _ = image_block_reference(proc_mod)
    media = tok("<image>", add_special_tokens=False)["input_ids"]
    chunk = tok("<|endofchunk|>", add_special_tokens=False)["input_ids"]
    records_meta = dict(common_meta, description=(
        "Per record, collated alone (batch of one, as stage 2's --batch_size 1) by the release's "
        "prepare_dragonfly_sample (pipeline/data_utils/data.py:72-99) with DragonflyProcessor in training mode. "
        "text_ids/labels are input_ids/labels from position image_block_len on (0 for text-only rows); every "
        "position before it is the image block below, whose labels are all -100 (asserted). labels are exactly "
        "what LlamaForCausalLM's loss receives (it shifts them by one and ignores -100)."),
        tokenizer=("meta-llama/Meta-Llama-3.1-8B-Instruct fast tokenizer rebuilt from llama-models' tokenizer.model "
                   f"(checked id for id against llama-models on every prompt), then {tok_src} applied "
                   f"(stage 2's {tok2_src} gives identical ids, checked): eos/pad <|end_of_text|> = 128001, "
                   "padding right; add_eos_token/add_bos_token are plain attributes on a PreTrainedTokenizerFast "
                   "in transformers 4.45.2 and change nothing"),
        image_block={"len": len(block_ids), "placeholder_id": PLACEHOLDER, "newline_id": NEWLINE,
                     "layout": "(577 x 128002, 128003) then 40 x (37 x 128002, 128003)",
                     "newline_positions": [i for i, t in enumerate(block_ids) if t == NEWLINE],
                     "image_patches_indices": "patch counter 0..2056 at placeholders, -1 at newlines and all text; "
                                              "its length is input_ids length + 10 (max_tokens_to_generate)"},
        mask_lm_head_token_ids={"<image>": media, "<|endofchunk|>": chunk,
                                "kept_rows": [media[-1], chunk[-1]]},
        fields={
            "id/kind": "record id and what it exercises", "record": "the row as given to the collate (parquet row)",
            "max_length": "--max_seq_length passed to the processor", "image_size": "[w, h] of image_url's PNG or null",
            "random_seed": "random.seed() right before the collate (format_llama3_prompt's random.choice)",
            "error": "null, or 'Type: message' when the release raises on this row (no ids then)",
            "formatted_prompt": "item['text'] after format_llama3_prompt", "instruction_index": "IMAGE_CAP_INSTRUCT index for caption rows",
            "path": "'image' (processor image branch) or 'text_only' (tokenizer branch)",
            "image_block_len": "2098 or 0", "seq_len": "total input_ids length",
            "prompt_token_count": "len(tokenizer(formatted_prompt).input_ids), BOS included, before truncation",
            "truncated": "text was cut", "begin_of_text_replaced_at": "index in text_ids where find_and_remove_tokens turned the last BOS into 128001",
            "text_ids": "input_ids[image_block_len:]", "labels": "labels[image_block_len:]",
            "n_loss_tokens": "count of labels[1:] != -100 over the whole sequence (the CE mean's denominator)",
            "image_patches_shape": "[41, 3, 336, 336]", "image_patches_indices_len": "seq_len + 10"},
        instructions=list(data.IMAGE_CAP_INSTRUCT))
    batches_meta = dict(common_meta, description=(
        "Batches collated together by prepare_dragonfly_sample (max_length 4096); record_ids point into "
        "records.json.xz. Rows are right-padded with 128001; text_ids/labels are [B][L - image_block_len]; "
        "attention_len is each row's count of 1s (mask is 1s then 0s, asserted). Padded positions keep label "
        "128001 (get_labels unmasks everything after the first BOS). A batch with any row lacking an image "
        "goes through the text-only branch for all rows (images dropped)."))

    files = []
    files.append(write_json(out_dir / "records.json", {"_meta": records_meta, "records": g_recs}, compress=True))
    files.append(write_json(out_dir / "batches.json", {"_meta": batches_meta, "batches": g_batches}, compress=True))
    sched = golden_schedule(rel)
    files.append(write_json(out_dir / "schedule.json", {"_meta": dict(common_meta, description=(
        "lr_at_step[k] is param_groups[*]['lr'] when optimizer.step() runs at global step k (k = 0..total-1), "
        "after the release's own lines (warmup_steps = total * ratio, a float; num_warmup_steps = "
        "warmup_steps // gradient_accumulation_steps) built get_cosine_schedule_with_warmup; "
        "lr_at_step_hex the same values as float.hex; the script-sized schedules (stage1_script, stage2_script) keep "
        "only the global steps in `steps`, with lr_at_steps/lr_at_steps_hex. accelerate_gradient_accumulation_2: the real "
        "accelerate scheduler wrapper with GA=2, stepping only when sync_gradients")), **sched}, indent=1))
    files.append(write_json(out_dir / "weight_decay.json", {"_meta": dict(common_meta, description=(
        "The release's get_grouped_params on the parameter names of the release's DragonflyForCausalLM "
        "(tiny sizes, same names; LLM 2 layers, CLIP 3 layers). stage1/stage2: the release's freezing lines "
        "and optimizer line run on it with each script's parsed args; param_groups[0] decays, [1] does not; "
        "no_grad_after_backward: trainable parameters with no gradient after one training step's backward")),
        **g_wd}, indent=1))
    files.append(write_json(out_dir / "hyperparameters.json", {"_meta": dict(common_meta, description=(
        "Each launch script's flags with their line, parsed by the release's own parse_args; effective "
        "values with the line they come from (script or argparse default); the accelerate yaml it launches with")),
        **golden_hyperparameters(rel)}, indent=1))
    for p, raw in files:
        print(f"wrote {p} ({p.stat().st_size / 1024:.1f} KiB on disk, {raw / 1024:.1f} KiB JSON, "
              f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:12]})")


if __name__ == "__main__":
    main()

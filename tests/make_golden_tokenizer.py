"""Make tests/golden/llama3_tokenizer.json.xz: the Llama-3.1 tokenizer in Hugging Face format.

Run by hand (needs transformers, tokenizers, tiktoken and llama-models):

    python tests/make_golden_tokenizer.py

The released checkpoints (Dragonfly-v2, Llama-3.1-8B-Instruct) ship a 9 MB `tokenizer.json`.
We cannot download it in CI, so we rebuild the same file from Meta's tiktoken-format
`tokenizer.model` (bundled with the llama-models package) using transformers' own tiktoken
converter, add the 256 special tokens under their Llama-3.1 names as added tokens, and add
the `<|begin_of_text|>` template post-processor, as the release does. Before saving, the
script checks that the Hugging Face tokenizer built from the json gives the same ids as
llama-models on a mixed corpus, with special-token strings in the text read as special tokens.
"""

import json
import lzma
from pathlib import Path

import llama_models.llama3.tokenizer as meta
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers.convert_slow_tokenizer import TikTokenConverter

OUT = Path(__file__).parent / "golden" / "llama3_tokenizer.json.xz"
MODEL = Path(meta.__file__).parent / "tokenizer.model"

# Llama-3.1 release names (meta-llama/Llama-3.1-8B-Instruct tokenizer.json). The llama-models
# package (0.3) names 128005 `<|step_id|>` and 128011 `<|image|>` and numbers the remaining
# reserved tokens from 128012; the ids of every token Dragonfly uses are the same in both.
NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
         "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIALS = NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
assert len(SPECIALS) == 256

CORPUS = [
    "", "Hello, world!", "  leading and trailing  ", "tabs\tand\r\nwindows\nnewlines\n\n\n",
    "数字 1234567890 and 3.14159", "日本語のテキストと中文", "مرحبا بالعالم", "e\u0301 n\u0303 a\u030a",
    "emoji 👍🏽 👨‍👩‍👧 🇫🇷", "def f(x):\n    return x ** 2  # square\n", "https://example.com/a?b=c&d=e",
    "I'm sure they'd've LIKED it", "<|begin_of_text|>text<|eot_id|><|start_header_id|>user",
    "<|reserved_special_token_0|><|reserved_special_token_1|> <|python_tag|>x",
    "a" * 3000, " " * 3000, "\n" * 500 + "end",
    "".join(chr(c) for c in range(0x20, 0x3000, 7)),  # a sweep across many scripts
]


def build() -> HFTokenizer:
    tok = TikTokenConverter(vocab_file=str(MODEL), pattern=meta.Tokenizer.pat_str,
                            extra_special_tokens=SPECIALS).converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return tok


def check(tok: HFTokenizer) -> None:
    ref = meta.Tokenizer(MODEL)
    assert tok.get_vocab_size() == 128256
    for i, name in enumerate(SPECIALS):
        assert tok.token_to_id(name) == 128000 + i, name
    for text in CORPUS:
        want_special = ref.encode(text, bos=False, eos=False, allowed_special="all")
        # The corpus avoids the two names only llama-models knows (<|step_id|>, <|image|>).
        assert tok.encode(text, add_special_tokens=False).ids == want_special, text
        assert tok.encode(text).ids == [128000] + want_special, text  # the BOS template
        assert tok.decode(want_special, skip_special_tokens=False) == text, text


def main() -> None:
    tok = build()
    check(tok)
    data = json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=None).encode()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    check(HFTokenizer.from_str(lzma.decompress(OUT.read_bytes()).decode()))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(data) / 1e6:.2f} MB uncompressed)")


if __name__ == "__main__":
    main()

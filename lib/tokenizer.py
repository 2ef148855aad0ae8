"""The Llama-3 tokenizer (byte-level BPE on tiktoken) and the chat prompt Dragonfly uses.

Llama-3 splits text with a regular expression (`PATTERN`), then merges the UTF-8 bytes of each
piece by BPE ranks: 128000 base tokens, followed by 256 special tokens (ids 128000..128255).
This follows Meta's reference `llama3/tokenizer.py` (llama-models); `tests/test_tokenizer.py`
checks our ids against it.

`Tokenizer.from_file` reads three formats:
  - Meta's tiktoken `tokenizer.model` (one "base64-token rank" per line),
  - the Hugging Face `tokenizer.json` the Dragonfly and Llama-3 repos ship (byte-level BPE:
    the vocab strings are bytes spelt with GPT-2's byte-to-unicode table; the special
    tokens are its `added_tokens`),
  - a sentencepiece `tokenizer.model` (Llama-2 family), through the sentencepiece library.

Special tokens. The names are those of the Llama-3.1 release, which Dragonfly-v2 ships.
llama-models 0.3 calls 128005 `<|step_id|>` and 128011 `<|image|>`, and the Llama-3.0 release
calls 128004/128005/128008 reserved tokens; the ids Dragonfly uses (128000-128003, 128006,
128007, 128009) mean the same everywhere. `encode` reads special-token strings in the text
as special tokens by default, as the release's Hugging Face tokenizer does; Meta's
reference does the opposite by default (`allowed_special=()` here).

User text is not trusted with control tokens: `encode_text` spells special-token strings out as
ordinary text, and `encode_prompt` puts questions through it, so a question holding
`<|eot_id|><|start_header_id|>system...` cannot end its turn or forge another, and
`<|reserved_special_token_1|>` in it is not the image separator (Meta's ChatFormat encodes
message content so too). For every question without such strings the ids are the release's.
`specials_in_text = True` (sample.py/eval.py `--special-tokens-in-text`) restores the release's
behaviour, which formats one string and lets its tokenizer read every special string in it;
`encode_with_specials` is that reading for any text.

Prompt (docs/release-facts.md#prompt-format), no system prompt:

    [image block] <|begin_of_text|> <|start_header_id|>user<|end_header_id|>\\n\\n
    {question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

In the release the image block (crops + separators) comes *before* `<|begin_of_text|>`;
`encode_prompt` returns the text part, from `<|begin_of_text|>` on.
"""

import base64
import json
import re
from pathlib import Path

import tiktoken

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
          "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
          "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(_NAMED) + 3)]

# tiktoken's regex engine fails on very long runs of whitespace or of non-whitespace
# (github.com/openai/tiktoken/issues/195). Like the reference, encode at most 400k characters
# at a time and cut every run after 25k characters; the same cuts give the same ids.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


# ---- the chat template: written here once, used by training (data/formats.py) and answering ----
def chat_header(role: str) -> str:
    """A turn's header: `<|start_header_id|>role<|end_header_id|>` and the blank line after it."""
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def chat_turn(role: str, text: str) -> str:
    """One turn of the Llama-3 chat format: its header, its text, `<|eot_id|>`."""
    return chat_header(role) + text + "<|eot_id|>"


def chat_prompt(question: str | list[tuple[str, str]]) -> str:
    """The Llama-3 chat text for one user question, or for turns [(role, text), ...],
    ending with the assistant header the model completes."""
    turns = [("user", question)] if isinstance(question, str) else question
    return "".join(chat_turn(role, body) for role, body in turns) + chat_header("assistant")


def _byte_decoder() -> dict[str, int]:
    # GPT-2's table: printable Latin-1 bytes spell themselves, the other 68 bytes map to
    # chr(256), chr(257), ... in byte order. We need the inverse.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(rest)})
    return table


def _find_regex(node):
    """The first `{"Regex": ...}` pattern in a tokenizer.json pre_tokenizer tree."""
    if isinstance(node, dict):
        if isinstance(node.get("Regex"), str):
            return node["Regex"]
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            if (found := _find_regex(child)) is not None:
                return found
    return None


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 name: str = "llama3"):
        if special_tokens is None:  # Meta's file holds only the base vocab; specials follow it
            special_tokens = {tok: len(mergeable_ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        needed = {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"} - special_tokens.keys()
        if needed:
            raise ValueError(f"{name}: not a Llama-3 tokenizer, it lacks the special tokens {sorted(needed)}")
        self.special_tokens = dict(special_tokens)
        self.specials_in_text = False  # True: questions' special-token strings are control tokens (the release)
        self.model = tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = len(mergeable_ranks) + len(special_tokens)
        self.bos_id = special_tokens["<|begin_of_text|>"]
        self.eos_id = special_tokens["<|end_of_text|>"]
        self.eot_id = special_tokens["<|eot_id|>"]
        self.stop_ids = {self.eot_id, self.eos_id}
        # Dragonfly's image placeholder and the separator after every crop (docs/release-facts.md#image-block).
        self.image_id = special_tokens.get("<|reserved_special_token_0|>")
        self.separator_id = special_tokens.get("<|reserved_special_token_1|>")

    @staticmethod
    def find_file(path: str | Path) -> Path:
        """The tokenizer file a checkpoint directory holds (or `path` itself, a file)."""
        path = Path(path)
        if path.is_dir():
            names = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")
            found = [path / n for n in names if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer here (looked for {', '.join(names)})")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load from a checkpoint directory or a tokenizer file (see the module docstring)."""
        path = cls.find_file(path)
        data = path.read_bytes()
        if data.lstrip()[:1] == b"{":
            return cls._from_hf_json(data, path)
        ranks = _parse_tiktoken(data)
        if ranks is not None:
            # Meta's file holds ranks 0..127999 and the code uses ids 128000..128255 (SPECIAL_TOKENS,
            # bos/eos/eot, the image and separator tokens): a file cut short would move them all
            # and the checkpoint's ids would fail to decode mid-answer (KeyError 128009)
            base = 128000
            if len(ranks) != base or min(ranks.values()) != 0 or max(ranks.values()) != base - 1:
                raise ValueError(f"{path}: cut short or damaged: it holds {len(ranks)} tokens (ranks "
                                 f"{min(ranks.values())}..{max(ranks.values())}), Meta's Llama-3 tokenizer.model "
                                 f"holds 128000 (0..127999), followed by the special tokens the model uses")
            return cls(ranks, name=path.name)
        try:
            if data:  # sentencepiece reads b"" as a model with no pieces
                return SentencePieceTokenizer(data, name=path.name)
        except ValueError:
            pass
        raise ValueError(f"{path}: not a tokenizer file (expected a tiktoken tokenizer.model, a Hugging Face "
                         "tokenizer.json, or a sentencepiece tokenizer.model)")

    @classmethod
    def _from_hf_json(cls, data: bytes, path: Path) -> "Tokenizer":
        try:
            spec = json.loads(data)
            model, pattern = spec["model"], _find_regex(spec.get("pre_tokenizer"))
            if model.get("type") != "BPE" or pattern != PATTERN:
                raise ValueError
            to_byte = _byte_decoder()
            ranks = {bytes(to_byte[ch] for ch in tok): i for tok, i in model["vocab"].items()}
            specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special", True)}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a Llama-3 byte-level BPE tokenizer.json") from e
        n = len(ranks) + len(specials)
        used = {t: specials.get(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
        bad = {t: i for t, i in {**used, **specials}.items() if i is not None and not 0 <= i < n}
        if bad or set(ranks.values()) & set(specials.values()):
            raise ValueError(f"{path}: damaged: special token ids {bad or 'that are also base tokens'} are outside "
                             f"its {n} tokens")
        return cls(ranks, specials, name=path.name)

    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allowed_special: str | set[str] | tuple = "all") -> list[int]:
        """Token ids of `text`. Special-token strings in it become their ids if allowed
        ("all", or a set of token strings); the others are encoded as plain text."""
        allowed = "all" if allowed_special == "all" else set(allowed_special)
        ids = [self.bos_id] if bos else []
        for piece in _pieces(text):
            ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids + [self.eos_id] if eos else ids

    def encode_text(self, text: str) -> list[int]:
        """User text (a question, a record's text): special-token strings in it are ordinary text."""
        return self.encode(text, allowed_special=())

    def encode_with_specials(self, text: str) -> list[int]:
        """Text whose special-token strings are control tokens: the release's reading of everything."""
        return self.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def encode_prompt(self, question: str | list[tuple[str, str]]) -> list[int]:
        """`[<|begin_of_text|>] + chat_prompt(question)` as ids. The release encodes that string at
        once; here each turn's text ("\\n\\n" + question) goes through `encode_text`, which gives the
        same ids unless the text holds special-token strings, kept as text (module docstring;
        `specials_in_text` reads them as the release does). Meta's ChatFormat encodes header and
        question apart; its ids also differ when the question starts with a line break."""
        if "<|start_header_id|>" not in self.special_tokens:
            raise ValueError("the Llama-3 chat prompt needs the Llama-3 special tokens; this tokenizer has none")
        if self.specials_in_text:
            return [self.bos_id] + self.encode_with_specials(chat_prompt(question))
        turns = [("user", question)] if isinstance(question, str) else question
        ids = [self.bos_id]
        for role, body in turns:
            header, text = self.encode_turn(role, body)
            ids += header + text
        return ids + self.encode_with_specials(chat_header("assistant"))

    def encode_turn(self, role: str, text: str) -> tuple[list[int], list[int]]:
        """`chat_turn(role, text)` as ids, split into (header, text + <|eot_id|>); the text's
        special-token strings are plain text. The header ends with the ids of the blank line after
        it, unless the text starts with white space that the tokenizer joins to that line (then
        the joined ids open the text): the ids are always those of the whole string, which
        encodes as its pieces would, a special token ending each piece."""
        header = self.encode_with_specials(chat_header(role).removesuffix("\n\n"))
        blank, joined = self.encode_text("\n\n"), self.encode_text("\n\n" + text)
        if joined[:len(blank)] == blank:
            header, joined = header + blank, joined[len(blank):]
        return header, joined + [self.eot_id]


def _parse_tiktoken(data: bytes) -> dict[bytes, int] | None:
    """Meta's format, one `base64-token rank` per line; None if `data` is not that."""
    try:
        ranks = {}
        for line in data.decode("ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        return ranks or None
    except ValueError:  # covers UnicodeDecodeError, binascii.Error, a bad split or rank
        return None


def _pieces(text: str):
    """`text` cut as the reference cuts it before tiktoken (see MAX_CHUNK_CHARS)."""
    for start in range(0, len(text), MAX_CHUNK_CHARS):
        chunk, cut = text[start:start + MAX_CHUNK_CHARS], 0
        for run in _LONG_RUN.finditer(chunk):
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama-2 family) behind the same interface. Its control pieces
    (`<s>`, `</s>`) are never read from text; there is no end-of-turn token, so eot = eos,
    and no image or separator token."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        import sentencepiece

        try:
            self.model = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece's error for bytes that are not its protobuf
            raise ValueError(f"{name}: not a sentencepiece model") from e
        self.n_words = self.model.get_piece_size()
        self.special_tokens = {self.model.id_to_piece(i): i for i in range(self.n_words) if self.model.is_control(i)}
        self.bos_id, self.eos_id = self.model.bos_id(), self.model.eos_id()
        self.eot_id, self.stop_ids = self.eos_id, {self.eos_id}
        self.image_id = self.separator_id = None

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special="all") -> list[int]:
        return [self.bos_id] * bos + self.model.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

"""Training records: the two formats they come in, and their Llama-3 chat tokens.

Public datasets ship LLaVA's JSON: a list of `{"id", "image", "conversations": [{"from":
"human"|"gpt"|"system", "value": "<image>\\n..."}, ...]}`; text-only ShareGPT sets (OpenHermes)
use the same shape without "image". The Dragonfly release trains from JSONL records
`{"image_url", "conversations": "<Llama-3 formatted text>", "source"}`
(docs/release-facts.md#training-records). Both become one normal form here, `(image path | None,
[(role, text), ...])` with roles system / user / assistant, and then one token layout
(docs/release-facts.md#prompt-format):

    <|begin_of_text|> (<|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>)*

The image block is not part of these tokens: it always comes first, before
<|begin_of_text|>, so `<image>` placeholders in the text are dropped. Caption-only samples
(stage 1) are wrapped in a user turn with a "describe the image" instruction
(docs/release-facts.md#training-records).
"""
import json
import mmap
import re
from pathlib import Path

import numpy as np

from lib.tokenizer import chat_turn

IGNORE = -100   # label of a position that is not trained on (F.cross_entropy's ignore_index)

# Stage-1 wrapping for caption-only samples; one is drawn per sample
# (docs/release-facts.md#training-records).
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What is shown in this picture?",
    "Give a concise description of the image.",
    "Summarize the visual content of the image.",
    "Provide a brief description of the given image.",
    "Describe what you see in the photo.",
    "Share a short description of this image.",
    "What does this image show? Answer in one sentence.",
    "Caption this image.",
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
_HEADER = re.compile(r"<\|start_header_id\|>(.*?)<\|end_header_id\|>\n\n")
_PLACEHOLDER = re.compile(r"\s*<image>\s*")


# ---------------------------------------------------------------------------- reading files

class RecordFile:
    """The records of one JSON or JSONL file, indexable without holding them as Python
    objects: raw bytes plus two arrays of offsets. DataLoader workers are forked, and
    millions of dicts would be copied into every worker as their reference counts change;
    bytes, numpy arrays and a memory-mapped JSONL file stay shared."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip()
        self.mapped = self.path.suffix == ".jsonl" or head[:1] != b"["
        if not self.mapped:                                         # LLaVA: one JSON list
            with open(self.path, "rb") as f:
                parts = [json.dumps(r, ensure_ascii=False).encode() for r in json.load(f)]
            self.buf = b"".join(parts)
            offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
            self.starts, self.ends = offsets[:-1], offsets[1:]
            return
        self.buf = self._map()                                      # JSONL: one record a line
        starts, ends, pos = [], [], 0
        while pos < len(self.buf):
            end = self.buf.find(b"\n", pos)
            end = len(self.buf) if end < 0 else end
            if self.buf[pos:end].strip():
                starts.append(pos)
                ends.append(end)
            pos = end + 1
        if len(starts) > 1 and not _parses(self.buf[starts[0]:ends[0]]):
            if not head.startswith(b"{") or not _parses(self.buf[:]):
                # a later bad line costs one record; a bad first one means the file is not JSONL
                line = self.buf[:starts[0]].count(b"\n") + 1
                raise ValueError(f"line {line} is not a JSON record; a JSONL file holds one JSON object per line")
            starts, ends = [0], [len(self.buf)]                     # one pretty-printed object
        self.starts, self.ends = np.array(starts, np.int64), np.array(ends, np.int64)

    def _map(self):
        if self.path.stat().st_size == 0:
            return b""
        with open(self.path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __getstate__(self):            # a spawned DataLoader worker re-maps the file
        return {**self.__dict__, "buf": None} if self.mapped else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.mapped:
            self.buf = self._map()

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        """Record i as a dict; a line that is not a JSON object gives {"_error": ...}, which
        to_turns rejects as a malformed record (the dataset skips it, never crashes)."""
        try:
            record = json.loads(self.buf[self.starts[i]:self.ends[i]])
        except ValueError as e:
            return {"_error": f"{self.path.name} record {i}: not JSON ({e})"}
        if not isinstance(record, dict):
            return {"_error": f"{self.path.name} record {i}: not a JSON object"}
        return record


def _parses(raw) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


def read_records(path):
    """Yield the raw records (dicts) of a LLaVA/ShareGPT JSON list or a release JSONL file."""
    records = RecordFile(path)
    for i in range(len(records)):
        yield records[i]


# ---------------------------------------------------------------------------- normal form

def _clean(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"turn text is {type(text).__name__}, not a string")
    return _PLACEHOLDER.sub(" ", text).strip()


def parse_chat(text: str) -> list:
    """A Llama-3 formatted conversation string -> [(role, text), ...]. The last turn may lack
    its <|eot_id|>; text outside header-led turns (<|begin_of_text|>) is ignored."""
    heads = list(_HEADER.finditer(text))
    if not heads:
        raise ValueError("conversation string has no <|start_header_id|>role<|end_header_id|> turns")
    turns = []
    for k, h in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        body = text[h.end():end].split("<|eot_id|>")[0]
        turns.append((h.group(1), body))
    return turns


def format_chat(turns) -> str:
    """[(role, text), ...] -> the release's conversation string (inverse of parse_chat)."""
    return "".join(chat_turn(role, text) for role, text in turns)


def to_turns(record: dict, rng=None):
    """A raw record in either format -> (image path | None, [(role, text), ...]).

    rng (a random.Random) picks the caption instruction; None picks the first. Raises
    ValueError for a record that cannot be read as a conversation."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {type(record).__name__}, not an object")
    if "_error" in record:
        raise ValueError(record["_error"])
    image = record.get("image_url", record.get("image"))
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError(f"image field is {image!r}, not one path")

    conv = record.get("conversations")
    if conv is None:
        caption = record.get("caption", record.get("blip_caption"))
        if caption is None or image is None:
            raise ValueError("record has no conversations, and no caption of an image")
        raw = [("user", ""), ("assistant", caption)]
    elif isinstance(conv, str):                                   # release JSONL
        raw = parse_chat(conv)
    elif isinstance(conv, list):                                  # LLaVA / ShareGPT
        raw = []
        for turn in conv:
            if not isinstance(turn, dict):
                raise ValueError("a conversation turn is not an object")
            raw.append((turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))))
    else:
        raise ValueError(f"conversations is {type(conv).__name__}")

    turns = []
    for role, text in raw:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        role, text = ROLES[role], _clean(text)
        if role == "user" and not text and image is not None:     # "<image>" alone: a caption pair
            text = rng.choice(CAPTION_INSTRUCTIONS) if rng is not None else CAPTION_INSTRUCTIONS[0]
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("conversation has no assistant turn")
    return image, turns


# ---------------------------------------------------------------------------- tokens

def encode_turns(tok, turns, loss_on: str = "assistant"):
    """Turns -> (tokens, labels), two lists of equal length, labels aligned with tokens
    (label i = token i where token i is trained on, IGNORE elsewhere; the model predicts
    label t+1 from position t).

    loss_on="assistant": each assistant turn's text and its <|eot_id|> (what the model must
    generate after the assistant header). loss_on="all": every token after <|begin_of_text|>,
    as the release trains. Only the headers inserted here are special tokens: special-token
    strings inside the data are encoded as plain text.

    Each turn's ids are `Tokenizer.encode_turn`'s, the ones sample.py's prompt is made of: the
    header (with the blank line after it) and the text with its <|eot_id|>."""
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', not {loss_on!r}")
    tokens, labels = [tok.bos_id], [IGNORE]
    for role, text in turns:
        header, body = tok.encode_turn(role, text)
        tokens += header + body
        train = loss_on == "all" or role == "assistant"
        labels += (header if loss_on == "all" else [IGNORE] * len(header)) + (body if train else [IGNORE] * len(body))
    return tokens, labels

"""The release's training examples, token for token: what `--recipe release` trains on.

The Dragonfly release (togethercomputer/Dragonfly at 25a9c6a1) turns a batch of parquet rows into
input ids and labels in its collate, `prepare_dragonfly_sample` (pipeline/data_utils/data.py:72-99,
"D" below), and its processor (src/dragonfly/models/processing_dragonfly.py, "P"). This file is
that path, one function a step, so that a batch here is the batch the release's loss receives
(checked against the release's own output: tests/test_recipe.py, tests/golden/recipe/). What it
does differs from our default (data/formats.py) on purpose, and each difference is a row of
docs/release-facts.md#training-recipe:

  - the prompt is the record's Llama-3 string verbatim, its special-token names read as special
    tokens; a record with a "text" key is a caption, wrapped in one of 22 instructions (D:37-69);
  - an image row's text is cut to int(max_length / 2) - 1 tokens, <|begin_of_text|> included, and
    <|end_of_text|> is appended after the cut (P:360-383);
  - one row without an image makes the whole batch text-only (D:89-91): the text rows are
    `prompt + "<|end_of_text|>"` cut at max_length, and the images are dropped (P:728-753);
  - rows are right-padded with <|end_of_text|>; labels are -100 up to and including the first
    <|begin_of_text|> and the input id everywhere after it, padding included (P:492-504);
  - a row holding more than one <|begin_of_text|> has its last one turned into <|end_of_text|>,
    in ids and labels (`find_and_remove_tokens`, P:468-490).

The image block (2098 positions for the release's crops) is not part of these ids: as in our
default it goes in front of them, and its labels are -100.
"""
import random

from data.formats import IGNORE

# D:37-60, verbatim, the stray quote of "about'?" included (D:47)
CAPTION_INSTRUCTIONS = (
    "Analyze the image in a comprehensive and detailed manner.",
    "What's happening in the scene?",
    "Write a terse but informative summary of the picture.",
    "What are the key elements in this picture?",
    "Present a compact description of the photo's key features.",
    "What do you think is going on in this snapshot?",
    "Describe the following image.",
    "What do you see happening in this image?",
    "Provide a brief description of the given image.",
    "What is this photo about'?",
    "Summarize the visual content of the image.",
    "What is in the photo?",
    "Write a detailed description of the given image.",
    "Can you elaborate on the elements of the picture provided?",
    "Give a brief description of the image.",
    "Explain the visual content of the image in great detail.",
    "Render a clear and concise summary of the photo.",
    "Describe the image concisely.",
    "Give a short and clear explanation of the subsequent image.",
    "Can you describe the main features of this image for me?",
    "Share a concise interpretation of the image provided.",
    "What is this?",
)


def prompt(record: dict, rng: random.Random) -> tuple[str, int | None]:
    """A row -> (its Llama-3 prompt string, the caption instruction's index or None) (D:63-69).
    Any "text" key makes a caption, whatever its value (None becomes "None") and whatever else the
    row holds; otherwise "conversations" must already be one formatted string."""
    if "text" in record:
        k = rng.randrange(len(CAPTION_INSTRUCTIONS))       # random.choice's one draw (D:65)
        return ("<|start_header_id|>user<|end_header_id|>\n\n" + CAPTION_INSTRUCTIONS[k] + "<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{record['text']}<|eot_id|>"), k
    conv = record.get("conversations")
    if not isinstance(conv, str):
        # the release fails here too (its tokenizer or `+` raise): a list of turns is LLaVA's
        # format, which the release never reads; data/llava/prepare.py converts it
        raise ValueError(f"conversations is {type(conv).__name__}, not a Llama-3 formatted string "
                         "(the release reads only its own record format)")
    return conv, None


def image_of(record: dict) -> str | None:
    """The row's image path, or None: a missing, None or blank image_url is no image (D:73-82)."""
    url = record.get("image_url")
    return url if isinstance(url, str) and url.strip() else None


def image_row_ids(tok, text: str, max_length: int) -> list[int]:
    """An image row's text ids (P:360-383): <|begin_of_text|> and the prompt, cut to
    int(max_length / 2) - 1 ids with the BOS counted, then <|end_of_text|>."""
    ids = [tok.bos_id] + tok.encode_with_specials(text)
    ids = ids[:int(max_length / 2) - 1]
    if not ids:       # max_length <= 3 cuts the BOS too; the release then fails in get_labels
        raise ValueError(f"max_length {max_length} leaves no room for <|begin_of_text|> (the release raises IndexError)")
    return ids + [tok.eos_id]


def text_row_ids(tok, text: str, max_length: int) -> list[int]:
    """A text-only row's ids (P:728-753): the prompt with "<|end_of_text|>" appended, tokenized
    with its BOS, then cut at max_length (not half of it), which loses the EOS."""
    return ([tok.bos_id] + tok.encode_with_specials(text + "<|end_of_text|>"))[:max_length]


def labels_of(ids: list[int], bos_id: int) -> list[int]:
    """-100 up to and including the first <|begin_of_text|>, the id everywhere after (P:492-504)."""
    first = ids.index(bos_id)
    return [IGNORE] * (first + 1) + ids[first + 1:]


def last_bos_to_eos(ids: list[int], bos_id: int, eos_id: int) -> int | None:
    """`find_and_remove_tokens` (P:468-490): in a row with more than one BOS, the last becomes EOS
    (in place). Returns its index, or None."""
    where = [i for i, t in enumerate(ids) if t == bos_id]
    if len(where) < 2:
        return None
    ids[where[-1]] = eos_id
    return where[-1]


def collate_rows(tok, records: list[dict], max_length: int, rng: random.Random) -> dict:
    """A batch of rows as the release's collate makes it (D:72-99): {"path": "image" | "text_only",
    "images": [path per row] | None, "tokens", "labels" ([B][L] lists, the positions after the
    image block, right-padded with <|end_of_text|>), "attention_len" [B], "prompts",
    "instructions" [B]}. Raises ValueError where the release raises."""
    drawn = [prompt(r, rng) for r in records]
    prompts, instructions = [p for p, _ in drawn], [k for _, k in drawn]
    images = [image_of(r) for r in records]
    if None in images:                                  # D:89-91: one text row drops every image
        path, rows = "text_only", [text_row_ids(tok, p, max_length) for p in prompts]
        images = None
    else:
        path, rows = "image", [image_row_ids(tok, p, max_length) for p in prompts]
    width = max(len(r) for r in rows)
    attention_len = [len(r) for r in rows]
    tokens = [r + [tok.eos_id] * (width - len(r)) for r in rows]   # pad = eos (P:464, P:514-526)
    for row in tokens:                                  # D:96, after get_labels: the same ids
        last_bos_to_eos(row, tok.bos_id, tok.eos_id)
    labels = [labels_of(row, tok.bos_id) for row in tokens]
    return {"path": path, "images": images, "tokens": tokens, "labels": labels,
            "attention_len": attention_len, "prompts": prompts, "instructions": instructions}

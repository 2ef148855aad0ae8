"""What the loss sees: the first examples of a records file, made as a training run makes them
(`train.py --show-examples N`, with or without `--recipe release`).

Each example is its batch of one: our default (data/dataset.py) or the release's collate
(data/release_recipe.py), so the tokens and labels are the ones the training step gets with
`--micro-batch 1`. Printed for a reader, the image block is one line with its length and the text
is decoded with the trained spans between ⟦ and ⟧; with `--json`, one object per example,
{"tokens", "labels"} for the positions after the image block (labels -100 where nothing trains).
"""
import json

import model as M
from data import release_recipe
from data.dataset import Skipped, VLDataset, collate
from lib import presets
from lib import release_format

OPEN, CLOSE = "⟦", "⟧"


def model_config(cfg) -> M.DragonflyConfig:
    """The config that sets the image block and the crops, without building the model: --model
    tiny's, --init's, else the release's v2 layout (what --clip/--llama start from)."""
    if cfg.model == "tiny":
        return presets.tiny_config(cfg.low_only, cfg.preset, cfg.high_pool)
    if cfg.init:
        return release_format.read_config(cfg.init)[0]
    return presets.PRESETS.get(cfg.preset) or M.v2_config()


def examples(cfg, records, tok, n: int):
    """The first n records as (index, image path | None, image block length, tokens, labels), or
    (index, Skipped) for a record training would skip; images are opened and cropped as training
    opens them, so a missing one shows up here."""
    mcfg = model_config(cfg)
    images = cfg.images or str(records.path.parent)
    if cfg.recipe == "release":
        dataset = release_recipe.ReleaseDataset(records, images, mcfg.crops, cfg.seed, cfg.images_anywhere)
        batch_of = lambda item: release_recipe.collate([item], tok, cfg.max_seq)
    else:
        dataset = VLDataset(records, images, tok, mcfg.crops, M.image_positions(mcfg), max_seq=cfg.max_seq,
                            loss_on=cfg.loss_on, seed=cfg.seed, images_anywhere=cfg.images_anywhere)
        batch_of = lambda item: collate([item], pad_id=tok.eos_id)
    for i in range(min(n, len(records))):
        item = dataset[i]
        batch = batch_of(item)
        part, with_image = (batch["image"], True) if batch["image"] else (batch["text"], False)
        if part is None:
            yield i, item if isinstance(item, Skipped) else Skipped(next(iter(batch["skipped"])), i)
            continue
        image = records[i].get("image_url", records[i].get("image")) if with_image else None
        yield i, image, M.image_positions(mcfg) if with_image else 0, part["tokens"][0].tolist(), part["labels"][0].tolist()


def render(tok, index, image, block, tokens, labels) -> str:
    """One example for a reader: a title line, the image block as one line, the text with its
    trained spans marked."""
    trained = [label != -100 for label in labels]
    lines = [f"example {index}: {len(tokens)} text positions, {sum(trained[1:])} trained"
             + (f", image {image}" if image is not None else ", text only")]
    if block:
        lines.append(f"[image block: {block} positions, not trained]")
    text, start = "", 0
    for k in range(1, len(tokens) + 1):                  # decode runs of equal trained-ness
        if k == len(tokens) or trained[k] != trained[start]:
            piece = tok.decode(tokens[start:k])
            text += f"{OPEN}{piece}{CLOSE}" if trained[start] else piece
            start = k
    return "\n".join(lines + [text, ""])


def show(cfg, records, tok, n: int, as_json: bool, write=print):
    """Print the first n examples (train.py --show-examples); a skipped record is one line."""
    if not as_json:
        write(f"trained text is between {OPEN} and {CLOSE}; recipe: {cfg.recipe}\n")
    for i, *example in examples(cfg, records, tok, n):
        if isinstance(example[0], Skipped):
            write(json.dumps({"index": i, "skipped": example[0].reason}) if as_json
                  else f"example {i}: skipped ({example[0].reason}), as training skips it\n")
        elif as_json:
            write(json.dumps({"tokens": example[2], "labels": example[3]}))
        else:
            write(render(tok, i, *example))

"""The training dataset: records -> (image crops, tokens, labels), batches, and the sampler.

One sample is one image (or none) and one conversation (docs/release-facts.md#image-block). The
image becomes crops.py's low/medium/high crops; the model puts their block of `image_positions`
embeddings in front of the text, so a sample costs image_positions + len(tokens) positions of
the context. Stage 2 mixes in text-only conversations (OpenHermes, MathInstruct) with
probability 0.1 (docs/release-facts.md#training-recipe): `text_prob`.

Nothing here raises on bad data: a missing or broken image, a malformed record, an image path
that leaves the images folder (absolute, or through `..`: a record must not make training read
/etc/passwd), a sample with nothing to learn or too long to fit comes back as `Skipped(reason, index)`, and
`collate` drops it and counts the reason, so one bad file among millions costs one sample,
not the run. Every random choice is a function of (seed, index), so a sample is the same
whichever worker, rank or epoch draws it.
"""
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.images import crop_image
from data.formats import IGNORE, RecordFile, encode_turns, to_turns


@dataclass
class Skipped:
    reason: str        # a short category, counted by collate
    index: int
    detail: str = ""   # the error message, for logs


def _rng(seed, i, purpose):
    # str seeds are hashed with SHA-512: the same in every process, whatever PYTHONHASHSEED
    return random.Random(f"{seed}/{i}/{purpose}")


def open_crops(image: str, images_dir, images_anywhere: bool, crop_cfg, i: int):
    """Record i's image -> (pixels (N, 3, S, S), grids (medium, high)), or a Skipped saying why not:
    a path leaving `images_dir` (unless images_anywhere), a missing file, an unreadable one."""
    # opened as judged: `..` taken away in the text, as _inside counts it
    path = Path(os.path.normpath(images_dir / image if images_dir is not None else image))
    if images_dir is not None and not images_anywhere and not _inside(image):
        return Skipped("image outside the images folder", i, str(path))
    if not path.is_file():
        return Skipped("missing image", i, str(path))
    try:
        crops = crop_image(path, crop_cfg)
    except Exception as e:              # PIL raises many types on hostile files
        return Skipped("bad image", i, f"{path}: {e}")
    return torch.from_numpy(crops.pixels), (crops.medium_grid, crops.high_grid)


class VLDataset(torch.utils.data.Dataset):
    """records_path: LLaVA/ShareGPT JSON or release JSONL (formats.py), or its RecordFile; image paths in it are
    relative to images_dir, and must stay inside it unless images_anywhere. JSONL is memory-mapped; a JSON list is parsed whole at start, so
    convert large sets first (data/llava/prepare.py). Item i: {"tokens", "labels" (T,),
    "pixels" (N, 3, S, S) | None, "grids" (medium, high) | None, "truncated", "index"} or Skipped."""

    def __init__(self, records_path, images_dir, tok, crop_cfg, image_positions: int, max_seq: int = 4096,
                 loss_on: str = "assistant", text_path=None, text_prob: float = 0.0, seed: int = 0,
                 images_anywhere: bool = False):
        if text_prob > 0 and text_path is None:
            raise ValueError("text_prob > 0 needs text_path, the text-only records to mix in")
        self.records = records_path if isinstance(records_path, RecordFile) else RecordFile(records_path)
        self.text = RecordFile(text_path) if text_path is not None else None
        if self.text is not None and text_prob > 0 and len(self.text) == 0:
            raise ValueError(f"{text_path}: no text-only records to mix in")
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.tok, self.crop_cfg, self.image_positions = tok, crop_cfg, image_positions
        self.max_seq, self.loss_on = max_seq, loss_on
        self.text_prob, self.seed, self.images_anywhere = text_prob, seed, images_anywhere

    def __len__(self):
        return len(self.records)

    def source(self, i):
        """Where sample i comes from: ("text", j) for a mixed-in text-only record j, else ("records", i)."""
        rng = _rng(self.seed, i, "mix")
        if self.text is not None and rng.random() < self.text_prob:
            return "text", rng.randrange(len(self.text))
        return "records", i

    def __getitem__(self, i):
        which, j = self.source(i)
        record = (self.text if which == "text" else self.records)[j]
        try:
            image, turns = to_turns(record, _rng(self.seed, f"{which}{j}", "caption"))
            if which == "text":
                image = None                        # text-only mixing never brings an image
            tokens, labels = encode_turns(self.tok, turns, self.loss_on)
        except (ValueError, KeyError, TypeError) as e:
            return Skipped("malformed record", i, str(e))
        if all(label == IGNORE for label in labels):
            return Skipped("nothing supervised", i)

        # the image block is fixed; only the text is cut, from the end (max sequence 4096:
        # docs/release-facts.md#training-recipe)
        budget = self.max_seq - (self.image_positions if image is not None else 0)
        truncated = len(tokens) > budget
        if truncated:
            tokens, labels = tokens[:max(budget, 0)], labels[:max(budget, 0)]
            if all(label == IGNORE for label in labels[1:]):   # label 0 is never predicted
                return Skipped("too long", i, f"{len(tokens)} text tokens, room for {budget}")

        pixels = grids = None
        if image is not None:
            opened = open_crops(image, self.images_dir, self.images_anywhere, self.crop_cfg, i)
            if isinstance(opened, Skipped):
                return opened
            pixels, grids = opened
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixels": pixels, "grids": grids, "truncated": truncated, "index": i}


def _inside(relative: str) -> bool:
    """Whether a record's image path stays in the images folder: not absolute, no `..` out of it.
    Judged on the text, so a symlink the folder's owner put inside it still counts as inside."""
    normal = os.path.normpath(relative)
    return not os.path.isabs(normal) and normal.split(os.sep)[0] != ".."


def _pad(rows, key, value):
    T = max(len(r[key]) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r[key])] = r[key]
    return out


def _sub_batch(rows, pad_id):
    labels = _pad(rows, "labels", IGNORE)
    return {"tokens": _pad(rows, "tokens", pad_id), "labels": labels,
            "n_labels": int((labels[:, 1:] != IGNORE).sum()),   # the positions the loss averages over
            "index": [r["index"] for r in rows]}


def collate(batch, pad_id):
    """Samples -> {"image": sub-batch | None, "text": sub-batch | None, "skipped": Counter of
    reasons, "truncated": count}. Image rows and text-only rows go to separate sub-batches
    because one forward pass has one image-block length (0 for text). Each sub-batch holds
    tokens and labels (B, T), right-padded with pad_id and IGNORE (harmless under causal
    attention), n_labels and the sample indices; the image one also pixels (B, N, 3, S, S)
    and grids ([medium (cols, rows)], [high (cols, rows)]) as Dragonfly.forward takes them."""
    skipped = Counter(s.reason for s in batch if isinstance(s, Skipped))
    rows = [s for s in batch if not isinstance(s, Skipped)]
    out = {"image": None, "text": None, "skipped": skipped, "truncated": sum(r["truncated"] for r in rows)}
    image_rows = [r for r in rows if r["pixels"] is not None]
    text_rows = [r for r in rows if r["pixels"] is None]
    if image_rows:
        shapes = {tuple(r["pixels"].shape) for r in image_rows}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch have different crop stacks {sorted(shapes)}; "
                             "the crop config must give every image the same number of crops")
        out["image"] = {**_sub_batch(image_rows, pad_id),
                        "pixels": torch.stack([r["pixels"] for r in image_rows]),
                        "grids": ([r["grids"][0] for r in image_rows], [r["grids"][1] for r in image_rows])}
    if text_rows:
        out["text"] = _sub_batch(text_rows, pad_id)
    return out



class SkipCount:
    """Samples used and records skipped (by reason) over a run. Skipping keeps one bad file from
    ending a run, but a run whose data are mostly unusable (a wrong --images root, a format
    the reader does not know) must stop rather than train on the rest, or on nothing: `problem`
    says so when none of the first min(n_records, 16) records was usable, or when more than
    `max_skip` of the records read were skipped, judged after min(n_records, 64) of them (a
    sample large enough that a few bad batches in a row do not count), or at the end."""

    def __init__(self, n_records: int, max_skip: float):
        self.n_records, self.max_skip = n_records, max_skip
        self.used, self.skipped, self.truncated = 0, Counter(), 0

    def add(self, used: int, skipped: Counter, truncated: int = 0):
        self.used += used
        self.skipped.update(skipped)
        self.truncated += truncated

    def problem(self, final: bool = False):
        """Why the run must stop, or None."""
        seen, skipped = self.used + sum(self.skipped.values()), sum(self.skipped.values())
        if self.used == 0 and (final or seen >= min(self.n_records, 16)):
            return f"no usable sample in the {seen} records read (skipped: {self.reasons()})"
        if skipped > self.max_skip * seen and (final or seen >= min(self.n_records, 64)):
            return (f"{skipped} of the {seen} records read were skipped ({self.reasons()}), "
                    f"more than --max-skip {self.max_skip:g}: fix the data, or raise --max-skip")
        return None

    def reasons(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common()) or "none"

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        return (f"data: {self.used} samples used, {skipped} records skipped" + (f" ({self.reasons()})" if skipped else "")
                + f", {self.truncated} truncated")


class ShardedSampler(torch.utils.data.Sampler):
    """Every world-th index of a permutation of range(n), starting at rank; reshuffled each
    epoch from (seed, epoch). Like torch's DistributedSampler, the permutation is padded by
    wrapping around so all ranks get ceil(n / world) indices and step in lockstep.

    Resume: `start(k)` makes iteration begin at the k-th index of this rank's list for the
    epoch (until the next set_epoch). `position` counts the indices handed out; a DataLoader
    with workers prefetches ahead of training, so a checkpoint should store the number of
    samples the loop consumed this epoch: `state(consumed)`."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.per_rank = math.ceil(n / world)
        self.epoch, self._start, self.position = 0, 0, 0

    def set_epoch(self, epoch: int):
        self.epoch, self._start, self.position = epoch, 0, 0

    def start(self, index_within_epoch: int):
        if not 0 <= index_within_epoch <= self.per_rank:
            raise ValueError(f"start {index_within_epoch} is outside this rank's epoch of {self.per_rank}")
        self._start = self.position = index_within_epoch

    def indices(self) -> list:
        """This rank's whole list for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        while len(order) < total:               # wrap, more than once if world > n
            order += order[:total - len(order)]
        return order[self.rank:total:self.world]

    def __iter__(self):
        self.position = self._start
        for i in self.indices()[self._start:]:
            self.position += 1
            yield i

    def __len__(self):
        return self.per_rank - self._start

    def state(self, consumed: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position if consumed is None else consumed,
                "n": self.n, "world": self.world, "seed": self.seed}

    def load_state(self, state: dict):
        for key in ("n", "world", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state is for {key}={state[key]}, this run has {key}={getattr(self, key)}: "
                                 "resuming would repeat or skip samples")
        self.set_epoch(state["epoch"])
        self.start(state["position"])

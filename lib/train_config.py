"""The configuration of a training run: every train.py flag with its help line, its default
(per stage, v2 Table 10 and Dragonfly-Med Table 16; docs/release-facts.md#training-recipe) and the values it accepts; which
settings make up the run (a --resume must repeat them); and the paths it reads, which its
--out must not write over.
"""
import argparse
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lib import presets
from lib import release_recipe
from lib import weights

STAGES = {  # v2 Table 10 (pretrain, sft) and Dragonfly-Med Table 16 stage 1 (med-vision)
    "pretrain":   dict(trainable=("projection",), batch_size=64, lr=2e-5, grad_checkpoint=False),
    "sft":        dict(trainable=("projection", "vision", "llm"), batch_size=16, lr=2e-6, grad_checkpoint=True),
    "med-vision": dict(trainable=("projection", "vision"), batch_size=64, lr=2e-5, grad_checkpoint=False),
}


POSITIVE = (lambda v: 0 < v < math.inf, "above 0")
COUNT = (lambda v: 0 <= v < math.inf, "0 or more")
FRACTION = (lambda v: 0 <= v <= 1, "from 0 to 1")
SEED = (lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1 (numpy's range)")


def opt(default, help, choices=None, valid=None):
    """A TrainConfig field with its --help line (and the values it accepts: choices, or
    valid = (predicate, what it asks for))."""
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid})


@dataclass
class TrainConfig:
    recipe: str = opt("ours", "ours: this project's recipe; release: every example, target and optimizer step as the release "
                              "trains them, its scripts' numbers as the stage defaults (docs/training.md#the-release-recipe)",
                      ("ours", "release"))
    stage: str = opt("sft", "what trains, with the stage's batch, lr and checkpointing (v2 Table 10, Med Table 16)", tuple(STAGES))
    model: str = opt("", "tiny: the zoom demo's small random model; omit to start from --init, or --clip + --llama", ("tiny",))
    init: str = opt("", "a Dragonfly checkpoint directory to start from (e.g. stage 1's OUT/final)")
    clip: str = opt("", "OpenAI CLIP directory (Hugging Face layout): stage 1 from the backbones, with --llama")
    llama: str = opt("", "Llama-3 directory (Hugging Face layout), with --clip")
    tokenizer: str = opt("", "tokenizer.model/.json or a folder with one; default: from --init, then --llama "
                             "(--model tiny: the shipped checkpoints/zoom-tiny one)")
    data: str = opt("", "training records (LLaVA JSON or release JSONL), or a folder holding train.jsonl; required")
    images: str = opt("", "folder the records' image paths are relative to; empty: the records file's folder")
    images_anywhere: bool = opt(False, "let records name images outside --images (absolute paths, ../); off: such records are skipped")
    text_data: str = opt("", "text-only conversations: mixed in at --text-prob; --recipe release: one batch added every "
                             "10th iteration")
    text_prob: float = opt(0.0, "chance that a sample comes from --text-data (the release: 0.1 in stage 2)", valid=FRACTION)
    math_data: str = opt("", "--recipe release: math conversations, one batch added every 50th iteration (none: no math batches)")
    loss_on: str = opt("assistant", "the text that gets a loss; all = every token after <|begin_of_text|>, as the release",
                       ("assistant", "all"))
    max_seq: int = opt(4096, "positions per sample, image block included; longer text is cut from the end", valid=POSITIVE)
    low_only: bool = opt(False, "the low-resolution crop only (the paper's L ablation; --model tiny)")
    preset: str = opt("", "a presets.py name: from --clip/--llama the whole config; with --model tiny its resolution levels")
    high_pool: int = opt(0, "--model tiny: pooled side of each high crop's 8x8 grid (0: the demo's 2)", valid=COUNT)
    trainable: tuple = opt((), "the parts that train", ("projection", "vision", "llm"))
    batch_size: int = opt(16, "global batch in samples, whatever the number of processes", valid=POSITIVE)
    micro_batch: int = opt(1, "samples per forward pass and process; gradient accumulation makes up the batch", valid=POSITIVE)
    lr: float = opt(2e-6, "peak learning rate (AdamW, betas 0.9, 0.999)", valid=POSITIVE)
    min_lr_ratio: float = opt(0.0, "the cosine schedule's last lr, as a fraction of --lr", valid=FRACTION)
    warmup: float = opt(0.01, "linear warmup, as a fraction of the steps", valid=FRACTION)
    weight_decay: float = opt(0.1, "AdamW weight decay (none on biases, norms and CLS)", valid=COUNT)
    grad_clip: float = opt(1.0, "clip the gradient norm to this", valid=POSITIVE)
    epochs: float = opt(1.0, "passes over --data (fractions allowed)", valid=POSITIVE)
    max_steps: int = opt(0, "optimizer steps; 0: from --epochs", valid=COUNT)
    dtype: str = opt("auto", "compute dtype; auto: bfloat16 on CUDA, float32 on CPU", ("auto", "float32", "bfloat16"))
    seed: int = opt(0, "seed of the data order, the captions' instructions and a fresh model's weights", valid=SEED)
    # the fields from here on say how the run is carried out, not what it learns: they may change on --resume
    out: str = opt("out/run", "output folder: config.json, log.jsonl, checkpoints step_N, the exported final")
    workers: int = opt(2, "DataLoader worker processes per training process", valid=COUNT)
    save_every: int = opt(1000, "a checkpoint every N steps (also on SIGTERM, Ctrl-C and at the end)", valid=POSITIVE)
    resume: bool = opt(False, "continue the run in --out from its newest intact checkpoint; the flags above --out must be the run's")
    force: bool = opt(False, "a fresh run into an --out that holds another run: delete that run first")
    stop_after: int = opt(0, "testing aid: stop after N steps as if interrupted; 0: never", valid=COUNT)
    export_dtype: str = opt("float32", "dtype of OUT/final's weights (bfloat16 halves the size)", ("float32", "bfloat16", "float16"))
    max_skip: float = opt(0.5, "stop once more than this fraction of the records read is skipped (malformed, missing image, ...)",
                          valid=FRACTION)
    grad_checkpoint: bool = opt(True, "recompute each block in the backward: less memory, ~1/3 more compute")
    show_examples: int = opt(0, "print the first N examples as the loss sees them (trained spans marked) and exit; 0: train",
                             valid=COUNT)
    json: bool = opt(False, "with --show-examples: one JSON object per example, {tokens, labels} after the image block")


def show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return (" ".join(value) if isinstance(value, tuple) else str(value)) or "none"


def parse_config(argv=None, description=None, prog=None) -> TrainConfig:
    """Stage defaults first, then every field overridable from the command line; a value outside
    its field's range (`valid`) is a one-line error."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        by_stage = {stage: d[f.name] for stage, d in STAGES.items() if f.name in d}
        default = ", ".join(f"{stage} {show(v)}" for stage, v in by_stage.items()) if by_stage else show(f.default)
        kw = dict(default=None, choices=f.metadata["choices"], help=f"{f.metadata['help']} (default: {default})")
        if f.type in (bool, "bool"):
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=str if f.name == "trainable" else type(f.default),
                           nargs="+" if f.name == "trainable" else None, **kw)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "trainable" in args:
        args["trainable"] = tuple(args["trainable"])
    if args.get("preset") and (args["preset"] not in presets.PRESETS or args.get("init")):
        p.error("--preset: a name from `python -m tools.presets --list`, with --model tiny or --clip/--llama, not --init")
    stage = args.get("stage", TrainConfig.stage)
    if args.get("recipe") == "release":
        if stage not in release_recipe.SCRIPTS:
            raise SystemExit(f"error: --recipe release: the release has stages {' and '.join(release_recipe.SCRIPTS)} "
                             f"(its two scripts), not {stage}")
        if args.get("text_prob"):
            raise SystemExit("error: --recipe release adds --text-data batches every 10th iteration; --text-prob is ours")
        defaults = release_recipe.stage_defaults(stage)
    else:
        defaults = STAGES[stage]
    cfg = replace(TrainConfig(), **{**defaults, **args})
    for f in fields(cfg):
        if f.metadata["valid"] and not f.metadata["valid"][0](getattr(cfg, f.name)):
            raise SystemExit(f"error: --{f.name.replace('_', '-')} {getattr(cfg, f.name)}: must be {f.metadata['valid'][1]}")
    return cfg


def run_identity(cfg: TrainConfig, data: Path, world: int) -> dict:
    """What decides what a run learns, which a --resume must repeat: the fields above `out`
    (paths made absolute), the content of the data files (a file replaced by another of the same
    name is other data) and the number of processes (each one's share of the data)."""
    names = [f.name for f in fields(cfg)]
    kept = {k: getattr(cfg, k) for k in names[:names.index("out")]}
    paths = {k: str(Path(v).resolve()) for k, v in kept.items()
             if k in ("init", "clip", "llama", "tokenizer", "images", "text_data", "math_data") and v}
    digests = {"data_sha256": weights.file_sha256(data)[:16]}
    for key in ("text_data", "math_data"):
        if getattr(cfg, key):
            digests[f"{key}_sha256"] = weights.file_sha256(getattr(cfg, key))[:16]
    return json.loads(json.dumps({**kept, **paths, "data": str(data.resolve()), **digests, "processes": world}))


def inputs(cfg: TrainConfig, data: Path, tokenizer: Path) -> dict:
    """The paths training reads, which --out must not write over: flag -> (path, whether an --out
    inside it is refused too, as inside a model folder)."""
    found = {"--init": (cfg.init, True), "--clip": (cfg.clip, True), "--llama": (cfg.llama, True),
             "--tokenizer" if cfg.tokenizer else "the tokenizer": (tokenizer, True),
             "--data": (data, False), "--images": (cfg.images or data.parent, False), "--text-data": (cfg.text_data, False),
             "--math-data": (cfg.math_data, False)}
    return {flag: (path, inside) for flag, (path, inside) in found.items() if path}

"""The release's optimiser, schedule and stage settings: what `--recipe release` trains with.

Read from togethercomputer/Dragonfly at 25a9c6a1: pipeline/train/training.py ("T"), the two launch
scripts train_dragonfly_stage1.sh / train_dragonfly_stage2.sh ("S1", "S2") and the accelerate
config they launch with, pipeline/accelerate_configs/accelerate_config_zero1.yaml ("Z1"). Each
setting is a row of docs/release-facts.md#training-recipe; the numbers are checked against the
release's own code in tests/test_recipe.py (tests/golden/recipe/).

One unit needs care. The release counts *loop iterations* (`global_step`, `--total_training_steps`),
each one per-GPU batch on 8 GPUs; Z1's `gradient_accumulation_steps: 2` makes an optimizer update
of two iterations, while the scheduler is sized with the script's 1 (T:640-647) and steps once per
update. train.py counts optimizer updates, so a release stage of N iterations is N / 2 of our
steps, and the cosine over them is the release's N-iteration cosine, which ends at half its
length (near half the peak lr): the release's bug, kept.
"""
import math

import torch

from lib.release_format import checkpoint_names

ITERATIONS_PER_UPDATE = 2    # Z1:3 gradient_accumulation_steps, overriding T:203's 1 (T:549)
GPUS = 8                     # S1:3 / S2:3 --num_processes 8
TEXT_EVERY = 10              # T:160 --text_alternate_step: a text batch at iterations 9, 19, ...
MATH_EVERY = 50              # T:165 --math_alternate_step: a math batch at iterations 49, 99, ...

# The launch scripts' numbers as they stand (S1:4-23, S2:4-31, T:236 weight decay); `stage_defaults`
# turns them into train.py's flags.
SCRIPTS = {
    "pretrain": dict(per_gpu_batch=4, iterations=17400, lr=2e-5, warmup_ratio=0.01, weight_decay=0.1,
                     max_seq=4096, seed=42, grad_checkpoint=False, trainable=("projection",),
                     text_and_math=False),   # S1 passes no --together_text/math_datasets
    "sft": dict(per_gpu_batch=1, iterations=507798, lr=2e-6, warmup_ratio=0.01, weight_decay=0.1,
                max_seq=4096, seed=42, grad_checkpoint=True, trainable=("projection", "vision", "llm"),
                text_and_math=True),         # S2 passes --together_text_datasets and --together_math_datasets
}


def stage_defaults(stage: str) -> dict:
    """train.py's stage defaults under --recipe release: a global batch of per-GPU batch x 8 GPUs x
    2 iterations per update, micro-batches of the per-GPU batch, the iterations / 2 updates."""
    s = SCRIPTS[stage]
    return dict(trainable=s["trainable"], batch_size=s["per_gpu_batch"] * GPUS * ITERATIONS_PER_UPDATE,
                micro_batch=s["per_gpu_batch"], lr=s["lr"], warmup=s["warmup_ratio"],
                weight_decay=s["weight_decay"], max_seq=s["max_seq"], seed=s["seed"],
                grad_checkpoint=s["grad_checkpoint"], max_steps=s["iterations"] // ITERATIONS_PER_UPDATE,
                grad_clip=1.0, min_lr_ratio=0.0)


def decays(release_name: str) -> bool:
    """T:65-80's rule on the release's parameter name. It decays the final `norm.weight`, CLIP's
    `layer_norm1/2`, `pre_layrnorm` ("layernorm" matches none of them) and never the projection:
    "vision_embed_tokens" contains "embed_tokens", so stage 1 has no decay at all."""
    return ("weight" in release_name and "layernorm" not in release_name and "lm_head" not in release_name
            and "embed_tokens" not in release_name)


def freeze(model, trainable):
    """T:602-610: stage 1 (`--tune_vision_embed_tokens_only`) trains the projection alone; stage 2
    every parameter, the CLIP layer after the feature layer and its post_layernorm included,
    though they get no gradient (the release reads hidden_states[-2])."""
    everything = set(trainable) >= {"projection", "vision", "llm"}
    model.requires_grad_(everything)
    if not everything:
        model.projection.requires_grad_(True)


def param_groups(model, weight_decay):
    """T:65-80 and T:630: the decayed group first, then the rest, each in our model's order (the
    release's is its module order; AdamW updates each parameter alone, so the order changes nothing)."""
    release = checkpoint_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(release[n])], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(release[n])], "weight_decay": 0.0}]


def cosine_with_warmup(step: int, num_warmup_steps: float, num_training_steps: int) -> float:
    """transformers 4.45.2 get_cosine_schedule_with_warmup's multiplier at scheduler step `step`."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def lr_at(step: int, total_iterations: int, warmup_ratio: float, ga_arg: int = 1) -> float:
    """The multiplier at scheduler step `step` as T:635-648 builds it: warmup_steps =
    total * ratio (a float), then num_warmup_steps = warmup_steps // GA and num_training_steps =
    total // GA, with GA the script's --gradient_accumulation_steps (1)."""
    return cosine_with_warmup(step, (total_iterations * warmup_ratio) // ga_arg, total_iterations // ga_arg)


def lr_lambda(total_updates: int, warmup_ratio: float):
    """LambdaLR's function for a run of `total_updates` of our steps: the release's scheduler sized
    for the updates' iterations, stepped once per update (the GA mismatch, module docstring)."""
    iterations = total_updates * ITERATIONS_PER_UPDATE
    return lambda step: lr_at(step, iterations, warmup_ratio)


def extra_batches(iteration: int) -> tuple:
    """The streams whose batch the release adds to this iteration's image batch (T:359, T:383)."""
    return (("text",) if (iteration + 1) % TEXT_EVERY == 0 else ()) + \
           (("math",) if (iteration + 1) % MATH_EVERY == 0 else ())


def logged_loss(image: float, text: float | None = None, math_: float | None = None) -> float:
    """The `loss` the release logs for an iteration (T:380, T:404): the image and text losses
    averaged, then that and the math loss averaged; the gradients of all of them simply add."""
    total = image
    if text is not None:
        total = (total + text) / 2
    if math_ is not None:
        total = (total + math_) / 2
    return total


def adamw(groups, lr, device) -> torch.optim.Optimizer:
    """T:630: torch.optim.AdamW with its defaults (betas 0.9, 0.999, eps 1e-8) but the groups' decay."""
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def step_passes(step: int, parts: list, extras: dict) -> list:
    """One of our steps as the release's backward passes: [(iteration, kind, sub-batch)]. Its
    micro-batches are the update's two iterations, first half then second (`parts`, in order); an
    iteration that draws a text or math batch (`extra_batches`) gets one from extras[kind]() per
    micro-batch of that iteration, as each of the release's GPUs draws its own."""
    half = max(1, len(parts) // ITERATIONS_PER_UPDATE)
    passes = [(step * ITERATIONS_PER_UPDATE + min(ITERATIONS_PER_UPDATE - 1, j // half), "image", p)
              for j, p in enumerate(parts)]
    for g in sorted({g for g, _, _ in passes}):
        mine = sum(1 for h, _, _ in passes if h == g)
        passes += [(g, kind, extras[kind]()) for kind in extra_batches(g) if kind in extras for _ in range(mine)]
    return passes


def forward_backward(model, passes: list, n_micro: int, device, autocast):
    """The release's gradients for one update: each pass's loss is the mean cross-entropy over its
    own trained labels (LlamaForCausalLM's loss), scaled by 1 / micro-batches per update as
    DeepSpeed scales by 1 / GA; text and math passes add to the image ones (T:360-402). Returns
    (the loss the release logs for the update's last iteration, positions run)."""
    losses, positions = {}, 0
    for g, kind, p in passes:
        pixels = p.get("pixels") if kind == "image" else None
        with autocast:
            _, loss = model(p["tokens"].to(device), None if pixels is None else pixels.to(device),
                            p["labels"].to(device), grids=p.get("grids") or (None, None), reduction="sum")
        loss = loss / max(1, p["n_labels"])
        (loss / n_micro).backward()
        losses.setdefault((g, kind), []).append(loss.detach())
        positions += p["tokens"].numel()
    last = max(g for g, _ in losses)
    mean = {kind: torch.stack(v).mean() for (g, kind), v in losses.items() if g == last}
    return logged_loss(mean.get("image", torch.zeros((), device=device)), mean.get("text"), mean.get("math")), positions

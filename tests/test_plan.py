"""plan.py's numbers against measured ones (a CPU training step, one process and two gloo
processes), against hand-counted parameters of the release, and train.py's FSDP2 wiring run at
the full 8B size on meta tensors with a fake process group of 8."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import model as M
from tools import plan
from lib import presets
from lib import training
from lib import train_config
from conftest import ROOT, free_port, script
from plan_measure import TEXT, small_config

V2 = presets.PRESETS["dragonfly-v2"]
# The release by hand (docs/release-facts.md#checkpoints): Llama-3.1-8B, CLIP ViT-L/14@336's vision tower, the projection.
LLAMA = 2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
VIT_BLOCK = 4 * (1024 * 1024 + 1024) + 1024 * 4096 + 4096 + 4096 * 1024 + 1024 + 4 * 1024
VIT = 1024 * 3 * 14 * 14 + 1024 + 577 * 1024 + 2 * 1024 + 24 * VIT_BLOCK + 2 * 1024
PROJECTION = 1024 * 4096 + 4096
NEVER_RUN = VIT_BLOCK + 2 * 1024  # block 24 and ln_post: Dragonfly reads block 23's output
TRAINED = {"pretrain": PROJECTION, "sft": LLAMA + VIT + PROJECTION - NEVER_RUN,
           "med-vision": VIT + PROJECTION - NEVER_RUN}


def test_release_parameter_count_is_8_34_billion():
    assert LLAMA == 8_030_261_248 and LLAMA + VIT + PROJECTION == 8_337_967_104  # Llama-3.1-8B's published count


@pytest.mark.parametrize("stage", list(train_config.STAGES))
def test_full_size_params_grads_and_adam_bytes_follow_the_parameter_count(stage):
    s = plan.sharded(plan.meta_model(V2, train_config.STAGES[stage]["trainable"]), world=1)
    assert s["params"] == 4 * (LLAMA + VIT + PROJECTION)          # float32 masters of every parameter
    assert s["grads"] == 4 * TRAINED[stage] and s["adam"] == 8 * TRAINED[stage]
    eight = plan.sharded(plan.meta_model(V2, train_config.STAGES[stage]["trainable"]), world=8)
    assert s["params"] / 8 <= eight["params"] <= s["params"] / 8 * 1.001  # padding of dim 0 to a multiple of 8


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_meta_device_counts_the_same_saved_bytes_as_real_tensors(grad_checkpoint):
    trainable = train_config.STAGES["sft"]["trainable"]
    meta = plan.saved_bytes(plan.meta_model(small_config(), trainable, torch.float32), 1, TEXT, grad_checkpoint, flash=False)
    torch.manual_seed(0)
    real = M.Dragonfly(small_config())
    training.freeze(real, trainable)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        cpu = plan.saved_bytes(real, 1, TEXT, grad_checkpoint)
    # a meta tensor cannot select the supervised labels: the mask and the selected targets (T bytes + 8 T) go uncounted
    assert 0 <= cpu["saved"] - meta["saved"] <= 9 * TEXT and meta["largest_block"] == cpu["largest_block"] > 0


def test_flash_attention_is_counted_without_the_score_matrix():
    B, h, kv, T, d = 1, 32, 8, 2400, 128
    q = torch.zeros(B, h, T, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.zeros(B, kv, T, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes()),
                                                  lambda t: t):
        plan.meta_flash(q, k, v, is_causal=True, enable_gqa=True)
    want = 4 * B * h * T * d * 2 + B * h * T * 4  # q, k and v repeated to 32 heads, the output; float32 log-sum-exp
    assert want <= sum(saved.values()) <= want + 64   # + the kernel's two 8-byte RNG words


def measure(world, grad_checkpoint):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "plan_measure.py"), "--world", str(world)]
    out = subprocess.run(cmd + (["--grad-checkpoint"] if grad_checkpoint else []), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-1000:]}\nstderr:\n{out.stderr[-4000:]}"
    return sorted((json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")), key=lambda r: r["rank"])


def predicted_step(world, grad_checkpoint):
    m = plan.meta_model(small_config(), train_config.STAGES["sft"]["trainable"], torch.float32)
    mem = plan.memory(m, world, 1, grad_checkpoint, TEXT, flash=False)
    return mem, mem["grads"] + mem["activations"] + mem["transient"]  # what step 2 adds to params and AdamW state


# The plan sums, at the start of the backward, gradients and transients that in fact come and go
# as the backward frees activations: an upper bound. Measured here: 12-15% under it in one
# process, 16-22% with two (FSDP2's float32 gather needs no separate float32 reduce copy).
MARGIN = 1.3


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "checkpointed"])
def test_one_process_step_peak_is_under_the_plan_within_margin(grad_checkpoint):
    (r,) = measure(1, grad_checkpoint)
    mem, step = predicted_step(1, grad_checkpoint)
    assert (r["params"], r["trained"], r["adam"]) == (mem["params"], mem["grads"], mem["adam"])
    assert mem["activations"] < r["step_peak"] <= step <= MARGIN * r["step_peak"]


def test_two_gloo_processes_hold_the_planned_shards_and_peak():
    ranks = measure(2, grad_checkpoint=True)  # stage 2's setting; a minute on a busy 2-core machine
    mem, step = predicted_step(2, grad_checkpoint=True)
    assert len(ranks) == 2
    assert (ranks[0]["params"], ranks[0]["trained"], ranks[0]["adam"]) == (mem["params"], mem["grads"], mem["adam"])
    assert sum(r["params"] for r in ranks) == plan.sharded(plan.meta_model(small_config(), (), torch.float32), 1)["params"]
    for r in ranks:
        assert mem["activations"] < r["step_peak"] <= step <= MARGIN * r["step_peak"]


@pytest.fixture
def fake_world_of_8():
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", list(train_config.STAGES))
def test_train_builds_freezes_shards_and_optimizes_the_8b_on_8_ranks(stage, fake_world_of_8):
    """train.py's own freeze, shard and param_groups on the full v2 model (meta tensors). The
    forward itself cannot run here: FSDP2 refuses parameters still on the meta device
    ("should be materialized from meta device before training"); plan.py counts that forward
    on the unsharded meta model instead."""
    trainable = train_config.STAGES[stage]["trainable"]
    with torch.device("meta"):
        model = M.Dragonfly(V2)
    training.freeze(model, trainable)
    for b in plan.blocks(model):
        b.grad_checkpoint = True
    training.shard(model, torch.bfloat16)
    optim = torch.optim.AdamW(training.param_groups(model, 0.1), lr=2e-6, fused=False)
    in_optim = [p for g in optim.param_groups for p in g["params"]]
    assert sum(p.numel() for p in in_optim) == TRAINED[stage]          # DTensor: the global count
    assert all(p.requires_grad for p in in_optim) and len(in_optim) == len({id(p) for p in in_optim})
    local = sum(p.to_local().numel() for p in model.parameters()) * 4
    assert local == plan.sharded(plan.meta_model(V2, trainable), world=8)["params"]  # rank 0 holds the padded share
    assert all(str(p.placements) == "(Shard(dim=0),)" for p in model.parameters())


def test_plan_prints_both_checkpointing_settings_as_json():
    out = subprocess.run([sys.executable, *script("tools/plan.py"), "--stage", "pretrain", "--gpus", "8", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    p = json.loads(out.stdout)
    assert [r["grad_checkpoint"] for r in p["runs"]] == [False, True]
    on = p["runs"][1]
    assert on["memory"]["activations"] < p["runs"][0]["memory"]["activations"] and on["max_micro_batch"] >= 1
    assert math.isclose(on["hours"] * 8, on["gpu_hours"]) and on["samples"] == 558_000


def test_plan_refuses_a_sequence_shorter_than_the_image_block():
    out = subprocess.run([sys.executable, *script("tools/plan.py"), "--max-seq", "1000"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: --max-seq 1000: the image block alone takes 2098 positions"]


def test_gpu_script_dry_run_takes_the_training_steps_on_cpu():
    out = subprocess.run(["bash", str(ROOT / "tests" / "gpu.sh"), "--dry"], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, MASTER_PORT=str(free_port())))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "-m tools.bench --config full --device cuda --dtype bfloat16 --quantize int8" in out.stdout
    assert "env DRAGONFLY_TEST_DEVICE=cuda" in out.stdout  # step 1: the goldens checked on the GPU itself
    steps = [x for x in out.stdout.splitlines() if x.startswith("checkpointing")]
    assert len(steps) == 2 and all("samples/s (plan " in x and "GiB (plan " in x for x in steps)


def test_plan_with_the_release_recipe_counts_its_iterations_and_its_text_and_math_passes():
    # train_dragonfly_stage2.sh: 507798 iterations of 1 sample on each of 8 GPUs; a text batch every
    # 10th and a math batch every 50th iteration (T:160, T:165) add 12% text-only samples
    ours = plan.plan(train_config.parse_config(["--stage", "sft"]), gpus=(8,))["runs"][0]
    release = plan.plan(train_config.parse_config(["--stage", "sft", "--recipe", "release"]), gpus=(8,))["runs"][0]
    assert release["samples"] == 507_798 * 8
    text_only = presets.train_flops_per_sample(presets.PRESETS["dragonfly-v2"], release["text"], ("projection", "vision", "llm"),
                                                image=False)
    assert math.isclose(release["tflops_per_sample"] * 1e12, ours["tflops_per_sample"] * 1e12 + 0.12 * text_only, rel_tol=1e-9)


@pytest.mark.parametrize("tool,args", [("tools/plan.py", ["--json"]), ("tools/presets.py", ["--table"])])
def test_a_full_stdout_is_one_line(tool, args):
    import subprocess
    import sys
    from conftest import ROOT, script
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, *script(tool), *args], stdout=full, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: cannot write to stdout (No space left on device)"], r.stderr


def test_gpu_script_makes_the_venv_on_a_fresh_clone_when_no_python_is_given(tmp_path):
    # what runs first on a rented H100: `bash tests/gpu.sh` with no $PYTHON and no .venv yet
    import shutil
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    for name in ("run.sh", "requirements.txt", "tests/gpu.sh", "tests/requirements.txt"):
        shutil.copy(ROOT / name, clone / name)
    fake_python = tmp_path / "python3"   # stands for the machine's python: records what run.sh asks of it
    fake_python.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\nexit 1\n")
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    out = subprocess.run(["bash", str(clone / "tests" / "gpu.sh"), "--dry"], capture_output=True, text=True, timeout=60,
                         env={**env, "PATH": f"{tmp_path}:{env['PATH']}"})
    assert out.returncode != 0 and "run.sh: making" in out.stderr          # it went to make .venv first
    assert (tmp_path / "calls").read_text().split()[:3] == ["-m", "venv", str(clone / ".venv")]

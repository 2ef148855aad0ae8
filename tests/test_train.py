"""train.py on CPU: FSDP over 2 processes equals 1 process, stage freezing, resume, export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
import train
from conftest import ROOT

COMMON = ["--model", "tiny", "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3", "--workers", "0",
          "--no-grad-checkpoint", "--save-every", "100"]


@pytest.fixture(scope="module")
def zoom_data(tmp_path_factory):
    from data.zoom import prepare
    out = tmp_path_factory.mktemp("zoom")
    prepare.main(["--out", str(out), "--train", "16", "--test", "2", "--seed", "3"])
    return out


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def run_single(zoom_data, out, *extra):
    return train.main([*COMMON, "--data", str(zoom_data / "train.jsonl"), "--out", str(out), *extra])


def run_two(zoom_data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train.py"), *COMMON, "--data", str(zoom_data / "train.jsonl"), "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_fsdp_processes_give_the_losses_of_one(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path / "one", "--max-steps", "3", "--micro-batch", "1")
    run_two(zoom_data, tmp_path / "two", "--micro-batch", "1", "--max-steps", "3")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    # Same samples per global step (rank r takes every 2nd index of the same permutation),
    # loss normalised by the step's global token count: only the float32 summation order of
    # the gradient reduction differs, ~1e-7 relative per step, compounding over 3 AdamW steps.
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, rel=1e-4)
    a = M.Dragonfly.from_pretrained(tmp_path / "one" / "final")
    b = M.Dragonfly.from_pretrained(tmp_path / "two" / "final")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=n)


def test_fsdp_bf16_mixed_precision_with_activation_checkpointing(zoom_data, tmp_path):
    # the CUDA recipe (bf16 compute, fp32 master weights and gradient reduction, checkpointed
    # blocks) run on CPU/gloo: it must train, and stay within bf16 rounding of float32
    run_single(zoom_data, tmp_path / "fp32", "--max-steps", "3", "--micro-batch", "1")
    run_two(zoom_data, tmp_path / "bf16", "--micro-batch", "1", "--max-steps", "3", "--dtype", "bfloat16",
            "--grad-checkpoint")
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(bf16) == 3 and bf16 != fp32  # bf16 really ran ...
    assert bf16 == pytest.approx(fp32, rel=5e-3)  # ... 8 mantissa bits: ~4e-3 per rounding, far less on average
    weights = M.Dragonfly.from_pretrained(tmp_path / "bf16" / "final")
    assert all(p.dtype == torch.float32 for p in weights.parameters())  # exported from the fp32 masters


def test_pretrain_stage_trains_only_the_projection(zoom_data, tmp_path):
    trained = run_single(zoom_data, tmp_path, "--stage", "pretrain", "--max-steps", "2")
    torch.manual_seed(0)
    initial = train.init_weights(M.Dragonfly(train.tiny_config()))
    for (name, p), q in zip(trained.named_parameters(), initial.parameters()):
        if name.startswith("projection."):
            assert not torch.equal(p, q), name
        else:
            assert torch.equal(p, q), name
            assert not p.requires_grad


def test_data_may_be_a_prepared_folder(zoom_data, tmp_path):
    train.main([*COMMON, "--data", str(zoom_data), "--out", str(tmp_path), "--max-steps", "1"])
    assert len(losses(tmp_path)) == 1


def test_frozen_weights_are_not_in_the_optimizer(zoom_data, tmp_path):
    m = train.init_weights(M.Dragonfly(train.tiny_config()))
    train.freeze(m, ("projection", "vision"))
    groups = train.param_groups(m, 0.1)
    in_optim = {id(p) for g in groups for p in g["params"]}
    unused = {id(p) for p in [*m.vision.blocks[-1].parameters(), *m.vision.ln_post.parameters()]}  # after layer -2
    assert in_optim == {id(p) for p in [*m.projection.parameters(), *m.vision.parameters()]} - unused
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path / "full", "--max-steps", "4")
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--stop-after", "2")
    assert (tmp_path / "cut" / "latest").read_text() == "step_0000002"
    assert not (tmp_path / "cut" / "final").exists()
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_sigterm_saves_a_checkpoint_and_exits(zoom_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--max-steps", "200", "--data", str(zoom_data / "train.jsonl"),
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((tmp_path / "log.jsonl").exists() and (tmp_path / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    step = len(losses(tmp_path))
    assert (tmp_path / "latest").read_text() == f"step_{step:07d}"
    assert not list(tmp_path.glob("*.tmp"))


def test_exported_checkpoint_round_trips_with_identical_logits(zoom_data, tmp_path):
    trained = run_single(zoom_data, tmp_path, "--max-steps", "1", "--export-dtype", "float32")
    loaded = M.Dragonfly.from_pretrained(tmp_path / "final")
    crops = loaded.crop_image(zoom_data / "example.png")
    tokens, pixels = torch.tensor([[128000, 3923, 16099]]), torch.from_numpy(crops.pixels)[None]
    trained.eval()
    with torch.no_grad():
        assert torch.equal(trained(tokens, pixels)[0], loaded(tokens, pixels)[0])
    assert (tmp_path / "final" / "tokenizer.model").exists()

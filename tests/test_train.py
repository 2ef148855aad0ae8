"""train.py on CPU: FSDP over 2 processes equals 1 process, stage freezing, resume, export; bad data,
SIGTERM and damaged checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as M
import presets
import train
from train_config import TrainConfig, fields
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
    initial = train.init_weights(M.Dragonfly(presets.tiny_config()))
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
    m = train.init_weights(M.Dragonfly(presets.tiny_config()))
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


# ---- bad data, interruptions and damaged checkpoints ------------------------------------------
def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=timeout)


def test_empty_training_file_fails_at_once_with_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = run_cli(*COMMON, "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'empty.jsonl'} holds no records"]


@pytest.mark.parametrize("data", [None, "missing.jsonl"])
def test_absent_or_missing_data_gives_one_line(tmp_path, data):
    args = [] if data is None else ["--data", str(tmp_path / data)]
    r = run_cli(*COMMON, *args, "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: no --data" if data is None else f"error: --data {tmp_path / data}: no such file")


def with_malformed(zoom_data, tmp_path, good, bad):
    lines = (zoom_data / "train.jsonl").read_text().splitlines()[:good] + ['{"conversations": 7}'] * bad
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return ["--data", str(tmp_path / "mixed.jsonl"), "--images", str(zoom_data)]


def test_no_usable_sample_stops_the_run_without_an_export(zoom_data, tmp_path):
    with pytest.raises(SystemExit, match=r"no usable sample in the 16 records read \(skipped: malformed record: 16\)"):
        train.main([*COMMON, *with_malformed(zoom_data, tmp_path, 0, 16), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "final").exists()


def test_skipped_fraction_above_max_skip_stops_the_run(zoom_data, tmp_path, capsys):
    data = with_malformed(zoom_data, tmp_path, 4, 12)  # 16 records, 12 skipped: 75%, one epoch in 4 steps
    with pytest.raises(SystemExit, match=r"12 of the 16 records read were skipped .* more than --max-skip 0.5"):
        train.main([*COMMON, *data, "--out", str(tmp_path / "strict"), "--max-steps", "4"])
    assert not (tmp_path / "strict" / "final").exists()
    train.main([*COMMON, *data, "--out", str(tmp_path / "lenient"), "--max-steps", "4", "--max-skip", "0.8"])
    assert (tmp_path / "lenient" / "final").exists()
    assert "data: 4 samples used, 12 records skipped (malformed record: 12)" in capsys.readouterr().err


STALL = """import os, sys, time
sys.path.insert(0, {root!r})
import data.dataset, train
original = data.dataset.VLDataset.__getitem__
def stalling(self, i):  # the data pipeline stops delivering while the trigger file exists
    while os.path.exists({trigger!r}):
        time.sleep(0.05)
    return original(self, i)
data.dataset.VLDataset.__getitem__ = stalling
train.main(sys.argv[1:])
"""


def cpu_seconds(pid, window):
    """CPU time the process pid uses over the next `window` seconds (Linux /proc)."""
    def used():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
    before = used()
    time.sleep(window)
    return used() - before


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see the loop idle")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_sigterm_while_waiting_for_data_saves_and_exits_within_seconds(zoom_data, tmp_path, workers):
    trigger, log = tmp_path / "stall", tmp_path / "out" / "log.jsonl"
    code = STALL.format(root=str(ROOT), trigger=str(trigger))
    proc = subprocess.Popen([sys.executable, "-c", code, *COMMON, "--workers", workers, "--max-steps", "200",
                             "--data", str(zoom_data / "train.jsonl"), "--out", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (log.exists() and log.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        trigger.touch()
        while cpu_seconds(proc.pid, 2.0) > 0.05 and time.time() < deadline:
            pass  # the loop is still training on what was prefetched; idle, it waits for data
        steps = len(log.read_text().splitlines())
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 30 and proc.returncode == 0, err[-2000:]
    finally:
        trigger.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(log.read_text().splitlines()) == steps  # no step after the signal: it came while waiting
    assert (tmp_path / "out" / "latest").read_text() == f"step_{steps:07d}"
    assert f"stopped at step {steps}; continue from step {steps} with --resume" in err


def damaged_copies(src, tmp_path):
    """src (an intact checkpoint) copied and damaged in each way a kill, a full disk or a lost file can."""
    shard = next(p.name for p in src.iterdir() if p.suffix == ".distcp")
    damage = {"no marker": lambda d: (d / "complete.json").unlink(),
              "missing metadata": lambda d: (d / ".metadata").unlink(),
              "missing shard": lambda d: (d / shard).unlink(),
              "missing extra": lambda d: (d / "extra_rank0.pt").unlink(),
              "truncated shard": lambda d: os.truncate(d / shard, (d / shard).stat().st_size // 2)}
    copies = {}
    for kind, hurt in damage.items():
        copies[kind] = tmp_path / kind.replace(" ", "_")
        shutil.copytree(src, copies[kind])
        hurt(copies[kind])
    return copies, shard


def test_a_torn_checkpoint_is_recognised_and_named(zoom_data, tmp_path):
    import checkpoint
    run_single(zoom_data, tmp_path / "run", "--max-steps", "1")
    intact = tmp_path / "run" / "step_0000001"
    assert checkpoint.damage(intact) is None
    copies, shard = damaged_copies(intact, tmp_path)
    assert checkpoint.damage(copies["no marker"]).startswith("no complete.json")
    assert checkpoint.damage(copies["missing metadata"]) == ".metadata is missing"
    assert checkpoint.damage(copies["missing shard"]) == f"{shard} is missing"
    assert checkpoint.damage(copies["missing extra"]) == "extra_rank0.pt is missing"
    assert checkpoint.damage(copies["truncated shard"]).startswith(f"{shard} has ")


def test_resume_falls_back_to_the_newest_intact_checkpoint(zoom_data, tmp_path, capsys):
    run_single(zoom_data, tmp_path / "full", "--max-steps", "4")
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--save-every", "2", "--stop-after", "3")
    (tmp_path / "cut" / "step_0000003" / ".metadata").unlink()
    capsys.readouterr()
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--resume")
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'cut' / 'step_0000003'} is damaged (.metadata is missing)" in err
    assert "resumed from step 2 (step_0000002, the newest intact checkpoint)" in err
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_resume_with_no_intact_checkpoint_stops_with_one_line(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "2", "--stop-after", "1")
    os.truncate(tmp_path / "step_0000001" / "extra_rank0.pt", 10)
    with pytest.raises(SystemExit, match=f"no intact checkpoint in {tmp_path} "):
        run_single(zoom_data, tmp_path, "--max-steps", "2", "--resume")


def test_log_after_a_resume_has_each_step_once(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path / "full", "--max-steps", "4")
    # killed after logging step 3 but before saving it: the newest checkpoint is step 2
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--save-every", "2", "--stop-after", "3")
    shutil.rmtree(tmp_path / "cut" / "step_0000003")
    (tmp_path / "cut" / "latest").write_text("step_0000002")
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--resume")
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_a_loss_still_near_its_start_gets_a_warning(tmp_path):
    def warning(curve):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(curve)))
        return train.loss_warning(tmp_path / "log.jsonl")
    assert "still 8.22 after 3 steps (12.20 at step 1)" in warning([12.2, 10.1, 8.22])  # the 20-step zoom demo
    assert warning([12.2, 3.0, 0.011]) is None      # the full demo
    assert warning([1.5, 1.2, 1.0]) is None         # fine-tuning a pretrained model: low from the start


def test_every_train_flag_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert text.count("(default: ") == len(fields(TrainConfig))
    assert "--model {tiny} tiny: the zoom demo's small random model" in text
    assert "(default: pretrain 64, sft 16, med-vision 64)" in text  # --batch-size follows --stage

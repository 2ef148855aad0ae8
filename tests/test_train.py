"""train.py on CPU: FSDP over 2 processes equals 1 process, stage freezing, resume, export; bad data,
SIGTERM and damaged checkpoints."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as M
from lib import pretrained
from lib import presets
import train
from lib import training
from lib.images import crop_image
from lib.train_config import TrainConfig, fields
from conftest import ROOT, free_port

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
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
    a = pretrained.load(tmp_path / "one" / "final")
    b = pretrained.load(tmp_path / "two" / "final")
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
    weights = pretrained.load(tmp_path / "bf16" / "final")
    assert all(p.dtype == torch.float32 for p in weights.parameters())  # exported from the fp32 masters


def test_pretrain_stage_trains_only_the_projection(zoom_data, tmp_path):
    trained = run_single(zoom_data, tmp_path, "--stage", "pretrain", "--max-steps", "2")
    torch.manual_seed(0)
    initial = training.init_weights(M.Dragonfly(presets.tiny_config()))
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
    m = training.init_weights(M.Dragonfly(presets.tiny_config()))
    training.freeze(m, ("projection", "vision"))
    groups = training.param_groups(m, 0.1)
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
    assert proc.returncode == 143, err[-2000:]
    step = len(losses(tmp_path))
    assert (tmp_path / "latest").read_text() == f"step_{step:07d}"
    assert not list(tmp_path.glob("*.tmp"))


def test_exported_checkpoint_round_trips_with_identical_logits(zoom_data, tmp_path):
    trained = run_single(zoom_data, tmp_path, "--max-steps", "1", "--export-dtype", "float32")
    loaded = pretrained.load(tmp_path / "final")
    crops = crop_image(zoom_data / "example.png", loaded.cfg.crops)
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
        assert time.time() - t0 < 30 and proc.returncode == 143, err[-2000:]
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
    from lib import checkpoint
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


# ---- one run per --out, and nothing of it lost or faked (issue 17) ------------------------------
def test_resume_refuses_a_run_started_with_another_seed(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "4", "--stop-after", "2")
    with pytest.raises(SystemExit, match=r"error: --resume: the run in .* was started with other settings "
                                         r"\(--seed 0, now 1\): resume with its flags, or train into a new --out"):
        run_single(zoom_data, tmp_path, "--max-steps", "4", "--resume", "--seed", "1")


def test_resume_refuses_another_schedule(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "4", "--stop-after", "2")
    with pytest.raises(SystemExit, match=r"--max-steps 4, now 8"):
        run_single(zoom_data, tmp_path, "--max-steps", "8", "--resume")


def test_resume_of_a_run_whose_train_py_recorded_no_data_digest_says_so(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "4", "--stop-after", "2")
    record = json.loads((tmp_path / "run.json").read_text())
    del record["identity"]["data_sha256"]   # run.json as train.py wrote it before it hashed the data
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"started with other settings \(the content of --data: not recorded by the "
                                         r"train.py that started it\): resume with its flags, or train into a new --out"):
        run_single(zoom_data, tmp_path, "--max-steps", "4", "--resume")


def test_fresh_run_into_an_out_holding_another_run_is_refused_and_leaves_it_whole(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "6", "--save-every", "3")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match=r"already holds a run: continue it with --resume, train into a new --out, "
                                         r"or pass --force to delete that run and start over"):
        run_single(zoom_data, tmp_path, "--max-steps", "4", "--stop-after", "2", "--seed", "1")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_force_replaces_the_old_run_and_resume_continues_only_the_new_one(zoom_data, tmp_path):
    # the case: run A leaves step 3 and step 6; run B stops at step 2 and is resumed
    run_single(zoom_data, tmp_path / "full", "--max-steps", "4", "--seed", "1")
    run_single(zoom_data, tmp_path / "out", "--max-steps", "6", "--save-every", "3")
    shutil.copytree(tmp_path / "out" / "step_0000006", tmp_path / "a_step_6")
    run_single(zoom_data, tmp_path / "out", "--max-steps", "4", "--stop-after", "2", "--seed", "1", "--force")
    assert sorted(p.name for p in tmp_path.joinpath("out").glob("step_*")) == ["step_0000002"]
    shutil.copytree(tmp_path / "a_step_6", tmp_path / "out" / "step_0000006")   # run A's, put back by hand
    run_single(zoom_data, tmp_path / "out", "--max-steps", "4", "--seed", "1", "--resume")
    assert losses(tmp_path / "out") == losses(tmp_path / "full")


def test_a_checkpoint_of_another_run_is_passed_over(zoom_data, tmp_path, capsys):
    run_single(zoom_data, tmp_path / "a", "--max-steps", "6", "--save-every", "3")
    run_single(zoom_data, tmp_path / "b", "--max-steps", "6", "--save-every", "3", "--stop-after", "2")
    shutil.copytree(tmp_path / "a" / "step_0000006", tmp_path / "b" / "step_0000006")
    capsys.readouterr()
    run_single(zoom_data, tmp_path / "b", "--max-steps", "6", "--save-every", "3", "--resume")
    err = capsys.readouterr().err
    assert re.search(r"step_0000006 is damaged \(written by another run \(run id \w+, this folder's run is \w+\)\)", err)
    assert "resumed from step 2" in err


def test_a_second_train_on_the_same_out_refuses_while_the_first_lives(zoom_data, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.joinpath("lock").write_text(f"{os.uname().nodename} {sleeper.pid}")
        with pytest.raises(SystemExit, match=rf"error: --out {tmp_path} is in use by another train.py \(pid {sleeper.pid} on "):
            run_single(zoom_data, tmp_path, "--max-steps", "1")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    finally:
        sleeper.kill()
        sleeper.wait()
    run_single(zoom_data, tmp_path, "--max-steps", "1")      # its process is gone: a stale lock is taken over
    assert (tmp_path / "final").exists() and not (tmp_path / "lock").exists()


def test_two_train_processes_on_one_out_never_run_side_by_side(zoom_data, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--max-steps", "200", "--data", str(zoom_data / "train.jsonl"),
           "--out", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((tmp_path / "log.jsonl").exists() and (tmp_path / "log.jsonl").read_text()) and time.time() < deadline:
            time.sleep(0.2)
        second = run_cli(*COMMON, "--max-steps", "2", "--data", str(zoom_data / "train.jsonl"), "--out", str(tmp_path), "--resume")
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: --out {tmp_path} is in use by another train.py (pid {first.pid} on {os.uname().nodename}); wait for it "
            f"to end or train into another --out (if it is not running, delete {tmp_path / 'lock'})"]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 143 and not (tmp_path / "lock").exists()   # stopped by SIGTERM


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_exports_nothing(zoom_data, tmp_path):
    r = run_cli(*COMMON, "--max-steps", "4", "--save-every", "1", "--lr", "1e30", "--data", str(zoom_data / "train.jsonl"),
                "--out", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: step 2: the loss is nan and the gradient norm nan: training diverged; stopped, {tmp_path / 'step_0000001'} "
        "is the newest checkpoint, kept, nothing exported; lower --lr (in a new --out, or with --force) or check the data")
    assert not (tmp_path / "final").exists() and sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000001"]
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]


def test_non_finite_weights_are_neither_saved_nor_exported(zoom_data, tmp_path, monkeypatch):
    from lib import checkpoint
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *a, **kw):   # the update itself overflows, the loss before it was fine
        out = real_step(self, *a, **kw)
        self.param_groups[0]["params"][0].data[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(SystemExit, match=r"error: step 1: a weight is not a finite number: training diverged; "
                                         r"stopped, no checkpoint was saved, nothing exported"):
        run_single(zoom_data, tmp_path, "--max-steps", "1")
    assert not list(tmp_path.glob("step_*")) and not (tmp_path / "final").exists()
    assert checkpoint.finite(training.init_weights(M.Dragonfly(presets.tiny_config())))


def test_a_step_with_no_usable_sample_logs_no_loss(zoom_data, tmp_path):
    data = with_malformed(zoom_data, tmp_path, 8, 8)
    train.main([*COMMON, *data, "--out", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "8", "--max-skip", "1"])
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    skipped = [r["skipped"].get("malformed record", 0) for r in records]
    empty = [now - before == 2 for before, now in zip([0] + skipped, skipped)]  # both samples of the step skipped
    assert any(empty) and not all(empty)
    assert [r["loss"] is None for r in records] == empty
    assert all(r["loss"] > 0 for r, e in zip(records, empty) if not e)


def test_the_loss_warning_sees_a_nan_and_skips_steps_without_a_loss(tmp_path):
    def warning(curve):
        (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(curve)))
        return train.loss_warning(tmp_path / "log.jsonl")
    assert "still nan after 2 steps (12.20 at step 1)" in warning([12.2, float("nan")])
    assert warning([12.2, None, 0.5, None]) is None
    assert "still 8.00 after 3 steps (12.20 at step 2)" in warning([None, 12.2, 8.0])   # every step counts
    assert "still 8.00 after 8 steps" in warning([12.2, None, 9.0, None, 8.5, None, 8.0, 8.0])


def test_flipped_bytes_in_a_checkpoint_are_found_and_resume_falls_back(zoom_data, tmp_path, capsys):
    from lib import checkpoint
    run_single(zoom_data, tmp_path / "full", "--max-steps", "4")
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--save-every", "2", "--stop-after", "3")
    step3 = tmp_path / "cut" / "step_0000003"
    shard = next(step3.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
    shard.write_bytes(raw)                      # same size, other bytes: a bad disk, a bad copy
    assert checkpoint.damage(step3) == f"{shard.name} does not match the sha256 written with it: its bytes changed"
    capsys.readouterr()
    run_single(zoom_data, tmp_path / "cut", "--max-steps", "4", "--resume")
    err = capsys.readouterr().err
    assert f"checkpoint {step3} is damaged ({shard.name} does not match the sha256" in err
    assert "resumed from step 2 (step_0000002, the newest intact checkpoint)" in err
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.parametrize("where", ["is", "holds"])
def test_an_out_that_is_or_holds_the_init_checkpoint_is_refused_before_writing(zoom_data, tmp_path, where):
    init = tmp_path / "run" / "final"
    shutil.copytree(ROOT / "checkpoints" / "zoom-tiny", init)
    before = {p.name: p.read_bytes() for p in init.iterdir()}
    out = init if where == "is" else init.parent
    with pytest.raises(SystemExit, match=rf"error: --out {out} {where} --init {init}: training would write over its input"):
        train.main(["--init", str(init), "--data", str(zoom_data), "--out", str(out), "--max-steps", "1", "--workers", "0"])
    assert {p.name: p.read_bytes() for p in init.iterdir()} == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.parent != init) == []


def test_an_out_inside_the_init_checkpoint_is_refused(zoom_data, tmp_path):
    shutil.copytree(ROOT / "checkpoints" / "zoom-tiny", tmp_path / "ckpt")
    with pytest.raises(SystemExit, match=r"is inside --init .*ckpt: training would write over its input"):
        train.main(["--init", str(tmp_path / "ckpt"), "--data", str(zoom_data), "--out", str(tmp_path / "ckpt" / "sft")])
    assert not (tmp_path / "ckpt" / "sft").exists()


def test_an_out_that_is_the_data_folder_is_refused(zoom_data, tmp_path):
    with pytest.raises(SystemExit, match=rf"error: --out {zoom_data} holds --data {zoom_data / 'train.jsonl'}: training would write"):
        run_single(zoom_data, zoom_data)
    assert not (zoom_data / "config.json").exists()


def test_ctrl_c_saves_a_checkpoint_and_exits(zoom_data, tmp_path):
    # as a terminal sends it: to the whole process group, DataLoader workers included
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--workers", "1", "--max-steps", "200",
           "--data", str(zoom_data / "train.jsonl"), "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    deadline = time.time() + 300
    while not ((tmp_path / "log.jsonl").exists() and (tmp_path / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    step = len(losses(tmp_path))
    assert (tmp_path / "latest").read_text() == f"step_{step:07d}"
    assert f"stopped at step {step}; continue from step {step} with --resume" in err
    assert not (tmp_path / "lock").exists()


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {PLANTED_MARK}",))


PLANTED_MARK = "/tmp/planted-code-ran"


def test_resume_runs_no_code_planted_in_the_checkpoint(zoom_data, tmp_path):
    from lib import checkpoint
    Path(PLANTED_MARK).unlink(missing_ok=True)
    run_single(zoom_data, tmp_path, "--max-steps", "4", "--stop-after", "2")
    step = tmp_path / "step_0000002"
    torch.save({"step": 2, "payload": Planted()}, step / "extra_rank0.pt")
    marker = json.loads((step / "complete.json").read_text())   # whoever plants code can rewrite the sums too
    marker["files"]["extra_rank0.pt"] = {"size": (step / "extra_rank0.pt").stat().st_size,
                                         "sha256": checkpoint.sha256(step / "extra_rank0.pt")}
    (step / "complete.json").write_text(json.dumps(marker))
    with pytest.raises(SystemExit, match=rf"error: {step / 'extra_rank0.pt'}: not a checkpoint this train.py wrote"):
        run_single(zoom_data, tmp_path, "--max-steps", "4", "--resume")
    assert not Path(PLANTED_MARK).exists()


def test_extra_state_reloads_with_weights_only(zoom_data, tmp_path):
    run_single(zoom_data, tmp_path, "--max-steps", "1")
    extra = torch.load(tmp_path / "step_0000001" / "extra_rank0.pt", weights_only=True)
    assert extra["step"] == 1 and extra["sampler"]["position"] == 4


def wait_for_steps(log, n, proc, timeout=300):
    deadline = time.time() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its steps"
        time.sleep(0.2)


@pytest.mark.parametrize("workers", ["0", "1", "2"])
def test_sigterm_to_the_whole_process_group_saves_the_step_reached(zoom_data, tmp_path, workers):
    # what Slurm, systemd and torchrun do: every process of the group, DataLoader workers included
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--workers", workers, "--max-steps", "200",
           "--data", str(zoom_data / "train.jsonl"), "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_steps(tmp_path / "log.jsonl", 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143 and "Traceback" not in err and "Warning" not in err, err[-2000:]
    step = len(losses(tmp_path))
    assert (tmp_path / "latest").read_text() == f"step_{step:07d}"
    assert err.strip().splitlines()[-1] == f"stopped at step {step}; continue from step {step} with --resume"
    assert not (tmp_path / "lock").exists()


def test_sigterm_to_torchrun_saves_every_rank_at_one_step(zoom_data, tmp_path):
    # the signal comes while both ranks wait for data (a stalled pipeline), the case that saved nothing
    trigger, log, script = tmp_path / "stall", tmp_path / "out" / "log.jsonl", tmp_path / "stalling_train.py"
    script.write_text(STALL.format(root=str(ROOT), trigger=str(trigger)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script),
           *COMMON, "--max-steps", "400", "--data", str(zoom_data / "train.jsonl"), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_steps(log, 2, proc)
        trigger.touch()
        steps = -1
        while steps != len(log.read_text().splitlines()):   # until the loop idles, waiting for data
            steps = len(log.read_text().splitlines())
            time.sleep(2)
        proc.send_signal(signal.SIGTERM)       # torchrun forwards it to its workers
        _, err = proc.communicate(timeout=120)
    finally:
        trigger.unlink(missing_ok=True)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert f"stopped at step {steps}; continue from step {steps} with --resume" in err, err[-3000:]
    assert (tmp_path / "out" / "latest").read_text() == f"step_{steps:07d}"
    saved = tmp_path / "out" / f"step_{steps:07d}"
    assert sorted(p.name for p in saved.glob("extra_rank*")) == ["extra_rank0.pt", "extra_rank1.pt"]


def test_a_stop_signal_that_lands_where_python_drops_exceptions_still_ends_the_wait(capfd):
    # A handler runs wherever the main thread is; inside a __del__ (or the loader's fork callbacks,
    # as CI once saw) Python prints its exception and drops it, and the wait for data went on
    from lib import checkpoint

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):   # bytecodes for the handler to run in, inside __del__
                pass

    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    stop, t0 = checkpoint.Stop(), time.time()
    try:
        with pytest.raises(checkpoint.Interrupted), stop.waiting_for_data():
            SignalledWhileCollected()
            time.sleep(20)          # a loader that never answers
    finally:
        stop.close()
    assert time.time() - t0 < 5 and stop.requested and stop.signum == signal.SIGTERM
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook


def test_only_the_wait_for_a_batch_is_interruptible_not_the_loader_turning_an_epoch():
    # an exception raised inside the loader's fork of its workers or its shutdown of them was
    # dropped there (the wait went on) or left a worker that the trainer's exit waited on forever
    from lib import checkpoint
    from data.dataset import ShardedSampler
    stop, seen = checkpoint.Stop(), []

    class Loader:
        def __iter__(self):
            seen.append(("iter", stop.waiting))
            return self.batches()

        def batches(self):
            for i in range(2):
                seen.append(("next", stop.waiting))
                yield {"image": None, "text": {"index": [i]}, "skipped": {}}
            seen.append(("end", stop.waiting))

    sampler, consumed = ShardedSampler(2), {"n": 0}
    try:
        batches = train.micro_batches(Loader(), sampler, consumed, stop)
        got = [next(batches) for _ in range(3)]
    finally:
        stop.close()
    assert [b["text"]["index"] for b in got] == [[0], [1], [0]] and sampler.epoch == 1 and consumed["n"] == 1
    assert seen == [("iter", False), ("next", True), ("next", True), ("end", True), ("iter", False), ("next", True)]


def test_a_worker_does_not_print_the_trainer_hanging_up_on_it():
    # a trainer stopped while it received a batch breaks the worker's handoff of its shared memory
    code = """if True:
        import sys
        from lib import checkpoint
        checkpoint.ignore_stop_signals(0)
        for e in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), ValueError("a real fault")):
            sys.excepthook(type(e), e, None)"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip().splitlines() == ["ValueError: a real fault"], r.stderr


def test_a_save_past_the_file_size_limit_is_one_error_line(zoom_data, tmp_path):
    # `ulimit -f` (RLIMIT_FSIZE): SIGXFSZ killed train.py; ignored, the save fails: one line, no step_*.tmp
    import resource
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
    r = subprocess.run([sys.executable, "train.py", *COMMON, "--data", str(zoom_data / "train.jsonl"),
                        "--out", str(tmp_path), "--max-steps", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, preexec_fn=small_files)
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.fullmatch(r"error: cannot write the checkpoint of step 1 in .*ulimit -f.*", lines[-1]), lines[-1]
    assert not list(tmp_path.glob("step_*"))

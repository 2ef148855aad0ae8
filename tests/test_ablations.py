"""data/zoom/ablations.py end to end in its short mode, and the tiny configs it trains."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import model as M
from lib import presets
from lib.images import crop_image


@pytest.mark.parametrize("preset,high_pool,expected", [
    ("v2-L", 0, 1 + 16 + 1),                         # low: CLS + 4x4 pooled + separator
    ("v2-M", 0, 4 * (1 + 4 + 1)),                    # 4 medium crops pooled to 2x2
    ("dragonfly-v2", 0, 18 + 24 + 36 * 6),           # the demo's 258
    ("v2-LH-9", 3, 18 + 36 * (1 + 9 + 1)),           # the paper's 3x3 on the 8x8 grid, adaptive
    ("v2-LH-64", 8, 18 + 36 * (1 + 64 + 1)),         # 8x8: the high crops unpooled
])
def test_tiny_ablation_configs_have_the_hand_counted_image_positions(preset, high_pool, expected):
    cfg = presets.tiny_config(preset=preset, high_pool=high_pool)
    assert M.image_positions(cfg) == expected
    assert M.image_positions(cfg) + 64 <= cfg.llm.max_seq_len


def zoom_script(name):
    """A data/zoom script as a module (they are run as scripts, not imported as a package)."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / "zoom" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_study_trains_scores_and_writes_the_table(tmp_path):
    ablations = zoom_script("ablations")
    argv = ["--steps", "2", "--train", "32", "--test", "4", "--seeds", "0", "--runs", "L+H 3x3",
            "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res")]
    ablations.main(argv)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [(r["name"], r["steps"], r["n_test"], r["positions"]) for r in runs] == [("L+H 3x3", 2, 4, 414)]
    table = (tmp_path / "res" / "ablations.md").read_text()
    assert "| L+H 3x3 | v2 Table 8: `v2-LH-9` + high 3x3 | 414 |" in table
    assert table.rstrip().endswith("| 59.1 | 45.4 |")   # the paper's Table 8, 9 tokens: TextVQA, ChartQA
    assert (tmp_path / "res" / "ablations.png").stat().st_size > 0
    ablations.main(argv)   # everything is done already: nothing is trained again
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == 1


def zoom_models(*preset_names):
    """Tiny ablation models with one set of weights (the levels share the ViT, projection and LLM)
    and the crops of one zoom page for each."""
    import random
    import sys
    import torch
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "data" / "zoom"))
    import prepare
    torch.manual_seed(0)
    models = [M.Dragonfly(presets.tiny_config(preset=name)).eval() for name in preset_names]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    page = prepare.draw_sample(random.Random("zoom/test"), digit=4)[0]
    return [(m, torch.from_numpy(crop_image(page, m.cfg.crops).pixels)[None]) for m in models]


def test_low_plus_medium_block_is_the_low_block_then_the_medium_block():
    import torch
    (lm, lm_px), (low, low_px), (medium, medium_px), (lmh, lmh_px) = zoom_models("v2-LM", "v2-L", "v2-M", "dragonfly-v2")
    with torch.no_grad():
        lm_block = lm.image_block(lm_px)[0]                      # (18 + 24, dim)
        assert torch.equal(lm_block[:18], low.image_block(low_px)[0])
        assert torch.equal(lm_block[18:], medium.image_block(medium_px)[0])
        assert torch.equal(lmh.image_block(lmh_px)[0][:42], lm_block)   # the high crops come after


def test_the_loss_reaches_every_crop_of_low_plus_medium():
    import torch
    (lm, pixels), = zoom_models("v2-LM")
    pixels.requires_grad_(True)
    tokens = torch.tensor([[128000, 15546, 16099, 30, 19]])   # <|begin_of_text|>, three text ids, "4" (id 19)
    labels = torch.tensor([[-100, -100, -100, -100, 19]])
    lm(tokens, pixels, labels)[1].backward()
    per_crop = pixels.grad[0].flatten(1).norm(dim=1)                  # (1 low + 4 medium,)
    assert per_crop.shape == (5,) and bool((per_crop > 0).all())


def test_rewriting_the_table_keeps_the_sections_below_it():
    with_notes = zoom_script("ablations").with_notes
    old = "Zoom demo ablations: old\n\n| run |\n| L |\n\n## Why L+M stays at chance\n\nthe evidence\n"
    assert with_notes("Zoom demo ablations: new\n\n| run |\n", old) == \
        "Zoom demo ablations: new\n\n| run |\n\n## Why L+M stays at chance\n\nthe evidence\n"
    assert with_notes("new table\n", "a table without notes\n") == "new table\n"


def test_onset_follows_every_checkpoint_of_a_short_run(tmp_path):
    onset = zoom_script("onset")
    onset.main(["--run", "L+M", "--steps", "2", "--every", "1", "--train", "32", "--test", "4",
                "--data", str(tmp_path / "data"), "--out", str(tmp_path / "onset")])
    run, = [json.loads(line) for line in (tmp_path / "onset" / "onset.jsonl").read_text().splitlines()]
    assert (run["name"], run["steps"], [c["step"] for c in run["checkpoints"]]) == ("L+M", 2, [1, 2])
    for c in run["checkpoints"]:
        assert c["top_share"] in (25.0, 50.0, 75.0, 100.0)          # 4 pages
        assert set(c["gradient"]) == {"low", "medium"} and c["gradient"]["medium"] > 0
        assert 0 < c["attention"]["low"] + c["attention"]["medium"] < 100   # the text takes the rest
    assert not list((tmp_path / "onset").glob("*/step_*"))              # only the export is kept


def test_onset_refuses_blank_low_for_a_run_without_low_and_medium_crops(tmp_path, capsys):
    onset = zoom_script("onset")
    with pytest.raises(SystemExit) as exit_:
        onset.main(["--run", "M", "--blank-low", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--blank-low" in capsys.readouterr().err
    assert not (tmp_path / "onset.jsonl").exists()


def study(tmp_path, *extra):
    """ablations.py as its own process group (as from a terminal), long enough to be interrupted."""
    from conftest import ROOT
    argv = [sys.executable, "-m", "data.zoom.ablations", "--steps", "300", "--train", "32", "--test", "4", "--seeds", "0",
            "--runs", "L", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res"), *extra]
    # Ctrl-C at its default, as a terminal starts a program: the runner of this suite may be ignoring
    # SIGINT (a background job's is), and an ignored SIGINT is inherited across exec
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_training(proc, log):
    deadline = time.time() + 300
    while not (log.exists() and log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)


def test_a_study_whose_training_is_preempted_says_so_in_one_line(tmp_path):
    proc = study(tmp_path)
    try:
        wait_for_training(proc, tmp_path / "out" / "L_seed0" / "log.jsonl")
        train_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(train_pid, signal.SIGTERM)      # the scheduler stops the training alone
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: the training (train.py) was interrupted (SIGTERM)")
    assert "Traceback" not in err and "eval" not in err.strip().splitlines()[-1]


def test_ctrl_c_in_a_study_stops_it_in_one_line_and_leaves_no_lock(tmp_path):
    proc = study(tmp_path)
    try:
        wait_for_training(proc, tmp_path / "out" / "L_seed0" / "log.jsonl")
        os.killpg(proc.pid, signal.SIGINT)      # a terminal's Ctrl-C: the study and its train.py
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: the training (train.py) was interrupted (Ctrl-C)")
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "L_seed0" / "lock").exists()


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--test", "0"]])
def test_the_study_refuses_an_empty_budget(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        zoom_script("ablations").main([*flags, "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res")])
    assert exit_.value.code == 2 and f"{flags[0]} 0: must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_smoke_study_without_results_leaves_the_committed_table_alone(tmp_path, capsys):
    from conftest import ROOT
    committed = {p: p.read_bytes() for p in (ROOT / "data" / "zoom").glob("ablations.*")}
    with pytest.raises(SystemExit) as exit_:
        zoom_script("ablations").main(["--steps", "2", "--train", "32", "--test", "4", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "only for the full study" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (ROOT / "data" / "zoom").glob("ablations.*")} == committed


def test_a_study_rerun_on_other_test_pages_scores_its_runs_again(tmp_path):
    ablations = zoom_script("ablations")
    argv = ["--steps", "1", "--train", "32", "--seeds", "0", "--runs", "L", "--out", str(tmp_path / "out"),
            "--results", str(tmp_path / "res")]
    ablations.main([*argv, "--test", "4"])
    ablations.main([*argv, "--test", "2"])      # the run on 4 pages is not this study's
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [r["n_test"] for r in runs] == [4, 2]
    assert [r["n_test"] for r in json.loads((tmp_path / "res" / "ablations.json").read_text())["runs"]] == [2]


def test_onset_refuses_more_test_pages_than_the_data_holds_and_an_out_that_is_a_file(tmp_path, capsys):
    onset = zoom_script("onset")
    from data.zoom import prepare
    prepare.main(["--out", str(tmp_path / "data"), "--train", "8", "--test", "3", "--seed", "0"])
    (tmp_path / "afile").write_text("")
    for flags, said in [(["--test", "500", "--out", str(tmp_path / "o")], "--test 500: .* holds 3 held-out pages"),
                        (["--out", str(tmp_path / "afile")], "--out .*afile is a file"),
                        (["--test", "0", "--out", str(tmp_path / "o")], "--test 0: must be 1 or more")]:
        with pytest.raises(SystemExit) as exit_:
            onset.main([*flags, "--data", str(tmp_path / "data")])
        assert exit_.value.code == 2 and re.search(said, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_onset_rerun_lists_the_run_once_and_keeps_it_until_train_accepts_the_flags(tmp_path):
    onset = zoom_script("onset")
    argv = ["--run", "L+M", "--steps", "1", "--every", "1", "--train", "32", "--test", "4",
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "onset")]
    onset.main(argv)
    onset.main(argv)
    runs = [json.loads(line) for line in (tmp_path / "onset" / "onset.jsonl").read_text().splitlines()]
    assert [(r["name"], r["seed"]) for r in runs] == [("L+M", 0)]
    folder, = [p for p in (tmp_path / "onset").iterdir() if p.is_dir()]
    (tmp_path / "data" / "train.jsonl").write_text("")      # train.py refuses this data: the earlier run stays
    with pytest.raises(SystemExit):
        onset.main(argv)
    assert (folder / "final").exists()

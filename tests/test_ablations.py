"""data/zoom/ablations.py end to end in its short mode, and the tiny configs it trains."""
import json

import pytest

import model as M
import presets


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


def test_short_study_trains_scores_and_writes_the_table(tmp_path):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "data" / "zoom" / "ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
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

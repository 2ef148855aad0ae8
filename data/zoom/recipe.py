"""The zoom demo's training recipe, shared by demo.py, ablations.py and onset.py: the flags
`train.py --model tiny` trains the synthetic pages with, the ablation study's rows, and how the
scripts run train.py and tools/eval.py (each as its own process: the command-line scripts never
import one another).
"""
import subprocess
import sys
from pathlib import Path

import crops as crops_lib

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--model", "tiny", "--stage", "sft", "--batch-size", "16", "--micro-batch", "16", "--lr", "2e-3",
         "--epochs", "1.5", "--no-grad-checkpoint", "--workers", "1", "--save-every", "100000",
         "--export-dtype", "bfloat16", "--seed", "0"]

# name: (paper table, train.py flags). Table 8 rows use the presets of those rows (same levels as v2-LH).
RUNS = {
    "L": ("2", ["--preset", "v2-L"]),
    "M": ("2", ["--preset", "v2-M"]),
    "H": ("2", ["--preset", "v2-H"]),
    "L+M": ("2", ["--preset", "v2-LM"]),
    "L+H": ("2", ["--preset", "v2-LH"]),
    "L+M+H": ("2", ["--preset", "dragonfly-v2"]),
    "L+H 3x3": ("8", ["--preset", "v2-LH-9", "--high-pool", "3"]),
    "L+H 4x4": ("8", ["--preset", "v2-LH-16", "--high-pool", "4"]),
    "L+H 6x6": ("8", ["--preset", "v2-LH", "--high-pool", "6"]),
    "L+H 8x8": ("8", ["--preset", "v2-LH-64", "--high-pool", "8"]),
}


def run_dir(out, name, seed) -> Path:
    """The folder of one study run (ablations.py, onset.py)."""
    return out / f"{name.replace(' ', '_').replace('+', '')}_seed{seed}"


def run(args):
    """`python ARGS...` from the repository root (`train.py ...`, `-m tools.eval ...`); a script that
    fails has said why: stop there."""
    print("$", "python", " ".join(args), flush=True)
    code = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
    if code:
        script = args[1] if args[0] == "-m" else args[0]
        sys.exit(f"error: {script} stopped with exit code {code} (its message is above)")


def blank_low_crops():
    """The control run: every low crop becomes a flat page at the CLIP mean (0 after normalising),
    so L+M keeps its 18 low positions but they carry nothing that varies from page to page.
    For onset.py's control run (issue 20). Patched where the dataset and lib/images.py's crop_image call it
    (DataLoader workers fork: they inherit it)."""
    make = crops_lib.make_crops

    def made(img, cfg=crops_lib.V2):
        crops = make(img, cfg)
        if cfg.low:
            crops.pixels[0] = 0.0
        return crops
    crops_lib.make_crops = made

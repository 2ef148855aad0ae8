"""The zoom demo's training recipe, shared by demo.py and ablations.py: the flags `train.py
--model tiny` trains the synthetic pages with, and how both run train.py and eval.py (each as
its own process: the command-line scripts never import one another).
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--model", "tiny", "--stage", "sft", "--batch-size", "16", "--micro-batch", "16", "--lr", "2e-3",
         "--epochs", "1.5", "--no-grad-checkpoint", "--workers", "1", "--save-every", "100000",
         "--export-dtype", "bfloat16", "--seed", "0"]


def run(args):
    """`python ARGS...` from the repository root; a script that fails has said why: stop there."""
    print("$", " ".join(args), flush=True)
    code = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
    if code:
        sys.exit(f"error: {args[0]} stopped with exit code {code} (its message is above)")

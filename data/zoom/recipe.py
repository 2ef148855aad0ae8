"""The zoom demo's training recipe, shared by demo.py, ablations.py and onset.py: the flags
`train.py --model tiny` trains the synthetic pages with, the ablation study's rows, and how the
scripts run train.py and tools/eval.py (each as its own process: the command-line scripts never
import one another).
"""
import signal
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


STOPPED = {130: "Ctrl-C", 143: "SIGTERM", -signal.SIGINT: "Ctrl-C", -signal.SIGTERM: "SIGTERM", -signal.SIGKILL: "SIGKILL"}


def run(args, name=None, quiet=False):
    """`python ARGS...` from the repository root (`train.py ...`, `-m tools.eval ...`); a script that
    fails has said why: stop there, with its exit code when a signal stopped it (130, 143), so a
    study interrupted in its training says so instead of failing later at eval. name: the script
    as the user knows it (for `-c CODE`); quiet: keep its output, show its last line on failure.
    A Ctrl-C reaches the child too (a terminal signals the whole group): wait for it to save and end."""
    name = name or (args[1] if args[0] == "-m" else args[0])
    print("$", "python", " ".join([name, *args[2 if args[0] in ("-m", "-c") else 1:]]), flush=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.PIPE if quiet else None)
    try:
        err = proc.communicate()[1]
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)   # a stop request, in case the Ctrl-C was sent to this process alone
        err, signalled = proc.communicate()[1], True
    else:
        signalled = False
    code = proc.returncode
    if code in STOPPED or (signalled and code):
        what = "the training (train.py)" if name == "train.py" else name
        how = "Ctrl-C" if signalled else STOPPED.get(code, "Ctrl-C")  # our SIGTERM to the child is not the cause
        print(f"error: {what} was interrupted ({how}): the study stops here; "
              "rerun the same command to continue (finished runs are kept)", file=sys.stderr)
        raise SystemExit(130 if signalled or STOPPED.get(code) == "Ctrl-C" else 143)
    if code:
        said = f": {err.strip().splitlines()[-1]}" if quiet and err.strip() else " (its message is above)"
        raise SystemExit(f"error: {name} stopped with exit code {code}{said}")


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

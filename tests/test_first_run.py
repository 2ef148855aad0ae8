"""A new user's first minutes: the README's two Quick-start commands, `bash run.sh` running any
script with .venv (installed once), one line instead of a traceback when a package is missing,
and a short zoom demo that leaves the tracked results alone."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lib import first_run
from conftest import ROOT

ENTRY_POINTS = ["sample.py", "train.py", "tools/eval.py", "tools/bench.py", "tools/convert_weights.py",
                "tools/presets.py", "tools/draw_crops.py", "tools/quantize.py", "tools/looked.py", "tools/plan.py",
                "data/zoom/demo.py", "data/zoom/prepare.py", "data/zoom/ablations.py", "data/zoom/onset.py",
                "data/llava/prepare.py"]
# every module that imports a required package, scripts included (the tests import those too)
MODULES = ["vit", "llama", "crops", "pool", "model", "lib.images", "lib.tokenizer", "lib.weights", "lib.metrics",
           "lib.devices", "lib.stored", "lib.pretrained", "lib.presets", "lib.conversation", "lib.looked",
           "lib.checkpoint", "lib.training", "data.formats", "data.dataset", "sample", "train", "tools.quantize",
           "tools.eval", "tools.plan", "tools.bench"]


def quick_start_commands():
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_the_sample_command_then_the_test_command_ci_runs():
    assert quick_start_commands() == ['bash run.sh sample.py --image data/zoom/example.png --prompt "What digit is this page printed in?"',
                                      "bash tests/run.sh"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "bash tests/run.sh"


def test_run_sh_uses_the_project_venv_and_installs_only_once():
    cmd = ["bash", "run.sh", "-c", "import sys; print(sys.prefix)"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert Path(first.stdout.strip()).resolve() == (ROOT / ".venv").resolve()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == ""  # nothing made, nothing installed


def test_quick_start_sample_command_reads_the_example_digit():
    r = subprocess.run(shlex.split(quick_start_commands()[0]), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "7"  # data/zoom/example.png is printed in 7s


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_a_missing_package_gives_one_line_naming_the_install_command(script):
    # -S leaves site-packages out: a python without torch, numpy or pillow, like a fresh machine's python3
    command = script if "/" not in script else "-m " + script[:-3].replace("/", ".")
    r = subprocess.run([sys.executable, "-S", *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "is not installed" in lines[0] and f"bash run.sh {command} ..." in lines[0]
    assert "pip install -r requirements.txt" in lines[0]


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_module_without_the_requirements_raises_import_error_not_exit(module):
    # a notebook without torch (or numpy, pillow, ...): the import fails as imports do and the
    # kernel lives on; only a script's __main__ part turns this into the one line above
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in sorted(first_run.REQUIRED))
    code = f"import sys\n{hide}try:\n    import {module}\nexcept ImportError as e:\n    print('ImportError', e.name)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "ImportError" and r.stdout.split()[1] in first_run.REQUIRED


def test_required_packages_are_those_of_requirements_txt():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    names = {re.split(r"[<>=!~ \[]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")}
    assert {"PIL" if name == "pillow" else name for name in names} == first_run.REQUIRED


def test_a_missing_optional_package_keeps_its_traceback():
    code = "from lib import first_run\nfirst_run.one_line_for_missing_packages()\nimport pycocoevalcap_absent_here\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "bash run.sh" not in r.stderr


def test_a_short_zoom_demo_writes_only_under_out(tmp_path):
    tracked = [ROOT / "data" / "zoom" / name for name in ("results.json", "results.png", "example.png")]
    tracked += sorted((ROOT / "checkpoints" / "zoom-tiny").iterdir())
    before = {p: p.read_bytes() for p in tracked}
    listing = sorted(p.name for p in (ROOT / "data" / "zoom").iterdir() if p.name != "__pycache__")  # not tracked
    r = subprocess.run([sys.executable, "-m", "data.zoom.demo", "--steps", "1", "--train", "16", "--test", "2",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 2 and (tmp_path / "results.png").is_file()
    for run in ("low", "zoom"):
        assert len((tmp_path / run / "log.jsonl").read_text().splitlines()) == 1   # --steps 1
        assert json.loads((tmp_path / run / "eval" / "metrics.json").read_text())["n"] == 2  # --test 2
    assert {p: p.read_bytes() for p in tracked} == before
    assert sorted(p.name for p in (ROOT / "data" / "zoom").iterdir() if p.name != "__pycache__") == listing


def test_ship_is_refused_for_a_short_demo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.zoom.demo", "--ship", "--steps", "20", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--ship writes the tracked results and checkpoint: only for the full run" in r.stderr
    assert not any(tmp_path.iterdir())

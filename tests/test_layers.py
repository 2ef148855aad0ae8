"""Imports point one way (README, "Layers"): each project file sits in one layer and imports only
files of lower layers, at the top of the file or inside a function alike; the command-line
scripts, the top layer, never import one another, and nothing imports them."""
import ast
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# Lowest first. A file imports only files of the layers before its own. The architecture (the card's
# files at the top) sits low: it imports only itself, torch, numpy and PIL.
LAYERS = [
    ("first_run", ["lib/__init__.py", "lib/first_run.py"]),
    ("parts", ["vit.py", "llama.py", "crops.py", "pool.py"]),
    ("model", ["model.py"]),
    ("the tokenizer", ["lib/tokenizer.py"]),
    ("basics", ["lib/weights.py", "lib/locks.py", "lib/images.py", "lib/devices.py", "lib/timing.py",
                "lib/metrics.py", "data/__init__.py", "data/formats.py",
                "data/benchmarks/__init__.py"]),
    ("storage", ["lib/stored.py"]),
    ("the release's format", ["lib/release_format.py"]),
    ("loading, presets, data", ["lib/results.py", "lib/pretrained.py", "lib/presets.py", "lib/release_recipe.py", "data/dataset.py", "data/zoom/prepare.py",
                                "data/zoom/recipe.py"]),
    ("the release's examples", ["data/release_recipe.py"]),
    ("uses", ["data/show.py", "lib/conversation.py", "lib/looked.py", "lib/checkpoint.py", "lib/training.py", "lib/train_config.py"]),
    ("scripts", ["sample.py", "train.py", "tools/__init__.py", "tools/eval.py", "tools/plan.py", "tools/bench.py",
                 "tools/quantize.py", "tools/convert_weights.py", "tools/presets.py", "tools/looked.py",
                 "tools/draw_crops.py", "data/zoom/demo.py", "data/zoom/ablations.py", "data/zoom/onset.py",
                 "data/llava/prepare.py", "data/benchmarks/convert.py"]),
]
ARCHITECTURE = ["vit.py", "llama.py", "crops.py", "pool.py", "model.py"]
LAYER = {file: (rank, name) for rank, (name, files) in enumerate(LAYERS) for file in files}


def project_files() -> list:
    """Every .py file of the project: the top folder, lib/, tools/ and data/ (tests/ may import anything)."""
    found = [p.name for p in ROOT.glob("*.py")]
    for folder, subfolders, files in [w for top in ("lib", "tools", "data") for w in os.walk(ROOT / top)]:
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")))
        found += [str((Path(folder) / f).relative_to(ROOT)) for f in files if f.endswith(".py")]
    return sorted(found)


def module_file(dotted: str):
    """The project file that `import dotted` runs last (`data.formats` -> data/formats.py), or None
    for a module from outside the project."""
    path = ROOT / dotted.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(ROOT))
    return None


def imported_files(source: str) -> list:
    """(line, file) for each project file an import anywhere in `source` runs: the module itself
    and the packages above it (`import data.formats` runs data/__init__.py first); for
    `from package import name`, the submodule `name` when it is one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for dotted in names:
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file:
                    found.append((node.lineno, file))
    return sorted(set(found))


def upward_imports(file: str, source: str) -> list:
    rank, _ = LAYER[file]
    return [f"{file}:{line} imports {other} ({LAYER[other][1]}), not below {LAYER[file][1]}"
            for line, other in imported_files(source) if other != file and LAYER[other][0] >= rank]


def test_every_project_file_has_a_layer():
    assert set(project_files()) == set(LAYER), "place each new file in LAYERS (and the README's picture)"


@pytest.mark.parametrize("file", sorted(LAYER))
def test_imports_point_only_to_lower_layers(file):
    assert upward_imports(file, (ROOT / file).read_text()) == []


def test_scripts_never_import_scripts():
    scripts = dict(LAYERS)["scripts"]
    found = [f"{file} imports {other}" for file in LAYER for _, other in imported_files((ROOT / file).read_text())
             if other in scripts and other != file]
    assert found == []


def test_the_check_sees_imports_inside_functions_and_from_packages():
    # the shapes the cycles used to hide in (model.py's loaders, looked.py's main, ablations.py)
    hidden = "def from_pretrained(path):\n    from lib import pretrained\n    return pretrained.load(path)\n"
    assert upward_imports("model.py", hidden) == ["model.py:2 imports lib/pretrained.py (loading, presets, data), not below model"]
    assert [f for _, f in imported_files("def main():\n    from data.zoom import prepare\n")] == \
        ["data/__init__.py", "data/zoom/prepare.py"]
    assert upward_imports("data/zoom/ablations.py", "import train\n") != []


def outside_imports(source: str) -> set:
    """The top-level names of every module `source` imports that is not a project file."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if module_file(a.name) is None}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and module_file(node.module) is None:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("file", ARCHITECTURE)
def test_the_architecture_imports_only_itself_torch_numpy_and_pil(file):
    source = (ROOT / file).read_text()
    assert {other for _, other in imported_files(source)} <= set(ARCHITECTURE)
    assert outside_imports(source) - set(sys.stdlib_module_names) <= {"torch", "numpy", "PIL"}


def test_the_architecture_check_sees_a_loader_or_a_package():
    assert {f for _, f in imported_files("from lib.images import load_image\n")} - set(ARCHITECTURE)
    assert outside_imports("import safetensors.torch\nimport numpy as np\n") == {"safetensors", "numpy"}


def test_only_the_card_is_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == sorted(["model.py", "vit.py", "llama.py", "crops.py", "pool.py", "train.py", "sample.py"])


def imports_inside_functions(source: str) -> list:
    """(line, file) of each project file imported inside a function of `source`."""
    inside = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = ast.unparse(ast.Module(body=fn.body, type_ignores=[]))
            inside += [(fn.lineno, file) for _, file in imported_files(body)]
    return sorted(set(inside))


@pytest.mark.parametrize("file", sorted(LAYER))
def test_project_imports_sit_at_the_top_of_the_file(file):
    # an import placed inside a function to dodge a cycle hides the file's real layer
    assert imports_inside_functions((ROOT / file).read_text()) == []


# ---- one way in for a checkpoint (tests/data_path.py says what is counted) -----------------------
def test_loading_a_checkpoint_for_sample_py_reads_as_a_straight_line(checkpoint_dir):
    import argparse
    import torch
    import sample
    from data_path import calls_down
    args = argparse.Namespace(checkpoint=str(checkpoint_dir), special_tokens_in_text=False, image=None, quantize=None)
    layer_of = {file: rank for file, (rank, _) in LAYER.items()}
    found, _ = calls_down(lambda: sample.load(args, "cpu", torch.float32), layer_of, "sample.py", depth=2)
    bounces = [f"{a} -> {b}" for a, b in found if not a.startswith("sample.py:")]
    # before issue 23: 12, config checking ping-ponging between pretrained.py, llama.py and vit.py
    assert len(bounces) <= 6, bounces
    assert sum(b.endswith("lib/release_format.py:read_config") for b in bounces) == 1   # config.json read once
    assert not any(b.split(" -> ")[1].startswith(("llama.py", "vit.py")) for b in bounces)


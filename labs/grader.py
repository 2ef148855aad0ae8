"""
How a lab is graded (labs/README.md, "How a lab is graded").

A lab is a folder labs/NN-slug/ whose lab.py names the project functions the student writes
(FUNCTIONS, e.g. "crops.select_best_resolution") and defines its checks, in order, with the
`check` decorator. An implementation is the project's own (the default), the student's
starter.py, or any file that defines some of those functions (the known-wrong versions). The
grader puts that file's functions in place of the project's in every project module that binds
them (`crops.select_best_resolution` and also tools/draw_crops.py's `from crops import
make_crops`), so a check that runs the trained toy runs it with the student's code. It runs the
checks, one printed line each, and writes what the run observed, with the torch version and the
CPU kind, to out/labs/NN-slug/IMPL.json. A run of the project's code with --record keeps that as
the lab's reference.json and rewrites the handout's Observe block from it: a number a handout
quotes is a run's, never typed.
"""
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import devices

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "labs"
OUT = ROOT / "out" / "labs"
# Project modules that bind a lab's functions by name; imported before a swap so that every
# binding exists when the swap looks for it.
BINDERS = ["crops", "pool", "llama", "model", "lib.images", "lib.looked", "lib.presets", "data.dataset",
           "tools.draw_crops", "tools.looked"]
OBSERVE = re.compile(r"<!-- observe:begin.*?<!-- observe:end -->", re.S)
TABLE = re.compile(r"<!-- labs:begin.*?<!-- labs:end -->", re.S)


# ---- a lab: its folder and its lab.py -------------------------------------------------------
@dataclass
class Lab:
    number: str          # "01"
    dir: Path            # labs/01-crops
    module: object       # its lab.py

    @property
    def slug(self) -> str:
        return self.dir.name

    @property
    def functions(self) -> list:
        return self.module.FUNCTIONS

    def checks(self) -> list:
        """The lab's checks in the order lab.py defines them."""
        found = [f for f in vars(self.module).values() if callable(f) and hasattr(f, "lab_check")]
        return sorted(found, key=lambda f: f.__code__.co_firstlineno)

    def wrongs(self) -> dict:
        """wrong_*.py -> the checks its docstring's `Caught by:` line names (each must fail)."""
        out = {}
        for path in sorted(self.dir.glob("wrong_*.py")):
            caught = re.search(r"^Caught by: (.+)$", path.read_text(), re.M)
            out[path] = caught.group(1).replace(",", " ").split() if caught else []
        return out


def labs() -> dict:
    """'01' -> Lab, for every labs/NN-slug/ with a lab.py."""
    return {p.name[:2]: load_lab(p) for p in sorted(LABS.glob("[0-9][0-9]-*")) if (p / "lab.py").is_file()}


def load_lab(folder: Path) -> Lab:
    return Lab(folder.name[:2], folder, load_file(folder / "lab.py", f"lab{folder.name[:2]}"))


def load_file(path: Path, name: str):
    """A Python file as a module (lab folders start with digits: they are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


def find(number: str) -> Lab:
    """Lab `number`, loading only its own lab.py."""
    folders = [p for p in sorted(LABS.glob("[0-9][0-9]-*")) if (p / "lab.py").is_file()]
    chosen = [p for p in folders if p.name[:2] == number.zfill(2)]
    if not chosen:
        raise ValueError(f"no lab {number}; the labs are {', '.join(p.name[:2] for p in folders)} (labs/README.md)")
    return load_lab(chosen[0])


def check(fn=None, *, after_pass=False):
    """Mark a lab.py function as a check. It takes the Run, returns a one-line detail when it
    passes and raises AssertionError (the message says what is wrong) when it fails.
    after_pass: slow checks (training, 50 pages) run only when every check above passed."""
    def mark(f):
        f.lab_check, f.after_pass = True, after_pass
        return f
    return mark(fn) if fn is not None else mark


# ---- the implementation under test ----------------------------------------------------------
def implementation(lab: Lab, path) -> dict:
    """The functions of `path` that the lab names, as {"crops.select_best_resolution": fn};
    {} for the project's own (path None). Only functions the file itself defines count."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LAB_IMPL: no file {path}")
    module = load_file(path, f"labimpl_{lab.number}_{path.stem}")
    found = {}
    for dotted in lab.functions:
        fn = vars(module).get(dotted.rsplit(".", 1)[1])
        if inspect.isfunction(fn) and fn.__module__ == module.__name__:
            found[dotted] = fn
    if not found:
        raise ValueError(f"{path} defines none of the lab's functions: {', '.join(lab.functions)}")
    return found


def original(dotted: str):
    """The project's own function, even while a swap is on (checks compare against it)."""
    module, name = dotted.rsplit(".", 1)
    current = getattr(importlib.import_module(module), name)
    return getattr(current, "lab_original", current)


def project_modules():
    """Loaded modules from the project's files: not the labs' own, not the packages of a .venv
    inside the repository."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        path = Path(file).resolve() if file else None
        if path and path.is_relative_to(ROOT) and not path.is_relative_to(LABS) and "site-packages" not in path.parts:
            yield module


@contextlib.contextmanager
def swapped(functions: dict):
    """Within the block, each project binding of a function in `functions` (its module's and
    every `from module import name` elsewhere) is the given replacement."""
    for name in BINDERS:
        importlib.import_module(name)
    undo = []
    for dotted, new in functions.items():
        old = original(dotted)
        new.lab_original = old
        for module in project_modules():
            for name, value in list(vars(module).items()):
                if value is old:
                    setattr(module, name, new)
                    undo.append((module, name, old))
    try:
        yield
    finally:
        for module, name, old in reversed(undo):
            setattr(module, name, old)


INSTALLED = []  # install()'s swaps: a swap left unreferenced would be closed, and undone, by the garbage collector


def install(number: str, path):
    """The swap for the rest of this process: train.py run by a lab (labs/toy.py) starts so, and
    its DataLoader workers fork from it with the student's functions in place."""
    swap = swapped(implementation(find(number), path))
    swap.__enter__()
    INSTALLED.append(swap)


def assert_close(got, want, what: str, atol: float = 1e-5):
    """An AssertionError naming `what` and the largest difference, when two tensors differ."""
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    worst = float((got - want).abs().max()) if got.numel() else 0.0
    assert worst <= atol, f"{what}: off by up to {worst:.3g} (allowed {atol:g})"


# ---- a run ----------------------------------------------------------------------------------
@dataclass
class Run:
    lab: Lab
    impl: str                 # "project", or the implementation file's path
    impl_path: object         # None for the project's
    full: bool
    out: Path                 # out/labs/NN-slug/IMPL/: pictures and training runs
    values: dict = field(default_factory=dict)
    stable: list = field(default_factory=list)

    def record(self, key: str, value, stable: bool = True):
        """An observed value, for the results file (and the handout, when recorded). stable:
        the same on every run of the same code (the suite compares it with the reference)."""
        self.values[key] = value
        if stable and key not in self.stable:
            self.stable.append(key)


def shown(path) -> str:
    """A path as a line says it: from the repository root when it is inside."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def impl_name(path) -> str:
    return "project" if path is None else shown(path)


def run(lab: Lab, path=None, full: bool = False, say=print, out: Path = OUT) -> dict:
    """Run the lab's checks with the implementation in `path` (None: the project's); print one
    line per check with `say`; return the results (also written to out/labs/NN-slug/IMPL.json)."""
    name = impl_name(path)
    tag = "project" if path is None else Path(path).stem
    r = Run(lab, name, path, full, out / lab.slug / (tag + ("-full" if full else "")))
    r.out.mkdir(parents=True, exist_ok=True)
    say(f"lab {lab.number}: {lab.module.TITLE} ({lab.module.PAPER}); implementation: {name}"
        + (" (full form)" if full else ""))
    t0, load, results, failed = time.time(), os.getloadavg()[0], {}, False
    with swapped(implementation(lab, path)):
        for fn in lab.checks():
            if fn.after_pass and failed:
                results[fn.__name__] = dict(ok=False, kind="not_run", detail="not run: the checks above must pass first")
            else:
                results[fn.__name__] = one_check(fn, r, path)
            failed |= not results[fn.__name__]["ok"]
            say(f"  {'PASS' if results[fn.__name__]['ok'] else 'FAIL'}  {fn.__name__}: {results[fn.__name__]['detail']}")
    n_bad = sum(not c["ok"] for c in results.values())
    seconds = round(time.time() - t0, 1)
    say(f"lab {lab.number}: {len(results) - n_bad} of {len(results)} checks passed in {seconds} s"
        + ("" if not n_bad else f"; {n_bad} failed"))
    result = dict(lab=lab.number, impl=name, mode="full" if full else "run", ok=not n_bad, seconds=seconds,
                  checks=results, values=r.values, stable=r.stable, torch=torch.__version__,
                  cpu_kind=devices.cpu_kind(), cores=os.cpu_count(), when=time.strftime("%Y-%m-%d"),
                  load=[round(load, 1), round(os.getloadavg()[0], 1)])  # other work on a shared CPU slows a run
    (r.out.parent / f"{tag}{'-full' if full else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def one_check(fn, r: Run, path) -> dict:
    try:
        detail = fn(r)
        return dict(ok=True, kind="pass", detail=one_line(detail or "ok"))
    except NotImplementedError:
        return dict(ok=False, kind="not_implemented", detail="not written yet (NotImplementedError)")
    except AssertionError as e:
        return dict(ok=False, kind="assert", detail=one_line(str(e) or "assertion failed"))
    except Exception as e:  # a crash in the student's code is a failed check, not a grader error
        where = [f for f in traceback.extract_tb(e.__traceback__) if path is None or f.filename == str(Path(path).resolve())]
        at = f" ({Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
        return dict(ok=False, kind="crash", detail=one_line(f"crashed: {type(e).__name__}: {e}{at}"))


def one_line(text: str, width: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- the reference run and the handouts -------------------------------------------------------
def reference(lab: Lab) -> dict:
    path = lab.dir / "reference.json"
    return json.loads(path.read_text()) if path.exists() else {}


def provenance(result: dict, number: str) -> str:
    flag = "--full " if result["mode"] == "full" else ""
    load = result.get("load", ["?", "?"])
    return (f"`bash labs/check.sh --record {flag}{number}` took {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min) on "
            f"{result['cores']} cores, {result['cpu_kind']}, torch {result['torch']}, load average {load[0]} at the "
            f"start and {load[1]} at the end ({result['when']})")


def observe_block(lab: Lab, ref: dict) -> str:
    lines = [lab.module.observe(ref).rstrip(), ""] + [f"Recorded: {provenance(ref[m], lab.number)}." for m in ("run", "full") if m in ref]
    return ("<!-- observe:begin: written by `bash labs/check.sh --record` from reference.json and lab.py's observe(); "
            "edit those, not this block -->\n" + "\n".join(lines) + "\n<!-- observe:end -->")


def labs_table() -> str:
    rows = ["| lab | paper | minutes to do | check run (recorded) | commands |", "|---|---|---:|---|---|"]
    for number, lab in labs().items():
        ref, m = reference(lab), lab.module
        run_s = f"{ref['run']['seconds']:.0f} s" if "run" in ref else "not recorded"
        full = f"; `--full` {ref['full']['seconds'] / 60:.1f} min" if "full" in ref else ""
        commands = f"`bash labs/check.sh {number}`" + (f", `bash labs/check.sh --full {number}`" if getattr(m, "FULL", False) else "")
        rows.append(f"| [{number} {m.TITLE}]({lab.slug}/README.md) | {m.PAPER} | {m.MINUTES} | {run_s}{full} | {commands} |")
    kinds = sorted({r["cpu_kind"] for lab in labs().values() for r in reference(lab).values()})
    rows += ["", f"Check runs recorded on: {'; '.join(kinds)}."]
    return ("<!-- labs:begin: written by `bash labs/check.sh --record` from each lab's reference.json -->\n"
            + "\n".join(rows) + "\n<!-- labs:end -->")


def write_record(lab: Lab, result: dict):
    """Keep a passing run of the project's code as the lab's reference; rewrite the handout's
    Observe block and the labs' table from the references."""
    if result["impl"] != "project" or not result["ok"]:
        raise ValueError("--record keeps only a passing run of the project's own implementation")
    ref = reference(lab)
    ref[result["mode"]] = json.loads(json.dumps(result))  # as it will be read back: JSON keys are strings
    (lab.dir / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    handout = lab.dir / "README.md"
    handout.write_text(OBSERVE.sub(lambda _: observe_block(lab, ref), handout.read_text()))
    index = LABS / "README.md"
    index.write_text(TABLE.sub(lambda _: labs_table(), index.read_text()))

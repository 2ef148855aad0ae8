"""The labs (labs/README.md) are graded by checks that can fail: each lab passes with the project's
code, fails with the blank starter written from today's source, and fails with each known-wrong
version on the checks that version's docstring names; the handouts quote only recorded numbers
and name only commands and functions that exist. Labs 03 and 04 run their smoke form here (their
--full form trains for minutes: labs/README.md)."""
import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from labs import grader, make_starters

LABS = grader.labs()
WRONGS = [(number, path, caught) for number, lab in LABS.items() for path, caught in lab.wrongs().items()]
quiet = lambda line: None


@pytest.mark.parametrize("number", LABS)
def test_the_projects_code_passes_and_gives_the_recorded_numbers(number, tmp_path):
    lab = LABS[number]
    result = grader.run(lab, None, say=quiet, out=tmp_path)
    assert result["ok"], {name: c["detail"] for name, c in result["checks"].items() if not c["ok"]}
    ref = grader.reference(lab)["run"]
    values = json.loads(json.dumps(result["values"]))  # as the reference stores them (JSON keys are strings)
    assert {k: values[k] for k in ref["stable"]} == {k: ref["values"][k] for k in ref["stable"]}


@pytest.mark.parametrize("number", LABS)
def test_the_blank_starter_fails_every_check(number, tmp_path):
    lab = LABS[number]
    (tmp_path / "starter.py").write_text(make_starters.starter_source(lab))
    result = grader.run(lab, tmp_path / "starter.py", say=quiet, out=tmp_path)
    assert {c["kind"] for c in result["checks"].values()} <= {"not_implemented", "not_run"}


@pytest.mark.parametrize("number,path,caught", WRONGS, ids=[f"{n}-{p.stem}" for n, p, _ in WRONGS])
def test_each_known_mistake_fails_the_checks_that_name_it(number, path, caught, tmp_path):
    result = grader.run(LABS[number], path, say=quiet, out=tmp_path)
    assert caught and set(caught) <= set(result["checks"]), f"{path.name}: its 'Caught by:' line names no check of the lab"
    # failed by the check's own assertion, not by a crash a changed signature would also cause
    assert {name: result["checks"][name]["kind"] for name in caught} == {name: "assert" for name in caught}
    assert not result["ok"]


def test_every_lab_has_one_or_two_known_mistakes_and_a_handout():
    assert len(LABS) >= 6
    for number, lab in LABS.items():
        assert 1 <= len(lab.wrongs()) <= 2, number
        assert (lab.dir / "README.md").is_file() and (lab.dir / "ANSWERS.md").is_file(), number


# ---- starters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("number", LABS)
def test_a_starter_is_todays_signature_and_docstring_with_a_blank_body(number, tmp_path):
    lab = LABS[number]
    (tmp_path / "s.py").write_text(make_starters.starter_source(lab))
    starter = grader.load_file(tmp_path / "s.py", f"starter_check_{number}")
    for dotted in lab.functions:
        name = dotted.rsplit(".", 1)[1]
        ours, theirs = getattr(starter, name), grader.original(dotted)
        assert inspect.signature(ours) == inspect.signature(theirs) and ours.__doc__ == theirs.__doc__, dotted
        body = next(n for n in ast.parse((tmp_path / "s.py").read_text()).body if getattr(n, "name", "") == name).body
        assert isinstance(body[-1], ast.Raise) and len(body) == 2, f"{dotted}: the body is the docstring and one raise"


def test_a_starter_says_when_the_source_changed_under_it(tmp_path):
    lab = LABS["01"]
    path = tmp_path / "starter.py"
    path.write_text(make_starters.starter_source(lab))
    assert make_starters.stale(path) == []
    path.write_text(re.sub(r"(# source: \S+) \w+", r"\1 0000000000", path.read_text()))
    assert make_starters.stale(path) == ["crops.select_best_resolution"]


def test_a_swap_reaches_names_imported_elsewhere_and_is_undone():
    import crops
    from tools import draw_crops
    fake = lambda img, cfg=None: "fake"
    with grader.swapped({"crops.make_crops": fake}):
        assert crops.make_crops is fake and draw_crops.make_crops is fake
        assert grader.original("crops.make_crops") is not fake
    assert crops.make_crops is draw_crops.make_crops is not fake


def test_an_installed_swap_lasts_until_it_is_closed():
    # train.py run by labs 03 and 04 starts with install(): its DataLoader workers must see the swap
    import gc
    import crops
    grader.install("01", LABS["01"].dir / "wrong_tie_last.py")
    try:
        gc.collect()
        assert crops.select_best_resolution.__module__ == "labimpl_01_wrong_tie_last"
    finally:
        grader.INSTALLED.pop().__exit__(None, None, None)
    assert crops.select_best_resolution is grader.original("crops.select_best_resolution")


# ---- the command and the handouts ----------------------------------------------------------------
def test_check_sh_prints_a_line_per_check_and_exits_1_on_a_mistake():
    env = {**os.environ, "PYTHON": sys.executable}
    ok = subprocess.run(["bash", "labs/check.sh", "06"], cwd=ROOT, env=env, capture_output=True, text=True)
    wrong = subprocess.run(["bash", "labs/check.sh", "06"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "LAB_IMPL": "labs/06-zoom-selection/wrong_quadrants.py"})
    checks = len(LABS["06"].checks())
    assert ok.returncode == 0 and len(re.findall(r"^  PASS  ", ok.stdout, re.M)) == checks, ok.stdout + ok.stderr
    assert wrong.returncode == 1 and re.search(r"^  FAIL  release_regions_are_runs: ", wrong.stdout, re.M), wrong.stdout


def test_handouts_quote_only_recorded_numbers():
    for number, lab in LABS.items():
        ref = grader.reference(lab)
        assert "run" in ref and all(r["torch"] and r["cpu_kind"] for r in ref.values()), number
        assert getattr(lab.module, "FULL", False) == ("full" in ref), f"lab {number}: record its --full form"
        block = grader.OBSERVE.search((lab.dir / "README.md").read_text())
        assert block and block.group(0) == grader.observe_block(lab, ref), f"lab {number}: run `bash labs/check.sh --record {number}`"
    table = grader.TABLE.search((ROOT / "labs" / "README.md").read_text())
    assert table and table.group(0) == grader.labs_table()


SPAN = re.compile(r"`([^`\n]+)`")
PROJECT = ("crops", "pool", "llama", "vit", "model", "lib", "tools", "data", "labs")
FILE = re.compile(r"[\w./*-]+\.(py|md|sh|json|png|npz|txt)")
MADE_BY_A_RUN = re.compile(r"^out/|starter\.py$|NN|IMPL")  # written by a run, or a placeholder


def named(text: str):
    """(kind, span) for each command, project file or dotted project name in backquotes."""
    for span in SPAN.findall(text):
        words = span.split()
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # LAB_IMPL=starter ...
            words = words[1:]
        if words and words[0] in ("bash", "python"):
            yield "command", words
        elif FILE.fullmatch(span) and "/" in span:
            yield "file", span
        elif re.fullmatch(r"[a-z_]+(\.[A-Za-z_]\w*)+(\(.*\))?", span) and span.split(".")[0] in PROJECT:
            yield "name", span.split("(")[0]


def resolve(dotted: str):
    """The object `dotted` names (module attributes, attributes of attributes), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def command_problem(words) -> str:
    """What is wrong with a handout's command, or ''."""
    if words[:2] == ["bash", "run.sh"]:
        words = ["python"] + words[2:]
    if len(words) < 2:
        return ""
    if words[0] == "bash":
        script = ROOT / words[1]
        if not script.is_file():
            return f"no script {words[1]}"
        if words[1] == "labs/check.sh":
            numbers = [w for w in words[2:] if not w.startswith("-")]
            flags = [w for w in words[2:] if w.startswith("-")]
            if any(n.zfill(2) not in LABS for n in numbers if n not in ("NN",)) or set(flags) - {"--full", "--record"}:
                return "unknown lab or flag"
        return ""
    if words[1] == "-m":
        spec = importlib.util.find_spec(words[2])
        source = spec and spec.origin and open(spec.origin).read()
    else:
        source = (ROOT / words[1]).is_file() and (ROOT / words[1]).read_text()
    if not source:
        return f"no module or script {words[1:3]}"
    missing = [w.split("=")[0] for w in words if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
    return f"flags {missing} not in its source" if missing else ""


def test_handouts_name_only_commands_and_functions_that_exist():
    pages = [ROOT / "labs" / "README.md"] + [p for lab in LABS.values() for p in (lab.dir / "README.md", lab.dir / "ANSWERS.md")]
    problems, counted = [], 0
    for page in pages:
        for kind, what in named(page.read_text()):
            counted += 1
            if kind == "command":
                problem = command_problem(what)
            elif kind == "file":
                problem = "" if MADE_BY_A_RUN.search(what) or list(ROOT.glob(what)) else "no such file"
            else:
                problem = "" if resolve(what) is not None else "not found"
            if problem:
                problems.append(f"{page.relative_to(ROOT)}: `{' '.join(what) if kind == 'command' else what}`: {problem}")
    assert counted > 40 and problems == []

"""The documents a reader follows: every citation of docs/release-facts.md names one of its
headings, nothing cites the facts file the repository never had, and the README's reading path
names only functions that exist."""
import importlib
import os
import re
from pathlib import Path

from conftest import ROOT

FACTS = ROOT / "docs" / "release-facts.md"
CITATION = re.compile(r"release-facts\.md#([^\s)\]`'\",.;:]*)")   # docs/release-facts.md#crop-grids
LINK_IN_FACTS = re.compile(r"\]\(#([^)]*)\)")                   # [Crop grids](#crop-grids)
UNPUBLISHED = re.compile(r"\bSPEC\b")                           # the old "SPEC §2.8" citations
TEXT_SUFFIXES = {".py", ".md", ".sh", ".txt"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, only letters, digits, hyphens and underscores
    kept, spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def fact_anchors() -> list:
    return [anchor(line[3:]) for line in FACTS.read_text().splitlines() if line.startswith("## ")]


def project_text_files():
    """Every text file of the project (not .venv, .git or caches), except this test, which has to
    spell out the patterns it looks for."""
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
                yield path


def citations():
    """(file:line, anchor) of every citation of the facts file, its own internal links included."""
    for path in project_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            found = CITATION.findall(line) + (LINK_IN_FACTS.findall(line) if path == FACTS else [])
            for name in found:
                yield f"{path.relative_to(ROOT)}:{number}", name


def test_release_facts_headings_are_unique():
    anchors = fact_anchors()
    assert len(anchors) > 10 and len(set(anchors)) == len(anchors), anchors


def test_every_citation_of_the_release_facts_names_one_of_its_headings():
    found = list(citations())
    assert len(found) > 30  # the code cites the file throughout; none found means the pattern broke
    headings = set(fact_anchors())
    dangling = [f"{where} #{name}" for where, name in found if name not in headings]
    assert dangling == [], f"no such heading in docs/release-facts.md: {dangling}"


def test_no_file_cites_the_unpublished_spec():
    old = [f"{path.relative_to(ROOT)}:{number}" for path in project_text_files()
           for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
           if UNPUBLISHED.search(line)]
    assert old == [], f"cite docs/release-facts.md#<heading> instead: {old}"


# ---- the README's reading path ------------------------------------------------------------------
NAMED = re.compile(r"`([^`]+)`")


def reading_section() -> str:
    return (ROOT / "README.md").read_text().split("\n## Reading the code\n", 1)[1].split("\n## ", 1)[0]


def resolve(file: str, dotted: str):
    """The object `dotted` (e.g. `Dragonfly.encode`) in the module of `file`, or None."""
    obj = importlib.import_module(file[:-3].replace("/", "."))
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def named_functions():
    """(where, files, name) for every function the reading path names: `file.py:name` anywhere;
    a bare `name` in a numbered step belongs to one of the files that step names."""
    for step in re.split(r"\n(?=\d+\. )", reading_section()):
        yield from named_functions_of(step)


def test_reading_path_names_only_functions_that_exist():
    named = list(named_functions())
    assert len(named) > 40  # the steps and the concept map; fewer means the section was not parsed
    missing = [where for where, files, name in named if all(resolve(f, name) is None for f in files)]
    assert missing == [], f"README's reading path names what the code does not have: {missing}"


def test_concept_map_covers_the_papers_ideas():
    table = [line for line in reading_section().splitlines() if line.startswith("| ")][1:]  # after the header
    concepts = " ".join(line.split("|")[1] for line in table)
    for idea in ("low, medium and high crops", "grid choice", "mean pooling", "separator", "projection",
                 "zoom-in", "two training stages"):
        assert idea in concepts, idea


# ---- the front page and the manuals --------------------------------------------------------------
MAX_README_LINES = 250  # a front page, as nanoGPT's, gpt-fast's and nanoVLM's are; manuals go to docs/
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")                 # [text](path#anchor), ![alt](path)
CODE_SPAN = re.compile(r"`[^`\n]*`")
COMMAND = re.compile(r"\bpython3?\s+-m\s+([\w.]+)|\bpython3?\s+([\w./-]+\.py)\b"
                     r"|\bbash\s+run\.sh\s+(?:-m\s+([\w.]+)|([\w./-]+\.py)\b)")


def documents() -> list:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def prose(path: Path) -> str:
    """The text of a markdown file outside its fenced code blocks."""
    kept, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def headings(path: Path) -> set:
    return {anchor(line.lstrip("#")) for line in prose(path).splitlines() if re.match(r"#{1,6} ", line)}


def links(path: Path):
    """(target file, anchor or None) of every relative link of a markdown file; web and mail links
    are left out, and so is what only looks like a link inside `code`."""
    for target in LINK.findall(CODE_SPAN.sub("", prose(path))):
        if re.match(r"(https?|mailto):", target):
            continue
        file, _, name = target.partition("#")
        yield (path.parent / file).resolve() if file else path, name or None


def broken_links(paths) -> list:
    broken = []
    for path in paths:
        for target, name in links(path):
            where = f"{os.path.relpath(path, ROOT)} -> {os.path.relpath(target, ROOT)}"
            if not target.is_file():
                broken.append(f"{where}: no such file")
            elif name is not None and target.suffix == ".md" and name not in headings(target):
                broken.append(f"{where}#{name}: no such heading")
    return broken


def commands(text: str):
    """The file each `python -m X`, `python FILE.py` and `bash run.sh ...` in `text` runs, relative to
    the repository root. A module written in capitals (`python -m tools.NAME`) is a placeholder."""
    for module, file, run_module, run_file in COMMAND.findall(text):
        module = module or run_module
        if module and not any(part.isupper() for part in module.split(".")):
            yield module.rstrip(".").replace(".", "/") + ".py"
        elif file or run_file:
            yield file or run_file


def missing_commands(paths) -> list:
    return [f"{path.relative_to(ROOT)}: {file}" for path in paths for file in commands(path.read_text())
            if not (ROOT / file).is_file()]


def test_readme_and_docs_link_only_to_files_and_headings_that_exist():
    assert sum(1 for path in documents() for _ in links(path)) > 30  # the front page links every page
    assert broken_links(documents()) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#no-such) [missing](nowhere.md) `[code](x.md)`\n"
                    "[web](https://example.com) ![picture](page.md#title)\n```\n[fenced](also-nowhere.md)\n```\n")
    assert [(t.name, n) for t, n in links(page)] == [("page.md", "title"), ("page.md", "no-such"),
                                                     ("nowhere.md", None), ("page.md", "title")]
    assert [Path(b.split(" -> ")[1]).name for b in broken_links([page])] == ["page.md#no-such: no such heading",
                                                                             "nowhere.md: no such file"]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move a manual to docs/"


def test_every_page_of_docs_is_linked_from_the_front_page():
    linked = {target for target, _ in links(ROOT / "README.md")}
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_every_command_in_the_readme_and_docs_names_a_file_that_exists():
    found = [file for path in documents() for file in commands(path.read_text())]
    assert len(found) > 40 and "tools/eval.py" in found and "sample.py" in found
    assert missing_commands(documents()) == []


def test_a_command_naming_a_missing_module_is_caught():
    text = "python -m tools.evaluate --task zoom; bash run.sh -m tools.eval; python sampler.py; python -m tools.NAME"
    assert list(commands(text)) == ["tools/evaluate.py", "tools/eval.py", "sampler.py"]


# ---- the Figure 1 class: one 90-minute path through code that runs ------------------------------
STEP_TIME = re.compile(r"^(\d+)\. \*\*[^*]*?, (\d+) min\.\*\*", re.M)


def figure_1_steps() -> list:
    """The numbered steps before the optional path, as (number, minutes, step text)."""
    first = reading_section().split("second, optional path", 1)[0]
    steps = re.split(r"\n(?=\d+\. )", first)[1:]
    return [(int(m.group(1)), int(m.group(2)), step) for step in steps if (m := STEP_TIME.match(step))]


def test_the_figure_1_path_fits_one_90_minute_class():
    steps = figure_1_steps()
    assert [n for n, _, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 6
    assert sum(minutes for _, minutes, _ in steps) <= 90


def test_a_tiny_model_answering_about_an_image_runs_every_function_of_the_figure_1_path(tiny_v2):
    import dataclasses
    import sys
    import torch
    from PIL import Image
    import crops
    from lib.tokenizer import Tokenizer
    tok = Tokenizer.from_file(ROOT / "checkpoints" / "zoom-tiny")
    named = [(files, name) for n, _, step in figure_1_steps() for where, files, name in named_functions_of(step)]
    assert len(named) > 25
    ran = set()

    def profile(frame, event, arg):
        if event == "call":
            ran.add(frame.f_code)
    image = Image.effect_noise((500, 300), 60).convert("RGB")
    sys.setprofile(profile)
    try:
        c = crops.make_crops(image, tiny_v2.cfg.crops)
        pixels = torch.from_numpy(c.pixels)[None]
        prompt = tok.encode_prompt("What is this?")
        tiny_v2(torch.tensor([prompt]), pixels, torch.tensor([prompt]))                # training's loss
        list(tiny_v2.generate([prompt], [c], max_new_tokens=2))                          # an answer
    finally:
        sys.setprofile(None)
    configs = {type(v) for v in (tiny_v2.cfg, tiny_v2.cfg.vit, tiny_v2.cfg.llm, tiny_v2.cfg.crops)}

    def runs(obj) -> bool:
        if isinstance(obj, type):
            methods = [f for f in vars(obj).values() if hasattr(f, "__code__")]
            return (dataclasses.is_dataclass(obj) and obj in configs) or any(f.__code__ in ran for f in methods)
        return getattr(obj, "__code__", None) in ran

    idle = [f"{files[0]}:{name}" for files, name in named
            if not any(runs(resolve(f, name)) for f in files if resolve(f, name) is not None)]
    assert idle == [], f"the Figure 1 path names code that answering does not run: {idle}"


def named_functions_of(step: str):
    files = [t for t in NAMED.findall(step) if t.endswith(".py")]
    for token in NAMED.findall(step):
        if ":" in token:
            file, name = token.split(":", 1)
            yield token, [file], name
        elif not token.endswith(".py") and files and re.fullmatch(r"[A-Za-z_][\w.]*", token):
            yield f"{token} (step naming {', '.join(files)})", files, token

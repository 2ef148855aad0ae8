"""
Write a lab's starter.py from the project's live source: each function the lab names keeps its
signature, its docstring and its comments (shapes, why), and its body becomes
`raise NotImplementedError`. The names the project's version uses come imported as the project
imports them; private helpers are only named, for the student to write.

    python -m labs.make_starters 02           # labs/02-pooling/starter.py, if it is not there yet
    python -m labs.make_starters --force 02   # again, over the student's edits
    python -m labs.make_starters --print 02   # to stdout

Starters are not committed (.gitignore): `LAB_IMPL=starter bash labs/check.sh NN` writes one the
first time, from the code as it is that day, so a starter cannot drift from the code it replaces;
a later check says when the code changed under a starter (the digest in its header).
"""
import argparse
import ast
import builtins
import hashlib
import importlib
import inspect
import io
import sys
import tokenize
from pathlib import Path

from labs import grader


def source_of(dotted: str) -> tuple:
    """(module source, module ast, the function's ast node) of 'pool.mean_pool'."""
    module_name, name = dotted.rsplit(".", 1)
    source = Path(inspect.getfile(importlib.import_module(module_name))).read_text()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return source, tree, node


def digest(dotted: str) -> str:
    """A short hash of the function's source: a starter records it, a check compares."""
    source, _, node = source_of(dotted)
    return hashlib.sha1(ast.get_source_segment(source, node).encode()).hexdigest()[:10]


def blank(dotted: str) -> str:
    """The function with its body replaced: signature and docstring verbatim, then every
    comment of the body, in order, then the raise."""
    source, _, node = source_of(dotted)
    lines = source.splitlines()
    doc = node.body[0]
    head = lines[node.lineno - 1:doc.end_lineno]  # the def line(s) and the docstring
    body_text = "\n".join(lines[doc.end_lineno:node.end_lineno])
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(body_text).readline) if t.type == tokenize.COMMENT]
    indent = " " * doc.col_offset
    out = head + ([f"{indent}# The project's version has these comments, in this order:"] if comments else [])
    out += [f"{indent}{c}" for c in comments]
    return "\n".join(out + [f'{indent}raise NotImplementedError("write {node.name}")'])


def imports_for(dotted_names: list) -> tuple:
    """(import lines, private helpers) for the names the functions read from their module."""
    lines, private = [], []
    for dotted in dotted_names:
        module_name = dotted.rsplit(".", 1)[0]
        source, tree, node = source_of(dotted)
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        used -= set(dir(builtins)) | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        own = []
        for name in sorted(used):
            statement = import_statement(tree, name)
            if statement:
                lines.append(statement)
            elif name not in module_level(tree) or name == node.name:
                continue  # a local variable
            elif name.startswith("_"):
                private.append(f"{module_name}.{name}")
            else:
                own.append(name)
        if own:
            lines.append(f"from {module_name} import {', '.join(own)}")
    return sorted(set(lines), key=lambda s: (s.startswith("from"), s)), sorted(set(private))


def module_level(tree) -> set:
    """The names a module's own top-level statements define (functions, classes, constants)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def import_statement(tree, name: str):
    """The module-level import that binds `name`, reduced to that one name."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if (a.asname or a.name.split(".")[0]) == name:
                    return f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if (a.asname or a.name) == name:
                    return f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
    return None


def starter_source(lab: grader.Lab) -> str:
    imports, private = imports_for(lab.functions)
    names = ", ".join(lab.functions)
    header = [f'"""Lab {lab.number} ({lab.module.TITLE}): your {names}.',
              "",
              f"Written by `python -m labs.make_starters {lab.number}` from the project's source: the signature,",
              "docstring and comments are the project's; the body is yours to write. Check it with",
              f"    LAB_IMPL=starter bash labs/check.sh {lab.number}",
              "It replaces the project's function everywhere while the checks run (labs/README.md).",
              '"""']
    marks = [f"# source: {d} {digest(d)}" for d in lab.functions]
    helpers = ([f"# The project's version also calls {', '.join(private)}: write what you need here."] if private else [])
    body = [blank(d) for d in lab.functions]
    return "\n".join(header + imports + [""] + marks + helpers + [""] + ["\n\n\n".join(body)]) + "\n"


def stale(path: Path) -> list:
    """The functions whose source changed since `path` (a starter) was written."""
    marks = [line.split()[2:4] for line in path.read_text().splitlines() if line.startswith("# source: ")]
    return [dotted for dotted, d in marks if digest(dotted) != d]


def write(lab: grader.Lab, force: bool = False) -> Path:
    path = lab.dir / "starter.py"
    if force or not path.exists():
        path.write_text(starter_source(lab))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Write labs' starter.py from the live source.")
    p.add_argument("labs", nargs="*", help="lab numbers (default: every lab)")
    p.add_argument("--force", action="store_true", help="overwrite an existing starter.py (the student's edits)")
    p.add_argument("--print", action="store_true", help="print the starter instead of writing it")
    args = p.parse_args(argv)
    for number in args.labs or list(grader.labs()):
        lab = grader.find(number)
        if args.print:
            print(starter_source(lab))
            continue
        existed = (lab.dir / "starter.py").exists()
        path = write(lab, args.force)
        print(f"{'kept' if existed and not args.force else 'wrote'} {path.relative_to(grader.ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")

"""
Grade one lab: its checks, one line each, against an implementation (labs/README.md).

    bash labs/check.sh 01                              # the project's own code: must pass
    LAB_IMPL=starter bash labs/check.sh 01             # your labs/01-crops/starter.py
    LAB_IMPL=labs/01-crops/wrong_tie_last.py bash labs/check.sh 01   # any file: a known mistake
    bash labs/check.sh --full 03                       # a long lab's full form (training)
    bash labs/check.sh --record 01                     # the project's run becomes reference.json

LAB_IMPL=starter writes the starter from the live source the first time (labs/make_starters.py)
and never over your edits. The exit status is 0 when every check passed, 1 otherwise.
"""
import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from labs import grader, make_starters


def implementation_path(lab: grader.Lab, spec: str):
    """LAB_IMPL -> the file to grade; None for the project's own code."""
    if spec in ("", "project"):
        return None
    if spec == "starter":
        path = lab.dir / "starter.py"
        if not path.exists():
            make_starters.write(lab)
            print(f"wrote {path.relative_to(grader.ROOT)} from the project's source: edit it, then check again")
        for dotted in make_starters.stale(path):
            print(f"note: {dotted} changed since your starter was written; `python -m labs.make_starters --print "
                  f"{lab.number}` shows the new one (--force overwrites yours)")
        return path
    path = Path(spec)
    return path if path.is_file() else grader.ROOT / spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lab", help="the lab's number: 01, 02, ...")
    p.add_argument("--full", action="store_true", help="the full form of a long lab (training runs, minutes)")
    p.add_argument("--record", action="store_true", help="keep this run of the project's code as the lab's "
                   "reference.json and rewrite the handout's Observe block from it")
    args = p.parse_args(argv)
    lab = grader.find(args.lab)
    if args.full and not getattr(lab.module, "FULL", False):
        raise ValueError(f"lab {lab.number} has no --full form; run `bash labs/check.sh {lab.number}`")
    result = grader.run(lab, implementation_path(lab, os.environ.get("LAB_IMPL", "")), full=args.full)
    if args.record:
        grader.write_record(lab, result)
        print(f"recorded {(lab.dir / 'reference.json').relative_to(grader.ROOT)} and the Observe block of "
              f"{(lab.dir / 'README.md').relative_to(grader.ROOT)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)

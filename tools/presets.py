"""The papers' experiment presets (lib/presets.py) on the command line.

    python -m tools.presets --describe dragonfly-v2     # one preset: crops, tokens, positions, TFLOPs
    python -m tools.presets --table                     # every preset, as a markdown table
    python -m tools.presets --list                      # the names
"""
import argparse
import sys

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from lib import first_run
from lib import presets


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.presets", description="The Dragonfly papers' experiment presets.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--describe", metavar="PRESET", help="crops, tokens, positions and TFLOPs of one preset")
    g.add_argument("--table", action="store_true", help="all presets as a markdown table")
    g.add_argument("--list", action="store_true", help="the preset names")
    args = p.parse_args(argv)
    try:
        first_run.write_stdout(presets.table() if args.table else "\n".join(presets.PRESETS) if args.list
                               else presets.describe(args.describe))
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(first_run.run(main))

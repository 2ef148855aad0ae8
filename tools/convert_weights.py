"""Convert a released checkpoint directory (.bin or safetensors shards) to safetensors shards,
copying its config and tokenizer files (lib/weights.py's `convert_to_safetensors`).

    python -m tools.convert_weights Llama-3.1-8B-Dragonfly-v2 Dragonfly-v2-safetensors
"""
import argparse
import sys

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from lib import first_run
from lib.weights import CheckpointError, convert_to_safetensors


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.convert_weights", description="Convert a checkpoint directory (.bin or safetensors shards) to "
                                            "safetensors shards, copying config and tokenizer files.")
    p.add_argument("src", help="checkpoint directory to read")
    p.add_argument("dst", help="new directory to write (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST")
    args = p.parse_args(argv)
    first_run.file_size_limit_as_error()  # past `ulimit -f`: an OSError, one line
    try:
        convert_to_safetensors(args.src, args.dst, force=args.force)
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # staged() has removed its temporary folder: DST is as it was
        sys.exit(130)


if __name__ == "__main__":
    main()

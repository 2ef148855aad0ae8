"""What a command-line script says when the python running it lacks the requirements.

A fresh clone's `python3 sample.py` usually has no torch. Instead of a traceback it should
print one line naming `bash run.sh`, which makes `.venv` and installs requirements.txt once.
Only scripts do this, from their `if __name__ == "__main__":` part, before their first
third-party import. Library modules leave a missing package alone: `import model` in a
notebook raises an ordinary ImportError and the kernel keeps running.

Standard library only, and no project imports, so any script can call it first.
"""
import sys

# requirements.txt's packages, by the names they are imported under (pillow is PIL)
REQUIRED = {"torch", "numpy", "PIL", "sentencepiece", "tiktoken", "safetensors", "tqdm"}


def command() -> str:
    """How this script was started, as run.sh takes it: `sample.py` or `-m tools.eval`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]


def missing_package_line(name: str) -> str:
    return (f"error: {name} is not installed: run `bash run.sh {command()} ...` "
            "(installs requirements.txt into .venv once) or pip install -r requirements.txt")


def one_line_for_missing_packages():
    """From here on, a required package that fails to import and is not caught ends the script
    with that one line and exit status 1, instead of a traceback. Every other error, including a
    missing optional package (METEOR's pycocoevalcap), keeps Python's usual report."""
    def report(kind, error, traceback):
        package = (getattr(error, "name", None) or "").split(".")[0]
        if issubclass(kind, ModuleNotFoundError) and package in REQUIRED:
            print(missing_package_line(package), file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = report


def write_stdout(text: str):
    """print(text), flushed now: a stdout that cannot take it (`> /dev/full`, a closed pipe) is an
    OSError here, once, with stdout pointed at /dev/null so the interpreter's own flush at exit
    has nothing left to complain about."""
    import os
    try:
        print(text)
        sys.stdout.flush()
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OSError(f"cannot write to stdout ({e.strerror or e})") from None


def file_size_limit_as_error():
    """A write past `ulimit -f` (RLIMIT_FSIZE) is an OSError (EFBIG, "File too large") that the
    script reports in one line, instead of SIGXFSZ killing the process with a core dump and
    leaving a half-written file; a full disk (ENOSPC) already is one."""
    import signal
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def run(main):
    """A script's main() with the errors a user causes as one line: a bad input (ValueError) or a
    file that cannot be read or written (OSError) is `error: ...` with exit status 1, Ctrl-C is
    exit status 130, with no traceback either way."""
    file_size_limit_as_error()
    try:
        return main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)

"""One run per output folder: OUT/lock, created exclusively, names the process writing OUT now
(host and pid). train.py and eval.py take it before they write; a second process on the same
folder is refused while the first lives, and a lock whose process has died (a kill, a power
cut) is stale and taken over.
"""
import os
import socket
from pathlib import Path

LOCK = "lock"


class InUse(ValueError):
    """The folder is being written by another live process."""


def me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def lock(out: Path, tool: str, instead: str = "use another --out"):
    """Take OUT/lock for this process, or raise InUse naming its holder. tool: the command that
    refuses (`train.py`, `eval.py`) and what to do instead, for the message."""
    path = Path(out) / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, _, pid = path.read_text().partition(" ")
            except OSError:                 # not a file we wrote (a folder named lock): not ours to judge
                host = pid = ""
            if host == socket.gethostname() and pid.strip().isdigit() and not alive(int(pid)):
                path.unlink(missing_ok=True)
                continue
            raise InUse(f"--out {out} is in use by another {tool} (pid {pid.strip() or '?'} on {host or '?'}); "
                        f"wait for it to end or {instead} (if it is not running, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me())
        return


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process
        return True
    return True


def release(out: Path):
    """Remove OUT/lock if this process holds it."""
    path = Path(out) / LOCK
    try:
        if path.read_text() == me():
            path.unlink()
    except OSError:
        pass

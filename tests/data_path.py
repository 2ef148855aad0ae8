"""How straight a command's data path reads (issue 23, "one way in for a checkpoint"): follow the
calls a reader follows from a script's main() to its answer and count how often the reader comes
back up to a higher layer (README's layers: tests/test_layers.py's LAYERS).

A reader following `sample.py:main` reads each call into another file of the plumbing (the script
and lib/) and comes back up when it returns. So the count is the number of distinct calls
(caller function -> callee function) that go from a file down to a file of a lower layer, at most
`depth` files below the script, made from the script or lib/ (the architecture's own calls are
the reading path's subject, read on their own). A call made again (a loop) is one step."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = {"vit.py", "llama.py", "crops.py", "pool.py", "model.py"}


def project_file(code):
    path = Path(code.co_filename)
    try:
        rel = str(path.resolve().relative_to(ROOT))
    except ValueError:
        return None
    return None if rel.startswith(("tests/", ".venv/")) else rel


def calls_down(run, layer_of, script: str, depth: int = 2) -> list:
    """Run `run()` and return the distinct down-calls (caller file:function -> callee file:function)
    a reader follows from `script`, at most `depth` files below it. layer_of: file -> rank."""
    seen, order = {}, []

    def hop_chain(frame):
        """The project files on the stack from `frame` up, consecutive repeats folded."""
        files = []
        while frame is not None:
            f = project_file(frame.f_code)
            if f and (not files or files[-1] != f):
                files.append(f)
            frame = frame.f_back
        return files

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = project_file(frame.f_code)
        if callee is None or callee not in layer_of:
            return
        back = frame.f_back               # the project frame that made this call
        while back is not None and project_file(back.f_code) is None:
            back = back.f_back
        if back is None or project_file(back.f_code) == callee:
            return                        # a call inside one file: the reader is already there
        chain = hop_chain(frame)          # [callee file, caller file, ..., script]
        if script not in chain:
            return
        caller = chain[1]
        below = chain.index(script)       # files between the callee and the script
        if below > depth or caller not in layer_of or layer_of[callee] >= layer_of[caller]:
            return
        if caller in ARCHITECTURE:
            return
        key = (f"{caller}:{back.f_code.co_name}", f"{callee}:{frame.f_code.co_name}")
        seen.setdefault(key, None)
        order.append((caller, callee))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return list(seen), order

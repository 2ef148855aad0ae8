"""A run's answers on disk, resumable (eval.py): OUT/predictions.jsonl grows one whole line per
answer, a line torn by a kill is dropped, and OUT/run.json says what made the answers, so that a
later run reuses them only when it would make the same ones.
"""
import json
import sys
from pathlib import Path

from lib import weights


def claim_out(out: Path, identity: dict, restart: bool) -> Path:
    """OUT's predictions file, once its answers are known to come from a run like this one
    (OUT/run.json): otherwise refused in one line, or discarded with `restart`."""
    pred_file, run_file = out / "predictions.jsonl", out / "run.json"
    answered = pred_file.exists() and pred_file.stat().st_size > 0
    try:
        saved = json.loads(run_file.read_text()) if run_file.is_file() else None
    except ValueError:  # torn or edited: it no longer says what made the answers
        saved = None
    if answered and restart:
        pred_file.unlink()
        print(f"{pred_file}: the earlier answers discarded (--restart)", file=sys.stderr)
    elif answered and saved != identity:
        differs = "no run.json says what made them" if not isinstance(saved, dict) else "they differ in " + ", ".join(
            k for k in identity if saved.get(k) != identity[k])
        raise ValueError(f"{pred_file} holds answers of another run ({differs}); use a new --out, or --restart "
                         "to discard them")
    if restart or saved != identity:    # the scores of answers now gone, or of another run
        (out / "metrics.json").unlink(missing_ok=True)
    if saved != identity:
        run_file.with_suffix(".tmp").write_text(json.dumps(identity, indent=2) + "\n")
        run_file.with_suffix(".tmp").replace(run_file)
    return pred_file


def check_out(out: Path, inputs: dict):
    """Refuse an --out that would write over an input or another tool's run (train.py's OUT holds
    run.json too). inputs: flag -> (path, whether an --out inside it is refused too: a model folder)."""
    weights.refuse_input_overlap(out, inputs, "eval")
    try:
        recorded = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        recorded = None
    if (isinstance(recorded, dict) and "run_id" in recorded) or (out / "log.jsonl").exists():
        raise ValueError(f"--out {out} holds a training run (train.py's run.json and log); eval would overwrite "
                         f"its run.json and it could no longer be resumed: give another --out, e.g. {out / 'eval'}")


def drop_torn_line(path: Path) -> bool:
    """Cut a last line that has no newline (a run killed mid-write) off the predictions file, so
    the next answer is not appended onto it and lost with it; its question is asked again."""
    if not path.exists():
        return False
    with open(path, "r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def read_predictions(path: Path) -> dict:
    """id -> the last entry written for it ({"id", "prediction"} or {"id", "error"})."""
    done = {}
    if path.exists():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                entry = json.loads(line)
                done[str(entry["id"])] = entry
            except (ValueError, KeyError, TypeError):  # e.g. torn by an older eval.py, or edited by hand
                print(f"{path}:{n}: unreadable line skipped", file=sys.stderr)
    return done


def append_line(f, entry: dict):
    """One os-level write per line on an unbuffered file: a kill lands between lines, never
    inside one (a buffered file may flush a line in pieces)."""
    f.write((json.dumps(entry, ensure_ascii=False) + "\n").encode())

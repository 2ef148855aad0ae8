"""The inventory of bad inputs to the command-line tools and what each one gets.

One row per input: the tool, its arguments, the exit code, and the line stderr ends with. A
failing row must end stderr with that one line, print no traceback, and print nothing else but
the tool's usual progress lines. Rows that succeed (a capped --max-new-tokens, a torn predictions
file) name the line they must print, and some check the files left behind.

Every row is a process of its own running the tool's `__main__`, with its stdout and stderr on
file descriptors 1 and 2 and the exit code the interpreter would give. To keep 50 rows at
seconds rather than a torch import each, the rows are forked from one interpreter that has
imported torch already (`python tests/test_cli_errors.py` is that runner); where there is no
fork, each row is a fresh `python TOOL ...`.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import script  # noqa: E402
TINY = ROOT / "checkpoints" / "zoom-tiny"     # context 1024, 258 image positions
IMAGE = ROOT / "data" / "zoom" / "example.png"
RECORDS = ROOT / "tests" / "fixtures" / "data" / "release.jsonl"  # usable data: the --init rows fail on --init


def _missing_device(kind):
    """A device string naming a `kind` device that this machine lacks, or None."""
    import torch
    if kind == "cuda":
        return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    return None if torch.backends.mps.is_available() else "mps"


CUDA, MPS = _missing_device("cuda"), _missing_device("mps")
EVAL = ["--task", "zoom", "--data", "{tmp}/bench.jsonl", "--images", str(IMAGE.parent), "--device", "cpu", "--out"]
TINY_RUN = ["--model", "tiny", "--data", str(RECORDS)]

# (tool, case, arguments, exit code, regular expression for the line; {tmp} is the fixture folder)
ROWS = [
    ("sample.py", "missing image", ["--image", "{tmp}/nope.png", "--prompt", "hi"], 1,
     r"error: image file not found: .*nope\.png"),
    ("sample.py", "not an image", ["--image", "{tmp}/notes.png", "--prompt", "hi"], 1,
     r"error: cannot read image .*notes\.png: .*"),
    ("sample.py", "truncated image", ["--image", "{tmp}/truncated.png", "--prompt", "hi"], 1,
     r"error: cannot read image .*truncated\.png: .*truncated.*"),
    ("sample.py", "huge image (13000x13000 PNG)", ["--image", "{tmp}/huge.png", "--prompt", "hi"], 1,
     r"error: image .*huge\.png is 13000x13000 \(169 megapixels\); at most 67 are read .*"),
    ("sample.py", "prompt longer than the context", ["--image", str(IMAGE), "--prompt", "word " * 1000], 1,
     r"error: --prompt number 1: \d+ of the context's 1024 positions are left; this turn needs \d+ "
     r"\(its question and one answer token\); shorten it, ask fewer, or use a checkpoint with a longer context"),
    ("sample.py", "--max-new-tokens above the context", ["--prompt", "hi", "--max-new-tokens", "5000"], 0,
     r"note: --max-new-tokens 5000 capped to 10\d\d: the conversation takes \d+ of the context's 1024 positions"),
    ("sample.py", "--device cuda not here", ["--prompt", "hi", "--device", CUDA], 1,
     rf"error: --device {CUDA} is not available here; available: cpu.*"),
    ("sample.py", "--device mps not here", ["--prompt", "hi", "--device", MPS], 1,
     rf"error: --device {MPS} is not available here; available: cpu.*"),
    ("sample.py", "--device that does not exist", ["--prompt", "hi", "--device", "gpu"], 1,
     r"error: --device gpu is not available here; available: cpu.*"),
    ("sample.py", "missing checkpoint", ["--checkpoint", "{tmp}/none", "--prompt", "hi"], 1,
     r"error: checkpoint directory .*none not found .*"),
    ("sample.py", "empty checkpoint directory", ["--checkpoint", "{tmp}/empty", "--prompt", "hi"], 1,
     r"error: .*empty: no checkpoint here \(no config\.json, no weights\); .*"),
    ("sample.py", "invalid config.json", ["--checkpoint", "{tmp}/badconfig", "--prompt", "hi"], 1,
     r"error: .*badconfig/config\.json: not valid JSON \(.*\); .*"),
    ("sample.py", "shape-mismatched weight", ["--checkpoint", "{tmp}/badshape", "--prompt", "hi"], 1,
     r"error: .*badshape/model\.safetensors: image_encoder\.vision_model\.post_layernorm\.weight has shape "
     r"\(63,\), the model expects \(64,\)"),
    ("sample.py", "missing weight", ["--checkpoint", "{tmp}/noweight", "--prompt", "hi"], 1,
     r"error: .*noweight: missing 1 weight\(s\), first 'image_encoder\.vision_model\.post_layernorm\.weight'"),
    ("tools/eval.py", "--device cuda not here", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_a", "--device", CUDA], 1,
     rf"error: --device {CUDA} is not available here; available: cpu.*"),
    ("tools/eval.py", "empty checkpoint directory", ["--checkpoint", "{tmp}/empty", *EVAL, "{tmp}/eval_b"], 1,
     r"error: .*empty: no checkpoint here \(no config\.json, no weights\); .*"),
    ("tools/eval.py", "unknown task", ["--checkpoint", str(TINY), "--task", "gqa", "--data", "{tmp}/bench.jsonl"], 1,
     r"error: unknown task 'gqa'; tasks: textvqa, .*"),
    ("tools/eval.py", "predictions file torn by a kill", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_torn"], 0,
     r".*predictions\.jsonl: dropped a torn last line .*"),
    ("tools/convert_weights.py", "non-empty DST", [str(TINY), "{tmp}/dst_full"], 1,
     r"error: .*dst_full exists and is not empty; choose a new folder or pass --force to replace it"),
    ("tools/convert_weights.py", "non-empty DST with --force", [str(TINY), "{tmp}/dst_force", "--force"], 0,
     r"model\.safetensors -> model-00001-of-00001\.safetensors \(77 tensors\)"),
    ("tools/convert_weights.py", "SRC is a file", [str(TINY / "model.safetensors"), "{tmp}/dst_new"], 1,
     r"error: .*model\.safetensors: not a checkpoint directory .*"),
    ("tools/draw_crops.py", "missing image", ["{tmp}/nope.png"], 1, r"error: image file not found: .*nope\.png"),
    ("tools/draw_crops.py", "truncated image", ["{tmp}/truncated.png"], 1, r"error: cannot read image .*truncated\.png: .*"),
    ("tools/draw_crops.py", "huge image (13000x13000 PNG)", ["{tmp}/huge.png"], 1,
     r"error: image .*huge\.png is 13000x13000 \(169 megapixels\); at most 67 are read .*"),
    ("train.py", "empty --init directory", ["--init", "{tmp}/empty", "--data", str(RECORDS), "--out", "{tmp}/train_a"], 1,
     r"error: .*empty: no checkpoint here \(no config\.json, no weights\); .*"),
    ("train.py", "invalid config.json in --init", ["--init", "{tmp}/badconfig", "--data", str(RECORDS), "--out", "{tmp}/train_b"], 1,
     r"error: .*badconfig/config\.json: not valid JSON \(.*\); .*"),
    # issue 17: training's flags, outputs and records
    ("train.py", "--out is a file", [*TINY_RUN, "--out", "{tmp}/notes.png"], 1,
     r"error: --out .*notes\.png is a file; give a folder \(new or empty\) for the run"),
    ("train.py", "--out inside a file", [*TINY_RUN, "--out", "{tmp}/notes.png/run"], 1,
     r"error: --out .*notes\.png/run: cannot create it \(Not a directory\); choose another folder"),
    ("train.py", "--lr -1", [*TINY_RUN, "--out", "{tmp}/train_c", "--lr", "-1"], 1, r"error: --lr -1\.0: must be above 0"),
    ("train.py", "--lr nan", [*TINY_RUN, "--out", "{tmp}/train_c", "--lr", "nan"], 1, r"error: --lr nan: must be above 0"),
    ("train.py", "--max-steps -5", [*TINY_RUN, "--out", "{tmp}/train_c", "--max-steps", "-5"], 1,
     r"error: --max-steps -5: must be 0 or more"),
    ("train.py", "--seed 10**23", [*TINY_RUN, "--out", "{tmp}/train_c", "--seed", str(10**23)], 1,
     r"error: --seed 10{23}: must be from 0 to 2\*\*32 - 1 \(numpy's range\)".replace("10{23}", str(10**23))),
    ("train.py", "--resume with another --seed", [*TINY_RUN, "--out", "{tmp}/resume_seed", "--resume", "--seed", "1"], 1,
     r"error: --resume: the run in .*resume_seed was started with other settings \(--seed 0, now 1\): "
     r"resume with its flags, or train into a new --out"),
    ("train.py", "--out is --init", ["--init", "{tmp}/init_copy", "--data", str(RECORDS), "--out", "{tmp}/init_copy"], 1,
     r"error: --out .*init_copy is --init .*init_copy: training would write over its input; choose another --out"),
    ("train.py", "--out inside --init", ["--init", "{tmp}/init_copy", "--data", str(RECORDS), "--out", "{tmp}/init_copy/sft"], 1,
     r"error: --out .*init_copy/sft is inside --init .*init_copy: training would write over its input; choose another --out"),
    ("train.py", "--out is --data", ["--model", "tiny", "--data", "{tmp}/bench.jsonl", "--out", "{tmp}/bench.jsonl"], 1,
     r"error: --out .*bench\.jsonl is --data .*bench\.jsonl: training would write over its input; choose another --out"),
    ("train.py", "first JSONL line not JSON", ["--model", "tiny", "--data", "{tmp}/badfirst.jsonl", "--out", "{tmp}/train_d"], 1,
     r"error: --data .*badfirst\.jsonl: line 1 is not a JSON record; a JSONL file holds one JSON object per line"),
    ("data/zoom/demo.py", "--train 0", ["--train", "0", "--out", "{tmp}/demo"], 1, r"error: --train 0: must be 1 or more"),
    # issue 17, probes of train.py beyond the list
    ("train.py", "--save-every 0", [*TINY_RUN, "--out", "{tmp}/train_c", "--save-every", "0"], 1,
     r"error: --save-every 0: must be above 0"),
    ("train.py", "--micro-batch 0", [*TINY_RUN, "--out", "{tmp}/train_c", "--micro-batch", "0"], 1,
     r"error: --micro-batch 0: must be above 0"),
    ("train.py", "--epochs 0", [*TINY_RUN, "--out", "{tmp}/train_c", "--epochs", "0"], 1, r"error: --epochs 0\.0: must be above 0"),
    ("train.py", "--text-prob without --text-data", [*TINY_RUN, "--out", "{tmp}/train_c", "--text-prob", "0.1"], 1,
     r"error: --text-prob 0\.1 mixes in text-only records: give them with --text-data"),
    ("train.py", "--out holds the tokenizer", [*TINY_RUN, "--tokenizer", "{tmp}/init_copy/tokenizer.model", "--out", "{tmp}/init_copy"],
     1, r"error: --out .*init_copy holds --tokenizer .*init_copy/tokenizer\.model: training would write over its input; .*"),
    ("train.py", "--out holds a model folder, not a run", [*TINY_RUN, "--out", "{tmp}/dst_full_model"], 1,
     r"error: --out .*dst_full_model holds config\.json, not a training run's; choose a new --out"),
    ("train.py", "unreadable run.json", [*TINY_RUN, "--out", "{tmp}/badrun", "--resume"], 1,
     r"error: .*badrun/run\.json is unreadable, so whose run .*badrun holds is unknown; train into a new --out"),
    ("train.py", "--out/lock is a folder", [*TINY_RUN, "--out", "{tmp}/lockdir"], 1,
     r"error: --out .*lockdir is in use by another train\.py \(pid \? on \?\); wait for it to end or train into another "
     r"--out \(if it is not running, delete .*lockdir/lock\)"),
    # ---- issue 17, inference and files: nothing silently wrong, nothing destroyed
    ("sample.py", "--temperature nan", ["--prompt", "hi", "--temperature", "nan"], 1,
     r"error: need 0 < --top-p <= 1, --temperature >= 0 \(a finite number\) and --max-new-tokens >= 1"),
    ("sample.py", "--seed 10**23", ["--prompt", "hi", "--seed", str(10**23)], 1,
     r"error: --seed 100000000000000000000000 is out of range: give an integer from -2\*\*63 to 2\*\*64 - 1"),
    ("sample.py", "--show onto the --image", ["--image", "{tmp}/pic.png", "--prompt", "hi", "--show", "{tmp}/pic.png"], 1,
     r"error: --show .*pic\.png is the input .*pic\.png; write to a new path"),
    ("sample.py", "--show into a missing folder", ["--image", str(IMAGE), "--prompt", "hi", "--show", "{tmp}/nodir/a.png"], 1,
     r"error: --show .*nodir/a\.png: the folder .*nodir does not exist; create it or choose another path"),
    ("sample.py", "a FIFO as --image", ["--image", "{tmp}/fifo.png", "--prompt", "hi"], 1,
     r"error: image .*fifo\.png is not a regular file \(a folder, FIFO or device\); give an image file"),
    ("sample.py", "an int8 tensor for a float weight", ["--checkpoint", "{tmp}/int8proj", "--prompt", "hi"], 1,
     r"error: .*int8proj/model\.safetensors: vision_embed_tokens\.weight is stored as int8, the model expects a "
     r"floating-point weight"),
    ("sample.py", "a bool tensor for a float weight", ["--checkpoint", "{tmp}/boolnorm", "--prompt", "hi"], 1,
     r"error: .*boolnorm/model\.safetensors: language_model\.model\.norm\.weight is stored as bool, .*"),
    ("sample.py", "NaN weights", ["--checkpoint", "{tmp}/nanweight", "--prompt", "hi", "--json"], 1,
     r"error: .*nanweight/model\.safetensors: language_model\.model\.norm\.weight holds NaN or infinite values; .*"),
    ("sample.py", "config.json hidden_size \"32\"", ["--checkpoint", "{tmp}/cfg_hidden", "--prompt", "hi"], 1,
     r'error: .*cfg_hidden/config\.json: text_config: hidden_size: expected an integer from 1 to 131072, found "32"'),
    ("sample.py", "config.json num_attention_heads 0", ["--checkpoint", "{tmp}/cfg_heads", "--prompt", "hi"], 1,
     r"error: .*cfg_heads/config\.json: text_config: num_attention_heads: expected an integer from 1 to 4096, found 0"),
    ("sample.py", "config.json rms_norm_eps \"1e-5\"", ["--checkpoint", "{tmp}/cfg_eps", "--prompt", "hi"], 1,
     r'error: .*cfg_eps/config\.json: text_config: rms_norm_eps: expected a number above 0, at most 1\.0, found "1e-5"'),
    ("sample.py", "config.json num_hidden_layers 2.0", ["--checkpoint", "{tmp}/cfg_layers", "--prompt", "hi"], 1,
     r"error: .*cfg_layers/config\.json: text_config: num_hidden_layers: expected an integer from 1 to 4096, found 2\.0"),
    ("sample.py", "config.json unknown dragonfly_nano key", ["--checkpoint", "{tmp}/cfg_key", "--prompt", "hi"], 1,
     r"error: .*cfg_key/config\.json: dragonfly_nano: unknown field 'crop' \(known: vit, crops, .*\)"),
    ("sample.py", "config.json null crop size", ["--checkpoint", "{tmp}/cfg_null", "--prompt", "hi"], 1,
     r"error: .*cfg_null/config\.json: dragonfly_nano\.crops\.size: expected an integer from 1 to 65536, found null"),
    ("tools/eval.py", "--batch-size 0", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_c", "--batch-size", "0"], 1,
     r"error: --batch-size 0: give a number >= 1"),
    ("tools/eval.py", "--limit -1", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_d", "--limit", "-1"], 1,
     r"error: --limit -1: give a number >= 1"),
    ("tools/eval.py", "no records", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/blank.jsonl", "--out", "{tmp}/eval_e"], 1,
     r"error: .*blank\.jsonl holds no questions"),
    ("tools/eval.py", "every image missing", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/noimages.jsonl",
                                        "--out", "{tmp}/eval_f", "--device", "cpu"], 1,
     r"error: none of the 2 questions was answered \(first: q1: image file not found: .*gone\.png\); see .*"),
    ("tools/eval.py", "an image path leaving --images", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/escape.jsonl",
                                                   "--out", "{tmp}/eval_g"], 1,
     r"error: .*escape\.jsonl: question q1: image '\.\./\.\./etc/passwd' is outside the image root .*; pass "
     r"--images-anywhere to read it"),
    ("tools/eval.py", "a FIFO as an image", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/fifo.jsonl",
                                       "--out", "{tmp}/eval_h", "--device", "cpu"], 1,
     r"error: none of the 1 questions was answered \(first: q1: image .*fifo\.png is not a regular file .*"),
    ("tools/eval.py", "--out holding another checkpoint's answers", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_other"], 1,
     r"error: .*eval_other/predictions\.jsonl holds answers of another run \(they differ in checkpoint\); use a new "
     r"--out, or --restart to discard them"),
    ("tools/eval.py", "--out holding answers of an unknown run", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_old"], 1,
     r"error: .*eval_old/predictions\.jsonl holds answers of another run \(no run\.json says what made them\); .*"),
    ("tools/convert_weights.py", "DST inside SRC with --force", ["{tmp}/src_copy", "{tmp}/src_copy/model.safetensors", "--force"], 1,
     r"error: DST .*src_copy/model\.safetensors is inside the input .*src_copy; write to a new path"),
    ("tools/convert_weights.py", "DST holding SRC", ["{tmp}/src_copy", "{tmp}", "--force"], 1,
     r"error: DST .* holds the input .*src_copy; write to a new path"),
    ("tools/draw_crops.py", "--out onto the image", ["{tmp}/pic.png", "--out", "{tmp}/pic.png"], 1,
     r"error: --out .*pic\.png is the input .*pic\.png; write to a new path"),
    ("tools/draw_crops.py", "a FIFO as the image", ["{tmp}/fifo.png"], 1,
     r"error: image .*fifo\.png is not a regular file \(a folder, FIFO or device\); give an image file"),
    ("tools/quantize.py", "DST inside SRC", ["{tmp}/src_copy", "{tmp}/src_copy/int8"], 1,
     r"error: DST .*src_copy/int8 is inside the input .*src_copy; write to a new path"),
    ("tools/quantize.py", "DST where nothing can be written", [str(TINY), "/sys/dragonfly-int8"], 1,
     r"error: DST /sys/dragonfly-int8: cannot write in /sys \(.*\); choose another place"),
    ("tools/bench.py", "--threads 0", ["--threads", "0"], 1, r"error: --threads 0: give a number >= 1"),
    ("tools/bench.py", "--repeats 0", ["--repeats", "0", "--warmup", "0", "--contexts", "", "--no-turns", "--new-tokens", "1"], 1,
     r"error: --repeats 0: give a number >= 1"),
    ("tools/bench.py", "--json into a missing folder", ["--json", "{tmp}/nodir/bench.json", "--repeats", "1", "--warmup", "0",
                                                  "--contexts", "", "--no-turns", "--new-tokens", "1"], 1,
     r"error: --json .*nodir/bench\.json: the folder .*nodir does not exist; create it or choose another path"),
    # ---- issue 17, probes of our own
    ("sample.py", "a FIFO as the weight file", ["--checkpoint", "{tmp}/fifoweights", "--prompt", "hi"], 1,
     r"error: .*fifoweights/model\.safetensors: not a regular file \(a folder, FIFO or device\); .*"),
    ("sample.py", "--show naming a folder", ["--image", str(IMAGE), "--prompt", "hi", "--show", "{tmp}/empty"], 1,
     r"error: --show .*empty is a folder; give the path of the PNG to write"),
    ("tools/eval.py", "a repeated question id", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/dupids.jsonl",
                                           "--out", "{tmp}/eval_i"], 1,
     r"error: .*dupids\.jsonl:2: id 'q1' again \(first on line 1\); ids must be unique"),
    ("tools/eval.py", "answers as one string", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/strans.jsonl",
                                          "--out", "{tmp}/eval_j"], 1,
     r"error: .*strans\.jsonl:1: not a benchmark record \('answers' must be a list of strings\); .*"),
    ("tools/eval.py", "an image path that is a number", ["--checkpoint", str(TINY), *EVAL[:2], "--data", "{tmp}/intimage.jsonl",
                                                   "--out", "{tmp}/eval_k"], 1,
     r"error: .*intimage\.jsonl:1: not a benchmark record \('image' must be a string\); .*"),
    ("tools/draw_crops.py", "--out into a missing folder", [str(IMAGE), "--out", "{tmp}/nodir/grid.png"], 1,
     r"error: --out .*nodir/grid\.png: the folder .*nodir does not exist; create it or choose another path"),
    # issue 24
    ("tools/eval.py", "--out in use by another eval", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_locked"], 1,
     r"error: --out .*eval_locked is in use by another eval\.py \(pid \d+ on .*\); wait for it to end or use another "
     r"--out \(if it is not running, delete .*eval_locked/lock\)"),
    ("tools/eval.py", "--out holding the --checkpoint", ["--checkpoint", "{tmp}/evalin/final", *EVAL, "{tmp}/evalin"], 1,
     r"error: --out .*evalin holds --checkpoint .*evalin/final: eval would write over its input; choose another --out"),
    ("tools/eval.py", "--out is a training run", ["--checkpoint", str(TINY), *EVAL, "{tmp}/trainrun"], 1,
     r"error: --out .*trainrun holds a training run \(train\.py's run\.json and log\); eval would overwrite its "
     r"run\.json and it could no longer be resumed: give another --out, e\.g\. .*trainrun/eval"),
    ("train.py", "--resume on data replaced by other data", ["--model", "tiny", "--data", "{tmp}/replaced.jsonl",
                                                              "--out", "{tmp}/resume_data", "--resume"], 1,
     r"error: --resume: the run in .*resume_data was started with other settings \(the content of --data \(sha256 "
     r"[0-9a-f]{16}, now [0-9a-f]{16}\)\): resume with its flags, or train into a new --out"),
    ("train.py", "--resume on a finished run", [*TINY_RUN, "--out", "{tmp}/finished", "--resume"], 1,
     r"error: --resume: the run in .*finished has finished \(.*finished/final is its export\): nothing to continue; "
     r"train into a new --out, or pass --force instead to start it over"),
    ("train.py", "--out an eval folder", [*TINY_RUN, "--out", "{tmp}/eval_other"], 1,
     r"error: --out .*eval_other holds an eval run \(tools/eval\.py's run\.json and answers\), not a training run; "
     r"train into a new --out"),
    ("tools/quantize.py", "--compare on an int8 checkpoint", ["--compare", "{tmp}/int8ckpt"], 1,
     r"error: --compare .*int8ckpt: an int8 checkpoint; its float32 reference would be the int8 model itself "
     r"\(32/32, diff 0\.0\): compare the float checkpoint it was quantized from"),
    ("tools/plan.py", "--gpus 1000000000", ["--gpus", "1000000000"], 1,
     r"error: --gpus 1000000000: give world sizes from 1 to 100000, like 8,16,24"),
    ("tools/plan.py", "--utilisation 40", ["--utilisation", "40"], 1,
     r"error: --utilisation 40\.0: give a fraction above 0 and at most 1 \(0\.4 is 40%\)"),
    ("tools/plan.py", "--utilisation 0", ["--utilisation", "0"], 1, r"error: --utilisation 0\.0: give .*"),
    ("tools/plan.py", "--headroom -0.5", ["--headroom", "-0.5"], 1,
     r"error: --headroom -0\.5: give a fraction from 0 up to, not including, 1"),
    ("tools/plan.py", "--samples 0", ["--samples", "0"], 1, r"error: --samples 0: give 1 or more"),
    ("tools/plan.py", "--samples -100", ["--samples", "-100"], 1, r"error: --samples -100: give 1 or more"),
    ("tools/plan.py", "--text-tokens -5", ["--text-tokens", "-5"], 1, r"error: --text-tokens -5: give 0 or more"),
    ("tools/plan.py", "--model tiny", ["--model", "tiny"], 1,
     r"error: --model tiny: plan\.py plans the paper's models from their presets .*; drop the flag"),
    ("tools/plan.py", "--init", ["--init", str(TINY)], 1, r"error: --init: plan\.py plans .*; drop the flag"),
    # issue 24: a symbolic link loop as the output path
    ("train.py", "--out is a symlink loop", [*TINY_RUN, "--out", "{tmp}/loop"], 1,
     r"error: --out .*/loop: a loop of symbolic links .*"),
    ("tools/eval.py", "--out is a symlink loop", ["--checkpoint", str(TINY), *EVAL, "{tmp}/loop"], 1,
     r"error: --out .*/loop: a loop of symbolic links .*"),
    ("tools/draw_crops.py", "--out is a symlink loop", [str(IMAGE), "--out", "{tmp}/loop"], 1,
     r"error: --out .*/loop: a loop of symbolic links .*"),
    ("sample.py", "--show is a symlink loop", ["--image", str(IMAGE), "--prompt", "hi", "--show", "{tmp}/loop"], 1,
     r"error: --show .*/loop: a loop of symbolic links .*"),
    ("tools/bench.py", "--write-checkpoint into a read-only folder", ["--write-checkpoint", "/sys/dfnano-bench"], 1,
     r"error: --write-checkpoint /sys/dfnano-bench: cannot write in /sys \(.*\); choose another place"),
    ("tools/eval.py", "--show-dir in a read-only folder", ["--checkpoint", str(TINY), *EVAL, "{tmp}/eval_show",
                                                          "--show-dir", "/sys/dfnano-show"], 1,
     r"error: --show-dir /sys/dfnano-show: cannot write in /sys \(.*\); choose another place"),
    # issue 24's own probes, from a fresh clone
    ("tools/looked.py", "--pages 0", ["--pages", "0"], 1, r"error: --pages 0: give 1 or more held-out pages"),
]

# lines a tool prints on every run, before whatever goes wrong
PROGRESS = re.compile(r"loaded .* in [\d.]+s on \w+ \(.*\)|\w+: \d+ questions, \d+ already answered in .*"
                      r"|(\w+: +\d+%\|.*)+")  # eval.py's bar (tqdm)


# ---- the fixture folder ---------------------------------------------------------------------
def write_huge_png(path, w=13000, h=13000):
    """A valid w x h PNG of 1-bit pixels, written directly (PIL would allocate w*h bytes first)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" + b"\xff" * ((w + 7) // 8)) * h          # filter byte + packed bits per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def make_fixtures(tmp: Path):
    from safetensors.torch import load_file, save_file
    (tmp / "notes.png").write_text("not an image")
    (tmp / "truncated.png").write_bytes(IMAGE.read_bytes()[:IMAGE.stat().st_size // 2])
    write_huge_png(tmp / "huge.png")
    (tmp / "empty").mkdir()
    for name in ("badconfig", "badshape", "noweight"):
        shutil.copytree(TINY, tmp / name)
    (tmp / "badconfig" / "config.json").write_text((TINY / "config.json").read_text()[:200])
    state = load_file(TINY / "model.safetensors")
    key = "image_encoder.vision_model.post_layernorm.weight"
    save_file({**state, key: state[key][:-1]}, tmp / "badshape" / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != key}, tmp / "noweight" / "model.safetensors")
    rows = [{"id": "q1", "image": IMAGE.name, "question": "What is the number?", "answers": ["7"]},
            {"id": "q2", "image": IMAGE.name, "question": "What is the number?", "answers": ["7"]}]
    (tmp / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "eval_torn").mkdir()   # q1 answered, q2's line cut short by a kill
    (tmp / "eval_torn" / "predictions.jsonl").write_text(
        json.dumps({"id": "q1", "prediction": "7", "answers": ["7"]}) + "\n" + '{"id": "q2", "predi')
    shutil.copytree(TINY, tmp / "init_copy")
    shutil.copytree(TINY, tmp / "dst_full_model", ignore=shutil.ignore_patterns("*.model"))   # a model, no run
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "run.json").write_text('{"run_id": ')
    (tmp / "lockdir" / "lock").mkdir(parents=True)
    (tmp / "badfirst.jsonl").write_text('{"image_url": "red.png", "conversations": \n' + RECORDS.read_text())
    from lib import train_config   # a run of TINY_RUN in resume_seed, with --seed 0
    cfg = train_config.parse_config([*TINY_RUN, "--out", str(tmp / "resume_seed")])
    (tmp / "resume_seed").mkdir()
    (tmp / "resume_seed" / "run.json").write_text(json.dumps({"run_id": "0" * 32, "identity": train_config.run_identity(cfg, RECORDS, 1)}))
    write_run_json(tmp, "eval_torn")
    make_fixtures_17(tmp, state)
    make_fixtures_24(tmp)
    from tools import quantize
    quantize.write_int8(TINY, tmp / "int8ckpt")
    for name in ("dst_full", "dst_force"):
        (tmp / name).mkdir()
        (tmp / name / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')  # an older checkpoint


def write_run_json(tmp: Path, out: str, **changed):
    """OUT/run.json as the eval rows' run writes it (eval.run_identity), with `changed` fields."""
    from tools import eval as ev
    args = ev.parse_args(["--checkpoint", str(TINY), *[a.replace("{tmp}", str(tmp)) for a in EVAL], str(tmp / out)])
    (tmp / out / "run.json").write_text(json.dumps({**ev.run_identity(args, "cpu"), **changed}))


def make_fixtures_17(tmp: Path, state: dict):
    """The inputs of the issue-17 rows: damaged weights and configs, FIFOs, reused folders."""
    import torch
    from safetensors.torch import save_file
    shutil.copy(IMAGE, tmp / "pic.png")
    os.mkfifo(tmp / "fifo.png")
    shutil.copytree(TINY, tmp / "src_copy")
    for name, key, value in [("int8proj", "vision_embed_tokens.weight", lambda t: t.to(torch.int8)),
                             ("boolnorm", "language_model.model.norm.weight", lambda t: t > 0),
                             ("nanweight", "language_model.model.norm.weight", lambda t: t * float("nan"))]:
        shutil.copytree(TINY, tmp / name)
        save_file({**state, key: value(state[key]).contiguous()}, tmp / name / "model.safetensors")
    config = json.loads((TINY / "config.json").read_text())
    for name, part, key, value in [("cfg_hidden", "text_config", "hidden_size", "32"),
                                   ("cfg_heads", "text_config", "num_attention_heads", 0),
                                   ("cfg_eps", "text_config", "rms_norm_eps", "1e-5"),
                                   ("cfg_layers", "text_config", "num_hidden_layers", 2.0),
                                   ("cfg_key", "dragonfly_nano", "crop", {}),
                                   ("cfg_null", "crops", "size", None)]:
        shutil.copytree(TINY, tmp / name)
        changed = json.loads(json.dumps(config))
        (changed["dragonfly_nano"] if part == "crops" else changed)[part][key] = value
        (tmp / name / "config.json").write_text(json.dumps(changed))
    (tmp / "blank.jsonl").write_text("\n")
    for name, image in [("noimages", "gone.png"), ("escape", "../../etc/passwd"), ("fifo", "fifo.png")]:
        rows = [{"id": f"q{i}", "image": image, "question": "Which digit?", "answers": ["7"]}
                for i in range(1, 2 if name == "fifo" else 3)]
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("eval_other", "eval_old"):  # answers "7" left by another model's run
        (tmp / name).mkdir()
        (tmp / name / "predictions.jsonl").write_text(
            "".join(json.dumps({"id": i, "prediction": "7", "answers": ["7"]}) + "\n" for i in ("q1", "q2")))
    write_run_json(tmp, "eval_other", checkpoint="0123456789abcdef")
    shutil.copytree(TINY, tmp / "fifoweights")
    (tmp / "fifoweights" / "model.safetensors").unlink()
    os.mkfifo(tmp / "fifoweights" / "model.safetensors")
    for name, rows in [("dupids", [{"id": "q1", "question": "a?", "answers": ["7"]}, {"id": "q1", "question": "b?", "answers": ["3"]}]),
                       ("strans", [{"id": "q1", "question": "a?", "answers": "12"}]),   # list("12") was ["1", "2"]
                       ("intimage", [{"id": "q1", "image": 5, "question": "a?", "answers": ["7"]}])]:
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_fixtures_24(tmp: Path):
    """The inputs of the issue-24 rows: a folder another live eval holds, a training run."""
    (tmp / "eval_locked").mkdir()
    (tmp / "eval_locked" / "lock").write_text(f"{os.uname().nodename} {os.getpid()}")   # this test process: alive
    shutil.copytree(TINY, tmp / "evalin" / "final")
    (tmp / "trainrun").mkdir()
    (tmp / "trainrun" / "run.json").write_text(json.dumps({"run_id": "0" * 32, "identity": {"seed": 0}}))
    (tmp / "trainrun" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    from lib import train_config
    lines = RECORDS.read_text().splitlines(keepends=True)
    (tmp / "replaced.jsonl").write_text("".join(lines))
    cfg = train_config.parse_config(["--model", "tiny", "--data", str(tmp / "replaced.jsonl"), "--out", str(tmp / "resume_data")])
    (tmp / "resume_data").mkdir()
    (tmp / "resume_data" / "run.json").write_text(json.dumps(
        {"run_id": "0" * 32, "identity": train_config.run_identity(cfg, tmp / "replaced.jsonl", 1)}))
    (tmp / "replaced.jsonl").write_text("".join(reversed(lines)))    # another file of the same length, same name
    cfg = train_config.parse_config([*TINY_RUN, "--out", str(tmp / "finished")])
    (tmp / "finished" / "final").mkdir(parents=True)
    (tmp / "finished" / "run.json").write_text(json.dumps({"run_id": "0" * 32, "identity": train_config.run_identity(cfg, RECORDS, 1)}))
    (tmp / "loop").symlink_to(tmp / "loop")                          # a symbolic link to itself


# ---- checks on the files a row leaves behind -------------------------------------------------
def check_files(case, tmp: Path):
    if case == ("tools/eval.py", "predictions file torn by a kill"):
        lines = (tmp / "eval_torn" / "predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["q1", "q2"]   # every line whole, q2 asked again
    elif case == ("tools/convert_weights.py", "non-empty DST"):
        assert sorted(os.listdir(tmp / "dst_full")) == ["pytorch_model.bin.index.json"]   # left untouched
    elif case == ("tools/convert_weights.py", "non-empty DST with --force"):
        from lib import weights
        assert sorted(os.listdir(tmp / "dst_force")) == sorted(
            ["config.json", "tokenizer.model", "model-00001-of-00001.safetensors", "model.safetensors.index.json"])
        assert weights.read_shapes(tmp / "dst_force") == weights.read_shapes(TINY)
        assert not [p for p in os.listdir(tmp) if p.endswith(".tmp")]
    elif case == ("tools/convert_weights.py", "SRC is a file"):
        assert not (tmp / "dst_new").exists()
    elif case in (("train.py", "--out is --init"), ("train.py", "--out inside --init")):
        assert sorted(os.listdir(tmp / "init_copy")) == sorted(os.listdir(TINY))
        assert (tmp / "init_copy" / "config.json").read_bytes() == (TINY / "config.json").read_bytes()
    elif case == ("train.py", "--resume with another --seed"):
        assert sorted(os.listdir(tmp / "resume_seed")) == ["run.json"]       # nothing written, the lock let go
    elif case in (("train.py", "--out holds the tokenizer"), ("train.py", "--out holds a model folder, not a run")):
        assert sorted(os.listdir(tmp / "init_copy")) == sorted(os.listdir(TINY))
        assert (tmp / "dst_full_model" / "config.json").read_bytes() == (TINY / "config.json").read_bytes()
    elif case[0] == "train.py" and case[1].startswith(("--lr", "--max-steps", "--seed", "first JSONL", "--save-every",
                                                       "--micro-batch", "--epochs", "--text-prob")):
        assert not (tmp / "train_c").exists() and not (tmp / "train_d").exists()
    elif case in [("sample.py", "--show onto the --image"), ("tools/draw_crops.py", "--out onto the image")]:
        assert (tmp / "pic.png").read_bytes() == IMAGE.read_bytes()
    elif case in [("tools/convert_weights.py", "DST inside SRC with --force"), ("tools/convert_weights.py", "DST holding SRC"),
                  ("tools/quantize.py", "DST inside SRC")]:
        assert sorted(os.listdir(tmp / "src_copy")) == sorted(os.listdir(TINY))
        assert (tmp / "src_copy" / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
    elif case == ("tools/eval.py", "--out is a training run"):
        assert sorted(os.listdir(tmp / "trainrun")) == ["log.jsonl", "run.json"]
        assert "run_id" in json.loads((tmp / "trainrun" / "run.json").read_text())
    elif case == ("tools/eval.py", "--out in use by another eval"):
        assert sorted(os.listdir(tmp / "eval_locked")) == ["lock"]
    elif case[0] == "tools/eval.py" and case[1].startswith("--out holding"):
        out = tmp / ("eval_other" if "another" in case[1] else "eval_old")
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 2   # left as it was


# ---- running the rows --------------------------------------------------------------------------
def run_rows(rows, timeout=120):
    """[(tool, args)] -> [(exit code, stdout, stderr)], each row in a process of its own."""
    import tempfile
    results = []
    for tool, args in rows:
        if not hasattr(os, "fork"):
            r = subprocess.run([sys.executable, *script(tool), *args], capture_output=True, text=True,
                               timeout=timeout, cwd=ROOT)
            results.append((r.returncode, r.stdout, r.stderr))
            continue
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child runs `python TOOL ARGS`'s __main__
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            import runpy
            sys.argv = [str(ROOT / tool), *args]
            try:
                if "/" in tool:  # python -m tools.eval ...
                    runpy.run_module(tool[:-3].replace("/", "."), run_name="__main__", alter_sys=True)
                else:            # python sample.py ...
                    runpy.run_path(str(ROOT / tool), run_name="__main__")
                code = 0
            except SystemExit as e:  # as the interpreter ends on one: a non-int code is printed, exit 1
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:   # an uncaught exception: the interpreter's traceback, exit 1
                sys.excepthook(*sys.exc_info())
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # skips tearing down the inherited modules: a second per row
        start = time.time()
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.time() - start > timeout:
                os.kill(pid, 9)
                done = os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        out.seek(0), err.seek(0)
        results.append((os.waitstatus_to_exitcode(done[1]), out.read().decode(errors="replace"),
                        err.read().decode(errors="replace")))
    return results


if __name__ == "__main__":  # the runner: rows as JSON on stdin, results as JSON on stdout
    sys.path[0] = str(ROOT)
    os.chdir(ROOT)
    import torch  # imported once here, for every row through fork
    import model  # noqa: F401
    with torch.device("meta"):  # the first op on the meta device imports torch._refs & co.: seconds
        torch.empty(2).mul(2)
    rows = json.load(sys.stdin)
    results = run_rows(rows)
    sys.stdout.write(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)


# ---- the tests -------------------------------------------------------------------------------
import pytest  # noqa: E402  (below the runner, which does not need it)

ACTIVE = [r for r in ROWS if None not in r[2]]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    make_fixtures(tmp)
    rows = [(tool, [a.replace("{tmp}", str(tmp)) for a in args]) for tool, _, args, _, _ in ACTIVE]
    r = subprocess.run([sys.executable, __file__], input=json.dumps(rows), capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return tmp, dict(zip([(tool, case) for tool, case, *_ in ACTIVE], json.loads(r.stdout)))


@pytest.mark.parametrize("tool,case,args,code,line", ACTIVE, ids=[f"{r[0]}: {r[1]}" for r in ACTIVE])
def test_bad_input_gets_its_exit_code_and_one_line(ran, tool, case, args, code, line):
    tmp, results = ran
    rc, out, err = results[(tool, case)]
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert rc == code, err
    if code != 0:
        assert lines and re.fullmatch(line, lines[-1]), err
        assert all(PROGRESS.fullmatch(x) for x in lines[:-1]), err
    else:
        assert any(re.fullmatch(line, x) for x in lines), err
    check_files((tool, case), Path(tmp))

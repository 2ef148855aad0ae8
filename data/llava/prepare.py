"""LLaVA's public training sets -> the release's JSONL records (docs/release-facts.md#training-records).

Stage 1 (`pretrain`) trains on LLaVA-Pretrain, 558K image-caption pairs; stage 2 (`sft`) on
instruction data such as LLaVA-Instruct's 665K mix. Neither is downloaded here. On a machine
with network:

    # stage 1: blip_laion_cc_sbu_558k.json and images.zip (unzip it to images/)
    huggingface-cli download liuhaotian/LLaVA-Pretrain --repo-type dataset --local-dir LLaVA-Pretrain
    # stage 2: llava_v1_5_mix665k.json
    huggingface-cli download liuhaotian/LLaVA-Instruct-150K --repo-type dataset --local-dir LLaVA-Instruct

The 665K mix refers to images of five other datasets, laid out as the LLaVA repository's
README ("Visual Instruction Tuning") documents, under one folder:
    coco/train2017/  gqa/images/  ocr_vqa/images/  textvqa/train_images/  vg/VG_100K/ + vg/VG_100K_2/
(COCO train2017, GQA images, OCR-VQA images via its download script, TextVQA train_val
images, Visual Genome parts 1 and 2). Its ~40K ShareGPT records have no image: they are
kept as text-only records (image_url null).

    python -m data.llava.prepare --json LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        --images LLaVA-Pretrain/images --out data/llava/pretrain.jsonl
    python -m data.llava.prepare --json LLaVA-Instruct/llava_v1_5_mix665k.json \\
        --images playground/data --out data/llava/sft.jsonl

Each output line is {"image_url": path relative to --images, "conversations": Llama-3
formatted turns, "source": dataset name}. Records whose image file is missing are counted
and left out (--keep-missing keeps them; the dataset would then skip them at train time).
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

if __name__ == "__main__":  # as a script: a missing package is one line naming `bash run.sh`
    from lib import first_run
    first_run.one_line_for_missing_packages()

from data.formats import format_chat, read_records, to_turns


MIX_PARTS = ("coco", "gqa", "ocr_vqa", "textvqa", "vg")   # the 665K mix's image folders


def source_of(image, default):
    """The 665K mix names its parts by folder (coco/..., gqa/..., vg/...); its text-only records are ShareGPT."""
    if image is None:
        return "sharegpt"
    head = Path(image).parts[0]
    return head if head in MIX_PARTS else default


def convert(records, images_dir: Path, default_source: str, counts: Counter, seed: int = 0,
            keep_missing: bool = False):
    """Yield release records, counting in `counts` what happened to each input record."""
    for i, record in enumerate(records):
        try:
            image, turns = to_turns(record, random.Random(f"{seed}/{i}/caption"))
        except ValueError:
            counts["malformed"] += 1
            continue
        if image is not None and not (images_dir / image).is_file():
            counts["missing image"] += 1
            if not keep_missing:
                continue
        counts["text-only" if image is None else "image"] += 1
        yield {"image_url": image, "conversations": format_chat(turns), "source": source_of(image, default_source)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.llava.prepare", description="Convert LLaVA-Pretrain / LLaVA-Instruct JSON to release JSONL records.")
    p.add_argument("--json", required=True, help="blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json, ...")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--source", help="source name for records without a dataset folder (default: the JSON's stem)")
    p.add_argument("--seed", type=int, default=0, help="picks the instruction of caption-only records")
    p.add_argument("--limit", type=int, help="convert only the first N records")
    p.add_argument("--keep-missing", action="store_true", help="keep records whose image file is missing")
    args = p.parse_args(argv)

    src, images = Path(args.json), Path(args.images)
    for path, what in ((src, "JSON file"), (images, "image folder")):
        if not path.exists():
            sys.exit(f"prepare.py: {what} {path} not found (see this file's docstring for the downloads)")
    records = read_records(src)
    if args.limit is not None:
        records = (r for i, r in zip(range(args.limit), records))
    counts = Counter()
    out = convert(records, images, args.source or src.stem, counts, args.seed, args.keep_missing)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for record in out:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if counts["missing image"]:
        print(f"  {counts['missing image']} records point at images missing under {images}"
              + (" (kept)" if args.keep_missing else " (left out)"))


if __name__ == "__main__":
    main()

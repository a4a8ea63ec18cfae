"""``tpm-predict``: tag the posts of a JSON-lines file with an exported TPM-MI model.

Input lines are MNER-MI posts without labels: ``{"id": ..., "text": [words], "images": ["a.jpg", ...]}`` (a
``"label"`` field, if present, is ignored). Output lines: ``{"id" (a string), "text", "entities": [{"type",
"start", "end", "text"}]}`` with word spans ``[start, end)``.

    tpm-predict --checkpoint runs/default/best_model.pt --input posts.jsonl --image-dir images/ --output out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, PILImages
from tpm_fast.data.images import ImageStats
from tpm_fast.data.readers import read_mner_jsonl
from tpm_fast.engine import load_exported, make_loader, predict_tags
from tpm_fast.metrics import entities


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best_model.pt written by train.py (tokenizer/ beside it)")
    p.add_argument("--input", required=True, help="posts, JSON lines")
    p.add_argument("--output", default="-", help="entities, JSON lines (default: standard output)")
    p.add_argument("--image-dir", help="folder the image names are relative to (default: the input's folder)")
    p.add_argument("--twitter2017-image-dir", help="folder of 'twitter2017-*' image names (MNER-UNI posts)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-threads", type=int, default=2, help="image decoding threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, tokenizer, spec, max_seq_length = load_exported(args.checkpoint, args.device)
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.input).parent
    posts = read_mner_jsonl(args.input, image_dir, args.twitter2017_image_dir, labeled=False)
    dataset = MNERDataset(posts, tokenizer, max_seq_length, model.config.image_mode)
    source = None if model.config.image_mode == "text" else PILImages(spec, threads=args.image_threads)
    stats = ImageStats()
    feed = ImageFeed(
        make_loader(dataset, args.batch_size, shuffle=False), source, torch.device(args.device), stats=stats
    )
    tags = predict_tags(model, feed, desc="predict")
    lines = [
        json.dumps({"id": post.id, "text": post.words, "entities": entities(post.words, t)}, ensure_ascii=False) + "\n"
        for post, t in zip(posts, tags)
    ]
    if args.output == "-":
        sys.stdout.writelines(lines)
    else:
        Path(args.output).write_text("".join(lines), encoding="utf-8")
    print(f"tagged {len(posts)} posts; {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
    main()

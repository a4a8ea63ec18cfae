"""Check a dataset before training: the statistics of the MNER-MI paper's Tables 1 and 2, and every image decoded.

Per split (and in total): posts, words per post, entities per type (PER, LOC, ORG, MISC: the B- tags, as the papers'
tables count them) and the entities the evaluation scores (seqeval's chunks in its default conlleval mode, where an
I- tag after O or after another type also begins one), posts per number of images (0-4, and more than 4: those keep
their first 4), and the images the model would see (the first 4 of each post): present (decoded,
perhaps after repairing a truncated JPEG), missing, or broken (empty or undecodable). Each distinct image file is
read and decoded once, on a thread pool, by the training's own loader
(:meth:`~tpm_fast.data.images.ImageLoader.load_uint8`), so a file counts here as it counts in training.

    python -m tpm_fast.data.check DATA --dataset MI [--image-dir DIR] [--twitter2017-image-dir DIR] [--json FILE]

DATA is laid out flat or as its authors distribute it (see :func:`~tpm_fast.data.readers.resolve_layout`).
Malformed text stops the check with one line naming the file and line (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from seqeval.metrics.sequence_labeling import get_entities
from tqdm import tqdm

from tpm_fast.data.images import MAX_IMAGES, DataWarning, ImageEvent, ImageLoader, ImageStats
from tpm_fast.data.labels import ENTITY_TYPES
from tpm_fast.data.readers import DATASETS, SPLITS, DataFormatError, Post, load_split, resolve_layout

IMAGE_BINS: tuple[str, ...] = (*(str(k) for k in range(MAX_IMAGES + 1)), f">{MAX_IMAGES}")
"""Keys of ``images_per_post``: posts with 0..4 images, and with more than 4."""

PROGRESS_MIN = 1000
"""Images from which the decoding shows a progress bar."""


def text_stats(posts: Sequence[Post], too_many: int = 0) -> dict:
    """Post, word, entity and images-per-post counts of labeled posts.

    Args:
        posts: the posts (their ``images`` hold at most 4 paths, as the readers keep).
        too_many: how many of them had more than 4 images in the file (``ImageStats.too_many`` of the reader).

    Returns:
        ``{"posts", "words", "words_per_post", "entities": {type: n, ..., "total": n}, "entities_scored",
        "images_per_post": {bin: n}}``: ``entities`` counts B- tags per type, ``entities_scored`` the chunks seqeval
        scores (B- tags plus I- tags that begin a chunk), ``images_per_post`` has the bins of ``IMAGE_BINS``.
    """
    words = sum(len(p.words) for p in posts)
    types = Counter(tag[2:] for p in posts for tag in p.labels or [] if tag.startswith("B-"))
    entities = {t: types.get(t, 0) for t in ENTITY_TYPES}
    entities["total"] = sum(types.values())
    per_post = Counter(len(p.images) for p in posts)
    per_post[MAX_IMAGES] -= too_many  # those were cut to 4 by the reader
    bins = {str(k): per_post.get(k, 0) for k in range(MAX_IMAGES + 1)}
    bins[IMAGE_BINS[-1]] = too_many
    return {
        "posts": len(posts),
        "words": words,
        "words_per_post": round(words / len(posts), 2) if posts else 0.0,
        "entities": entities,
        "entities_scored": sum(len(get_entities(p.labels or [])) for p in posts),
        "images_per_post": bins,
    }


def decode_images(paths: Sequence[Path], threads: int = 1, progress: bool = False) -> dict[Path, ImageEvent]:
    """Read and decode each distinct image once, as training does (:class:`~tpm_fast.data.images.ImageLoader` at the
    default 224-pixel :class:`~tpm_fast.data.images.ImageSpec`), keeping only the events.

    Args:
        paths: image files (duplicates are decoded once).
        threads: decoding threads.
        progress: show a progress bar (from ``PROGRESS_MIN`` images).

    Returns:
        Path -> its event (``kind`` one of ``ImageStats.OUTCOMES``).
    """
    unique = list(dict.fromkeys(paths))
    loader = ImageLoader()

    def event(path: Path) -> ImageEvent:
        return loader.load_uint8(path)[1]

    bar = dict(total=len(unique), desc="images", unit="img", disable=not progress or len(unique) < PROGRESS_MIN)
    if threads <= 1:
        return dict(zip(unique, tqdm(map(event, unique), **bar), strict=True))
    with ThreadPoolExecutor(threads, thread_name_prefix="check-decode") as pool:
        return dict(zip(unique, tqdm(pool.map(event, unique), **bar), strict=True))


def image_stats(posts: Sequence[Post], events: dict[Path, ImageEvent], examples: int = 5) -> tuple[dict, dict]:
    """Counts of the posts' image slots by outcome, and the first messages of the missing and broken ones.

    Args:
        posts: the posts.
        events: the event of every image path of ``posts`` (:func:`decode_images`).
        examples: messages kept per kind.

    Returns:
        ``{"slots", "files", "present", "missing", "broken", "ok", "repaired", "undecodable", "empty_file",
        "converted"}`` (present = ok + repaired, broken = undecodable + empty_file; ``files``: distinct paths), and
        ``{"missing": [message, ...], "broken": [...]}``.
    """
    stats = ImageStats()
    found: dict[str, list[str]] = {"missing": [], "broken": []}
    paths = [path for p in posts for path in p.images]
    with warnings.catch_warnings():  # the messages are kept below, not warned
        warnings.simplefilter("ignore", DataWarning)
        for path in paths:
            stats.record(events[path])
    for path in dict.fromkeys(paths):
        e = events[path]
        kind = "missing" if e.kind == "missing" else "broken" if e.kind in ("undecodable", "empty_file") else None
        if kind and len(found[kind]) < examples:
            found[kind].append(e.message)
    counts = {
        "slots": len(paths),
        "files": len(set(paths)),
        "present": stats.ok + stats.repaired,
        "missing": stats.missing,
        "broken": stats.undecodable + stats.empty_file,
        "ok": stats.ok,
        "repaired": stats.repaired,
        "undecodable": stats.undecodable,
        "empty_file": stats.empty_file,
        "converted": stats.converted,
    }
    return counts, found


def check_dataset(
    data_dir: str | Path,
    dataset: str,
    image_dir: str | Path | None = None,
    twitter2017_image_dir: str | Path | None = None,
    *,
    threads: int = 1,
    progress: bool = False,
    examples: int = 5,
) -> dict:
    """Read every split of a dataset and decode every image its posts name.

    Args:
        data_dir: the dataset folder (flat or as distributed).
        dataset: one of ``DATASETS``.
        image_dir, twitter2017_image_dir: override the image folders (as in ``train.py``).
        threads: image decoding threads.
        progress: show a progress bar while decoding many images.
        examples: missing / broken image messages kept per split.

    Returns:
        ``{"dataset", "data_dir", "layout": {"split_files", "image_dir", "image_dir_exists", "image_dirs_tried",
        "twitter2017_image_dir"}, "splits": {split: {...text_stats, "images": counts, "examples": messages}},
        "total": {...text_stats, "images": counts}}`` (see :func:`text_stats`, :func:`image_stats`); paths as strings.

    Raises:
        FileNotFoundError: a split file is missing (every path looked at is named).
        DataFormatError: malformed text (``"file:line: ..."``).
    """
    layout = resolve_layout(data_dir, dataset, image_dir, twitter2017_image_dir)
    split_files = {split: str(layout.split_file(split)) for split in SPLITS}  # a missing one before any reading
    posts, too_many = {}, {}
    for split in SPLITS:
        stats = ImageStats()
        with warnings.catch_warnings():  # posts with more than 4 images are counted in images_per_post
            warnings.simplefilter("ignore", DataWarning)
            posts[split] = load_split(data_dir, dataset, split, image_dir, twitter2017_image_dir, stats=stats)
        too_many[split] = stats.too_many
    everything = [p for split in SPLITS for p in posts[split]]
    events = decode_images([path for p in everything for path in p.images], threads, progress)
    splits = {}
    for split in SPLITS:
        counts, found = image_stats(posts[split], events, examples)
        splits[split] = {**text_stats(posts[split], too_many[split]), "images": counts, "examples": found}
    total = {**text_stats(everything, sum(too_many.values())), "images": image_stats(everything, events, 0)[0]}
    t17 = layout.twitter2017_image_dir
    return {
        "dataset": dataset,
        "data_dir": str(data_dir),
        "layout": {
            "split_files": split_files,
            "image_dir": str(layout.image_dir),
            "image_dir_exists": layout.image_dir.is_dir(),
            "image_dirs_tried": [str(d) for d in layout.image_dirs_tried],
            "twitter2017_image_dir": None if t17 is None else str(t17),
        },
        "splits": splits,
        "total": total,
    }


def format_report(report: dict) -> str:
    """The report of :func:`check_dataset` as a table (one column per split and the total) and a summary line."""
    cols = [*SPLITS, "total"]
    tables = {**report["splits"], "total": report["total"]}
    rows: list[tuple[str, list]] = [
        ("posts", [tables[c]["posts"] for c in cols]),
        ("words per post", [f"{tables[c]['words_per_post']:.2f}" for c in cols]),
        *((f"entities {t}", [tables[c]["entities"][t] for c in cols]) for t in (*ENTITY_TYPES, "total")),
        ("entities scored", [tables[c]["entities_scored"] for c in cols]),
        *((f"posts with {b} image(s)", [tables[c]["images_per_post"][b] for c in cols]) for b in IMAGE_BINS),
        ("images (first 4 of a post)", [tables[c]["images"]["slots"] for c in cols]),
        *((f"images {k}", [tables[c]["images"][k] for c in cols]) for k in ("present", "repaired", "missing")),
        *((f"images {k}", [tables[c]["images"][k] for c in cols]) for k in ("broken", "converted")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':{width}}" + "".join(f"{c:>10}" for c in cols)]
    lines += [f"{name:{width}}" + "".join(f"{v:>10}" for v in values) for name, values in rows]
    layout = report["layout"]
    head = [f"{report['dataset']} in {report['data_dir']}"]
    head += [f"  {split}: {path}" for split, path in layout["split_files"].items()]
    head.append(f"  images: {layout['image_dir']}")
    if layout["twitter2017_image_dir"] is not None:
        head.append(f"  TWITTER-2017 images: {layout['twitter2017_image_dir']}")
    if not layout["image_dir_exists"]:
        tried = ", ".join(layout["image_dirs_tried"])
        head.append(f"  warning: no image folder (looked at {tried}): every image is missing (see --image-dir)")
    tail = []
    for split in SPLITS:
        for kind, messages in report["splits"][split]["examples"].items():
            if messages:
                n = report["splits"][split]["images"][kind]
                tail += [f"{split}: {n} {kind} image(s), the first {len(messages)}:", *(f"  {m}" for m in messages)]
    t = report["total"]
    summary = (
        f"{report['dataset']}: {t['posts']} posts, {t['entities']['total']} entities, {t['images']['slots']} images: "
        f"{t['images']['present']} present, {t['images']['missing']} missing, {t['images']['broken']} broken"
    )
    return "\n".join([*head, "", *lines, "", *tail, *([""] if tail else []), summary])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tpm_fast.data.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("data_dir", metavar="DATA", help="dataset folder (flat, or as its authors distribute it)")
    p.add_argument("--dataset", default="MI", choices=DATASETS, help="the dataset's format (default MI)")
    p.add_argument("--image-dir", help="image folder (default: DATA/images, or as found for TWITTER)")
    p.add_argument("--twitter2017-image-dir", help="TWITTER-2017 images of MNER-UNI (default DATA/twitter2017_images)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to FILE as JSON")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="image decoding threads (default: all)")
    p.add_argument("--examples", type=int, default=5, help="missing / broken images named per split (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        p.error(f"DATA {args.data_dir}: no such folder")
    if args.threads < 1 or args.examples < 0:
        p.error("--threads must be at least 1 and --examples at least 0")
    try:
        report = check_dataset(args.data_dir, args.dataset, args.image_dir, args.twitter2017_image_dir,
                               threads=args.threads, progress=not args.no_progress, examples=args.examples)  # fmt: skip
    except (DataFormatError, FileNotFoundError) as e:  # bad input: one line naming the file (and line)
        raise SystemExit(f"error: {e}") from None
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

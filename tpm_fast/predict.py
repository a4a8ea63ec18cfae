"""``tpm-predict``: tag posts with an exported TPM-MI model (the folder ``train.py`` writes as ``OUTPUT/best_model``).

Input (``--input-format``):

- ``jsonl`` (default): MNER-MI posts without labels, ``{"id": ..., "text": [words], "images": ["a.jpg", ...]}``
  (a ``"label"`` field, if present, is ignored);
- ``text``: one post per line, words split on whitespace (tokenized as the training data is); a line may name its
  images after a TAB (``words of the post<TAB>a.jpg b.jpg``), else the post has none; the post id is the line number;
- ``conll``: TWITTER-2015/2017 blocks (``IMGID:<id>``, then one word per line; tags, if present, are ignored).

Output (``--output-format``):

- ``jsonl`` (default): ``{"id" (a string), "text", "entities": [{"type", "start", "end", "text"}]}`` with word spans
  ``[start, end)``;
- ``conll``: per post ``IMGID:<id>``, then ``word<TAB>tag`` per word, then a blank line (``read_conll`` reads it back
  when there is no third column).

``--marginals`` adds each entity's probability under the CRF (``"prob"`` in JSON lines, a third column in CoNLL:
the entity's probability on each of its words, ``-`` outside entities): the probability that the word pieces from
the first piece of the entity's first word to the last piece of its last word carry exactly the decoded tags,
whatever the tags elsewhere (:mod:`tpm_fast.marginals`).

    tpm-predict --model runs/default/best_model --input posts.jsonl --image-dir images/ --output out.jsonl
    tpm-predict --model runs/default/best_model --input posts.txt --input-format text --output-format conll --marginals
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tpm_fast.data.dataset import MNERDataset
from tpm_fast.data.feed import ImageFeed, PILImages
from tpm_fast.data.images import ImageStats
from tpm_fast.data.readers import DataFormatError, Post, read_conll, read_mner_jsonl, read_text_posts
from tpm_fast.engine import make_loader
from tpm_fast.export import load_pretrained
from tpm_fast.marginals import span_log_probs
from tpm_fast.metrics import entities, word_tags

INPUT_FORMATS = ("jsonl", "text", "conll")
OUTPUT_FORMATS = ("jsonl", "conll")


def read_posts(path: str | Path, input_format: str, image_dir: Path, twitter2017_image_dir: str | None,
               stats: ImageStats) -> list[Post]:  # fmt: skip
    """The posts of ``path`` in ``input_format`` (one of :data:`INPUT_FORMATS`), unlabeled."""
    if input_format == "jsonl":
        return read_mner_jsonl(path, image_dir, twitter2017_image_dir, labeled=False, stats=stats)
    if input_format == "text":
        return read_text_posts(path, image_dir, stats=stats)
    if input_format == "conll":
        return read_conll(path, image_dir, labeled=False)
    raise ValueError(f"unknown input format {input_format!r}; expected one of {INPUT_FORMATS}")


def piece_span(first_piece: list[bool], input_ids: list[int], length: int, start: int, end: int,
               special: set[int]) -> tuple[int, int]:  # fmt: skip
    """The word pieces ``(s, e)`` (inclusive) of the words ``[start, end)`` of one encoded post.

    Args:
        first_piece: (n,) True on each kept word's first piece.
        input_ids: (n,) piece ids (to skip a trailing special token such as [SEP]).
        length: real pieces of the post (special tokens included).
        start, end: the word span, ``end`` exclusive, within the kept words.
        special: the tokenizer's special token ids.
    """
    firsts = [i for i, f in enumerate(first_piece[:length]) if f]
    last = (firsts[end] if end < len(firsts) else length) - 1
    while last > firsts[start] and input_ids[last] in special:
        last -= 1
    return firsts[start], last


@torch.no_grad()
def tag_posts(model, feed: ImageFeed, marginals: bool = False, progress: bool = True) -> tuple[list, list]:
    """Viterbi-decode an unshuffled feed of an :class:`MNERDataset` and list each post's entities.

    Args:
        model: a :class:`tpm_fast.model.TPMMI`.
        feed: the posts' batches (``feed.dataset`` is the dataset).
        marginals: attach ``"prob"`` (:func:`tpm_fast.marginals.span_log_probs` of the entity's pieces) to every
            entity.
        progress: show a progress bar.

    Returns:
        (per post: one tag per word, per post: the entities of :func:`tpm_fast.metrics.entities`).
    """
    model.eval()
    posts = feed.dataset.posts
    special = set(feed.dataset.tokenizer.all_special_ids)
    all_tags, all_entities = [], []
    for batch in tqdm(feed, desc="predict", leave=False, disable=not progress):
        mask = batch.tensors["attention_mask"]
        emissions = model.emission_scores(batch.tensors).float()  # shape: (B, n, T)
        tags, _ = model.crf.decode(emissions, mask, as_tensor=True, validate=False)  # shape: (B, n)
        words = [posts[i].words for i in batch.host["index"].tolist()]
        first = batch.host["first_piece"]
        per_word = word_tags(tags.cpu(), first, [len(w) for w in words], model.config.labels)
        found = [entities(w, t) for w, t in zip(words, per_word)]
        if marginals and any(found):
            ids, lengths = batch.host["input_ids"].tolist(), batch.host["attention_mask"].sum(1).tolist()
            keep = first.tolist()
            spans = [
                (b, *piece_span(keep[b], ids[b], lengths[b], ent["start"], ent["end"], special))
                for b, ents in enumerate(found)
                for ent in ents
            ]
            params = model.crf._params()  # start, end, transitions as the CRF decodes with them
            probs = span_log_probs(emissions, mask, tags, torch.tensor(spans), *params).exp().tolist()
            for ent, prob in zip((e for ents in found for e in ents), probs):
                ent["prob"] = prob
        all_tags += per_word
        all_entities += found
    return all_tags, all_entities


def jsonl_line(post: Post, found: list[dict]) -> str:
    """One output JSON line: id, words, entities."""
    return json.dumps({"id": post.id, "text": post.words, "entities": found}, ensure_ascii=False) + "\n"


def conll_block(post: Post, tags: list[str], found: list[dict], marginals: bool) -> str:
    """One output CoNLL block: ``IMGID:<id>``, ``word<TAB>tag`` (``<TAB>prob`` with ``marginals``), a blank line."""
    probs = ["-"] * len(post.words)
    for ent in found:
        for k in range(ent["start"], ent["end"]):
            probs[k] = f"{ent['prob']:.6f}" if "prob" in ent else "-"
    rows = [f"{w}\t{t}" + (f"\t{p}" if marginals else "") for w, t, p in zip(post.words, tags, probs)]
    return "\n".join([f"IMGID:{post.id}", *rows]) + "\n\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the export folder train.py writes (OUTPUT/best_model)")
    which.add_argument("--checkpoint", help="a legacy best_model.pt (tokenizer/ beside it), or an export folder")
    p.add_argument("--input", required=True, help="the posts (see --input-format)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl", help="default: jsonl")
    p.add_argument("--output", default="-", help="where the entities go (default: standard output)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="jsonl", help="default: jsonl")
    p.add_argument("--marginals", action="store_true", help="attach each entity's probability under the CRF")
    p.add_argument("--image-dir", help="folder the image names are relative to (default: the input's folder)")
    p.add_argument("--twitter2017-image-dir", help="folder of 'twitter2017-*' image names (MNER-UNI posts)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-threads", type=int, default=2, help="image decoding threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    try:
        exported = load_pretrained(args.model or args.checkpoint, args.device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    model = exported.model
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.input).parent
    stats = ImageStats()
    try:
        posts = read_posts(args.input, args.input_format, image_dir, args.twitter2017_image_dir, stats)
    except (OSError, DataFormatError) as e:
        raise SystemExit(f"error: {e}") from None
    dataset = MNERDataset(posts, exported.tokenizer, exported.max_seq_length, model.config.image_mode)
    if dataset.truncated:
        print(f"warning: {dataset.truncated} posts longer than {exported.max_seq_length} word pieces: their last "
              "words are tagged O", file=sys.stderr)  # fmt: skip
    source = None if model.config.image_mode == "text" else PILImages(exported.image_spec, threads=args.image_threads)
    loader = make_loader(dataset, args.batch_size, shuffle=False)
    feed = ImageFeed(loader, source, torch.device(args.device), stats=stats)
    tags, found = tag_posts(model, feed, args.marginals, progress=not args.no_progress)
    if args.output_format == "jsonl":
        out = [jsonl_line(post, ents) for post, ents in zip(posts, found)]
    else:
        out = [conll_block(post, t, ents, args.marginals) for post, t, ents in zip(posts, tags, found)]
    if args.output == "-":
        sys.stdout.writelines(out)
    else:
        Path(args.output).write_text("".join(out), encoding="utf-8")
    print(f"tagged {len(posts)} posts; {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
    main()

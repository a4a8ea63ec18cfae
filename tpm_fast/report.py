"""Predictions to read: a split's word tags as a CoNLL-style file, and an evaluation report with the errors by post.

The predictions file (``OUTPUT/predictions/<split>.conll``, UTF-8, ``\\n`` line ends) holds one block per post, in
the split's order, blocks separated by one blank line::

    # id=5302 images=2
    Kevin<TAB>B-PER<TAB>B-PER
    Durant<TAB>I-PER<TAB>I-PER
    in<TAB>O<TAB>O
    Boston<TAB>B-LOC<TAB>B-ORG

The first line of a block is always its header, ``# id=<post id> images=<images listed for the post>`` (by
position, so a word ``#`` is never mistaken for one); then one line per word: word, gold tag, predicted tag,
separated by tabs (TWITTER-2015/2017 style, without ``-DOCSTART-``). Tags are ``O`` or ``B-``/``I-`` + PER, LOC,
ORG, MISC. Tabs, line feeds and carriage returns inside a word or an id are written as spaces (tweets' words never
hold them in the released data); everything else is written as is, so a file reads back exactly otherwise.

The evaluation report (:func:`evaluation_report`) scores entities with seqeval as training does (micro P/R/F1 and
per type), adds the F1 by number of images in the post (0 to 4), and lists the errors of every post:

- **wrong type**: a predicted entity with exactly the span of a gold entity, and another type;
- **wrong span**: a predicted and a gold entity that share at least one word but not both boundaries (the types may
  differ as well: ``same_type`` says whether they agree);
- **missed**: a gold entity with no exact match and no wrong-type or wrong-span partner;
- **spurious**: a predicted entity with no exact match and no wrong-type or wrong-span partner.

Each entity is counted at most once: exact matches (the true positives) are removed first, then wrong-type pairs
(one gold and one predicted entity per span: the entities of one tag sequence never overlap), then wrong-span
pairs, gold entities in reading order, each taking the first unpaired overlapping predicted entity of its own type,
else of any type. Hence per post: gold entities = true positives + missed + wrong type + wrong span, and predicted
entities = true positives + spurious + wrong type + wrong span.

    python -m tpm_fast.report runs/default/predictions/test.conll      # the text report of a predictions file
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from seqeval.metrics.sequence_labeling import get_entities

from tpm_fast.data.images import MAX_IMAGES
from tpm_fast.data.labels import LABELS, X_LABEL
from tpm_fast.data.readers import DataFormatError, Post
from tpm_fast.metrics import entity_scores

TAGS: frozenset[str] = frozenset(LABELS) - {X_LABEL}
"""Tags a predictions file may hold (gold and predicted)."""

ERROR_KINDS: tuple[str, ...] = ("missed", "spurious", "wrong_type", "wrong_span")


@dataclass
class TaggedPost:
    """One post with its gold and predicted word tags.

    Attributes:
        id: the post id.
        words: the post's words.
        gold, pred: one tag per word each.
        images: how many images the post lists (0..4; a listed image may have been missing or broken on disk).
    """

    id: str
    words: list[str]
    gold: list[str]
    pred: list[str]
    images: int


def tagged_posts(posts: list[Post], pred: list[list[str]]) -> list[TaggedPost]:
    """Pair a split's posts with their predicted tags (``tpm_fast.engine.predict_tags``'s output, same order).

    Raises:
        ValueError: counts differ, a post has no gold labels, or a post's tags do not match its words.
    """
    if len(posts) != len(pred):
        raise ValueError(f"{len(posts)} posts but {len(pred)} predicted tag sequences")
    out = []
    for post, tags in zip(posts, pred):
        if post.labels is None:
            raise ValueError(f"{post.source}: post {post.id} has no gold labels to score against")
        if len(tags) != len(post.words):
            raise ValueError(
                f"{post.source}: post {post.id} has {len(post.words)} words but {len(tags)} predicted tags"
            )
        out.append(TaggedPost(post.id, post.words, post.labels, list(tags), min(len(post.images), MAX_IMAGES)))
    return out


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_conll(path: str | Path, posts: list[TaggedPost]) -> None:
    """Write ``posts`` in the predictions format of this module's docstring (parent folders are made)."""
    blocks = []
    for p in posts:
        lines = [f"# id={_clean(p.id)} images={p.images}"]
        lines += [f"{_clean(w)}\t{g}\t{t}" for w, g, t in zip(p.words, p.gold, p.pred)]
        blocks.append("\n".join(lines) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(blocks), encoding="utf-8")


def read_conll(path: str | Path) -> list[TaggedPost]:
    """Read a predictions file written by :func:`write_conll`.

    Raises:
        DataFormatError: ``"<file>:<line>: ..."`` for a bad header, a line without three tab-separated fields, an
            unknown tag or a post without words.
    """
    path = Path(path)
    posts: list[TaggedPost] = []
    current: TaggedPost | None = None
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if line == "":
            if current is None or not current.words:
                raise DataFormatError(f"{where}: blank line where a post's header or words were expected")
            posts.append(current)
            current = None
        elif current is None:
            head, sep, count = line.rpartition(" images=")
            if not (sep and head.startswith("# id=") and count.isdigit() and int(count) <= MAX_IMAGES):
                raise DataFormatError(
                    f"{where}: expected a post header '# id=<id> images=<0-{MAX_IMAGES}>', got {line!r}"
                )
            current = TaggedPost(head[len("# id=") :], [], [], [], int(count))
        else:
            fields = line.split("\t")
            if len(fields) != 3:
                raise DataFormatError(f"{where}: expected 'word<TAB>gold<TAB>pred', got {len(fields)} field(s)")
            for tag in fields[1:]:
                if tag not in TAGS:
                    raise DataFormatError(f"{where}: unknown tag {tag!r} (expected O or B-/I- + PER, LOC, ORG, MISC)")
            current.words.append(fields[0])
            current.gold.append(fields[1])
            current.pred.append(fields[2])
    if current is not None:
        if not current.words:
            raise DataFormatError(f"{path}:{len(lines)}: post {current.id} has no words")
        posts.append(current)
    return posts


def _entity(words: list[str], kind: str, start: int, end: int) -> dict:
    return {"type": kind, "start": start, "end": end, "text": " ".join(words[start:end])}


def post_errors(words: list[str], gold: list[str], pred: list[str]) -> tuple[int, list[dict]]:
    """Classify one post's entity errors (definitions and matching order in the module docstring).

    Args:
        words, gold, pred: the post's words and its gold and predicted tags (same length).

    Returns:
        (true positives, errors): each error is ``{"kind", "gold"?, "pred"?}`` with entities as ``{"type", "start",
        "end" (exclusive word index), "text"}``; wrong-span errors also carry ``"same_type"``. Errors are in reading
        order of their first entity.
    """
    gold_set = {(k, s, e + 1) for k, s, e in get_entities(gold)}
    pred_set = {(k, s, e + 1) for k, s, e in get_entities(pred)}
    exact = gold_set & pred_set
    g_left, p_left = sorted(gold_set - exact, key=lambda x: x[1]), sorted(pred_set - exact, key=lambda x: x[1])
    pairs: list[tuple[str, tuple, tuple]] = []
    by_span = {(s, e): (k, s, e) for k, s, e in p_left}
    for g in list(g_left):
        p = by_span.get(g[1:])
        if p is not None:
            pairs.append(("wrong_type", g, p))
            g_left.remove(g)
            p_left.remove(p)
    for g in list(g_left):
        overlapping = [p for p in p_left if p[1] < g[2] and g[1] < p[2]]
        same = [p for p in overlapping if p[0] == g[0]]
        if overlapping:
            p = (same or overlapping)[0]
            pairs.append(("wrong_span", g, p))
            g_left.remove(g)
            p_left.remove(p)
    errors = []
    for kind, g, p in pairs:
        error = {"kind": kind, "gold": _entity(words, *g), "pred": _entity(words, *p)}
        errors.append(dict(error, same_type=g[0] == p[0]) if kind == "wrong_span" else error)
    errors += [{"kind": "missed", "gold": _entity(words, *g)} for g in g_left]
    errors += [{"kind": "spurious", "pred": _entity(words, *p)} for p in p_left]
    errors.sort(key=lambda x: min(x[side]["start"] for side in ("gold", "pred") if side in x))
    return len(exact), errors


def post_counts(posts: list[TaggedPost]) -> np.ndarray:
    """Per-post entity counts for micro scores: (N, 3) int64 of (true positives, false positives, false negatives),
    with seqeval's entity definition (a true positive matches type and both boundaries)."""
    counts = np.zeros((len(posts), 3), dtype=np.int64)
    for i, p in enumerate(posts):
        gold, pred = set(get_entities(p.gold)), set(get_entities(p.pred))
        tp = len(gold & pred)
        counts[i] = tp, len(pred) - tp, len(gold) - tp
    return counts


def evaluation_report(posts: list[TaggedPost]) -> dict:
    """Scores and errors of a split.

    Returns:
        ``{"posts", "precision", "recall", "f1", "per_type" (seqeval's report per entity type), "by_images":
        {"0".."4": {"posts", "gold_entities", "precision", "recall", "f1"}} (scores None for a group without posts),
        "error_counts": {kind: n}, "errors": [{"id", "images", "words", "errors": [...]}] (posts with at least one
        error, in split order; errors as :func:`post_errors`)}``.
    """
    scores = entity_scores([p.gold for p in posts], [p.pred for p in posts])
    by_images = {}
    for k in range(MAX_IMAGES + 1):
        group = [p for p in posts if p.images == k]
        row = {"posts": len(group), "gold_entities": sum(len(get_entities(p.gold)) for p in group)}
        if group:
            s = entity_scores([p.gold for p in group], [p.pred for p in group])
            row.update(precision=s["precision"], recall=s["recall"], f1=s["f1"])
        else:
            row.update(precision=None, recall=None, f1=None)
        by_images[str(k)] = row
    counts: Counter[str] = Counter(dict.fromkeys(ERROR_KINDS, 0))
    errors = []
    for p in posts:
        _, found = post_errors(p.words, p.gold, p.pred)
        counts.update(e["kind"] for e in found)
        if found:
            errors.append({"id": p.id, "images": p.images, "words": p.words, "errors": found})
    return {
        "posts": len(posts),
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "per_type": scores["per_type"],
        "by_images": by_images,
        "error_counts": dict(counts),
        "errors": errors,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}"


def _show(e: dict) -> str:
    return f'{e["type"]} "{e["text"]}" [{e["start"]},{e["end"]})'


def format_report(report: dict, title: str = "") -> str:
    """The report as readable text: scores, per type, by images, error counts, then every post's errors."""
    lines = [title] if title else []
    lines.append(f"{report['posts']} posts: P={_pct(report['precision'])} R={_pct(report['recall'])} "
                 f"F1={_pct(report['f1'])}")  # fmt: skip
    lines += ["", "type   P       R       F1      support"]
    for kind, row in sorted(report["per_type"].items()):
        lines.append(f"{kind:<6} {_pct(row['precision']):>6}  {_pct(row['recall']):>6}  {_pct(row['f1-score']):>6}  "
                     f"{int(row['support'])}")  # fmt: skip
    lines += ["", "images posts  gold   P       R       F1"]
    for k, row in report["by_images"].items():
        lines.append(f"{k:<6} {row['posts']:>5}  {row['gold_entities']:>5}  {_pct(row['precision']):>6}  "
                     f"{_pct(row['recall']):>6}  {_pct(row['f1']):>6}")  # fmt: skip
    counts = report["error_counts"]
    lines += ["", "errors: " + ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in ERROR_KINDS), ""]
    for post in report["errors"]:
        lines.append(f"post {post['id']} (images: {post['images']}): {' '.join(post['words'])}")
        for e in post["errors"]:
            kind = e["kind"].replace("_", " ")
            if "gold" in e and "pred" in e:
                lines.append(f"  {kind:<11} gold {_show(e['gold'])} -> pred {_show(e['pred'])}")
            else:
                lines.append(f"  {kind:<11} {'gold' if 'gold' in e else 'pred'} {_show(e.get('gold') or e['pred'])}")
    return "\n".join(lines) + "\n"


def write_predictions(folder: str | Path, split: str, posts: list[Post], pred: list[list[str]]) -> dict:
    """Write ``folder/<split>.conll``, ``folder/<split>_report.json`` and ``folder/<split>_report.txt``.

    Args:
        folder: the predictions folder (``OUTPUT/predictions``); made if missing.
        split: the split's name (``val``, ``test``).
        posts: the split's posts (with gold labels); pred: their predicted word tags, same order.

    Returns:
        The report (:func:`evaluation_report`).
    """
    folder = Path(folder)
    tagged = tagged_posts(posts, pred)
    write_conll(folder / f"{split}.conll", tagged)
    report = evaluation_report(tagged)
    (folder / f"{split}_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", "utf-8")
    (folder / f"{split}_report.txt").write_text(format_report(report, f"{split}: {folder / f'{split}.conll'}"), "utf-8")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the evaluation report of a predictions file (tpm_fast.report).")
    p.add_argument("predictions", help="a predictions file, e.g. OUTPUT/predictions/test.conll")
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        report = evaluation_report(read_conll(args.predictions))
    except (DataFormatError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print(format_report(report, args.predictions), end="")


if __name__ == "__main__":
    main()

"""Predictions files, the evaluation report (errors by kind, F1 by images) and the paired randomization test."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tpm_fast.data.readers import DataFormatError, Post
from tpm_fast.metrics import entity_scores
from tpm_fast.report import (
    TaggedPost,
    evaluation_report,
    format_report,
    main,
    post_counts,
    post_errors,
    read_conll,
    tagged_posts,
    write_conll,
    write_predictions,
)
from tpm_fast.significance import micro_f1, paired_randomization

TYPES = ("PER", "LOC", "ORG", "MISC")


def kinds(gold: list[str], pred: list[str]) -> list[tuple]:
    """(kind, gold span, pred span) of each error; spans as (type, start, end) or None."""
    words = [f"w{i}" for i in range(len(gold))]
    _, errors = post_errors(words, gold, pred)
    span = lambda e: None if e is None else (e["type"], e["start"], e["end"])  # noqa: E731
    return [(e["kind"], span(e.get("gold")), span(e.get("pred"))) for e in errors]


# --- error classes on hand-made cases -------------------------------------------------------------------------------


def test_exact_match_is_no_error():
    assert kinds(["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]) == []


def test_missed_and_spurious():
    assert kinds(["B-PER", "O", "O"], ["O", "O", "B-LOC"]) == [
        ("missed", ("PER", 0, 1), None),
        ("spurious", None, ("LOC", 2, 3)),
    ]


def test_wrong_type_needs_the_same_span():
    assert kinds(["O", "B-LOC", "I-LOC"], ["O", "B-ORG", "I-ORG"]) == [("wrong_type", ("LOC", 1, 3), ("ORG", 1, 3))]


def test_wrong_span_overlap_with_same_or_other_type():
    assert kinds(["B-LOC", "I-LOC", "O"], ["O", "B-LOC", "O"]) == [("wrong_span", ("LOC", 0, 2), ("LOC", 1, 2))]
    words = ["a", "b", "c"]
    _, errors = post_errors(words, ["B-LOC", "I-LOC", "O"], ["O", "B-ORG", "I-ORG"])
    assert [(e["kind"], e["same_type"]) for e in errors] == [("wrong_span", False)]
    assert errors[0]["gold"]["text"] == "a b" and errors[0]["pred"]["text"] == "b c"


def test_each_entity_counted_once():
    # one prediction covers two gold entities: it pairs with the first, the second is missed
    assert kinds(["B-LOC", "B-LOC", "O"], ["B-LOC", "I-LOC", "O"]) == [
        ("wrong_span", ("LOC", 0, 1), ("LOC", 0, 2)),
        ("missed", ("LOC", 1, 2), None),
    ]
    # a gold entity overlapping two predictions: the one of its own type is preferred, the other is spurious
    assert kinds(["B-PER", "I-PER", "I-PER"], ["B-ORG", "B-PER", "I-PER"]) == [
        ("wrong_span", ("PER", 0, 3), ("PER", 1, 3)),
        ("spurious", None, ("ORG", 0, 1)),
    ]
    # exact matches are taken first, so an exact match never becomes anyone's wrong-span partner
    assert kinds(["B-PER", "I-PER", "B-LOC"], ["B-PER", "I-PER", "B-LOC"]) == []


def random_tags(rng: random.Random, n: int) -> list[str]:
    tags, inside = [], None
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            tags.append("O")
            inside = None
        elif r < 0.75 and inside:
            tags.append(f"I-{inside}")
        else:
            inside = rng.choice(TYPES)
            tags.append(f"B-{inside}")
    return tags


def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities counted by hand, conlleval's way: (type, start, end). An entity starts at B-X, or at an I-X that does
    not continue an entity of type X, and runs over the I-X that follow."""
    out, start, kind = set(), None, None
    for i, t in enumerate([*tags, "O"]):
        continues = start is not None and t == f"I-{kind}"
        if start is not None and not continues:
            out.add((kind, start, i))
            start = None
        if t != "O" and not continues:
            start, kind = i, t[2:]
    return out


def random_posts(seed: int, n: int = 60) -> list[TaggedPost]:
    rng = random.Random(seed)
    posts = []
    for _ in range(n):
        length = rng.randint(1, 12)
        gold = random_tags(rng, length)
        pred = [g if rng.random() < 0.7 else t for g, t in zip(gold, random_tags(rng, length))]
        words = [rng.choice(["#", "Kevin", "é", "", "x y", "\u2028", "a\\b"]) for _ in range(length)]
        posts.append(TaggedPost(str(rng.randint(0, 10**6)), words, gold, pred, rng.randint(0, 4)))
    return posts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_error_counts_add_up(seed):
    for p in random_posts(seed):
        tp, errors = post_errors(p.words, p.gold, p.pred)
        count = {k: sum(e["kind"] == k for e in errors) for k in ("missed", "spurious", "wrong_type", "wrong_span")}
        gold, pred = spans(p.gold), spans(p.pred)
        assert tp == len(gold & pred)
        assert len(gold) == tp + count["missed"] + count["wrong_type"] + count["wrong_span"]
        assert len(pred) == tp + count["spurious"] + count["wrong_type"] + count["wrong_span"]
        used_gold = [(e["gold"]["start"], e["gold"]["end"]) for e in errors if "gold" in e]
        used_pred = [(e["pred"]["start"], e["pred"]["end"]) for e in errors if "pred" in e]
        assert len(used_gold) == len(set(used_gold)) and len(used_pred) == len(set(used_pred))  # counted once


# --- report: micro scores, F1 by number of images -------------------------------------------------------------------


def f1_by_hand(posts: list[TaggedPost]) -> float | None:
    if not posts:
        return None
    tp = sum(len(spans(p.gold) & spans(p.pred)) for p in posts)
    n_pred, n_gold = sum(len(spans(p.pred)) for p in posts), sum(len(spans(p.gold)) for p in posts)
    return 0.0 if tp == 0 else 2 * tp / (n_pred + n_gold)


@pytest.mark.parametrize("seed", [4, 5])
def test_report_scores_and_f1_by_images_match_a_count_by_hand(seed):
    posts = random_posts(seed, 120)
    report = evaluation_report(posts)
    assert report["f1"] == pytest.approx(f1_by_hand(posts))
    assert report["f1"] == pytest.approx(float(micro_f1(post_counts(posts).sum(0))))
    for k in range(5):
        group = [p for p in posts if p.images == k]
        row = report["by_images"][str(k)]
        assert row["posts"] == len(group) and row["gold_entities"] == sum(len(spans(p.gold)) for p in group)
        assert row["f1"] == pytest.approx(f1_by_hand(group))
    assert sum(row["posts"] for row in report["by_images"].values()) == len(posts)
    n_errors = sum(len(post_errors(p.words, p.gold, p.pred)[1]) for p in posts)
    assert sum(report["error_counts"].values()) == n_errors == sum(len(p["errors"]) for p in report["errors"])


def test_report_on_an_empty_image_group_and_its_text():
    posts = [TaggedPost("7", ["Kevin", "in", "Boston"], ["B-PER", "O", "B-LOC"], ["B-PER", "O", "B-ORG"], 2)]
    report = evaluation_report(posts)
    assert report["by_images"]["0"] == {"posts": 0, "gold_entities": 0, "precision": None, "recall": None, "f1": None}
    assert report["by_images"]["2"]["f1"] == pytest.approx(0.5)
    assert report["error_counts"] == {"missed": 0, "spurious": 0, "wrong_type": 1, "wrong_span": 0}
    text = format_report(report)
    assert "post 7 (images: 2): Kevin in Boston" in text
    assert 'wrong type  gold LOC "Boston" [2,3) -> pred ORG "Boston" [2,3)' in text


# --- predictions files ----------------------------------------------------------------------------------------------


def test_conll_round_trip(tmp_path):
    posts = random_posts(6, 40)
    write_conll(tmp_path / "p" / "test.conll", posts)
    assert read_conll(tmp_path / "p" / "test.conll") == posts
    text = (tmp_path / "p" / "test.conll").read_text()
    assert text.startswith(f"# id={posts[0].id} images={posts[0].images}\n") and "\n\n# id=" in text
    assert "-DOCSTART-" not in text


def test_conll_writes_tabs_and_newlines_in_words_as_spaces(tmp_path):
    posts = [TaggedPost("a\tb", ["x\ty", "z\nw"], ["O", "B-PER"], ["O", "O"], 1)]
    write_conll(tmp_path / "t.conll", posts)
    back = read_conll(tmp_path / "t.conll")
    assert back == [TaggedPost("a b", ["x y", "z w"], ["O", "B-PER"], ["O", "O"], 1)]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("# id=1 images=1\nw\tO\tB-FOO\n", 2, "unknown tag 'B-FOO'"),
        ("# id=1 images=1\nw\tO\n", 2, "expected 'word<TAB>gold<TAB>pred'"),
        ("w\tO\tO\n", 1, "expected a post header"),
        ("# id=1 images=7\nw\tO\tO\n", 1, "expected a post header"),
        ("# id=1 images=1\n\n", 2, "blank line"),
    ],
)
def test_conll_errors_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=f"bad.conll:{line}: {message}"):
        read_conll(path)


def test_write_predictions_from_posts(tmp_path):
    posts = [
        Post("1", ["Kevin", "Durant"], ["B-PER", "I-PER"], [Path("a.jpg"), Path("b.jpg")], "f:1"),
        Post("2", ["NYC"], ["B-LOC"], [], "f:2"),
    ]
    report = write_predictions(tmp_path / "predictions", "test", posts, [["B-PER", "I-PER"], ["O"]])
    assert report["f1"] == pytest.approx(entity_scores([p.labels for p in posts], [["B-PER", "I-PER"], ["O"]])["f1"])
    assert [p.images for p in read_conll(tmp_path / "predictions" / "test.conll")] == [2, 0]
    assert (tmp_path / "predictions" / "test_report.json").is_file()
    assert 'missed      gold LOC "NYC"' in (tmp_path / "predictions" / "test_report.txt").read_text()
    with pytest.raises(ValueError, match="f:1: post 1 has 2 words but 1 predicted tags"):
        tagged_posts(posts, [["O"], ["O"]])


# --- paired approximate randomization -------------------------------------------------------------------------------


def counts_of(rng: np.random.Generator, n: int, quality: float) -> np.ndarray:
    """Per-post (TP, FP, FN) of a system that finds each of 3 gold entities with probability ``quality``."""
    tp = rng.binomial(3, quality, n)
    return np.stack([tp, rng.binomial(1, 1 - quality, n), 3 - tp], axis=1)


def test_identical_systems_give_p_one():
    a = counts_of(np.random.default_rng(0), 300, 0.6)
    result = paired_randomization(a, a.copy(), samples=500)
    assert result.p_value == 1.0 and result.difference == 0.0 and result.differing == 0


def test_clearly_better_system_gives_small_p():
    rng = np.random.default_rng(1)
    result = paired_randomization(counts_of(rng, 400, 0.9), counts_of(rng, 400, 0.5), samples=2000)
    assert result.difference > 0.2 and result.p_value == pytest.approx(1 / 2001)


def test_randomization_is_seeded_and_agrees_with_a_plain_loop():
    rng = np.random.default_rng(2)
    a, b = counts_of(rng, 200, 0.62), counts_of(rng, 200, 0.6)
    first = paired_randomization(a, b, samples=3000, seed=7)
    assert paired_randomization(a, b, samples=3000, seed=7) == first
    assert paired_randomization(a, b, samples=3000, seed=8).p_value != first.p_value
    f1 = lambda c: 2 * c[0] / (2 * c[0] + c[1] + c[2])  # noqa: E731
    assert first.f1_a == pytest.approx(f1(a.sum(0))) and first.f1_b == pytest.approx(f1(b.sum(0)))
    loop, r = random.Random(3), 3000
    hits = 0
    for _ in range(r):  # the textbook loop: swap each post with probability 1/2
        swap = np.array([loop.random() < 0.5 for _ in range(len(a))])
        aa, bb = np.where(swap[:, None], b, a).sum(0), np.where(swap[:, None], a, b).sum(0)
        hits += abs(f1(aa) - f1(bb)) >= abs(first.difference) - 1e-12
    assert 0.05 < first.p_value < 0.95  # a close call: the check below is informative
    assert first.p_value == pytest.approx((hits + 1) / (r + 1), abs=0.04)  # ~4 standard errors of two estimates


def test_randomization_rejects_mismatched_counts():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        paired_randomization(np.zeros((3, 3)), np.zeros((4, 3)))


def test_report_command_line(tmp_path, capsys):
    posts = random_posts(9, 20)
    write_conll(tmp_path / "test.conll", posts)
    main([str(tmp_path / "test.conll"), "--json", str(tmp_path / "r.json")])
    report = evaluation_report(posts)
    assert capsys.readouterr().out == format_report(report, str(tmp_path / "test.conll"))
    assert json.loads((tmp_path / "r.json").read_text())["f1"] == report["f1"]
    (tmp_path / "bad.conll").write_text("# id=1 images=1\nw\tO\n")
    with pytest.raises(SystemExit, match="bad.conll:2: expected"):
        main([str(tmp_path / "bad.conll")])

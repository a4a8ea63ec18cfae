from __future__ import annotations

import pytest

from tpm_fast.data.labels import (
    ENTITY_TYPES,
    ID2LABEL,
    LABEL2ID,
    LABELS,
    PAD_LABEL_ID,
    TYPE_ALIASES,
    X_ID,
    X_LABEL,
    normalize_label,
)


def test_label_order_is_the_authors():
    assert LABELS == ("O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "X")
    assert [LABEL2ID[t] for t in LABELS] == list(range(len(LABELS)))
    assert all(ID2LABEL[i] == t for i, t in enumerate(LABELS))
    assert LABELS[X_ID] == X_LABEL == "X"
    assert LABELS[PAD_LABEL_ID] == "O"


def test_aliases_cover_every_type():
    assert set(TYPE_ALIASES.values()) == set(ENTITY_TYPES)
    assert {k for k, v in TYPE_ALIASES.items() if v == "MISC"} == {"MIS", "MISC", "OTHER"}


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("O", "O"),
        ("B-OTHER", "B-MISC"),
        ("I-OTHER", "I-MISC"),
        ("B-MIS", "B-MISC"),
        ("I-MIS", "I-MISC"),
        ("B-MISC", "B-MISC"),
        ("I-MISC", "I-MISC"),
        ("B-PER", "B-PER"),
        ("I-PER", "I-PER"),
        ("B-LOC", "B-LOC"),
        ("I-LOC", "I-LOC"),
        ("B-ORG", "B-ORG"),
        ("I-ORG", "I-ORG"),
    ],
)
def test_normalize_label(tag, expected):
    out = normalize_label(tag)
    assert out == expected
    assert out in LABEL2ID and out != X_LABEL


@pytest.mark.parametrize(
    "tag", ["X", "", "B-", "-PER", "S-PER", "E-LOC", "b-per", "B-FOO", "O-PER", "PER", "B_PER", "o"]
)
def test_normalize_label_rejects(tag):
    with pytest.raises(ValueError, match="unknown label") as exc:
        normalize_label(tag)
    assert repr(tag) in str(exc.value)

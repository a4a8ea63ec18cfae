"""Label set of the NER tagger (authors' order) and normalization of the MISC spellings.

The entity type MISC is spelled ``MIS`` (MNER-MI), ``MISC`` (TWITTER-2017) and ``OTHER`` (TWITTER-2015);
internally it is always ``MISC``. ``X`` marks [CLS], [SEP] and every non-first word piece.
"""

from __future__ import annotations

LABELS: tuple[str, ...] = ("O", "B-MISC", "I-MISC", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "X")
"""All tag names; the index of a tag is its id (authors' order)."""

ENTITY_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")

TYPE_ALIASES: dict[str, str] = {
    "PER": "PER",
    "LOC": "LOC",
    "ORG": "ORG",
    "MISC": "MISC",
    "MIS": "MISC",
    "OTHER": "MISC",
}
"""Entity type spelling found in the data -> internal type name."""

LABEL2ID: dict[str, int] = {label: i for i, label in enumerate(LABELS)}
ID2LABEL: dict[int, str] = dict(enumerate(LABELS))

X_LABEL: str = "X"
X_ID: int = LABEL2ID[X_LABEL]
PAD_LABEL_ID: int = LABEL2ID["O"]
"""Label id written at padded positions; such positions always have mask False."""

ALLOWED_LABELS_TEXT: str = "O, or B-/I- followed by one of " + ", ".join(sorted(TYPE_ALIASES))


def normalize_label(tag: str) -> str:
    """Map a data tag to the internal tag name.

    Args:
        tag: a tag as written in the data, e.g. ``"B-OTHER"``, ``"I-MIS"``, ``"O"``.

    Returns:
        The internal name (``"B-MISC"``, ``"I-MISC"``, ``"O"``, ...), always a member of ``LABELS`` other than X.

    Raises:
        ValueError: ``unknown label 'tag'`` for anything else (X included: it never appears in the data).
    """
    if tag == "O":
        return "O"
    prefix, sep, etype = tag.partition("-")
    if sep and prefix in ("B", "I") and etype in TYPE_ALIASES:
        return f"{prefix}-{TYPE_ALIASES[etype]}"
    raise ValueError(f"unknown label {tag!r}")

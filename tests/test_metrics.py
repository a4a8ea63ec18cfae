"""First-piece word tags and seqeval entity scores."""

import pytest
import torch

from tpm_fast.data.labels import LABEL2ID, LABELS
from tpm_fast.metrics import entities, entity_scores, word_tags


def ids(*tags: str) -> list[int]:
    return [LABEL2ID[t] for t in tags]


def test_word_tags_keep_first_pieces_and_pad_truncated_words():
    # pieces: [CLS] w0 w1a w1b w2 [SEP] pad ; post 2 was truncated to 1 of its 3 words
    tags = torch.tensor([ids("X", "B-PER", "I-PER", "X", "O", "X", "O"), ids("X", "X", "X", "O", "O", "O", "O")])
    first = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = word_tags(tags, first, [3, 3], LABELS)
    assert out == [["B-PER", "I-PER", "O"], ["O", "O", "O"]]  # X on a first piece counts as O


@pytest.mark.parametrize("case", ["perfect", "half", "wrong_type"])
def test_entity_scores(case):
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-MISC"]]
    pred = {
        "perfect": gold,
        "half": [["B-PER", "I-PER", "O", "O"], ["O", "O"]],
        "wrong_type": [["B-ORG", "I-ORG", "O", "B-LOC"], ["O", "B-MISC"]],
    }[case]
    scores = entity_scores(gold, pred)
    expected = {"perfect": (1, 1), "half": (1, 1 / 3), "wrong_type": (2 / 3, 2 / 3)}[case]
    assert scores["precision"] == pytest.approx(expected[0])
    assert scores["recall"] == pytest.approx(expected[1])
    assert set(scores["per_type"]) >= {"PER", "LOC", "MISC"}


def test_entities_spans():
    words = ["Kevin", "Durant", "visits", "New", "York", "!"]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    assert entities(words, tags) == [
        {"type": "PER", "start": 0, "end": 2, "text": "Kevin Durant"},
        {"type": "LOC", "start": 3, "end": 5, "text": "New York"},
    ]

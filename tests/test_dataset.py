from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizer

from tpm_fast.data.dataset import MNERDataset, collate
from tpm_fast.data.feed import ImageFeed, PILImages, assemble
from tpm_fast.data.images import MAX_IMAGES, DataWarning, ImageLoader, ImageSpec, ImageStats
from tpm_fast.data.labels import LABEL2ID, X_ID
from tpm_fast.data.readers import DataFormatError, Post, read_mner_jsonl
from tpm_fast.data.text import encode_words

S = 16  # small images keep the tests fast
CPU = torch.device("cpu")


def _tokenizer() -> BertTokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "obama", "visit", "paris", "new", "york", "##s", "!"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def _jpeg(rng: np.random.Generator, mode: str = "RGB", w: int = 20, h: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(buf, "JPEG")
    return buf.getvalue()


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bad_input_corpus(root: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """Images folder with broken files and an MNER-MI file with one post per case, plus a malformed copy.

    Returns:
        (good JSON-lines file, file whose 3rd line is malformed JSON)
    """
    img = root / "images"
    img.mkdir()
    (img / "good.jpg").write_bytes(_jpeg(rng))
    (img / "trunc.jpg").write_bytes(_jpeg(rng)[:-2])  # missing FF D9: repaired
    (img / "png.jpg").write_bytes(_png(rng))  # PNG named .jpg: decoded by content
    (img / "cmyk.jpg").write_bytes(_jpeg(rng, "CMYK"))  # converted to RGB
    (img / "empty.jpg").write_bytes(b"")  # 0 bytes: empty slot
    (img / "garbage.jpg").write_bytes(b"\x00garbage" * 20)  # undecodable: empty slot
    for k in range(5):
        (img / f"five_{k}.jpg").write_bytes(_jpeg(rng))
    posts = [
        {"id": "a", "images": ["trunc.jpg", "missing.jpg", "png.jpg"]},
        {"id": "b", "images": ["empty.jpg", "cmyk.jpg"]},
        {"id": "c", "images": [f"five_{k}.jpg" for k in range(5)]},  # 5 images: keep 4
        {"id": "d", "images": []},
        {"id": "e", "images": ["garbage.jpg", "good.jpg"]},
    ]
    lines = [json.dumps({**p, "text": ["Obama", "visits", "Paris"], "label": ["B-PER", "O", "B-LOC"]}) for p in posts]
    good = root / "MNER-MI_train.txt"
    good.write_text("\n".join(lines) + "\n")
    bad = root / "bad.txt"
    bad.write_text("\n".join(lines[:2] + ['{"id": "f", "text": ["x"],'] + lines[2:]) + "\n")
    return good, bad


def test_bad_input_corpus(tmp_path):
    rng = np.random.default_rng(0)
    good, bad = _bad_input_corpus(tmp_path, rng)
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(bad))}:3: invalid JSON"):
        read_mner_jsonl(bad, tmp_path / "images")

    stats = ImageStats()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        posts = read_mner_jsonl(good, tmp_path / "images", stats=stats)
        ds = MNERDataset(posts, _tokenizer())
        loader = DataLoader(ds, batch_size=len(ds), collate_fn=ds.collate_fn)
        (batch,) = [b.tensors for b in ImageFeed(loader, PILImages(ImageSpec(size=S), threads=2), CPU, stats=stats)]
    assert [len(p.images) for p in posts] == [3, 2, 4, 0, 2]
    expected_mask = [
        [True, False, True, False],  # repaired, missing, PNG named .jpg
        [False, True, False, False],  # 0-byte, CMYK
        [True, True, True, True],  # first 4 of 5
        [False, False, False, False],  # no image
        [False, True, False, False],  # garbage, good
    ]
    assert batch["image_mask"].tolist() == expected_mask
    assert batch["image_post"].tolist() == [0, 0, 1, 2, 2, 2, 2, 4]
    assert batch["image_slot"].tolist() == [0, 2, 1, 0, 1, 2, 3, 1]
    assert batch["pixel_values"].shape == (8, 3, S, S)
    assert stats.as_dict() == {
        "ok": 7, "repaired": 1, "missing": 1, "undecodable": 1, "empty_file": 1, "converted": 1, "too_many": 1
    }  # fmt: skip
    msgs = sorted(str(w.message) for w in rec if issubclass(w.category, DataWarning))
    assert len(msgs) == 5  # too_many, repaired, missing, empty_file, undecodable
    assert any(m.startswith(f"{good}:3: post c has 5 images") for m in msgs)
    assert any(m.startswith(str((tmp_path / "images" / "missing.jpg").resolve())) for m in msgs)


def _posts(root: Path, rng: np.random.Generator, n_images: list[int], broken: set[tuple[int, int]]) -> list[Post]:
    posts = []
    for i, n in enumerate(n_images):
        paths = []
        for k in range(n):
            p = root / f"{i}_{k}.jpg"
            p.write_bytes(
                b"" if (i, k) in broken else _jpeg(rng, w=int(rng.integers(1, 30)), h=int(rng.integers(1, 30)))
            )
            paths.append(p)
        words = ["obama", "visits", "new", "york", "!"][: 1 + i % 5]
        labels = ["B-PER", "O", "B-LOC", "I-LOC", "O"][: len(words)]
        posts.append(Post(id=str(i), words=words, labels=labels, images=paths, source=f"f:{i + 1}"))
    return posts


@pytest.mark.parametrize("mode", ["text", "first", "multi"])
def test_image_modes(tmp_path, mode):
    rng = np.random.default_rng(1)
    n_images = [0, 1, 2, 4, 3, 1]
    broken = {(2, 0), (4, 1), (5, 0)}
    posts = _posts(tmp_path, rng, n_images, broken)
    ds = MNERDataset(posts, _tokenizer(), max_seq_length=16, image_mode=mode)
    items = [ds[i] for i in range(len(ds))]
    batch = assemble(collate(items, pad_id=0), PILImages(ImageSpec(size=S)), CPU)
    limit = {"text": 0, "first": 1, "multi": MAX_IMAGES}[mode]
    assert [e.kind for e in batch.events] == [
        "empty_file" if (i, k) in broken else "ok" for i, n in enumerate(n_images) for k in range(min(n, limit))
    ]
    batch = batch.tensors
    mask = torch.zeros(len(posts), MAX_IMAGES, dtype=torch.bool)
    for i, n in enumerate(n_images):
        for k in range(min(n, limit)):
            mask[i, k] = (i, k) not in broken
    assert torch.equal(batch["image_mask"], mask)
    n = int(mask.sum())
    assert batch["pixel_values"].shape == (n, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    assert batch["image_post"].dtype == batch["image_slot"].dtype == torch.long
    post_major = mask.nonzero()  # rows (post, slot) in post-major order
    assert batch["image_post"].tolist() == post_major[:, 0].tolist()
    assert batch["image_slot"].tolist() == post_major[:, 1].tolist()
    for j, (i, k) in enumerate(post_major.tolist()):  # each image is the one of its (post, slot)
        ref, _ = ImageLoader(ImageSpec(size=S)).load(posts[i].images[k])
        assert torch.equal(batch["pixel_values"][j], ref)
    assert batch["index"].tolist() == list(range(len(posts)))


def test_collate_text_fields_and_no_images(tmp_path):
    tok = _tokenizer()
    posts = [
        Post(id="1", words=["Obama", "visits", "Paris"], labels=["B-PER", "O", "B-LOC"], images=[], source="f:1"),
        Post(id="2", words=["york"], labels=None, images=[tmp_path / "nope.jpg"], source="f:2"),
    ]
    ds = MNERDataset(posts, tok, max_seq_length=8, image_mode="text")
    posts_batch = collate([ds[1], ds[0]], pad_id=tok.pad_token_id)
    assert posts_batch.image_paths == []  # text mode asks for no image
    batch = assemble(posts_batch, None, CPU).tensors
    assert batch["pixel_values"].shape == (0, 3, 224, 224)
    assert batch["image_post"].shape == batch["image_slot"].shape == (0,)
    assert not batch["image_mask"].any() and batch["image_mask"].shape == (2, MAX_IMAGES)
    assert batch["index"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[2, 9, 3, 0, 0, 0], [2, 5, 6, 10, 7, 3]]
    o, x = LABEL2ID["O"], X_ID
    assert batch["labels"].tolist() == [[x, x, x, o, o, o], [x, LABEL2ID["B-PER"], o, x, LABEL2ID["B-LOC"], x]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 6]
    assert batch["first_piece"].tolist() == [
        [False, True, False] + [False] * 3,
        [False, True, True, False, True, False],
    ]
    assert ds.encoded[0] == encode_words(posts[0].words, posts[0].labels, tok, 8)


def test_items_and_bad_mode(tmp_path):
    tok = _tokenizer()
    paths = [tmp_path / f"{k}.jpg" for k in range(6)]
    post = Post(id="1", words=["paris"], labels=["B-LOC"], images=paths[:4], source="f:1")
    ds = MNERDataset([post], tok)
    assert ds[0]["images"] == paths[:4] and ds[0]["index"] == 0
    assert MNERDataset([post], tok, image_mode="first")[0]["images"] == paths[:1]
    with pytest.raises(ValueError, match="unknown image_mode 'all'"):
        MNERDataset([post], tok, image_mode="all")


@pytest.mark.parametrize("max_seq_length,truncated", [(4, 2), (6, 1), (7, 0)])
def test_truncated_posts_are_counted(max_seq_length, truncated):
    words = [["obama", "visits", "paris"], ["new", "york", "!", "obama", "visits"], ["paris"]]  # 4, 6, 1 pieces
    posts = [Post(id=str(i), words=w, labels=["O"] * len(w), images=[], source=f"f:{i}") for i, w in enumerate(words)]
    ds = MNERDataset(posts, _tokenizer(), max_seq_length=max_seq_length, image_mode="text")
    assert ds.truncated == truncated
